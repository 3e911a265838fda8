"""Qwen2-VL (``Qwen2VLForConditionalGeneration``; also ShowUI): a ViT feeding a Qwen2 LM.

In transformers 5 the language model is ``model.model.language_model`` (a
``Qwen2VLTextModel`` with llama's decoder layer and M-RoPE) and the vision tower is
``model.model.visual``: ``blocks.N`` are pre-LayerNorm ViT blocks (``attn.qkv`` fused,
``attn.proj``, ``mlp.fc1``/``mlp.fc2`` with QuickGELU) and ``merger`` groups 2×2 patches
(``ln_q`` then ``mlp.0`` / GELU / ``mlp.2``). ``lm_head`` stays at the top level.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from common.core.errors import EdgeforgeError
from common.models.base import BlockSpec, ModelAdapter
from common.models.llama import LLAMA_DECODER_SPEC

QWEN2_VL_VISION_BLOCK_SPEC = BlockSpec(
    input_norm="norm1",
    post_attention_norm="norm2",
    attention="attn",
    mlp="mlp",
    linears={"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
)


class Qwen2VLAdapter(ModelAdapter):
    """``Qwen2VLForConditionalGeneration``: text side as qwen2, vision side as a plain ViT."""

    model_type = "qwen2_vl"
    is_vision_language = True
    language_model_path = "model.language_model"
    decoder_spec = LLAMA_DECODER_SPEC
    vision_tower_path = "model.visual"
    vision_block_spec = QWEN2_VL_VISION_BLOCK_SPEC
    #: The module whose ``get_rope_index`` lays out M-RoPE positions, and the processor
    #: outputs it reads.
    rope_index_path: ClassVar[str] = "model"
    rope_index_inputs: ClassVar[tuple[str, ...]] = (
        "input_ids",
        "mm_token_type_ids",
        "image_grid_thw",
        "video_grid_thw",
        "attention_mask",
    )

    @property
    def head_dim(self) -> int:
        """The VL attention always splits ``hidden_size`` evenly (it ignores ``head_dim``)."""
        return self.hidden_size // self.num_heads

    @property
    def mrope_section(self) -> tuple[int, ...]:
        """The rotary module's own split (what HF rotates with, defaults included), checked
        to cover the rotary half-dim: a wrong split would silently mis-rotate every head."""
        section = tuple(int(n) for n in getattr(self.rotary_embedding(), "mrope_section", ()))
        if len(section) != 3 or min(section) < 0 or 2 * sum(section) != self.head_dim:
            raise EdgeforgeError(
                f"{self.model_type}: text_config.rope_parameters.mrope_section {list(section)} "
                f"must be 3 sections summing to head_dim/2 = {self.head_dim // 2}"
            )
        return section

    def rope_index(self, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's own ``get_rope_index`` on processor ``inputs`` (text runs count up, vision
        tokens take (t, h, w) grid positions): positions ``[3, B, L]`` and the offset
        ``[B, 1]`` that decode positions add to the cache row."""
        if "input_ids" not in inputs or "mm_token_type_ids" not in inputs:
            raise EdgeforgeError(
                f"{self.model_type} rope index: the processor inputs need input_ids and "
                f"mm_token_type_ids (got {', '.join(sorted(inputs)) or 'nothing'})"
            )
        owner = self._module(self.rope_index_path)
        args = {k: inputs[k] for k in self.rope_index_inputs if inputs.get(k) is not None}
        with torch.no_grad():
            positions, deltas = owner.get_rope_index(**args)
        return positions, deltas

    @property
    def vision_hidden_size(self) -> int:
        """Vision block width: ``vision_config.embed_dim`` (its ``hidden_size`` is the
        merger's output width, i.e. the LM's)."""
        return int(self.config.vision_config.embed_dim)

    @property
    def vision_num_heads(self) -> int:
        return int(self.config.vision_config.num_heads)

"""Qwen2-VL (``Qwen2VLForConditionalGeneration``; also ShowUI): a ViT feeding a Qwen2 LM.

In transformers 5 the language model is ``model.model.language_model`` (a
``Qwen2VLTextModel`` with llama's decoder layer and M-RoPE) and the vision tower is
``model.model.visual``: ``blocks.N`` are pre-LayerNorm ViT blocks (``attn.qkv`` fused,
``attn.proj``, ``mlp.fc1``/``mlp.fc2`` with QuickGELU) and ``merger`` groups 2×2 patches
(``ln_q`` then ``mlp.0`` / GELU / ``mlp.2``). ``lm_head`` stays at the top level.
"""

from __future__ import annotations

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

    @property
    def head_dim(self) -> int:
        """The VL attention always splits ``hidden_size`` evenly (it ignores ``head_dim``)."""
        return self.hidden_size // self.num_heads

    @property
    def vision_hidden_size(self) -> int:
        """Vision block width: ``vision_config.embed_dim`` (its ``hidden_size`` is the
        merger's output width, i.e. the LM's)."""
        return int(self.config.vision_config.embed_dim)

    @property
    def vision_num_heads(self) -> int:
        return int(self.config.vision_config.num_heads)

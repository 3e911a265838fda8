"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``).

Same places as Qwen2-VL (``model.model.language_model``, ``model.model.visual``,
top-level ``lm_head``), but the vision blocks are RMSNorm + SwiGLU
(``mlp.gate_proj``/``up_proj``/``down_proj``, with biases), the merger's norm is an
RMSNorm, and most blocks use windowed attention (``fullatt_block_indexes`` are global).
"""

from __future__ import annotations

from common.models.base import BlockSpec
from common.models.qwen2_vl import Qwen2VLAdapter

QWEN2_5_VL_VISION_BLOCK_SPEC = BlockSpec(
    input_norm="norm1",
    post_attention_norm="norm2",
    attention="attn",
    mlp="mlp",
    linears={
        "qkv": "attn.qkv",
        "proj": "attn.proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
)


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """``Qwen2_5_VLForConditionalGeneration``: Qwen2-VL's layout with a SwiGLU ViT."""

    model_type = "qwen2_5_vl"
    vision_block_spec = QWEN2_5_VL_VISION_BLOCK_SPEC
    #: Video frames also space their temporal positions by ``second_per_grid_ts``.
    rope_index_inputs = (*Qwen2VLAdapter.rope_index_inputs, "second_per_grid_ts")

    @property
    def vision_hidden_size(self) -> int:
        """Vision block width: ``vision_config.hidden_size`` (``out_hidden_size`` is the
        merger's output width)."""
        return int(self.config.vision_config.hidden_size)

    @property
    def vision_window_attention(self) -> tuple[int, tuple[int, ...]]:
        """Window size in pixels and the blocks that attend globally (the rest use windows)."""
        vision = self.config.vision_config
        return int(vision.window_size), tuple(int(i) for i in vision.fullatt_block_indexes)

"""Llama (``LlamaForCausalLM``): the reference layout most text families share.

``model.model`` is the decoder stack, ``model.lm_head`` the output projection; each layer
is pre-norm attention (``self_attn.{q,k,v,o}_proj``) then a SwiGLU MLP
(``mlp.{gate,up,down}_proj``). SmolLM2 and other llama-format checkpoints load as this.
"""

from __future__ import annotations

from common.models.base import BlockSpec, ModelAdapter

#: The decoder layer of llama and every family that copied it (qwen2, the Qwen-VL text side).
LLAMA_DECODER_SPEC = BlockSpec(
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
    attention="self_attn",
    mlp="mlp",
    linears={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
)


class LlamaAdapter(ModelAdapter):
    """``LlamaForCausalLM``; q/k/v/o carry a bias only when ``attention_bias`` is set."""

    model_type = "llama"
    language_model_path = "model"
    decoder_spec = LLAMA_DECODER_SPEC

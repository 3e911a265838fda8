"""Qwen2 / Qwen2.5 / Qwen1.5 text models (``Qwen2ForCausalLM``).

The layout is llama's; the differences that matter downstream are in the weights, not the
paths: q/k/v always carry a bias (o does not), and small checkpoints tie the LM head to
the embedding. Stages read both from the live modules (``linear.bias``,
``adapter.tie_word_embeddings``), so the adapter only has to name the family.
"""

from __future__ import annotations

from common.models.llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    """``Qwen2ForCausalLM``: llama's paths, q/k/v biases."""

    model_type = "qwen2"

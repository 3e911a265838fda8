"""The float reference of a decode — greedy tokens, teacher-forced logits — one part at a time.

A target proves its compiled pieces generate what the float model generates by comparing
them with :func:`common.export.piece_export.reference_greedy` and ``reference_logits``,
which run the whole model: 29 GiB in float32 for a 7B checkpoint, more than the 16–32 GiB
machines users build on. The functions here compute the same two numbers over
:class:`~common.analysis.layerwise.Parts`, so only one part (the embedding, one decoder
layer, or the final norm and LM head) is in memory at a time.

Greedy decoding needs every layer again for each new token, since token ``t + 1`` is the
argmax after token ``t`` went through the whole stack. Each step therefore reads every
part once and runs only the new tokens through it (the prompt, then one token), while
the keys and values of earlier tokens stay in memory in one transformers
``DynamicCache`` shared by the layers — layers × tokens × 2 × KV heads × head dim
floats, at most 1 MiB per token (Qwen1.5-7B), against the 0.75 GiB of one of its layers.
Cost: ``max_new_tokens`` passes over the checkpoint (each reads the stored weights once
and converts them to float32), plus one for the teacher-forced logits; the compute is
that of Hugging Face's cached decode. Re-running the prefix instead would read the parts
as often and compute quadratically more.

Each step feeds the layers what the model's own forward does — the cache, the causal
mask built against it, positions after the cached tokens, the rotary tables — and the
head sees every position of the step, as ``lm_head(model(ids))`` does, so the tokens and
logits equal the whole-model reference bit for bit on tiny-qwen2 and SmolLM2 (tested).
Qwen1 (remote code, which predates transformers' Cache objects) keeps its own cache
instead: per layer the ``(key, value)`` tuple its block takes as ``layer_past`` and returns
grown, with the rotary tables its ``QWenModel.forward`` builds
(:func:`~common.models.streaming.qwen1_layer_kwargs`); tested equal to its whole-model
reference the same way. Text models with plain causal attention only:
:meth:`~common.models.streaming.StreamedModel.check_layerwise` refuses the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from common.analysis.layerwise import Parts, head
from common.models import DecoderLayer, ModelAdapter, QwenAdapter
from common.models.streaming import qwen1_layer_kwargs


def reference_greedy(
    parts: Parts, prompt: torch.Tensor, max_new_tokens: int, *, bar: tqdm | None = None
) -> list[int]:
    """Hugging Face's greedy tokens for ``prompt`` ``[1, L]``, exactly ``max_new_tokens`` of
    them (EOS neither stops nor is suppressed, as in the whole-model reference); ``bar``
    advances once per token."""
    cache = _new_cache(parts.adapter)
    tokens: list[int] = []
    step = prompt
    with torch.inference_mode():
        while len(tokens) < max_new_tokens:
            tokens.append(int(_forward(parts, step, cache)[0, -1].argmax()))
            step = torch.tensor([[tokens[-1]]], dtype=prompt.dtype)
            if bar is not None:
                bar.update(1)
    return tokens


def reference_logits(parts: Parts, prompt: torch.Tensor, tokens: Sequence[int]) -> np.ndarray:
    """The logits ``[n, V]`` that predicted each of ``tokens`` after ``prompt`` ``[1, L]``:
    one teacher-forced pass over the prompt and all but the last token, as the
    whole-model ``reference_logits`` runs it (into a fresh cache, as the forward of a
    config with ``use_cache`` does)."""
    ids = torch.cat([prompt, torch.tensor([list(tokens)], dtype=prompt.dtype)], dim=1)
    cache = _new_cache(parts.adapter)
    with torch.inference_mode():
        logits = _forward(parts, ids[:, :-1], cache)
    return logits[0, prompt.shape[1] - 1 :].float().numpy()


class _LayerCache(Protocol):
    """The keys and values of the tokens so far, as a family's decoder stack keeps them."""

    def layer_kwargs(self, adapter: ModelAdapter, hidden: torch.Tensor) -> dict[str, Any]:
        """What the stack hands every layer for ``hidden`` ``[1, n, H]`` following the
        cached tokens; built before any layer appends, as the stack builds them."""

    def run(
        self, layer: DecoderLayer, hidden: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """``layer``'s output for ``hidden``, its new keys and values kept."""


def _new_cache(adapter: ModelAdapter) -> _LayerCache:
    """An empty cache of the kind ``adapter``'s model keeps."""
    return _Qwen1Cache(adapter) if isinstance(adapter, QwenAdapter) else _TransformersCache(adapter)


def _forward(parts: Parts, ids: torch.Tensor, cache: _LayerCache) -> torch.Tensor:
    """Logits ``[1, n, V]`` of the tokens ``ids`` ``[1, n]`` following those in ``cache``,
    each part read for its turn; every layer appends its keys and values to ``cache``."""
    with parts.embedding() as embed:
        hidden = embed(ids)
    kwargs = cache.layer_kwargs(parts.adapter, hidden)
    for layer in parts.adapter.layers():
        with parts.layer(layer):
            hidden = cache.run(layer, hidden, kwargs)
    with head(parts) as logits:
        return logits(hidden)


class _TransformersCache:
    """One transformers ``DynamicCache`` shared by the layers, which append to it."""

    def __init__(self, adapter: ModelAdapter) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=adapter.text_config)

    def layer_kwargs(self, adapter: ModelAdapter, hidden: torch.Tensor) -> dict[str, Any]:
        """Positions after the cached tokens, the causal mask built against the cache, the
        rotary tables, and the cache itself; only config and buffers are read, so a model
        on meta will do."""
        from transformers.masking_utils import create_causal_mask

        position_ids = (torch.arange(hidden.shape[1]) + self.cache.get_seq_length())[None]
        mask = create_causal_mask(
            config=adapter.text_config,
            inputs_embeds=hidden,
            attention_mask=None,
            past_key_values=self.cache,
            position_ids=position_ids,
        )
        return {
            "attention_mask": mask,
            "position_embeddings": adapter.rotary_embedding()(hidden, position_ids=position_ids),
            "position_ids": position_ids,
            "past_key_values": self.cache,
            "use_cache": True,
        }

    def run(
        self, layer: DecoderLayer, hidden: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        return layer.module(hidden, **kwargs)


class _Qwen1Cache:
    """Qwen1's own cache: per layer the ``(key, value)`` tuple ``[1, T, H, D]`` its block
    takes as ``layer_past`` and returns grown as ``present``, as ``QWenModel.forward``
    carries it from step to step."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.past: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * adapter.num_layers

    def layer_kwargs(self, adapter: ModelAdapter, hidden: torch.Tensor) -> dict[str, Any]:
        cached = 0 if self.past[0] is None else self.past[0][0].shape[1]
        return qwen1_layer_kwargs(adapter, hidden.shape[1], cached, use_cache=True)

    def run(
        self, layer: DecoderLayer, hidden: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        out = layer.module(hidden, **{**kwargs, "layer_past": self.past[layer.index]})
        self.past[layer.index] = out[1]
        return out[0]

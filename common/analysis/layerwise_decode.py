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

A vision-language prompt (:class:`VisualPrompt`) is the processor's inputs plus the vision
tower's merged tokens, computed first with the tower read alone (:func:`vision_features`)
or taken from another runtime (the exported vision ONNX); they replace the placeholder
rows after the embedding, and the prompt's M-RoPE positions (``get_rope_index``) and its
decode offset take the place of the 1-D count, as Qwen2-VL/Qwen2.5-VL's forward does:
``generate``'s tokens and the prompt logits, bit for bit (tested on both tiny models,
image and video).

Qwen1 (remote code, which predates transformers' Cache objects) keeps its own cache
instead: per layer the ``(key, value)`` tuple its block takes as ``layer_past`` and returns
grown, with the rotary tables its ``QWenModel.forward`` builds
(:func:`~common.models.streaming.qwen1_layer_kwargs`); tested equal to its whole-model
reference the same way. Plain causal attention only:
:meth:`~common.models.streaming.StreamedModel.check_layerwise` refuses the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from common.analysis.layerwise import Group, Parts, head
from common.core.errors import EdgeforgeError
from common.models import DecoderLayer, ModelAdapter, QwenAdapter
from common.models.streaming import (
    layer_kwargs,
    qwen1_layer_kwargs,
    transformers_layer_kwargs,
)


@dataclass(frozen=True)
class VisualPrompt:
    """A vision-language prompt as the language model sees it: the processor's ``inputs``
    (``input_ids``, the grids, ``mm_token_type_ids``) and the vision tower's merged tokens
    for each kind of placeholder they hold (``{"image": [n, H]}`` or ``"video"``): from
    the PyTorch tower (:func:`vision_features`) or another runtime (the exported ONNX)."""

    inputs: Mapping[str, Any]
    features: Mapping[str, torch.Tensor]


def vision_features(tower: nn.Module, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The vision ``tower``'s merged tokens for the pictures in processor ``inputs``, as
    ``get_image_features``/``get_video_features`` compute them (read the tower with
    :meth:`~common.analysis.layerwise.Parts.vision_tower`)."""
    pixels = {"image": ("pixel_values", "image_grid_thw"),
              "video": ("pixel_values_videos", "video_grid_thw")}  # fmt: skip
    features: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for kind, (values, grid) in pixels.items():
            if inputs.get(values) is not None:
                out = tower(inputs[values].to(torch.float32), grid_thw=inputs[grid])
                features[kind] = out.pooler_output
    return features


def reference_greedy(
    parts: Parts,
    prompt: torch.Tensor | VisualPrompt,
    max_new_tokens: int,
    *,
    bar: tqdm | None = None,
) -> list[int]:
    """Hugging Face's greedy tokens for ``prompt`` (ids ``[1, L]``, or a
    :class:`VisualPrompt`), exactly ``max_new_tokens`` of them (EOS neither stops nor is
    suppressed, as in the whole-model reference); ``bar`` advances once per token."""
    cache = _new_cache(parts.adapter)
    tokens: list[int] = []
    step = _Step.first(parts.adapter, prompt)
    with torch.inference_mode():
        while len(tokens) < max_new_tokens:
            tokens.append(int(_forward(parts, step, cache)[0, -1].argmax()))
            step = step.next(tokens[-1])
            if bar is not None:
                bar.update(1)
    return tokens


def reference_logits(
    parts: Parts, prompt: torch.Tensor | VisualPrompt, tokens: Sequence[int]
) -> np.ndarray:
    """The logits ``[n, V]`` that predicted each of ``tokens`` after ``prompt`` (ids
    ``[1, L]`` or a :class:`VisualPrompt`): one teacher-forced pass over the prompt and
    all but the last token, as the whole-model ``reference_logits`` runs it (into a fresh
    cache, as the forward of a config with ``use_cache`` does). With no ``tokens``, the
    logits over the whole prompt ``[L, V]`` (as ``model(**inputs).logits[0]``)."""
    first = _Step.first(parts.adapter, prompt)
    length = first.ids.shape[1]
    step = first.extended(list(tokens)[:-1]) if tokens else first
    cache = _new_cache(parts.adapter)
    with torch.inference_mode():
        logits = _forward(parts, step, cache)
    return logits[0, length - 1 if tokens else 0 :].float().numpy()


@dataclass(frozen=True)
class _Step:
    """The tokens one forward feeds (``ids`` ``[1, n]``), what replaces their vision
    placeholders, and their rotary positions (None: the text model's 1-D count after the
    cache; else M-RoPE rows ``[3, 1, n]``, with ``delta`` what decode positions add)."""

    ids: torch.Tensor
    features: Mapping[str, torch.Tensor]
    positions: torch.Tensor | None
    delta: torch.Tensor | None

    @classmethod
    def first(cls, adapter: ModelAdapter, prompt: torch.Tensor | VisualPrompt) -> _Step:
        if isinstance(prompt, torch.Tensor):
            return cls(prompt, {}, None, None)
        if adapter.mrope_section is None:  # for a VL model: checks its split, naming it
            raise EdgeforgeError(f"{adapter.model_type} is a text model: it takes no pictures")
        positions, delta = adapter.rope_index(prompt.inputs)
        return cls(prompt.inputs["input_ids"], prompt.features, positions, delta)

    def extended(self, tokens: list[int]) -> _Step:
        """This step with ``tokens`` appended (text tokens: positions count on)."""
        ids = torch.cat([self.ids, torch.tensor([tokens], dtype=self.ids.dtype)], dim=1)
        if self.positions is None or not tokens:
            return _Step(ids, self.features, self.positions, self.delta)
        after = self.positions.amax() + 1 + torch.arange(len(tokens))
        added = after.view(1, 1, -1).expand(3, 1, -1)
        return _Step(ids, self.features, torch.cat([self.positions, added], -1), self.delta)

    def next(self, token: int) -> _Step:
        """The step that feeds ``token`` after this one's tokens went into the cache."""
        return _Step(torch.tensor([[token]], dtype=self.ids.dtype), {}, None, self.delta)


def _forward(parts: Parts, step: _Step, cache: _LayerCache) -> torch.Tensor:
    """Logits ``[1, n, V]`` of ``step``'s tokens following those in ``cache``, each part
    read for its turn; every layer appends its keys and values to ``cache``."""
    with parts.embedding() as embed:
        hidden = _embedded(parts.adapter, embed, step)
    kwargs = cache.layer_kwargs(parts.adapter, hidden, step)
    for layer in parts.adapter.layers():
        with parts.layer(layer):
            hidden = cache.run(layer, hidden, kwargs)
    with head(parts) as logits:
        return logits(hidden)


def prompt_group(adapter: ModelAdapter, embed: nn.Module, prompt: VisualPrompt) -> Group:
    """A vision-language prompt as :func:`~common.analysis.layerwise.run_groups` runs it
    beside text windows: embedded by ``embed`` with its vision features in place, and its
    M-RoPE positions, without a cache (a forward with ``use_cache=False``)."""
    step = _Step.first(adapter, prompt)
    hidden = _embedded(adapter, embed, step)
    return hidden, layer_kwargs(adapter, hidden, step.positions)


def _embedded(adapter: ModelAdapter, embed: nn.Module, step: _Step) -> torch.Tensor:
    """``step``'s tokens embedded, vision placeholders replaced by their features."""
    hidden = embed(step.ids)
    for kind, features in step.features.items():
        hidden = _scatter(adapter, step.ids, hidden, kind, features)
    return hidden


def _scatter(
    adapter: ModelAdapter,
    ids: torch.Tensor,
    hidden: torch.Tensor,
    kind: str,
    features: torch.Tensor,
) -> torch.Tensor:
    """``hidden`` with the ``kind`` placeholders' rows replaced by ``features`` in order,
    as the model's ``masked_scatter`` does; a count or width that differs is named."""
    token = getattr(adapter.config, f"{kind}_token_id")
    mask = ids == token
    if int(mask.sum()) != features.shape[0] or features.shape[-1] != hidden.shape[-1]:
        raise EdgeforgeError(
            f"the prompt has {int(mask.sum())} {kind} placeholder tokens of width "
            f"{hidden.shape[-1]} but the vision features are {tuple(features.shape)}"
        )
    return hidden.masked_scatter(mask[..., None].expand_as(hidden), features.to(hidden.dtype))


class _LayerCache(Protocol):
    """The keys and values of the tokens so far, as a family's decoder stack keeps them."""

    def layer_kwargs(
        self, adapter: ModelAdapter, hidden: torch.Tensor, step: _Step
    ) -> dict[str, Any]:
        """What the stack hands every layer for ``hidden`` ``[1, n, H]`` (``step``'s
        tokens) following the cached tokens; built before any layer appends, as the stack
        builds them."""

    def run(
        self, layer: DecoderLayer, hidden: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """``layer``'s output for ``hidden``, its new keys and values kept."""


def _new_cache(adapter: ModelAdapter) -> _LayerCache:
    """An empty cache of the kind ``adapter``'s model keeps."""
    return _Qwen1Cache(adapter) if isinstance(adapter, QwenAdapter) else _TransformersCache(adapter)


class _TransformersCache:
    """One transformers ``DynamicCache`` shared by the layers, which append to it."""

    def __init__(self, adapter: ModelAdapter) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=adapter.text_config)

    def layer_kwargs(
        self, adapter: ModelAdapter, hidden: torch.Tensor, step: _Step
    ) -> dict[str, Any]:
        """Positions after the cached tokens (M-RoPE rows for a vision-language model: the
        prompt's grid positions, then the cache row plus the prompt's offset), the causal
        mask built against the cache, the rotary tables, and the cache itself."""
        offset = step.delta if step.delta is not None else 0
        return transformers_layer_kwargs(
            adapter, hidden, step.positions, cache=self.cache, mrope_offset=offset
        )

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

    def layer_kwargs(
        self, adapter: ModelAdapter, hidden: torch.Tensor, step: _Step
    ) -> dict[str, Any]:
        cached = 0 if self.past[0] is None else self.past[0][0].shape[1]
        return qwen1_layer_kwargs(adapter, hidden.shape[1], cached, use_cache=True)

    def run(
        self, layer: DecoderLayer, hidden: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        out = layer.module(hidden, **{**kwargs, "layer_past": self.past[layer.index]})
        self.past[layer.index] = out[1]
        return out[0]

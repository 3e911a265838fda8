"""Run token windows through a streamed model one part at a time.

:class:`~common.models.streaming.StreamedModel` holds one part in memory; this module
drives it over a batch of windows: the embedding turns every window into hidden states,
then each decoder layer is read (and transformed, e.g. rotated), runs every window (batch
1, as a whole-model forward does) and is released before the next, and finally the norm
and LM head turn hidden states into logits, one window at a time. Peak memory is one
part plus ``windows × seq × hidden`` floats (64 MiB for 16 windows of 512 tokens at hidden
2048), so profiling, verification and evaluation of a 7B model fit a 16 GiB machine.
The modules, inputs and causal mask are those of the whole-model forward, so every number
equals its whole-model counterpart bit for bit (tested).

Forward hooks registered on the (meta) modules stay in place across load and release;
:class:`Cursor` tells a hook which window is running.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from common.core.errors import EdgeforgeError
from common.models import DecoderLayer, ModelAdapter
from common.models.streaming import StreamedModel, layer_kwargs
from common.quant.transforms import Transforms


@dataclass
class Cursor:
    """The window a layer (or the head) is running now, for hooks that keep per-window
    records; -1 outside a run."""

    window: int = -1


class Parts:
    """A model's parts as a step uses them: each materialized (and transformed) for a
    ``with`` block and released after it.

    Over a :class:`~common.models.streaming.StreamedModel` each block reads its part from
    the checkpoint; over a whole model already in memory (``streamed`` None, transformed
    once up front) the blocks only hand out the modules, so one step's code serves both.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        streamed: StreamedModel | None = None,
        transforms: Transforms | None = None,
        after: tuple[Callable[[nn.Module], None], ...] = (),
    ) -> None:
        self.adapter, self.streamed = adapter, streamed
        self.transforms = transforms or Transforms()
        self.after = after

    def then(self, step: Callable[[nn.Module], None]) -> Parts:
        """These parts with ``step`` run on each module handed out (the embedding, a
        decoder layer's module, the final norm, the LM head), after the transforms: a
        change of weights, such as fake quantization, that a streamed part must get each
        time it is read. Over a whole model it runs at each hand-out too, so a step meant
        for one pass (one :func:`run_layers`) must be one."""
        return Parts(self.adapter, self.streamed, self.transforms, (*self.after, step))

    def _finish(self, *modules: nn.Module) -> None:
        for module in modules:
            for step in self.after:
                step(module)

    @contextmanager
    def embedding(self) -> Iterator[nn.Module]:
        module = self.adapter.embed_tokens()
        if self.streamed is None:
            self._finish(module)
            yield module
            return
        with self.streamed.loaded(module, self.adapter.name_of("embed_tokens")):
            self.transforms.embedding(self.adapter)
            self._finish(module)
            yield module

    @contextmanager
    def layer(self, layer: DecoderLayer) -> Iterator[DecoderLayer]:
        if self.streamed is None:
            self._finish(layer.module)
            yield layer
            return
        with self.streamed.loaded(layer.module, layer.name):
            handle = self.transforms.layer(self.adapter, layer)
            try:
                self._finish(layer.module)
                yield layer
            finally:
                if handle is not None:
                    handle.remove()

    @contextmanager
    def vision_tower(self) -> Iterator[nn.Module]:
        """A vision-language model's vision tower (patch embedding, blocks, merger), read
        whole: its largest part is a fraction of the language model's, and its export and
        checks run it as one module. Of the transforms, the rotation reaches its merger's
        output (it writes into the stream); steps apply to the language model only."""
        tower = self.adapter.vision_tower()
        if tower is None:
            raise EdgeforgeError(f"{self.adapter.model_type} is a text model: no vision tower")
        if self.streamed is None:
            yield tower
            return
        with self.streamed.loaded(tower, self.adapter.name_of("vision_tower")):
            self.transforms.vision_tower(self.adapter)
            yield tower

    @contextmanager
    def head(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        """The final norm and the LM head."""
        adapter = self.adapter
        norm, lm_head = adapter.final_norm(), adapter.lm_head()
        if self.streamed is None:
            self._finish(norm, lm_head)
            yield norm, lm_head
            return
        with (
            self.streamed.loaded(norm, adapter.name_of("final_norm")),
            self.streamed.loaded(lm_head, adapter.lm_head_path),
        ):
            self.transforms.head(adapter)
            self._finish(norm, lm_head)
            yield norm, lm_head


#: Sequences of one length as the decoder stack runs them: hidden states ``[n, L, H]`` and
#: what the stack hands every layer for them (:func:`~common.models.streaming.layer_kwargs`).
Group = tuple[torch.Tensor, dict[str, Any]]


def run_groups(
    parts: Parts,
    embed: Callable[[nn.Module], list[Group]],
    *,
    cursor: Cursor | None = None,
    bar: tqdm | None = None,
) -> list[torch.Tensor]:
    """The hidden states after the last decoder layer (before the final norm) of each
    group that ``embed`` makes with the embedding module (read once for them all): each
    layer is read once and runs every group's sequences in turn, one at a time (``cursor``
    counts them across groups); ``bar`` advances by each sequence's tokens per layer."""
    cursor = cursor or Cursor()
    with torch.inference_mode():
        with parts.embedding() as module:
            groups = embed(module)
        for layer in parts.adapter.layers():
            with parts.layer(layer):
                cursor.window = -1
                for g, (hidden, kwargs) in enumerate(groups):
                    out = torch.empty_like(hidden)
                    for i in range(hidden.shape[0]):
                        cursor.window += 1
                        out[i] = layer.module(hidden[i : i + 1], **kwargs)[0]
                        if bar is not None:
                            bar.update(hidden.shape[1])
                    groups[g] = (out, kwargs)
    cursor.window = -1
    return [hidden for hidden, _ in groups]


def run_layers(
    parts: Parts,
    windows: torch.Tensor,
    *,
    cursor: Cursor | None = None,
    bar: tqdm | None = None,
) -> torch.Tensor:
    """The hidden states ``[n, seq, hidden]`` after the last decoder layer (before the
    final norm) of every window of ``windows`` ``[n, seq]``, each part read (and
    transformed) by ``parts`` for its turn; ``bar`` advances by each window's tokens per
    layer."""

    def text(embedding: nn.Module) -> list[Group]:
        return [text_group(parts.adapter, embedding, windows)]

    return run_groups(parts, text, cursor=cursor, bar=bar)[0]


def text_group(adapter: ModelAdapter, embedding: nn.Module, windows: torch.Tensor) -> Group:
    """Token windows ``[n, seq]`` as :func:`run_groups` runs them: embedded, with what the
    stack hands every layer for text (a vision-language model's M-RoPE rows count the
    tokens in all three)."""
    hidden = embedding(windows)
    return hidden, layer_kwargs(adapter, hidden)


@contextmanager
def head(parts: Parts) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """The final norm and LM head, read (and transformed) for the block, as one function
    of ``[1, seq, hidden]`` hidden states to ``[1, seq, vocab]`` logits."""
    with parts.head() as (norm, lm_head), torch.inference_mode():
        yield lambda hidden: lm_head(norm(hidden))


def window_logits(parts: Parts, windows: torch.Tensor) -> Iterator[torch.Tensor]:
    """Float32 logits ``[seq, vocab]`` of each window of ``windows`` ``[n, seq]``, in order:
    the layers run first (:func:`run_layers`), then the head, one window at a time, so
    one window's logits are in memory at once."""
    hidden = run_layers(parts, windows)
    with head(parts) as logits_of:
        for i in range(hidden.shape[0]):
            yield logits_of(hidden[i : i + 1])[0].float()

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

import torch
from tqdm import tqdm

from common.models.streaming import StreamedModel
from common.quant.transforms import Transforms


@dataclass
class Cursor:
    """The window a layer (or the head) is running now, for hooks that keep per-window
    records; -1 outside a run."""

    window: int = -1


def run_layers(
    streamed: StreamedModel,
    windows: torch.Tensor,
    *,
    transforms: Transforms | None = None,
    cursor: Cursor | None = None,
    bar: tqdm | None = None,
) -> torch.Tensor:
    """The hidden states ``[n, seq, hidden]`` after the last decoder layer (before the
    final norm) of every window of ``windows`` ``[n, seq]``, each part transformed by
    ``transforms`` as it is read; ``bar`` advances by each window's tokens per layer."""
    adapter = streamed.adapter
    transforms = transforms or Transforms()
    cursor = cursor or Cursor()
    with torch.inference_mode():
        with streamed.loaded(adapter.embed_tokens(), adapter.name_of("embed_tokens")) as embed:
            transforms.embedding(adapter)
            hidden = embed(windows)
        layer_kwargs = streamed.layer_kwargs(hidden)
        for layer in adapter.layers():
            with streamed.loaded(layer.module, layer.name):
                handle = transforms.layer(adapter, layer)
                out = torch.empty_like(hidden)
                for i in range(hidden.shape[0]):
                    cursor.window = i
                    out[i] = layer.module(hidden[i : i + 1], **layer_kwargs)[0]
                    if bar is not None:
                        bar.update(windows.shape[1])
                hidden = out
                if handle is not None:
                    handle.remove()
    cursor.window = -1
    return hidden


@contextmanager
def head(
    streamed: StreamedModel, transforms: Transforms | None = None
) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """The final norm and LM head, read (and transformed) for the block, as one function
    of ``[1, seq, hidden]`` hidden states to ``[1, seq, vocab]`` logits."""
    adapter = streamed.adapter
    norm, lm_head = adapter.final_norm(), adapter.lm_head()
    with (
        streamed.loaded(norm, adapter.name_of("final_norm")),
        streamed.loaded(lm_head, adapter.lm_head_path),
        torch.inference_mode(),
    ):
        (transforms or Transforms()).head(adapter)
        yield lambda hidden: lm_head(norm(hidden))

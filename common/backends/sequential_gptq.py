"""GPTQ over a whole language model, one decoder layer at a time (bounded memory).

The calibration windows are embedded once; then each decoder layer runs on them as the
prefill piece :mod:`common.models.static_decoder` defines (so the statistics are those of the graph
that ships), its linears' input Hessians are gathered, its weights rounded by
:func:`common.quant.gptq.gptq_levels`, and the layer is run again *with those weights* to give
the next layer its input — each layer corrects for the rounding already done before it,
as ``llm-compressor``'s sequential pipeline does. Only one layer's Hessians and the
windows' hidden states are held at a time. The model's own weights are left float (the
levels are returned), so float pieces and golden outputs can still be taken from it.

Cost, per layer: two forward passes, the float64 Hessian sums and the rounding. Linears
that read the very same tensor (q/k/v the normed hidden states, gate/up the post-attention
ones) share one Hessian: the same sums, computed once, 4 a layer rather than 7 (43 rather
than 55 M multiply-adds a token at Qwen1.5-1.8B's layer). The first pass stops at the last
linear's input: ``down_proj``'s product and the residual after it, and for the LM head the
whole vocabulary projection, feed no Hessian. ``bench/gptq_bench.py`` times the parts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from common.analysis.layerwise import Parts
from common.core.errors import EdgeforgeError
from common.core.progress import progress as progress_bar
from common.export import piece_export as pe
from common.models import ModelAdapter
from common.models.static_decoder import BlockPiece, piece_dims, rotary_table
from common.quant.gptq import HessianObserver, gptq_levels
from common.quant.int8 import dequantize_weight

#: ``name -> (levels [out, in] int8, scale [out, 1])``.
Levels = dict[str, tuple[torch.Tensor, torch.Tensor]]


class _AllRead(Exception):
    """Every hooked linear has read its input: the rest of the pass feeds no Hessian."""


class _InputHessians:
    """Input Hessians of named linears over passes of a forward that calls each linear once,
    one :class:`HessianObserver` per distinct input.

    A linear whose input is the very tensor (``is``) another linear read earlier in the pass
    shares that linear's observer: the same sums, computed once. Every pass must share alike.
    A pass stops at the last linear's input (:class:`_AllRead`, as ``llm-compressor`` stops
    its calibration forwards), skipping what comes after it.
    """

    def __init__(self, linears: dict[str, nn.Linear]):
        self._names = list(linears)
        self._observers: dict[str, HessianObserver] = {}
        self._owner: dict[str, str] = {}  # linear -> the linear whose observer sums its input
        self._read: dict[str, torch.Tensor] = {}  # this pass: linear -> its input
        self._hooks = [
            m.register_forward_pre_hook(lambda _m, args, n=n: self._see(n, args[0]))
            for n, m in linears.items()
        ]

    def _see(self, name: str, x: torch.Tensor) -> None:
        owner = next((self._owner[n] for n, seen in self._read.items() if seen is x), name)
        if self._owner.setdefault(name, owner) != owner:
            raise EdgeforgeError(f"GPTQ: {name} shares its input unlike in the first pass")
        if owner == name:
            if name not in self._observers:
                self._observers[name] = HessianObserver(x.shape[-1])
            self._observers[name].observe(x)
        self._read[name] = x
        if len(self._read) == len(self._names):
            raise _AllRead

    def forward(self, run: Callable[[_Rows], torch.Tensor], rows: _Rows) -> None:
        """One pass of ``run(rows)``, up to the last linear's input."""
        try:
            with contextlib.suppress(_AllRead):
                run(rows)
        finally:
            self._read.clear()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def hessians(self) -> dict[str, torch.Tensor]:
        """``name -> H``, read once (the sums are let go); linears sharing an input share
        one tensor."""
        missing = [name for name in self._names if name not in self._owner]
        if missing:
            raise EdgeforgeError(f"GPTQ: {missing[0]} saw no calibration rows")
        owned = {owner: self._observers.pop(owner).hessian() for owner in set(self._owner.values())}
        return {name: owned[owner] for name, owner in self._owner.items()}


@dataclass(frozen=True)
class _Rows:
    """One calibration sequence at a layer's input: hidden states ``[1, L, H]`` and the
    prefill block's positions and causal mask for them."""

    hidden: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, hidden: torch.Tensor, feeds: dict[str, Any]) -> _Rows:
        positions = torch.from_numpy(feeds["position_ids"]).long()
        return cls(hidden, positions, torch.from_numpy(feeds["attention_mask"]))


def _round_and_run(
    linears: dict[str, nn.Linear],
    run: Callable[[_Rows], torch.Tensor],
    hidden: list[_Rows],
    bits: int,
    levels: Levels,
    *,
    group_size: int | None = None,
    scales: str = "absmax",
    propagate: bool = True,
) -> list[_Rows]:
    """Gather Hessians of ``linears`` over ``run(rows)`` for every sequence (``run`` calls
    each linear once), round them into ``levels``, and (``propagate``) return the sequences
    with ``run``'s output, the rounded weights in place; the float weights are put back
    either way."""
    gathered = _InputHessians(linears)
    try:
        with torch.no_grad():
            for rows in hidden:
                gathered.forward(run, rows)
    finally:
        gathered.remove()
    hessians = gathered.hessians()
    for name, linear in linears.items():
        levels[name] = gptq_levels(
            linear.weight, hessians[name], bits, group_size=group_size, scales=scales
        )
    if not propagate:  # no rounded copy of the weights (the LM head: the largest part)
        return []
    originals = {}
    for name, linear in linears.items():
        originals[name] = linear.weight.data
        linear.weight.data = dequantize_weight(*levels[name]).to(linear.weight.dtype)
    try:
        with torch.no_grad():
            return [replace(rows, hidden=run(rows)) for rows in hidden]
    finally:
        for name, linear in linears.items():
            linear.weight.data = originals[name]


def sequential_gptq(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    bits: int,
    *,
    group_size: int | None = None,
    scales: str = "absmax",
    progress: bool = True,
    parts: Parts | None = None,
    pictures: Sequence[pe.MultimodalPrompt] = (),
) -> Levels:
    """GPTQ levels of every decoder linear and the LM head, from ``windows`` ``[N, S]``
    (token ids, each a full causal sequence from position 0) and, for a vision-language
    model, ``pictures``: prompts whose vision embeddings replace their placeholder rows,
    at their M-RoPE positions (the statistics of what the deployed model reads). ``parts``
    reads a streamed model's parts one at a time (:class:`~common.analysis.layerwise.Parts`);
    ``group_size``: one scale per that many input columns (block-quantized weights);
    ``scales``: how each scale is chosen (:func:`common.quant.int8.weight_scale`)."""
    seq_len = max([windows.shape[1], *(len(p.token_ids) for p in pictures)])
    dims = piece_dims(adapter, seq_len)
    cos, sin = rotary_table(adapter, seq_len)
    text = pe.prefill_inputs(windows[0].tolist(), windows.shape[1], dims.rope_rows)
    parts = parts or Parts(adapter)
    with torch.no_grad(), parts.embedding() as embed:
        hidden = [_Rows.of(embed(w[None].long()), text) for w in windows]
        for picture in pictures:
            ids, length = list(picture.token_ids), len(picture.token_ids)
            rows = torch.from_numpy(picture.spliced(embed(torch.tensor([ids])).numpy()))
            feeds = pe.prefill_inputs(ids, length, dims.rope_rows, picture.positions)
            hidden.append(_Rows.of(rows, feeds))
    levels: Levels = {}
    layers = adapter.layers()
    for layer in progress_bar(layers, desc="gptq", enabled=progress):
        with parts.layer(layer):
            block = BlockPiece(layer, dims, cos, sin)
            linears = {layer.linear_names[r]: m for r, m in layer.linears.items()}
            hidden = _round_and_run(
                linears, lambda r, b=block: b(r.hidden, r.positions, r.mask)[0], hidden, bits,
                levels, group_size=group_size, scales=scales,
            )  # fmt: skip
    with parts.head() as (norm, head):
        _round_and_run(
            {adapter.lm_head_path: head}, lambda r: head(norm(r.hidden)), hidden, bits, levels,
            group_size=group_size, scales=scales, propagate=False,
        )  # fmt: skip
    return levels

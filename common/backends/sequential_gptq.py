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
from collections.abc import Callable

import torch
from torch import nn

from common.analysis.layerwise import Parts
from common.core.errors import EdgeforgeError
from common.core.progress import progress as progress_bar
from common.export import piece_export as pe
from common.models import ModelAdapter
from common.models.static_decoder import BlockPiece, piece_dims, rotary_table
from common.quant.gptq import HessianObserver, gptq_levels
from common.quant.int8 import dequantize

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

    def forward(self, run: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> None:
        """One pass of ``run(h)``, up to the last linear's input."""
        try:
            with contextlib.suppress(_AllRead):
                run(h)
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


def _round_and_run(
    linears: dict[str, nn.Linear],
    run: Callable[[torch.Tensor], torch.Tensor],
    hidden: list[torch.Tensor],
    bits: int,
    levels: Levels,
    *,
    propagate: bool = True,
) -> list[torch.Tensor]:
    """Gather Hessians of ``linears`` over ``run(h)`` for every ``h`` (``run`` calls each
    linear once), round them into ``levels``, and (``propagate``) return ``run(h)`` with the
    rounded weights; the float weights are put back either way."""
    gathered = _InputHessians(linears)
    try:
        with torch.no_grad():
            for h in hidden:
                gathered.forward(run, h)
    finally:
        gathered.remove()
    hessians = gathered.hessians()
    for name, linear in linears.items():
        levels[name] = gptq_levels(linear.weight, hessians[name], bits)
    if not propagate:  # no rounded copy of the weights (the LM head: the largest part)
        return []
    originals = {}
    for name, linear in linears.items():
        originals[name] = linear.weight.data
        linear.weight.data = dequantize(*levels[name]).to(linear.weight.dtype)
    try:
        with torch.no_grad():
            return [run(h) for h in hidden]
    finally:
        for name, linear in linears.items():
            linear.weight.data = originals[name]


def sequential_gptq(
    adapter: ModelAdapter,
    windows: torch.Tensor,
    bits: int,
    *,
    progress: bool = True,
    parts: Parts | None = None,
) -> Levels:
    """GPTQ levels of every decoder linear and the LM head, from ``windows`` ``[N, S]``
    (token ids, each a full causal sequence from position 0). ``parts`` reads a streamed
    model's parts one at a time (:class:`~common.analysis.layerwise.Parts`)."""
    seq_len = windows.shape[1]
    dims = piece_dims(adapter, seq_len)
    cos, sin = rotary_table(adapter, seq_len)
    fixed = pe.prefill_inputs(windows[0].tolist(), seq_len)
    positions = torch.from_numpy(fixed["position_ids"]).long()
    mask = torch.from_numpy(fixed["attention_mask"])
    parts = parts or Parts(adapter)
    with torch.no_grad(), parts.embedding() as embed:
        hidden = [embed(w[None].long()) for w in windows]
    levels: Levels = {}
    layers = adapter.layers()
    for layer in progress_bar(layers, desc="gptq", enabled=progress):
        with parts.layer(layer):
            block = BlockPiece(layer, dims, cos, sin)
            linears = {layer.linear_names[r]: m for r, m in layer.linears.items()}
            hidden = _round_and_run(
                linears, lambda h, b=block: b(h, positions, mask)[0], hidden, bits, levels
            )
    with parts.head() as (norm, head):
        _round_and_run(
            {adapter.lm_head_path: head}, lambda h: head(norm(h)), hidden, bits, levels,
            propagate=False,
        )  # fmt: skip
    return levels

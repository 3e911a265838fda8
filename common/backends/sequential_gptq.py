"""GPTQ over a whole language model, one decoder layer at a time (bounded memory).

The calibration windows are embedded once; then each decoder layer runs on them as the
prefill piece :mod:`common.models.static_decoder` defines (so the statistics are those of the graph
that ships), its linears' input Hessians are gathered, its weights rounded by
:func:`common.quant.gptq.gptq_levels`, and the layer is run again *with those weights* to give
the next layer its input — each layer corrects for the rounding already done before it,
as ``llm-compressor``'s sequential pipeline does. Only one layer's Hessians and the
windows' hidden states are held at a time. The model's own weights are left float (the
levels are returned), so float pieces and golden outputs can still be taken from it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from common.export import piece_export as pe
from common.models import ModelAdapter
from common.models.static_decoder import BlockPiece, piece_dims, rotary_table
from common.quant.gptq import HessianObserver, gptq_levels
from common.quant.int8 import dequantize

#: ``name -> (levels [out, in] int8, scale [out, 1])``.
Levels = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _observe(linears: dict[str, nn.Linear]) -> tuple[dict[str, HessianObserver], list]:
    observers = {n: HessianObserver(m.in_features) for n, m in linears.items()}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, o=observers[n]: o.observe(args[0]))
        for n, m in linears.items()
    ]
    return observers, hooks


def _round_and_run(
    linears: dict[str, nn.Linear],
    run: Callable[[torch.Tensor], torch.Tensor],
    hidden: list[torch.Tensor],
    bits: int,
    levels: Levels,
    *,
    propagate: bool = True,
) -> list[torch.Tensor]:
    """Gather Hessians of ``linears`` over ``run(h)`` for every ``h``, round them into
    ``levels``, and (``propagate``) return ``run(h)`` with the rounded weights; the float
    weights are put back either way."""
    observers, hooks = _observe(linears)
    try:
        with torch.no_grad():
            for h in hidden:
                run(h)
    finally:
        for hook in hooks:
            hook.remove()
    originals = {}
    for name, linear in linears.items():
        levels[name] = gptq_levels(linear.weight, observers[name].hessian(), bits)
        originals[name] = linear.weight.data
        linear.weight.data = dequantize(*levels[name]).to(linear.weight.dtype)
    try:
        with torch.no_grad():
            return [run(h) for h in hidden] if propagate else []
    finally:
        for name, linear in linears.items():
            linear.weight.data = originals[name]


def sequential_gptq(
    adapter: ModelAdapter, windows: torch.Tensor, bits: int, *, progress: bool = True
) -> Levels:
    """GPTQ levels of every decoder linear and the LM head, from ``windows`` ``[N, S]``
    (token ids, each a full causal sequence from position 0)."""
    seq_len = windows.shape[1]
    dims = piece_dims(adapter, seq_len)
    cos, sin = rotary_table(adapter, seq_len)
    fixed = pe.prefill_inputs(windows[0].tolist(), seq_len)
    positions = torch.from_numpy(fixed["position_ids"]).long()
    mask = torch.from_numpy(fixed["attention_mask"])
    with torch.no_grad():
        hidden = [adapter.embed_tokens()(w[None].long()) for w in windows]
    levels: Levels = {}
    layers = adapter.layers()
    for layer in tqdm(layers, desc="gptq", disable=not progress):
        block = BlockPiece(layer, dims, cos, sin)
        linears = {layer.linear_names[r]: m for r, m in layer.linears.items()}
        hidden = _round_and_run(
            linears, lambda h, b=block: b(h, positions, mask)[0], hidden, bits, levels
        )
    norm, head = adapter.final_norm(), adapter.lm_head()
    _round_and_run(
        {adapter.lm_head_path: head}, lambda h: head(norm(h)), hidden, bits, levels, propagate=False
    )
    return levels

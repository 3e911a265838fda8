"""Online Hadamard transform of the down_proj input (QuaRot's R4), on the live model.

The residual-stream rotation cannot reach the MLP's inner activation, where the attention
sink's massive values live (3000 against ~10 in SmolLM2 layer 11). With an orthogonal
``Q``, ``y = x Wᵀ = (x Q)(W Q)ᵀ``: the weight gets ``Q`` folded in offline and the
activation is multiplied by ``Q`` at run time (one extra fixed matmul, which an exporter
must emit — the quant plan records it). ``Q = H / √n`` with ``H`` the exact Hadamard
matrix of :mod:`common.quant.hadamard`, so it needs no seed (1536 = 12·128, 2048 = 2^11, …).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from common.models import DecoderLayer, ModelAdapter
from common.quant.hadamard import hadamard_factorization, hadamard_matrix

ROLE = "down"


@functools.lru_cache(maxsize=4)
def online_matrix(n: int) -> torch.Tensor:
    """The orthogonal ``H / √n`` (float64) applied to a down_proj input of width ``n``.

    Built once per width and shared by every layer: callers must not modify it.
    """
    return torch.from_numpy(hadamard_matrix(n).astype(np.float64)) / n**0.5


def describe(n: int) -> dict[str, Any]:
    """How an exporter rebuilds the matrix: exact Hadamard of order ``n`` = K·2^m, ÷√n."""
    k, power = hadamard_factorization(n) or (None, None)
    return {
        "kind": "hadamard",
        "size": n,
        "base_order": k,
        "power_of_two": power,
        "scale": "1/sqrt(n)",
    }


def online_hadamard_layer(layer: DecoderLayer) -> tuple[dict[str, Any], RemovableHandle]:
    """Fold ``Q`` into ``layer``'s down_proj weight and transform its input at run time.

    Returns the layer's plan entry (keyed by the linear's name) and the pre-hook's handle.
    Needs only this layer, so a streamed model transforms each layer as it is read. The
    hook goes before any pre-hook already there: it is part of the layer's function, so
    a fake-quant hook registered on the (streamed) module before the layer was read must
    still see the transformed activation.
    """
    linear: nn.Linear = layer.linears[ROLE]
    n = linear.in_features
    q = online_matrix(n)
    with torch.no_grad():
        linear.weight.copy_((linear.weight.double() @ q).to(linear.weight.dtype))
    q_run = q.to(linear.weight.dtype)
    handle = linear.register_forward_pre_hook(
        lambda _m, args, q=q_run: (args[0] @ q,), prepend=True
    )
    return {layer.linear_names[ROLE]: describe(n)}, handle


def apply_online_hadamard(adapter: ModelAdapter) -> tuple[dict[str, Any], list[RemovableHandle]]:
    """:func:`online_hadamard_layer` on every decoder layer of a whole model.

    Returns the per-linear plan entries and the hook handles (the model computes the same
    function as before, up to float32 rounding). The pre-hooks run first, so observers and
    fake-quant hooks see the transformed activation.
    """
    entries: dict[str, Any] = {}
    handles: list[RemovableHandle] = []
    for layer in adapter.layers():
        entry, handle = online_hadamard_layer(layer)
        entries.update(entry)
        handles.append(handle)
    return entries, handles

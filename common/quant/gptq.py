"""GPTQ weight rounding (Frantar et al., 2022) on :mod:`common.quant.int8`'s grid.

Round-to-nearest treats every weight alone. GPTQ rounds a linear's input columns one at a
time and moves each column's rounding error onto the columns not yet rounded, weighted by
the inverse of ``H = 2/n · Σ x xᵀ`` over the layer's real inputs, so the *output* error
``‖X Wᵀ − X Qᵀ‖`` shrinks rather than the weight error. The grid stays exactly the one
the rest of the project uses (symmetric, one scale per output channel over its abs-max,
or per group of input columns of it, zero point 0): only the choice of level per weight
changes, so a runtime sees ordinary per-channel int8 (or int4, or block-quantized int4)
weights.

Why here: on SmolLM2-135M, int8 per-channel RTN weights alone cost ~3-5 % top-1 agreement
with the float model (0.967 plain, 0.954 after the residual rotation, over 2048 held-out
tokens); GPTQ gave 0.972 / 0.977, which is what lets ``w8a16`` clear its 0.95 gate with
margin once 16-bit activations add their own loss.

Speed: the column loop is :func:`_round_block`, one numba call per block of columns that
does the tensor form's float32 operations one by one, in the same order and without FMA,
so the levels are the plain torch loop's bit for bit (``tests/test_gptq.py`` keeps that loop
as the reference). The torch loop cost ~6 tensor ops a column, each a Python call and an
OpenMP parallel region whose barrier, on a busy 2-core machine, waits for whichever thread
the scheduler parked: at Qwen1.5-1.8B's layer (17 792 columns) rounding took 72-210 s under
load against 17-23 s now, and 10 s against 6 s on a quiet machine (``bench/gptq_bench.py``).
What is left is LAPACK's float64 Cholesky factorisation and inverse, which the bit-for-bit
promise fixes as they are.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from common.core.errors import EdgeforgeError
from common.quant.int8 import qmax, weight_scale

#: Columns rounded per lazy batch update (the paper's B; only speed depends on it).
BLOCK = 128
#: Dampening added to H's diagonal, as a fraction of its mean (the paper's λ).
DAMP = 0.01
#: Output channels (rows) are independent in GPTQ, so a matrix larger than this in float32
#: is rounded a slice of rows at a time: the reordered copy and its error update are held
#: for one slice. Only LM heads are that large (Qwen1.5-1.8B's: 151 936 x 2048, 1.16 GiB,
#: held four times over before); every layer's linear is one slice.
ROW_SLICE_BYTES = 256 * 2**20
#: Fewest rows a slice holds: the error update of fewer than 4 rows takes another BLAS path
#: whose sums round differently (measured: 13 of 60 000 levels moved at 1-3 rows, none at
#: 4 and more), so slices are kept well above it and round as the whole matrix does.
MIN_SLICE_ROWS = 64


class HessianObserver:
    """Accumulates ``Σ x xᵀ`` over the rows of one linear's input; :meth:`hessian` is
    ``2/n`` times it. One contract: :meth:`observe` every batch, then read it once."""

    def __init__(self, in_features: int):
        self.in_features = in_features
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.rows = 0

    def observe(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, self.in_features).to(torch.float64)
        self._sum.addmm_(rows.T, rows)
        self.rows += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise EdgeforgeError("GPTQ: a linear saw no calibration rows")
        return self._sum * (2.0 / self.rows)


@numba.njit(cache=True)
def _round_block(
    w: np.ndarray,
    inv: np.ndarray,
    scale: np.ndarray,
    start: int,
    lo: np.float32,
    hi: np.float32,
    levels: np.ndarray,
    errors: np.ndarray,
) -> None:
    """Round columns ``start : start + B`` of ``w`` ``[out, in]`` (float32, in place) into
    ``levels`` (int8, same shape) on the steps ``scale`` ``[out, in]`` (each weight's, in
    ``w``'s column order), ``B = len(inv)``, ``inv`` that block of the upper
    Cholesky factor of ``H⁻¹`` (C-contiguous); each column's scaled error goes into
    ``errors`` ``[out, B]`` and onto the block's later columns.

    The same float32 operations, one by one, as the tensor form ``q = round(w[:, i] / s)``,
    ``e = (w[:, i] − q·s) / inv[i, i]``, ``w[:, i+1:] −= e · inv[i, i+1:]``: rows are
    independent, so each row runs through the block alone. No FMA contraction (numba's
    default), so products and differences round as torch's do.
    """
    size = inv.shape[0]
    for r in range(w.shape[0]):
        row = w[r, start : start + size]
        steps = scale[r, start : start + size]
        for i in range(size):
            x, s = row[i], steps[i]
            q = min(max(np.rint(x / s), lo), hi)
            levels[r, start + i] = np.int8(q)
            e = (x - q * s) / inv[i, i]
            errors[r, i] = e
            # Slices from 0: indices that cannot be negative, so the loop vectorises.
            rest, coefficients = row[i + 1 :], inv[i, i + 1 :]
            for j in range(rest.shape[0]):
                rest[j] -= e * coefficients[j]


def gptq_levels(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 8,
    *,
    group_size: int | None = None,
    scales: str = "absmax",
    block: int = BLOCK,
    damp: float = DAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(levels [out, in] int8, scale)`` of a float ``[out, in]`` weight: ``scale`` is
    ``[out, 1]``, or with ``group_size`` one step per group of that many consecutive input
    columns, ``[out, in / group_size]`` (the block scales of QNN's block-quantized int4).

    Columns are visited in order of decreasing ``H`` diagonal (the inputs with the most
    energy first, "act order"). The scales are fixed up front from the float weight, so
    the order cannot change a group's step ("static groups"). An input that never fired
    (zero diagonal) gets a unit diagonal: its column is rounded to nearest and passes no
    error on. CPU tensors; ``hessian`` is not modified.
    """
    columns = weight.shape[1]
    if hessian.shape != (columns, columns):
        raise EdgeforgeError(
            f"GPTQ: Hessian {tuple(hessian.shape)} does not match the weight's "
            f"{columns} input columns"
        )
    granularity = "group" if group_size else "per_channel"
    scale = weight_scale(weight, granularity, bits, group_size, scales)
    h = hessian.to(torch.float64)
    diag = torch.diagonal(h).clone()
    diag[diag == 0] = 1.0
    order = torch.argsort(diag, descending=True, stable=True)
    h = h[order[:, None], order]
    torch.diagonal(h).copy_(diag[order])  # with its zeros made 1
    # λ·mean(diag) added to the diagonal in place: the sums of ``h + λ·I`` without an
    # [in, in] identity (an off-diagonal −0.0 would stay −0.0 rather than become +0.0;
    # Hessians from HessianObserver have none).
    torch.diagonal(h).add_(damp * torch.diagonal(h).mean())
    try:
        h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
        h_inv = h_inv.float()
    except RuntimeError:
        raise EdgeforgeError(
            "GPTQ: the input Hessian is not positive definite even after dampening; "
            "calibrate on more tokens"
        ) from None
    levels = torch.empty(weight.shape, dtype=torch.int8)
    lo, hi = np.float32(-qmax(bits) - 1), np.float32(qmax(bits))
    rows = max(MIN_SLICE_ROWS, ROW_SLICE_BYTES // (4 * columns))
    for first in range(0, weight.shape[0], rows):
        last = min(first + rows, weight.shape[0])
        w = weight[first:last].detach().float()[:, order]  # indexing copies: weight untouched
        if group_size:  # each column's group step, in the visiting order (one gather)
            steps = scale[first:last][:, order // group_size].numpy()
        else:  # one step a row, seen by every column (a view, no copy)
            steps = np.broadcast_to(scale[first:last].numpy(), (last - first, columns))
        for start in range(0, columns, block):
            stop = min(start + block, columns)
            errors = torch.empty(w.shape[0], stop - start)
            inv = h_inv[start:stop, start:stop].contiguous()
            _round_block(
                w.numpy(),
                inv.numpy(),
                steps,
                start,
                lo,
                hi,
                levels[first:last].numpy(),
                errors.numpy(),
            )
            w[:, stop:] -= errors @ h_inv[start:stop, stop:]
    return levels[:, torch.argsort(order)], scale

"""Round-to-nearest (RTN) weight-only quantization: the baseline every smarter rounding must beat.

Weights are split into groups of ``group_size`` consecutive input channels per output row;
each group gets its own scale (and, asymmetric, zero point) from its min/max, and every
weight is rounded to the nearest grid point. Nothing is tuned, so the result is a function
of the weights alone.

The grid is the one AutoRound stores (``auto_round.data_type.int``): symmetric uses the
signed extreme of the group, so the larger-magnitude side maps exactly onto ``-2^(b-1)`` and
the codes span ``[-2^(b-1), 2^(b-1) - 1]``; asymmetric maps ``[min, max]`` (widened to
include 0) onto ``[0, 2^b - 1]`` with a rounded integer zero point. Scales are rounded to
the stored scale dtype (fp16) before use, as in the exported checkpoint. With the same
grid, "AutoRound vs RTN" isolates the rounding decision, which is what the comparison is
meant to measure.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from common.core.errors import EdgeforgeError

#: Bit widths the integer grids here (and the exported formats) support.
SUPPORTED_BITS = (2, 3, 4, 8)

#: Smallest scale magnitude: an all-zero group would otherwise divide by zero.
_MIN_SCALE = 1e-5


def check_group_size(in_features: int, group_size: int, what: str) -> None:
    """``group_size`` must be -1 (one group per row) or a positive divisor of ``in_features``.

    A non-dividing group is padded by the quantizer, and the exported checkpoint then fails
    to load (or loads into a fake layer); catching it here costs nothing.
    """
    if group_size == -1:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise EdgeforgeError(f"group_size must be -1 or a positive integer, got {group_size!r}")
    if in_features % group_size:
        raise EdgeforgeError(
            f"group_size {group_size} does not divide {what} (in_features {in_features}); "
            "pick a divisor of every quantized layer's input width, e.g. 32 or 64"
        )


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` → ``[out * in / g, g]`` (one row per group)."""
    out_features, in_features = weight.shape
    size = in_features if group_size == -1 else group_size
    return weight.reshape(out_features * (in_features // size), size)


def quantize_groups(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes, scales and zero points of ``weight`` ``[out, in]``.

    Returns ``(codes [out, in] int32, scale [groups, 1] float32, zero [groups, 1] float32)``
    with ``dequant = (codes - zero) * scale`` per group (``zero`` is 0 for symmetric).
    """
    if bits not in SUPPORTED_BITS:
        raise EdgeforgeError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if weight.ndim != 2 or not weight.dtype.is_floating_point:
        raise EdgeforgeError(
            f"RTN expects a floating [out, in] weight, got {weight.dtype} {list(weight.shape)}"
        )
    check_group_size(weight.shape[1], group_size, "the weight")
    groups = _grouped(weight.detach().float(), group_size)
    low = groups.min(dim=1, keepdim=True).values.clamp(max=0)
    high = groups.max(dim=1, keepdim=True).values.clamp(min=0)
    if sym:
        half = 2 ** (bits - 1)
        signed_max = torch.where(high >= -low, high, low)  # the larger-magnitude extreme
        scale = (-signed_max / half).to(scale_dtype).float()  # maps it onto -2^(b-1)
        scale = torch.where(scale < 0, scale.clamp(max=-_MIN_SCALE), scale.clamp(min=_MIN_SCALE))
        zero = torch.zeros_like(scale)
        codes = torch.clamp(torch.round(groups / scale), -half, half - 1)
    else:
        top = 2**bits - 1
        scale = ((high - low) / top).to(scale_dtype).float().clamp(min=_MIN_SCALE)
        zero = torch.round(-low / scale)
        codes = torch.clamp(torch.round(groups / scale) + zero, 0, top)
    return codes.reshape(weight.shape).to(torch.int32), scale, zero


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """``weight`` rounded to its RTN grid and dequantized, same shape and dtype."""
    codes, scale, zero = quantize_groups(weight, bits, group_size, sym)
    grouped = _grouped(codes.float(), group_size)
    return ((grouped - zero) * scale).reshape(weight.shape).to(weight.dtype)


def apply_rtn(
    linears: Iterable[tuple[str, nn.Linear]], bits: int, group_size: int, sym: bool
) -> list[str]:
    """Replace each named Linear's weight by its RTN fake-quantized copy, in place.

    Every layer is checked before any is changed, so a bad ``group_size`` leaves the model
    untouched. Returns the names quantized, in order.
    """
    chosen = list(linears)
    for name, linear in chosen:
        check_group_size(linear.in_features, group_size, name)
    with torch.no_grad():
        for _, linear in chosen:
            linear.weight.copy_(fake_quantize(linear.weight, bits, group_size, sym))
    return [name for name, _ in chosen]

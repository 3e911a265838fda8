"""Symmetric integer quantization as pure functions: the math every exporter and the
simulator share, so the fake-quant model and an exported artifact round identically.

Conventions (those of mllm's QNN convertor): symmetric, zero-point 0, scale =
``max(range, 1e-5) / (2^(bits−1) − 1)``, round half to even (``torch.round``), saturate
to ``[−2^(bits−1), 2^(bits−1) − 1]`` when a tensor is *clipped*. A *no-clip* (shadow)
tensor keeps the values beyond its range: on the device they saturate and the CPU shadow
op recomputes what saturated (:func:`shadow_input_correction`), so the sum equals the
unclamped grid value.

One deliberate difference from the seed: activation ranges here are ``max |x|`` (and the
99.9th percentile of ``|x|``), where mllm's profiler used the *signed* maximum, so a
tensor whose large values are negative got a range that saturated them. The seed-compatible
signed numbers are still written to the profile JSON (``ori``/``top_0_1``).
"""

from __future__ import annotations

import torch

from common.core.errors import EdgeforgeError
from common.quant.schemes import SCALE_RULES

#: Smallest range a scale is computed from (mllm's guard against all-zero tensors).
MIN_RANGE = 1e-5
WEIGHT_GRANULARITIES = ("per_channel", "per_tensor", "group")
#: The clips an ``mse`` scale is chosen among, 1.0 down to 0.5 in steps of 0.025 (1.0: the
#: abs-max grid itself, so the chosen one never rounds worse). SmolLM2, int4 groups of 32
#: by GPTQ, fake-quantized: perplexity ratio to float 1.168 with abs-max scales, 1.096
#: with 1.0..0.7 in steps of 0.05, 1.047 with these (top-1 0.786 → 0.807, 0.808).
MSE_RATIOS = tuple(1.0 - 0.025 * step for step in range(21))
#: Storage dtype per bit width; int4 levels (``[-8, 7]``) are held in int8 and packed
#: only by the file format that ships them (e.g. ONNX ``INT4`` for QNN ``w4a16``).
_INT_DTYPES = {4: torch.int8, 8: torch.int8, 16: torch.int16, 32: torch.int32}


def qmax(bits: int) -> int:
    """Largest positive level of a signed ``bits``-bit integer (127 for int8, 7 for int4)."""
    if bits not in _INT_DTYPES:
        raise EdgeforgeError(f"bits: expected 4, 8, 16 or 32, got {bits!r}")
    return 2 ** (bits - 1) - 1


def symmetric_scale(value_range: torch.Tensor | float, bits: int = 8) -> torch.Tensor:
    """``max(range, 1e-5) / qmax(bits)``: the step of a symmetric grid covering ``range``."""
    rng = torch.as_tensor(value_range, dtype=torch.float32)
    return rng.clamp(min=MIN_RANGE) / qmax(bits)


def quantize(
    x: torch.Tensor, scale: torch.Tensor | float, bits: int = 8, *, clip: bool = True
) -> torch.Tensor:
    """Integer levels ``round(x / scale)``; saturated to the ``bits`` range when ``clip``.

    Returns the ``bits``-wide integer dtype when clipped; unclipped levels can exceed it,
    so they come back as int64.
    """
    q = torch.round(x / torch.as_tensor(scale, dtype=x.dtype))
    if clip:
        return q.clamp_(-qmax(bits) - 1, qmax(bits)).to(_INT_DTYPES[bits])
    return q.to(torch.int64)


def dequantize(q: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Float values of integer levels ``q`` with step ``scale``."""
    return q.to(torch.float32) * torch.as_tensor(scale, dtype=torch.float32)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor | float, bits: int = 8, *, clip: bool = True
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype, without materialising integers."""
    s = torch.as_tensor(scale, dtype=x.dtype)
    q = torch.round(x / s)
    if clip:
        q = q.clamp_(-qmax(bits) - 1, qmax(bits))
    return q * s


def weight_scale(
    weight: torch.Tensor,
    granularity: str = "per_channel",
    bits: int = 8,
    group_size: int | None = None,
    rule: str = "absmax",
) -> torch.Tensor:
    """Scale of a ``[out, in]`` weight on the ``bits`` grid: one per output row
    (``[out, 1]``), one for the tensor (``[]``), or one per ``group_size`` consecutive input
    columns of a row (``group``: ``[out, in / group_size]``, the block scales of QNN's
    block-quantized int4 and of GPTQ's groups), chosen by ``rule``: over the row's/group's
    abs-max, or (``mse``) the one of :data:`MSE_RATIOS` times that abs-max whose rounding
    leaves the least squared error in the row/group — a few large weights clipped for a
    finer step on the rest."""
    _check_rule(rule, granularity)
    scale = _absmax_scale(weight, granularity, bits, group_size)
    if rule == "mse":
        rows = zip(weight.detach().split(WEIGHT_ROWS), scale.split(WEIGHT_ROWS), strict=True)
        scale = torch.cat([_least_error_scale(w, s, bits) for w, s in rows])
    return scale


def _check_rule(rule: str, granularity: str) -> None:
    """``rule`` is a known scale rule, and ``mse`` is asked of rows or groups only."""
    if rule not in SCALE_RULES:
        raise EdgeforgeError(f"weight scale rule {rule!r} is not one of {', '.join(SCALE_RULES)}")
    if rule == "mse" and granularity == "per_tensor":
        raise EdgeforgeError("weight scale rule mse: per row or per group only")


def _least_error_scale(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Per row/group of ``weight`` (its abs-max ``scale`` ``[rows, groups]``), the clip of
    :data:`MSE_RATIOS` whose rounding error (squared, summed) is least; ties keep the
    larger step."""
    rows, groups = scale.shape
    blocks = weight.float().reshape(rows, groups, -1)
    best, best_error = scale, None
    for ratio in MSE_RATIOS:
        step = scale * ratio
        error = (fake_quantize(blocks, step[..., None], bits) - blocks).square().sum(-1)
        if best_error is None:
            best, best_error = step, error
            continue
        better = error < best_error
        best, best_error = torch.where(better, step, best), torch.where(better, error, best_error)
    return best


def _absmax_scale(
    weight: torch.Tensor, granularity: str, bits: int, group_size: int | None
) -> torch.Tensor:
    if granularity == "per_channel":
        return symmetric_scale(weight.detach().abs().amax(dim=1, keepdim=True).float(), bits)
    if granularity == "per_tensor":
        return symmetric_scale(weight.detach().abs().max().float(), bits)
    if granularity == "group":
        rows, columns = weight.shape
        if not group_size or columns % group_size:
            raise EdgeforgeError(
                f"weight groups: group_size {group_size!r} does not divide the "
                f"{columns} input columns"
            )
        blocks = weight.detach().reshape(rows, columns // group_size, group_size)
        return symmetric_scale(blocks.abs().amax(dim=2).float(), bits)
    raise EdgeforgeError(
        f"weight granularity: {granularity!r} is not one of {', '.join(WEIGHT_GRANULARITIES)}"
    )


def column_scales(scale: torch.Tensor, columns: int) -> torch.Tensor:
    """Each weight's own step, ``[out, columns]``, from a per-row ``[out, 1]`` or a
    per-group ``[out, groups]`` scale (groups of ``columns / groups`` consecutive columns)."""
    return scale.repeat_interleave(columns // scale.shape[1], dim=1)


#: Rows of a weight :func:`quantize_weight` rounds at a time.
WEIGHT_ROWS = 4096


def quantize_weight(
    weight: torch.Tensor,
    granularity: str = "per_channel",
    bits: int = 8,
    group_size: int | None = None,
    rule: str = "absmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(levels [out, in], float32 scale)`` on the ``bits`` grid (int8 storage for 4 and 8
    bits); the scale has shape ``[out, 1]``, ``[]`` or, per group, ``[out, groups]``, chosen
    by ``rule`` (:func:`weight_scale`).

    :data:`WEIGHT_ROWS` rows at a time, into one int8 result: every step is elementwise
    or a per-row/whole maximum, so the values are those of one pass, while the float
    temporaries stay a chunk's (one pass over a vocab-wide LM head held 2.7x its float32
    weights, 3.4 GiB at Qwen1.5-1.8B)."""
    _check_rule(rule, granularity)  # the per-tensor scale below is not weight_scale's
    rows = weight.detach().split(WEIGHT_ROWS)
    if granularity == "per_tensor":
        scale = symmetric_scale(torch.stack([r.abs().max() for r in rows]).max().float(), bits)
        scales = [scale] * len(rows)
    else:
        scales = [weight_scale(r, granularity, bits, group_size, rule) for r in rows]
        scale = torch.cat(scales)
    if granularity == "group":  # each weight divided by its own group's step
        scales = [column_scales(s, weight.shape[1]) for s in scales]
    levels = [quantize(r.float(), s, bits) for r, s in zip(rows, scales, strict=True)]
    return torch.cat(levels), scale


def dequantize_weight(levels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float ``[out, in]`` weights of :func:`quantize_weight`'s levels and scale (per row,
    per tensor or per group)."""
    if scale.dim() == 2 and scale.shape[1] > 1:
        scale = column_scales(scale, levels.shape[1])
    return dequantize(levels, scale)


def quantize_bias(bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mllm's ``quant_bias``: int32 levels (within ±127) and the scale ``max|b| / 127``.

    The alternative (``quant_bias=false``, required with rotation) keeps the bias in float
    and adds it after dequantizing the output.
    """
    scale = symmetric_scale(bias.detach().abs().max().float())
    return quantize(bias.detach().float(), scale, 8).to(torch.int32), scale


def keeps_range(absmax: float, p999: float, threshold: float) -> bool:
    """mllm's ``t01m_clip_threshold`` rule: a tensor is *clipped* (plain int8 over its full
    range) when ``absmax < T · p99.9``; otherwise it is a no-clip (shadow) tensor whose
    int8 range is the 99.9th percentile and whose outliers are recomputed in float."""
    if not threshold > 0:
        raise EdgeforgeError(f"t01m_clip_threshold (T): must be > 0, got {threshold!r}")
    return absmax < threshold * p999


def shadow_input_correction(
    x: torch.Tensor,
    input_scale: torch.Tensor | float,
    weight_q: torch.Tensor,
    w_scale: torch.Tensor,
) -> torch.Tensor:
    """What the device's saturated input levels lost, times the weight: the CPU shadow op.

    With ``q = round(x / s)``, the device computes ``clamp(q) · s`` through the weight; this
    returns ``(q − clamp(q)) · s`` through the same dequantized weight, so device result +
    correction equals the unclipped grid value (mllm ``CPULinearINT8Shadow``, input side).
    """
    q = quantize(x.float(), input_scale, 8, clip=False)
    lost = (q - q.clamp(-128, 127)).to(torch.float32) * torch.as_tensor(input_scale)
    return lost @ dequantize(weight_q, w_scale).T


def shadow_output_fix(
    y_q: torch.Tensor, y_float: torch.Tensor, output_scale: torch.Tensor | float
) -> torch.Tensor:
    """Dequantized output where every saturated int8 level is replaced by the float result
    rounded to the same grid (mllm ``CPULinearINT8Shadow``, output side)."""
    s = torch.as_tensor(output_scale, dtype=torch.float32)
    saturated = (y_q <= -128) | (y_q >= 127)
    exact = torch.round(y_float / s) * s
    return torch.where(saturated, exact, dequantize(y_q, s))

"""4-bit symmetric grid of common.quant.int8: levels in [-8, 7], stored as int8, and the same
rounding/saturation rules as int8 (what QNN w4a16 weights are built from)."""

import pytest
import torch

from common.core.errors import EdgeforgeError
from common.quant.int8 import (
    dequantize,
    fake_quantize,
    qmax,
    quantize,
    quantize_weight,
    symmetric_scale,
    weight_scale,
)


def test_qmax_int4_and_unknown_width():
    assert qmax(4) == 7
    with pytest.raises(EdgeforgeError, match="bits: expected 4, 8, 16 or 32"):
        qmax(5)


def test_int4_levels_saturate_and_round_half_even():
    scale = symmetric_scale(7.0, 4)  # one level per unit
    assert float(scale) == pytest.approx(1.0)
    x = torch.tensor([-20.0, -8.4, -2.5, -0.5, 0.5, 1.5, 6.6, 7.4, 30.0])
    q = quantize(x, scale, 4)
    assert q.dtype == torch.int8
    assert q.tolist() == [-8, -8, -2, 0, 0, 2, 7, 7, 7]
    assert torch.equal(fake_quantize(x, scale, 4), dequantize(q, scale))


def test_int4_per_row_error_bound():
    """Within range, the dequantized weight is within half a step of the float one."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    scale = symmetric_scale(w.abs().amax(dim=1, keepdim=True), 4)
    q = quantize(w, scale, 4)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    assert torch.all((dequantize(q, scale) - w).abs() <= scale / 2 + 1e-6)
    # every row uses its full positive or negative extreme
    assert torch.all(q.abs().amax(dim=1) == 7)


def test_mse_scales_are_clips_that_never_round_worse():
    """``mse``: each group's step is one of MSE_RATIOS x its abs-max step, the one with the
    least squared rounding error: never worse than the abs-max grid, better on most groups
    of a Gaussian weight (a 4-bit abs-max grid spends its levels on the tails)."""
    from common.quant.int8 import MSE_RATIOS, WEIGHT_ROWS

    w = torch.randn(WEIGHT_ROWS + 8, 64, generator=torch.Generator().manual_seed(1))  # 2 chunks
    absmax = weight_scale(w, "group", 4, 32)
    mse = weight_scale(w, "group", 4, 32, "mse")
    ratios = mse / absmax
    assert all(any(abs(r - m) < 1e-6 for m in MSE_RATIOS) for r in ratios.flatten().tolist())

    def error(scale: torch.Tensor) -> torch.Tensor:
        blocks, steps = w.view(-1, 2, 32), scale[..., None]
        return (fake_quantize(blocks, steps, 4) - blocks).square().sum(-1)

    assert bool((error(mse) <= error(absmax)).all())
    assert (ratios < 1).float().mean() > 0.5
    levels, scale = quantize_weight(w, "group", 4, 32, "mse")
    assert torch.equal(scale, mse) and levels.abs().max() <= 8
    per_row = weight_scale(w, "per_channel", 4, rule="mse")
    assert per_row.shape == (w.shape[0], 1) and bool((per_row <= absmax.amax(1, True)).all())


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda w: weight_scale(w, "group", 4, 32, "minmax"), "rule 'minmax' is not one of"),
        (lambda w: weight_scale(w, "per_tensor", 4, rule="mse"), "per row or per group only"),
        (lambda w: quantize_weight(w, "per_tensor", 4, rule="mse"), "per row or per group only"),
    ],
)
def test_unknown_or_unsupported_scale_rules_are_refused(call, fragment: str) -> None:
    with pytest.raises(EdgeforgeError, match=fragment):
        call(torch.ones(2, 32))

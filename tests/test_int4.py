"""4-bit symmetric grid of common.quant.int8: levels in [-8, 7], stored as int8, and the same
rounding/saturation rules as int8 (what QNN w4a16 weights are built from)."""

import pytest
import torch

from common.core.errors import EdgeforgeError
from common.quant.int8 import dequantize, fake_quantize, qmax, quantize, symmetric_scale


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

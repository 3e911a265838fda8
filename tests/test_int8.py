"""Integer quantization math against float references."""

from __future__ import annotations

import pytest
import torch

from common.core.errors import EdgeforgeError
from common.quant import int8


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_scale_and_round_trip_error_bound() -> None:
    x = torch.randn(1000, generator=_gen(0)) * 3
    s = int8.symmetric_scale(x.abs().max())
    q = int8.quantize(x, s)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    err = (int8.dequantize(q, s) - x).abs().max()
    assert float(err) <= float(s) / 2 + 1e-7  # round to nearest: half a step
    assert torch.equal(int8.fake_quantize(x, s), int8.dequantize(q, s))
    assert float(int8.symmetric_scale(0.0)) == pytest.approx(1e-5 / 127)


def test_round_half_to_even_and_saturation() -> None:
    q = int8.quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, 500.0, -500.0]), 1.0)
    assert q.tolist() == [0, 2, 2, 0, 127, -128]
    unclipped = int8.quantize(torch.tensor([500.0]), 1.0, clip=False)
    assert unclipped.tolist() == [500] and unclipped.dtype == torch.int64


def test_int16_activation_grid() -> None:
    x = torch.randn(4096, generator=_gen(1))
    s16 = int8.symmetric_scale(x.abs().max(), bits=16)
    q = int8.quantize(x, s16, 16)
    assert q.dtype == torch.int16 and int(q.abs().max()) == 32767
    assert float((int8.dequantize(q, s16) - x).abs().max()) <= float(s16) / 2 + 1e-7


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_weight_quantization_matmul_error(granularity: str) -> None:
    w = torch.randn(32, 64, generator=_gen(2))
    w[3] *= 50  # one large row: per-channel must not let it coarsen the others
    q, s = int8.quantize_weight(w, granularity)
    assert q.dtype == torch.int8
    assert s.shape == ((32, 1) if granularity == "per_channel" else ())
    w_hat = int8.dequantize(q, s)
    assert float(((w_hat - w).abs() / s).max()) <= 0.5 + 1e-5
    if granularity == "per_channel":
        assert float((w_hat - w)[0].abs().max()) < float((w[3].abs().max()) / 127 / 2)


def test_group_weights_step_per_block_of_columns() -> None:
    """``group``: one step per ``group_size`` consecutive input columns of a row; each
    weight within half its own group's step, a loud group coarsening only itself."""
    w = torch.randn(8, 96, generator=_gen(3))
    w[2, 40:50] *= 30  # inside the second group of 32
    q, s = int8.quantize_weight(w, "group", 4, 32)
    assert q.dtype == torch.int8 and s.shape == (8, 3)
    assert torch.equal(s, int8.weight_scale(w, "group", 4, 32))
    w_hat = int8.dequantize_weight(q, s)
    steps = int8.column_scales(s, 96)
    assert float(((w_hat - w).abs() / steps).max()) <= 0.5 + 1e-5
    assert float(s[2, 1]) > 10 * float(s[2, 0]) and float(s[2, 2]) < 2 * float(s[3, 2])
    assert torch.equal(int8.dequantize_weight(*int8.quantize_weight(w, "per_channel", 4)),
                       int8.dequantize(*int8.quantize_weight(w, "per_channel", 4)))  # fmt: skip
    with pytest.raises(EdgeforgeError, match="group_size 40 does not divide the 96 input"):
        int8.weight_scale(w, "group", 4, 40)


def test_bad_granularity_and_bits() -> None:
    with pytest.raises(EdgeforgeError, match="granularity"):
        int8.weight_scale(torch.ones(2, 2), "per_row")
    with pytest.raises(EdgeforgeError, match="bits"):
        int8.qmax(12)


def test_quant_bias_int32() -> None:
    b = torch.tensor([0.2, -1.3, 0.05])
    q, s = int8.quantize_bias(b)
    assert q.dtype == torch.int32 and q.tolist() == [20, -127, 5]
    assert torch.allclose(q.float() * s, b, atol=float(s) / 2)


def test_clip_threshold_rule() -> None:
    assert int8.keeps_range(absmax=10.0, p999=1.0, threshold=64) is True
    assert int8.keeps_range(absmax=100.0, p999=1.0, threshold=64) is False
    assert int8.keeps_range(absmax=1.0, p999=1.0, threshold=1) is False  # T=1: all shadow
    for bad in (0, -3):
        with pytest.raises(EdgeforgeError, match="T"):
            int8.keeps_range(1.0, 1.0, bad)


def test_shadow_input_compensation_recovers_unclipped_result() -> None:
    x = torch.randn(16, 64, generator=_gen(3))
    x[0, 5] = 400.0  # outlier far beyond the p99.9 range
    w = torch.randn(24, 64, generator=_gen(4))
    wq, ws = int8.quantize_weight(w)
    s_in = int8.symmetric_scale(x.abs().quantile(0.99))
    device = int8.fake_quantize(x, s_in, clip=True) @ int8.dequantize(wq, ws).T
    fixed = device + int8.shadow_input_correction(x, s_in, wq, ws)
    ideal = int8.fake_quantize(x, s_in, clip=False) @ int8.dequantize(wq, ws).T
    assert torch.allclose(fixed, ideal, rtol=1e-5, atol=1e-4)
    reference = x @ w.T
    assert (fixed - reference).abs().max() < (device - reference).abs().max() / 10


def test_shadow_output_fix_replaces_saturated_levels() -> None:
    y = torch.tensor([[0.5, 3.0, -9.0]])
    s = int8.symmetric_scale(1.0)
    y_q = int8.quantize(y, s)
    fixed = int8.shadow_output_fix(y_q, y, s)
    assert torch.allclose(fixed, int8.fake_quantize(y, s, clip=False))

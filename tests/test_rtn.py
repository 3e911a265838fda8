"""common.quant.rtn: the round-to-nearest grid, against hand-computed values and invariants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.core.errors import EdgeforgeError
from common.quant.rtn import apply_rtn, fake_quantize, quantize_groups


def test_symmetric_grid_by_hand() -> None:
    # One group of 4: the larger-magnitude extreme (-2.0) maps onto code -8 at 4 bits.
    weight = torch.tensor([[-2.0, 0.5, 1.0, 0.26]])
    codes, scale, zero = quantize_groups(weight, bits=4, group_size=4, sym=True)
    assert scale.item() == pytest.approx(0.25)
    assert zero.item() == 0
    assert codes.tolist() == [[-8, 2, 4, 1]]
    assert fake_quantize(weight, 4, 4, True).tolist() == [[-2.0, 0.5, 1.0, 0.25]]


def test_positive_extreme_uses_negative_scale() -> None:
    # max |w| is positive: the scale is negative so the extreme still lands on -2^(b-1).
    weight = torch.tensor([[2.0, -0.5, 0.0, 1.0]])
    codes, scale, _ = quantize_groups(weight, bits=4, group_size=4, sym=True)
    assert scale.item() == pytest.approx(-0.25)
    assert codes[0, 0].item() == -8
    assert torch.allclose(fake_quantize(weight, 4, 4, True), weight)


def test_asymmetric_grid_by_hand() -> None:
    weight = torch.tensor([[0.0, 1.5, 3.0, 0.7]])  # min 0, max 3 → scale 0.2 at 4 bits
    codes, scale, zero = quantize_groups(weight, bits=4, group_size=-1, sym=False)
    assert scale.item() == pytest.approx(0.2, rel=1e-3)
    assert zero.item() == 0
    assert codes.tolist() == [[0, 8, 15, 4]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_error_bounded_by_half_step(bits: int, sym: bool) -> None:
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits))
    codes, scale, _ = quantize_groups(weight, bits, 32, sym)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    assert codes.min() >= low and codes.max() <= high
    error = (fake_quantize(weight, bits, 32, sym) - weight).reshape(-1, 32).abs()
    # Half a step; symmetric grids clip the side opposite the extreme to 2^(b-1) - 1, so a
    # full step there. Plus fp16 rounding of the scale stretching the grid by up to 2^-11.
    steps = 1.0 if sym else 0.5
    bound = scale.abs() * steps + weight.abs().reshape(-1, 32).amax(1, keepdim=True) * 2**-10
    assert (error <= bound + 1e-7).all()


def test_more_bits_less_error() -> None:
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    errors = [(fake_quantize(weight, b, 64, True) - weight).pow(2).mean() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)


def test_apply_rtn_checks_every_layer_first() -> None:
    good, bad = nn.Linear(64, 8), nn.Linear(48, 8)
    before = good.weight.detach().clone()
    with pytest.raises(EdgeforgeError, match="group_size 32 does not divide bad"):
        apply_rtn([("good", good), ("bad", bad)], bits=4, group_size=32, sym=True)
    assert torch.equal(good.weight, before)  # nothing changed
    assert apply_rtn([("good", good)], bits=4, group_size=32, sym=True) == ["good"]
    assert not torch.equal(good.weight, before)
    assert torch.equal(good.weight, fake_quantize(before, 4, 32, True))


@pytest.mark.parametrize(
    ("bits", "group_size", "message"),
    [(5, 32, "bits must be one of"), (4, 0, "group_size must be -1"), (4, 48, "does not divide")],
)
def test_bad_options(bits: int, group_size: int, message: str) -> None:
    with pytest.raises(EdgeforgeError, match=message):
        quantize_groups(torch.zeros(4, 64), bits, group_size, True)

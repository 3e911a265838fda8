"""Streaming observers against exact statistics of the same values."""

from __future__ import annotations

import math

import pytest
import torch

from common import observers
from common.errors import EdgeforgeError
from common.observers import LogHistogram, TensorObserver, exact_percentile, seed_rank


def _heavy_tailed(seed: int, n: int = 40_000, channels: int = 64) -> torch.Tensor:
    """Gaussian activations with a few huge outliers (the attention-sink shape)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n // channels, channels, generator=gen)
    x[0, 3] = 3000.0
    x[5, 7] = -250.0
    x[:, 9] *= 40.0  # an outlier channel
    return x


def test_seed_rank_matches_mllm_partition_index() -> None:
    assert seed_rank(1000, 0.0) == 999
    assert seed_rank(1000, 0.001) == 998
    assert seed_rank(1, 0.001) == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_percentiles_within_one_percent_of_exact(seed: int) -> None:
    x = _heavy_tailed(seed)
    obs = TensorObserver()
    for chunk in x.split(97):  # streaming in uneven batches
        obs.update(chunk)
    got = obs.result()
    want_signed = exact_percentile(x, 0.001)
    want_abs = exact_percentile(x.abs(), 0.001)
    assert got["p999"] == pytest.approx(want_signed, rel=0.01)
    assert got["abs_p999"] == pytest.approx(want_abs, rel=0.01)
    # The bound is in fact the bin half-width (0.27 %).
    assert abs(got["abs_p999"] / want_abs - 1) < 0.003


def test_exact_statistics_and_channels() -> None:
    x = _heavy_tailed(3)
    obs = TensorObserver()
    for chunk in x.split(50):
        obs.update(chunk[None])  # [1, T, C] like a hook sees
    got = obs.result()
    xd = x.double()
    assert got["count"] == x.numel()
    assert got["max"] == float(x.max()) and got["min"] == float(x.min())
    assert got["absmax"] == 3000.0
    assert got["mean"] == pytest.approx(float(xd.mean()), rel=1e-6, abs=1e-7)
    assert got["std"] == pytest.approx(float(xd.std(unbiased=False)), rel=1e-5)
    assert torch.equal(obs.channel_absmax, x.abs().amax(dim=0))


def test_merge_equals_single_stream() -> None:
    x = _heavy_tailed(4)
    a, b, whole = TensorObserver(), TensorObserver(), TensorObserver()
    a.update(x[:200])
    b.update(x[200:])
    whole.update(x)
    a.merge(b)
    assert a.result()["p999"] == whole.result()["p999"]
    assert a.result()["abs_p999"] == whole.result()["abs_p999"]
    assert a.result()["max"] == whole.result()["max"]
    assert torch.equal(a.channel_absmax, whole.channel_absmax)
    assert math.isclose(a.result()["mean"], whole.result()["mean"], rel_tol=1e-6)


def test_negative_dominated_and_constant_tensors() -> None:
    neg = -torch.rand(10_000, generator=torch.Generator().manual_seed(5)) * 7 - 1
    obs = TensorObserver()
    obs.update(neg)
    assert obs.result()["p999"] == pytest.approx(exact_percentile(neg, 0.001), rel=0.01)
    const = TensorObserver()
    const.update(torch.full((100, 4), 2.5))
    assert const.result()["p999"] == 2.5 and const.result()["std"] == 0.0


def test_empty_and_mismatched_inputs_are_clean_errors() -> None:
    with pytest.raises(EdgeforgeError, match="no values"):
        TensorObserver().result()
    with pytest.raises(EdgeforgeError, match="empty histogram"):
        LogHistogram().percentile(0.001, signed=True)
    obs = TensorObserver()
    obs.update(torch.zeros(2, 4))
    with pytest.raises(EdgeforgeError, match="channel count"):
        obs.update(torch.zeros(2, 5))


def test_chunked_histogram_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large tensors are counted in chunks; the counts must not depend on the chunking."""
    x = _heavy_tailed(6)
    whole = LogHistogram()
    whole.update(x)
    monkeypatch.setattr(observers, "_CHUNK", 999)  # uneven chunks, a short last one
    chunked = LogHistogram()
    chunked.update(x)
    assert torch.equal(chunked.counts, whole.counts)
    assert chunked.count == x.numel()


def test_subtract_observes_the_biasless_output() -> None:
    x = _heavy_tailed(7)
    bias = torch.linspace(-3.0, 5.0, x.shape[-1])
    direct, shifted = TensorObserver(), TensorObserver()
    direct.update(x - bias)
    shifted.update(x, subtract=bias)
    assert shifted.result() == direct.result()
    assert torch.equal(shifted.channel_absmax, direct.channel_absmax)

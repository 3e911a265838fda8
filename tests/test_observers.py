"""Streaming observers against exact statistics of the same values."""

from __future__ import annotations

import math

import pytest
import torch

from common.analysis import observers
from common.analysis.observers import LogHistogram, TensorObserver, exact_percentile, seed_rank
from common.core.errors import EdgeforgeError


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
    # float32 block sums (BLAS) in another grouping: agree to ~1e-6 of the sum of |x|.
    assert math.isclose(a.result()["mean"], whole.result()["mean"], rel_tol=1e-5)


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


def test_histogram_bins_are_the_float32_top_bits() -> None:
    """The kernel's bins against an independent count: numpy's bincount over the top 16
    bits of each value (sign, exponent, 7 mantissa bits), clamped to the kept range."""
    x = _heavy_tailed(11).reshape(-1)
    x[:3] = torch.tensor([0.0, -0.0, 1e-30])  # zeros and a value under the lowest bin
    hist = LogHistogram(exact=True)
    hist.update(x)
    top = (x.numpy().view("uint32") >> 16).astype("int64")
    magnitude = (top & 0x7FFF).clip(observers._LOW, observers._HIGH - 1) - observers._LOW
    negative = top >> 15 == 1
    want = torch.cat([
        torch.bincount(torch.from_numpy(magnitude[negative]), minlength=observers.NUM_BINS),
        torch.bincount(torch.from_numpy(magnitude[~negative]), minlength=observers.NUM_BINS),
    ])  # fmt: skip
    assert torch.equal(hist.counts, want)


def test_subtract_observes_the_biasless_output() -> None:
    x = _heavy_tailed(7)
    bias = torch.linspace(-3.0, 5.0, x.shape[-1])
    direct, shifted = TensorObserver(), TensorObserver()
    direct.update(x - bias)
    shifted.update(x, subtract=bias)
    assert shifted.result() == direct.result()
    assert torch.equal(shifted.channel_absmax, direct.channel_absmax)


def _sink_stream(seed: int, windows: int, rows: int = 512, channels: int = 64) -> torch.Tensor:
    """Windows whose first row is an attention sink, like a profiled hidden state."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(windows, rows, channels, generator=gen)
    x[:, 0, 3] = 3000.0
    x[:, :, 9] *= 40.0
    return x


def test_tail_histogram_gives_the_full_count_bins(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the warm-up only |x| ≥ floor is counted; the percentile bins stay those of a
    histogram that counted every value, and within 1 % of the exact order statistic."""
    monkeypatch.setattr(observers, "TAIL_WARMUP", 100_000)
    x = _sink_stream(8, windows=12)
    tail, full = TensorObserver(), TensorObserver(exact=True)
    for i, window in enumerate(x):
        tail.update(window[None])
        full.update(window[None])
        if i == 3:  # past the warm-up
            counted_in_full = int(tail.histogram.counts.sum())
    assert tail.histogram.floor > 0 and full.histogram.floor == 0
    # After the warm-up the tail took ~1 % of the values (the floor sits near p99).
    later = x[4:].numel()
    assert int(tail.histogram.counts.sum()) - counted_in_full < 0.03 * later
    assert tail.result() == full.result()
    assert tail.result()["p999"] == pytest.approx(exact_percentile(x, 0.001), rel=0.01)
    assert tail.result()["abs_p999"] == pytest.approx(exact_percentile(x.abs(), 0.001), rel=0.01)


def test_tail_histograms_merge_above_the_higher_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(observers, "TAIL_WARMUP", 50_000)
    x = _sink_stream(9, windows=8)
    a, b, full = LogHistogram(), LogHistogram(), LogHistogram(exact=True)
    for window in x[:2]:
        a.update(window)
    for window in x[2:]:
        b.update(window)
    full.update(x)
    assert 0 < a.floor != b.floor
    a.merge(b)
    assert a.floor == max(a.floor, b.floor) and a.count == x.numel()
    for signed in (True, False):
        assert a.percentile(0.001, signed=signed) == full.percentile(0.001, signed=signed)


def test_tail_that_no_longer_reaches_the_percentile_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Activations that shrink 100× after the floor was set: no silent answer from the tail;
    counting every value (``exact``) gives the right one."""
    monkeypatch.setattr(observers, "TAIL_WARMUP", 10_000)
    gen = torch.Generator().manual_seed(10)
    big = torch.randn(200, 100, generator=gen) * 100
    small = torch.randn(20_000, 100, generator=gen)
    tail, exact = TensorObserver(), TensorObserver(exact=True)
    for obs in (tail, exact):
        obs.update(big)
        obs.update(small)
    with pytest.raises(EdgeforgeError, match="exact-percentiles"):
        tail.result()
    both = torch.cat([big, small])
    assert exact.result()["p999"] == pytest.approx(exact_percentile(both, 0.001), rel=0.01)

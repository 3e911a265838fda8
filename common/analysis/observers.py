"""Streaming activation observers: statistics whose memory does not grow with the tokens.

The mllm profiler keeps every activation of every sample and sorts them at the end
(>100 GB for a 1.8B model). Every observer here has one contract — ``update(tensor)``
folds a batch in, ``merge(other)`` folds another observer of the same kind in (so q/k/v,
which read one tensor, or two processes, can share work), ``result()`` reads the summary —
and a fixed-size state.

Percentiles use a histogram over the *bit patterns* of float32 values: the top 16 bits of
a float (sign, 8 exponent bits, 7 mantissa bits) are monotone in its magnitude, so they
index an exact histogram with bins of relative width ≤ 2^-7 — 128 bins per factor of two,
everywhere, with no range to know in advance. Reporting the bin's midpoint is off by at
most 0.4 % of the value, a one-pass, scale-free alternative to the "histogram refined over
two passes" the issue allows. Magnitudes below ``2^MIN_EXPONENT`` (≈ 2.3e-10, zero
included) share the lowest bin and those above ``2^MAX_EXPONENT`` the highest; the result
is always clamped into the exact observed ``[min, max]``.

Cost matters as much as memory (the target is profiling within 1.3 × plain inference),
and the 99.9th percentiles only ever look at the top 0.1 %. So a histogram counts every
value for its first ``TAIL_WARMUP`` values, then sets a *floor* — the bin above which at
least ``TAIL_SAFETY`` × the needed 0.1 % of the values seen so far lie — and from then on
counts only values at or above it, plus the number of values below it. Bins at and above
the floor stay exact, so the percentile is the same bin as a full count gives as long as
the tail still holds the 0.1 %; the floor only ever rises. If the data shifts so far
downwards that the tail no longer reaches the percentile,
:meth:`LogHistogram.percentile` says so instead of guessing (``exact=True`` counts every
value).

An update reads each value once, in the compiled kernel of :mod:`common.analysis.stream_kernels`
(per-channel max/min, float64 sum and sum of squares, tail counts: ~0.45 ns a value),
which writes straight into the observer's state: one call, no allocation per update.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from common.analysis.stream_kernels import block_statistics
from common.core.errors import EdgeforgeError

#: Mantissa bits kept per bin: 2^7 = 128 bins per factor of two (≤ 0.4 % error).
MANTISSA_BITS = 7
#: Magnitudes kept in distinct bins: [2^MIN_EXPONENT, 2^MAX_EXPONENT).
MIN_EXPONENT = -32
MAX_EXPONENT = 32
#: Index (top 16 bits of |x| as float32) of the lowest and highest magnitude bin kept.
_LOW = (127 + MIN_EXPONENT) << MANTISSA_BITS
_HIGH = (127 + MAX_EXPONENT) << MANTISSA_BITS
NUM_BINS = _HIGH - _LOW
#: The tail kept above the floor holds at least this many times the values a 99.9th
#: percentile needs (the floor sits near the 99th percentile).
TAIL_SAFETY = 10
#: The fraction whose percentile the profile reports (the seed's ``top_0_1``).
TOP_FRACTION = 0.001
#: Values counted in full before the floor may rise: a sample of several windows (or,
#: for an LM head, dozens of tokens), not just the attention-sink rows of the first.
TAIL_WARMUP = 1 << 21


def seed_rank(count: int, fraction: float) -> int:
    """0-based ascending rank mllm's ``get_act_percentage`` picks: ``int(N·(1−f)) − 1``.

    ``fraction=0`` is the maximum; ``0.001`` is the seed's ``top_0_1`` (the 99.9th
    percentile). Clamped to a valid index so tiny tensors still give an answer.
    """
    return min(max(int(count * (1.0 - fraction)) - 1, 0), count - 1)


def exact_percentile(values: torch.Tensor, fraction: float) -> float:
    """The seed's order statistic computed exactly (sorting); the reference for tests."""
    flat = values.detach().reshape(-1).double()
    return float(torch.kthvalue(flat, seed_rank(flat.numel(), fraction) + 1).values)


def _bin_edge(index: int) -> np.float32:
    """Lower edge of magnitude bin ``index`` (0 = the lowest bin kept), a float32."""
    return np.uint32((index + _LOW) << 16).view(np.float32)


def _bin_centre(index: int) -> float:
    """Midpoint of magnitude bin ``index``."""
    return (float(_bin_edge(index)) + float(_bin_edge(index + 1))) / 2


class LogHistogram:
    """Signed histogram of float32 values with bins of constant relative width.

    ``counts[:NUM_BINS]`` hold negative values by magnitude bin, ``counts[NUM_BINS:]``
    positive values and zeros. Only bins at or above ``floor`` (a magnitude bin) are
    complete; ``total`` counts every value (see the module docstring).
    """

    def __init__(self, *, exact: bool = False) -> None:
        self.counts = torch.zeros(2 * NUM_BINS, dtype=torch.int64)
        self.total = 0
        self.floor = 0
        self.exact = exact
        self._checked_at = 0  # total at the last raise_floor check

    def update(self, values: torch.Tensor) -> None:
        self.update_numpy(values.detach().float().contiguous().view(-1).cpu().numpy())

    def update_numpy(self, flat: np.ndarray) -> None:
        """Fold in a contiguous 1-D float32 array."""
        row = flat.reshape(1, -1)
        high = np.full(row.shape[1], -np.inf, np.float32)
        low = np.full(row.shape[1], np.inf, np.float32)
        block_statistics(row, _LOW, _HIGH, self.floor_top(), self.bins(), high, low)
        self.seen(flat.size)
        self.raise_floor()

    def floor_top(self) -> int:
        """The top-16-bit magnitude from which values are counted (0: all of them)."""
        return self.floor + _LOW if self.floor > 0 else 0

    def bins(self) -> np.ndarray:
        """The counts as a numpy array sharing memory, for the kernel to count into."""
        return self.counts.numpy()

    def seen(self, values: int) -> None:
        """Record that ``values`` more values were offered (counted or below the floor).
        The floor moves separately, once per tensor (:meth:`raise_floor`), so it never
        rests on the first rows of a window alone (an LM head's first tokens)."""
        self.total += values

    def _tails(self) -> tuple[np.ndarray, np.ndarray]:
        """Values at or above each magnitude bin: (of ``|x|``, of the positive values)."""
        neg, pos = self.counts.numpy()[:NUM_BINS], self.counts.numpy()[NUM_BINS:]
        return np.cumsum((neg + pos)[::-1])[::-1], np.cumsum(pos[::-1])[::-1]

    def raise_floor(self) -> None:
        """Move the floor up to the highest bin whose positive tail (a subset of the
        magnitude tail) still holds ``TAIL_SAFETY`` × the values the percentile needs.

        Checked each time the count has doubled: a stationary stream's floor barely moves
        after the warm-up, and the check costs two cumulative sums over every bin."""
        if self.exact or self.total < max(TAIL_WARMUP, 2 * self._checked_at):
            return
        self._checked_at = self.total
        need = TAIL_SAFETY * (self.total - seed_rank(self.total, TOP_FRACTION))
        _, positive = self._tails()
        enough = np.flatnonzero(positive[self.floor :] >= need)
        if enough.size:
            self.floor += int(enough[-1])

    def merge(self, other: LogHistogram) -> None:
        """Both histograms are complete at or above the higher floor."""
        self.counts += other.counts
        self.total += other.total
        self.floor = max(self.floor, other.floor)

    @property
    def count(self) -> int:
        return self.total

    def percentile(self, fraction: float, *, signed: bool) -> float:
        """The value at :func:`seed_rank` of the signed values or of their magnitudes."""
        if self.total == 0:
            raise EdgeforgeError("percentile of an empty histogram: no values were observed")
        above = self.total - 1 - seed_rank(self.total, fraction)  # values ranked above it
        magnitude, positive = self._tails()
        tail = positive if signed else magnitude
        if tail[self.floor] > above:  # in the exact part: the highest bin whose tail holds it
            return _bin_centre(int(np.flatnonzero(tail > above)[-1]))
        if signed and self.floor == 0:  # fewer positives than that: among the negatives
            negatives = self.counts.numpy()[:NUM_BINS]
            rank = above - int(positive[0])  # from the top, i.e. by ascending magnitude
            return -_bin_centre(int(np.searchsorted(np.cumsum(negatives), rank, side="right")))
        raise EdgeforgeError(
            f"percentile: only {int(tail[self.floor])} of {self.total} values lie above the "
            f"histogram's floor {float(_bin_edge(self.floor)):.4g}, fewer than the {above + 1} the "
            f"{100 * (1 - fraction):g}th percentile needs — the activations got much smaller "
            "during profiling; profile again with --exact-percentiles"
        )


class TensorObserver:
    """Per-tensor statistics of one activation stream (the input or output of a linear).

    Tracks exactly: count, signed min/max, abs-max, sum and sum of squares (float64, for
    mean and std), abs-max per channel (the last dimension); and the log histogram for
    the 99.9th percentile of the signed values and of ``|x|``.
    """

    def __init__(self, *, exact: bool = False) -> None:
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0
        self.channel_max: np.ndarray | None = None  # float32 per channel, running
        self.channel_min: np.ndarray | None = None
        self.histogram = LogHistogram(exact=exact)

    @property
    def maximum(self) -> float:
        return -math.inf if self.channel_max is None else float(self.channel_max.max())

    @property
    def minimum(self) -> float:
        return math.inf if self.channel_min is None else float(self.channel_min.min())

    @property
    def channel_absmax(self) -> torch.Tensor | None:
        """Per-channel abs-max of everything observed (a fresh tensor)."""
        if self.channel_max is None or self.channel_min is None:
            return None
        return torch.from_numpy(np.maximum(-self.channel_min, self.channel_max))

    def _channels(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The running per-channel extremes, created on first use."""
        if self.channel_max is None or self.channel_min is None:
            self.channel_max = np.full(count, -np.inf, np.float32)
            self.channel_min = np.full(count, np.inf, np.float32)
        elif self.channel_max.size != count:
            raise EdgeforgeError(
                f"observer: channel count changed from {self.channel_max.size} to {count}; "
                "one observer must watch one tensor"
            )
        return self.channel_max, self.channel_min

    def update(self, tensor: torch.Tensor, *, subtract: torch.Tensor | None = None) -> None:
        """Fold in ``tensor`` (``− subtract``, broadcast over the last dimension: a linear's
        bias, so ``no_bias`` costs no extra parallel torch op) in one kernel call, straight
        into this observer's state: nothing is allocated per update."""
        x = tensor.detach().float().contiguous().cpu()
        if x.numel() == 0:
            return
        rows = x.numpy().reshape(-1, x.shape[-1] if x.ndim > 1 else x.numel())
        if subtract is not None:
            rows = rows - subtract.detach().float().cpu().numpy()
        high, low = self._channels(rows.shape[1])
        total, total_sq = block_statistics(
            rows, _LOW, _HIGH, self.histogram.floor_top(), self.histogram.bins(), high, low
        )
        self.histogram.seen(rows.size)
        self.histogram.raise_floor()
        self.count += rows.size
        self.total += total
        self.total_sq += total_sq

    def merge(self, other: TensorObserver) -> None:
        if other.channel_max is not None and other.channel_min is not None:
            high, low = self._channels(other.channel_max.size)
            np.maximum(high, other.channel_max, out=high)
            np.minimum(low, other.channel_min, out=low)
        self.count += other.count
        self.total += other.total
        self.total_sq += other.total_sq
        self.histogram.merge(other.histogram)

    def _clamped(self, value: float, low: float, high: float) -> float:
        return min(max(value, low), high)

    def result(self) -> dict[str, float]:
        """Summary: ``max`` and ``p999`` are signed (the seed's ``ori``/``top_0_1``);
        ``absmax`` and ``abs_p999`` are of ``|x|`` (what symmetric quantization needs)."""
        if self.count == 0:
            raise EdgeforgeError("observer: no values were observed")
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        absmax = max(abs(self.minimum), abs(self.maximum))
        p999 = self.histogram.percentile(0.001, signed=True)
        abs_p999 = self.histogram.percentile(0.001, signed=False)
        return {
            "count": self.count,
            "min": self.minimum,
            "max": self.maximum,
            "absmax": absmax,
            "mean": mean,
            "std": math.sqrt(var),
            "p999": self._clamped(p999, self.minimum, self.maximum),
            "abs_p999": self._clamped(abs_p999, 0.0, absmax),
        }

"""Streaming activation observers: statistics whose memory does not grow with the tokens.

The mllm profiler keeps every activation of every sample and sorts them at the end
(>100 GB for a 1.8B model). Every observer here has one contract — ``update(tensor)``
folds a batch in, ``merge(other)`` folds another observer of the same kind in (so q/k/v,
which read one tensor, or two processes, can share work), ``result()`` reads the summary —
and a fixed-size state.

Percentiles use a histogram over the *bit patterns* of float32 values: the top 16 bits of
a float (sign, 8 exponent bits, 7 mantissa bits) are monotone in its value, so
``bincount(bits >> 16)`` is an exact histogram with bins of relative width ≤ 2^-7 —
128 bins per factor of two, everywhere, with no range to know in advance. Reporting the
bin's midpoint is off by at most 0.4 % of the value, a one-pass, scale-free alternative to
the "histogram refined over two passes" the issue allows, at about the cost of one copy
of the tensor. Magnitudes below ``2^MIN_EXPONENT`` (≈ 2.3e-10, zero included) share the
lowest bin and those above ``2^MAX_EXPONENT`` the highest; the result is always clamped
into the exact observed ``[min, max]``.

Cost matters as much as memory (the target is profiling within 1.3 × plain inference), so
an update reads each value a handful of times, all on a zero-copy numpy view of the tensor:
the bin index is the high half of each float read through a strided ``uint16`` view (no
shift, no copy) counted by ``numpy.bincount``; per-channel max and min are two outer
reductions, the sum a pairwise reduction and the sum of squares one BLAS dot. Numpy on
purpose: each torch reduction is an OpenMP parallel region that waits for its slowest
thread, which on a loaded machine cost ~8 ms of spinning per call — more than the matmul
it observes — while these single-threaded kernels take 0.1–2 ns per value.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from common.errors import EdgeforgeError

#: Mantissa bits kept per bin: 2^7 = 128 bins per factor of two (≤ 0.4 % error).
MANTISSA_BITS = 7
#: Magnitudes kept in distinct bins: [2^MIN_EXPONENT, 2^MAX_EXPONENT).
MIN_EXPONENT = -32
MAX_EXPONENT = 32
#: Index (top 16 bits of |x| as float32) of the lowest and highest magnitude bin kept.
_LOW = (127 + MIN_EXPONENT) << MANTISSA_BITS
_HIGH = (127 + MAX_EXPONENT) << MANTISSA_BITS
NUM_BINS = _HIGH - _LOW
_HALF = 1 << 15  # sign bit of the top 16 bits
#: Which ``uint16`` of a float32 holds its top 16 bits (sign, exponent, 7 mantissa bits).
_HIGH_WORD = 1 if sys.byteorder == "little" else 0
#: Values histogrammed per ``bincount`` call.
_CHUNK = 1 << 20


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


def _bin_centre(index: int) -> float:
    """Midpoint of magnitude bin ``index`` (0 = the lowest bin kept)."""
    bits = torch.tensor([(index + _LOW) << 16, (index + _LOW + 1) << 16], dtype=torch.int32)
    low, high = bits.view(torch.float32).tolist()
    return (low + high) / 2


class LogHistogram:
    """Signed histogram of float32 values with bins of constant relative width."""

    def __init__(self) -> None:
        # [0:NUM_BINS]: negative values by magnitude; [NUM_BINS:]: positive values and zeros.
        self.counts = torch.zeros(2 * NUM_BINS, dtype=torch.int64)

    def update(self, values: torch.Tensor) -> None:
        self.update_numpy(values.detach().float().contiguous().view(-1).cpu().numpy())

    def update_numpy(self, flat: np.ndarray) -> None:
        """Fold in a contiguous 1-D float32 array (the observer's zero-copy fast path)."""
        # Top 16 bits = sign << 15 | magnitude bin: positives first, then negatives.
        top = flat.view(np.uint16)[_HIGH_WORD::2]
        # bincount casts its input to int64 first: in chunks, that copy stays small and
        # cache-resident instead of a fresh 200 MB buffer for an LM head's logits.
        full = np.bincount(top[:_CHUNK], minlength=2 * _HALF)
        for start in range(_CHUNK, top.size, _CHUNK):
            full += np.bincount(top[start : start + _CHUNK], minlength=2 * _HALF)
        counts = self.counts.numpy()  # shares memory
        for part, offset in ((full[_HALF:], 0), (full[:_HALF], NUM_BINS)):
            kept = counts[offset : offset + NUM_BINS]
            kept += part[_LOW:_HIGH]
            kept[0] += part[:_LOW].sum()
            kept[-1] += part[_HIGH:].sum()

    def merge(self, other: LogHistogram) -> None:
        self.counts += other.counts

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def percentile(self, fraction: float, *, signed: bool) -> float:
        """The value at :func:`seed_rank` of the signed values or of their magnitudes."""
        total = self.count
        if total == 0:
            raise EdgeforgeError("percentile of an empty histogram: no values were observed")
        neg, pos = self.counts[:NUM_BINS], self.counts[NUM_BINS:]
        rank = seed_rank(total, fraction)
        if not signed:
            return _bin_centre(_bin_of_rank(pos + neg, rank))
        negatives = int(neg.sum())
        if rank < negatives:  # ascending order runs through the negatives largest-first
            return -_bin_centre(_bin_of_rank(neg, negatives - 1 - rank))
        return _bin_centre(_bin_of_rank(pos, rank - negatives))


def _bin_of_rank(counts: torch.Tensor, rank: int) -> int:
    """Index of the bin holding the ``rank``-th (0-based, ascending) counted value."""
    cumulative = torch.cumsum(counts, 0)
    return int(torch.searchsorted(cumulative, torch.tensor(rank), right=True))


class TensorObserver:
    """Per-tensor statistics of one activation stream (the input or output of a linear).

    Tracks exactly: count, signed min/max, abs-max, sum and sum of squares (float64, for
    mean and std), abs-max per channel (the last dimension); and the log histogram for
    the 99.9th percentile of the signed values and of ``|x|``.
    """

    def __init__(self) -> None:
        self.count = 0
        self.minimum = math.inf
        self.maximum = -math.inf
        self.total = 0.0
        self.total_sq = 0.0
        self.channel_absmax: torch.Tensor | None = None
        self.histogram = LogHistogram()

    def update(self, tensor: torch.Tensor, *, subtract: torch.Tensor | None = None) -> None:
        """Fold in ``tensor`` (``− subtract``, broadcast over the last dimension: a linear's
        bias, so ``no_bias`` costs no extra parallel torch op)."""
        x = tensor.detach().float().contiguous().cpu()
        if x.numel() == 0:
            return
        rows = x.numpy().reshape(-1, x.shape[-1] if x.ndim > 1 else x.numel())
        if subtract is not None:
            rows = rows - subtract.detach().float().cpu().numpy()
        flat = rows.reshape(-1)
        high, low = rows.max(axis=0), rows.min(axis=0)  # per channel
        self._fold(
            count=flat.size,
            minimum=float(low.min()),
            maximum=float(high.max()),
            total=float(flat.sum()),  # numpy pairwise float32 sum: ~1e-7 relative
            total_sq=float(np.dot(flat, flat)),  # BLAS blocked sums: ~1e-7 relative
            channel_absmax=torch.from_numpy(np.maximum(np.abs(low), high)),
        )
        self.histogram.update_numpy(flat)

    def _fold(
        self,
        *,
        count: int,
        minimum: float,
        maximum: float,
        total: float,
        total_sq: float,
        channel_absmax: torch.Tensor | None,
    ) -> None:
        if channel_absmax is not None:
            if self.channel_absmax is None:
                self.channel_absmax = channel_absmax.clone()
            elif self.channel_absmax.shape != channel_absmax.shape:
                raise EdgeforgeError(
                    f"observer: channel count changed from {self.channel_absmax.numel()} to "
                    f"{channel_absmax.numel()}; one observer must watch one tensor"
                )
            else:
                torch.maximum(self.channel_absmax, channel_absmax, out=self.channel_absmax)
        self.count += count
        self.minimum = min(self.minimum, minimum)
        self.maximum = max(self.maximum, maximum)
        self.total += total
        self.total_sq += total_sq

    def merge(self, other: TensorObserver) -> None:
        self._fold(
            count=other.count,
            minimum=other.minimum,
            maximum=other.maximum,
            total=other.total,
            total_sq=other.total_sq,
            channel_absmax=other.channel_absmax,
        )
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

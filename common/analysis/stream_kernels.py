"""The one-pass kernel behind :class:`common.analysis.observers.TensorObserver` (numba).

Profiling observes ~300 k activation values per token of SmolLM2 and must stay within
1.3 × plain inference. Composed numpy passes (``|x|``, per-channel max, a boolean-mask
compaction of the tail, ``bincount``, two dots) cost ~2 ns a value: each pass re-reads
the tensor and is a Python call of its own, and the compaction and ``bincount`` are slow
per element. This kernel reads every row once, while it sits in L1: a vectorised loop for the
per-channel max and min and the float64 sum and sum of squares, then a loop that counts
the row's values at or above the histogram floor into their bins (a branch taken for
~1 % of the values after the warm-up): ~0.45 ns a value.

Compiled on first use and cached beside this file (``cache=True``).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, fastmath={"reassoc", "nsz", "contract"})
def block_statistics(
    rows: np.ndarray,
    low_top: int,
    high_top: int,
    floor_top: int,
    counts: np.ndarray,
    channel_max: np.ndarray,
    channel_min: np.ndarray,
) -> tuple[float, float]:
    """Fold the float32 ``rows`` ``[R, C]`` (C-contiguous) into ``counts`` and the
    per-channel ``channel_max`` / ``channel_min`` (float32, ``C``; running extremes).

    ``counts`` (int64, ``2·B`` with ``B = high_top − low_top``): first the negative values
    by magnitude bin, then the positive ones and zeros; a value's bin is the top 16 bits of
    its float32 pattern without the sign, clamped into ``[low_top, high_top)``, and only
    values whose unclamped top bits reach ``floor_top`` are counted (0: all of them).
    Returns the block's sum and sum of squares in float64. The extremes are kept per
    channel because element-wise maxima vectorise where a scalar running maximum does not
    (measured 0.08 against 1.1 ns a value).
    """
    bins = high_top - low_top
    bits = rows.view(np.uint32)
    total = 0.0
    total_sq = 0.0
    for i in range(rows.shape[0]):
        row = rows[i]
        for j in range(row.shape[0]):
            x = row[j]
            channel_max[j] = max(channel_max[j], x)
            channel_min[j] = min(channel_min[j], x)
            wide = np.float64(x)
            total += wide
            total_sq += wide * wide
        row_bits = bits[i]
        for j in range(row_bits.shape[0]):
            top = (row_bits[j] >> 16) & 0x7FFF
            if top >= floor_top:
                index = min(max(top, low_top), high_top - 1) - low_top
                if row_bits[j] >> 31:
                    counts[index] += 1
                else:
                    counts[bins + index] += 1
    return total, total_sq

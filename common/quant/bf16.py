"""fp32 → bfloat16 bit patterns, by round-to-nearest-even or by truncation.

NPU runtimes that look token embeddings up on the CPU (AXERA's ax-llm) read a raw
``[vocab, hidden]`` array of bf16 words. bf16 is the upper 16 bits of an IEEE fp32, so the
conversion is integer arithmetic on the bit pattern. Rounding to nearest even is what
``torch.Tensor.bfloat16()`` and hardware casts do and halves the worst-case error; AXERA's
own ``fp32_to_bf16`` tool truncates (drops the low 16 bits), so :func:`fp32_to_bf16_truncate`
exists for byte-for-byte compatibility with the vendor flow. Both are pure numpy functions
that work in row chunks, so a 600 MB table never needs a second full-size copy in fp32.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from common.core.errors import EdgeforgeError

#: Rows converted per chunk when streaming a table to disk (bounded extra memory).
_CHUNK_ROWS = 4096
#: Quiet-NaN bf16 word: NaNs must stay NaN (rounding could carry them into infinity).
_BF16_QNAN = np.uint16(0x7FC0)


def _as_fp32_bits(values: np.ndarray) -> np.ndarray:
    """The fp32 bit patterns of ``values`` (a float32 array) as uint32, without copying."""
    if values.dtype != np.float32:
        raise EdgeforgeError(f"bf16 conversion expects a float32 array, got {values.dtype}")
    return np.ascontiguousarray(values).view(np.uint32)


def fp32_to_bf16_rne(values: np.ndarray) -> np.ndarray:
    """bf16 words (uint16) of ``values`` rounded to nearest, ties to even; NaN stays NaN.

    Adding ``0x7FFF + lsb`` to the fp32 word and keeping the top half is the standard
    integer form of round-half-to-even: it carries into the kept half exactly when the
    dropped half exceeds 0x8000, or equals it and the kept half is odd.
    """
    bits = _as_fp32_bits(values)
    lsb = (bits >> 16) & np.uint32(1)
    rounded = ((bits + np.uint32(0x7FFF) + lsb) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), _BF16_QNAN, rounded)


def fp32_to_bf16_truncate(values: np.ndarray) -> np.ndarray:
    """bf16 words (uint16) of ``values`` by dropping the low 16 bits (AXERA's tool)."""
    return (_as_fp32_bits(values) >> 16).astype(np.uint16)


def bf16_to_fp32(words: np.ndarray) -> np.ndarray:
    """Widen bf16 words (uint16) back to float32 exactly (low 16 bits zero)."""
    if words.dtype != np.uint16:
        raise EdgeforgeError(f"bf16 words must be uint16, got {words.dtype}")
    return (words.astype(np.uint32) << 16).view(np.float32)


def _chunks(table: np.ndarray, truncate: bool) -> Iterator[np.ndarray]:
    convert = fp32_to_bf16_truncate if truncate else fp32_to_bf16_rne
    for start in range(0, table.shape[0], _CHUNK_ROWS):
        yield convert(np.ascontiguousarray(table[start : start + _CHUNK_ROWS], dtype=np.float32))


def write_bf16_table(table: np.ndarray, dest: Path, *, truncate: bool = False) -> dict[str, float]:
    """Write a 2-D fp32 table to ``dest`` as raw little-endian row-major bf16 words.

    ``dest`` should be a temporary path (the caller renames it into place). Returns the
    conversion error against the fp32 table (max abs, max relative over normal values,
    cosine) so the report can show what the rounding mode costs.
    """
    if table.ndim != 2:
        raise EdgeforgeError(f"embedding table must be 2-D [vocab, hidden], got {table.shape}")
    max_abs = 0.0
    max_rel = 0.0
    dot = norm_a = norm_b = 0.0
    with open(dest, "wb") as fh:
        for start, words in zip(
            range(0, table.shape[0], _CHUNK_ROWS), _chunks(table, truncate), strict=True
        ):
            fh.write(words.astype("<u2", copy=False).tobytes())
            ref = np.asarray(table[start : start + words.shape[0]], dtype=np.float64)
            got = bf16_to_fp32(words).astype(np.float64)
            diff = np.abs(got - ref)
            max_abs = max(max_abs, float(diff.max(initial=0.0)))
            normal = np.abs(ref) >= np.finfo(np.float32).tiny
            if normal.any():
                max_rel = max(max_rel, float((diff[normal] / np.abs(ref[normal])).max()))
            dot += float((got * ref).sum())
            norm_a += float((got * got).sum())
            norm_b += float((ref * ref).sum())
    cosine = dot / max(np.sqrt(norm_a * norm_b), 1e-300)
    return {"max_abs": max_abs, "max_rel": max_rel, "cosine": cosine}

"""bf16 words: round-to-nearest-even matches torch's cast bit for bit; truncation drops bits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.core.errors import EdgeforgeError
from common.quant.bf16 import (
    bf16_to_fp32,
    fp32_to_bf16_rne,
    fp32_to_bf16_truncate,
    write_bf16_table,
)


def _torch_bf16_words(values: np.ndarray) -> np.ndarray:
    return torch.from_numpy(values).bfloat16().view(torch.int16).numpy().view(np.uint16)


def test_rne_equals_torch_cast_on_random_and_edge_values() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([
        (rng.standard_normal(100_000) * 10.0 ** rng.integers(-30, 30, 100_000)).astype(np.float32),
        # Exact ties (low half 0x8000) with even and odd kept halves, and near-ties.
        np.array([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001], dtype=np.uint32).view(
            np.float32
        ),
        np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3.4028235e38], dtype=np.float32),
    ])  # fmt: skip
    assert np.array_equal(fp32_to_bf16_rne(values), _torch_bf16_words(values))


def test_ties_round_to_even_and_truncation_drops_low_bits() -> None:
    ties = np.array([0x3F808000, 0x3F818000], dtype=np.uint32).view(np.float32)
    assert fp32_to_bf16_rne(ties).tolist() == [0x3F80, 0x3F82]
    assert fp32_to_bf16_truncate(ties).tolist() == [0x3F80, 0x3F81]
    assert np.isnan(bf16_to_fp32(fp32_to_bf16_rne(np.array([np.nan], dtype=np.float32))))[0]


def test_table_file_is_raw_row_major_words(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    table = rng.standard_normal((5000, 24)).astype(np.float32)  # > one 4096-row chunk
    for truncate in (False, True):
        dest = tmp_path / f"t{truncate}.bin"
        stats = write_bf16_table(table, dest, truncate=truncate)
        words = np.fromfile(dest, dtype="<u2").reshape(table.shape)
        expected = fp32_to_bf16_truncate(table) if truncate else _torch_bf16_words(table)
        assert np.array_equal(words, expected)
        assert dest.stat().st_size == table.size * 2
        # bf16 keeps 8 significand bits: relative error ≤ 2^-8 rounded, < 2^-7 truncated.
        assert stats["max_rel"] <= (2**-7 if truncate else 2**-8)
        assert stats["cosine"] > 0.9999


def test_rejects_wrong_dtype() -> None:
    with pytest.raises(EdgeforgeError, match="float32"):
        fp32_to_bf16_rne(np.zeros(3, dtype=np.float64))

"""The common accuracy block: the interval and the figures every target's report carries."""

from __future__ import annotations

import math

import pytest
import torch

from common.analysis.accuracy import (
    accuracy_block,
    accuracy_line,
    rows_for_half_width,
    wilson_interval,
)
from common.analysis.eval import LogitComparison


def test_wilson_interval_matches_the_textbook_values() -> None:
    # Wilson (1927) / Newcombe (1998) table values at 95 %.
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    assert wilson_interval(1, 2) == pytest.approx((0.0945, 0.9055), abs=1e-4)
    # make qnn's default, 8 windows of 32 rows, at SmolLM2 w8a16's 250 of 256
    assert wilson_interval(250, 256) == pytest.approx((0.9498, 0.9892), abs=1e-4)
    for bad in ((3, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_rows_for_a_one_percent_interval() -> None:
    # about the normal approximation's 1.96² p(1-p) / 0.01² where that holds (9604 at 0.5)
    assert rows_for_half_width(0.5) == 9600
    assert rows_for_half_width(0.977) == 897
    # at 1.0 the Wilson width is z² / (2n + z²): no rows of spread measured, still ~190
    assert rows_for_half_width(1.0) == rows_for_half_width(0.0) == 189
    for p in (0.5, 0.977, 1.0):
        rows = rows_for_half_width(p)
        low, high = wilson_interval(round(p * rows), rows)
        assert (high - low) / 2 <= 0.0101


def _comparison(got: torch.Tensor, want: torch.Tensor, windows: torch.Tensor) -> dict:
    comparison = LogitComparison()
    for g, w, ids in zip(got, want, windows, strict=True):
        comparison.add(g, w, ids)
    return comparison.result()


def test_block_of_an_exact_artifact_and_of_a_lossy_one() -> None:
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 50, (4, 16), generator=gen)
    want = torch.randn(4, 16, 50, generator=gen)
    exact = accuracy_block(_comparison(want, want, windows), "the float model itself", 16)
    assert exact["ppl_ratio"] == 1.0 and exact["top1_agreement"] == 1.0
    assert exact["top1_interval_95"][1] == 1.0 and (exact["rows"], exact["windows"]) == (64, 4)
    noisy = want + 2.0 * torch.randn(want.shape, generator=gen)
    block = accuracy_block(_comparison(noisy, want, windows), "a noisy copy", 16)
    agreed = sum(
        int((n.argmax(-1) == w.argmax(-1)).sum()) for n, w in zip(noisy, want, strict=True)
    )
    assert block["top1_agreement"] == agreed / 64
    low, high = block["top1_interval_95"]
    assert low < block["top1_agreement"] < high
    # the ratio is of perplexities over the same targets (every row but each window's last)
    targets = windows[:, 1:]

    def ppl(logits: torch.Tensor) -> float:
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 50).double(), targets.reshape(-1), reduction="mean"
        )
        return math.exp(float(nll))

    assert block["ppl_ratio"] == pytest.approx(ppl(noisy) / ppl(want), rel=1e-5)
    assert block["windows_for_1pct"] == math.ceil(rows_for_half_width(agreed / 64) / 16)
    line = accuracy_line(block)
    assert line.startswith("**Accuracy** (a noisy copy; 4 held-out windows, 64 rows)")
    assert f"about {block['windows_for_1pct']} windows" in line
    assert "about 12 windows of this length" in accuracy_line(exact)  # 189 rows at 1.0
    assert "windows of this length" not in accuracy_line({**exact, "top1_interval_95": [0.99, 1]})

"""The shared gate record: comparisons, missing values, the report shape and its text."""

from __future__ import annotations

import math

import pytest

from common.core.gates import (
    by_name,
    failures,
    from_record,
    gate,
    limit_text,
    markdown_table,
    records,
)


def test_comparisons() -> None:
    assert gate("a", 0.9995, ">=", 0.999).passed
    assert not gate("a", 0.998, ">=", 0.999).passed
    assert gate("b", 3, "==", 3).passed and not gate("b", 2, "==", 3).passed
    assert gate("c", 1.0004, "within", (0.999, 1.001)).passed
    assert not gate("c", 1.002, "within", (0.999, 1.001)).passed
    assert not gate("d", 1.0, "<", 1.0).passed and gate("d", 0.5, "<", 1.0).passed


def test_missing_or_nan_value_fails() -> None:
    assert not gate("a", None, "<=", 1.0).passed
    assert not gate("a", math.nan, "<=", 1.0).passed  # NaN <= x is False anyway; stated


def test_bad_gate_definitions() -> None:
    with pytest.raises(ValueError, match="unknown comparison"):
        gate("a", 1, "=>", 0)
    with pytest.raises(ValueError, match=r"'within' needs \[low, high\]"):
        gate("a", 1, "within", 0.5)


def test_record_shape_round_trip_and_text() -> None:
    checks = [
        gate("ppl_ratio", 1.002, "within", (0.999, 1.001)),
        gate("min_piece_cos", 0.98, ">=", 0.99, "below: block_3"),
        gate("top1", 0.97, ">=", 0.95),
    ]
    written = records(checks)
    assert written[0] == {"name": "ppl_ratio", "value": 1.002, "op": "within",
                          "limit": [0.999, 1.001], "passed": False}  # fmt: skip
    assert written[1]["detail"] == "below: block_3" and "detail" not in written[2]
    assert [from_record(r) for r in written] == checks
    assert (
        failures(written)
        == failures(checks)
        == [
            "ppl_ratio: 1.002 (needs within [0.999, 1.001])",
            "min_piece_cos: 0.98 (needs >= 0.99), below: block_3",
        ]
    )
    assert limit_text(by_name(written)["top1"]) == "≥ 0.95"
    table = markdown_table(written)
    assert table[0] == "| gate | value | requirement | result |"
    assert table[3] == "| min_piece_cos | 0.98 | ≥ 0.99 | **FAIL** (below: block_3) |"
    assert table[4] == "| top1 | 0.97 | ≥ 0.95 | pass |"

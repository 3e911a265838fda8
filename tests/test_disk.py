"""The disk preflight: a step that cannot fit says so in one line before it starts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.core.disk import DiskEstimate, disk_preflight, free_bytes
from common.core.errors import EdgeforgeError
from common.core.records import tree_bytes


def test_estimate_counts_what_an_earlier_run_left() -> None:
    estimate = DiskEstimate("make x", {"pieces": 3 * 2**30, "package": 2**30}, reused=2**30)
    assert estimate.total == 3 * 2**30
    assert estimate.describe() == (
        "3.00 GiB (pieces 3.00 GiB, package 1.00 GiB, less 1.00 GiB reused from an earlier run)"
    )
    assert DiskEstimate("make x", {"pieces": 1}, reused=5).total == 0


def test_preflight_names_the_need_and_the_free_space(tmp_path: Path) -> None:
    where = tmp_path / "build" / "not-yet"  # read on the filesystem of its nearest parent
    free = shutil.disk_usage(tmp_path).free
    assert abs(free_bytes(where) - free) < 2**30
    disk_preflight(DiskEstimate("make x", {"pieces": 1}), where, "free space")  # fits
    with pytest.raises(EdgeforgeError) as caught:
        disk_preflight(DiskEstimate("make x", {"pieces": free + 2**40}), where, "free space")
    message = str(caught.value)
    assert message.startswith("make x needs about ") and f"of disk under {where}" in message
    assert message.endswith("is free there; free space") and "\n" not in message
    assert not where.exists()  # the check writes nothing


def test_tree_bytes(tmp_path: Path) -> None:
    assert tree_bytes(tmp_path / "missing") == 0
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x" * 10)
    (tmp_path / "g").write_bytes(b"y" * 5)
    assert tree_bytes(tmp_path) == 15

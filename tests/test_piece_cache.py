"""Cache keys and entries of per-piece work kept across runs (common/core/piece_cache.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.core.piece_cache import PieceCache, cache_key


def test_keys_follow_content_not_location(tmp_path: Path) -> None:
    a, b = tmp_path / "a.onnx", tmp_path / "elsewhere" / "b.onnx"
    b.parent.mkdir()
    a.write_bytes(b"graph")
    b.write_bytes(b"graph")
    assert cache_key({"model": a}) == cache_key({"model": b})
    b.write_bytes(b"other graph")
    assert cache_key({"model": a}) != cache_key({"model": b})
    assert cache_key({"model": tmp_path / "absent"}) == cache_key({"model": None})


def test_arrays_and_tensors_key_by_dtype_shape_and_bytes() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    key = cache_key({"x": x})
    assert cache_key({"x": torch.from_numpy(x.copy())}) == key  # a tensor is its array
    assert cache_key({"x": np.asfortranarray(x)}) == key  # memory layout does not count
    assert cache_key({"x": x.reshape(3, 2)}) != key
    assert cache_key({"x": x.astype(np.float64)}) != key
    changed = x.copy()
    changed[1, 2] = 7.5
    assert cache_key({"x": changed}) != key
    assert cache_key({"feeds": [{"a": x}]}) != cache_key({"feeds": [{"a": changed}]})


def test_entries_are_reused_and_pruned(tmp_path: Path) -> None:
    cache = PieceCache(tmp_path / "cache")
    built: list[str] = []

    def build(folder: Path) -> None:
        built.append(folder.name)
        (folder / "out.txt").write_text("done")

    first = cache.fetch_or_build("p", cache_key({"v": 1}), build)
    (tmp_path / "cache" / "stale.0000").mkdir()
    again = PieceCache(tmp_path / "cache")
    assert again.fetch_or_build("p", cache_key({"v": 1}), build) == first
    assert len(built) == 1 and again.reused == ["p"]
    assert again.prune() == ["stale.0000"]
    assert (first / "out.txt").read_text() == "done"

"""Build records: atomic outputs leave nothing behind on failure; manifests hash inputs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from common.core.records import (
    atomic_path,
    build_manifest,
    dumps_json,
    hash_tree,
    sha256_file,
    write_json_atomic,
)


def test_atomic_file_replaces_only_on_success(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with atomic_path(dest) as tmp:
        tmp.write_bytes(b"new")
    assert dest.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_directory(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    with pytest.raises(ValueError), atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_bytes(b"x")
        raise ValueError
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    for content in (b"first", b"second"):
        with atomic_path(dest) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_bytes(content)
    assert (dest / "weights").read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_path_requires_output(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="produced nothing"), atomic_path(tmp_path / "x"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_canonical_json_is_stable(tmp_path: Path) -> None:
    a, b = {"b": 1, "a": [1, 2]}, {"a": [1, 2], "b": 1}
    assert dumps_json(a) == dumps_json(b)
    write_json_atomic(tmp_path / "m.json", a)
    assert (tmp_path / "m.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'


def test_manifest_hashes_inputs_and_outputs(tmp_path: Path) -> None:
    src = tmp_path / "input.bin"
    src.write_bytes(b"weights")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("A")
    (out / "manifest.json").write_text("{}")
    manifest = build_manifest(
        step="unit", inputs={"w": src}, outputs=out, recipe={"name": "x"}, options={"seed": 3}
    )
    assert manifest["inputs"]["w"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert manifest["outputs"] == {"a.txt": hashlib.sha256(b"A").hexdigest()}
    assert manifest["options"] == {"seed": 3}
    assert manifest["versions"]["torch"] is not None
    assert sha256_file(src) == hash_tree(tmp_path)["input.bin"]

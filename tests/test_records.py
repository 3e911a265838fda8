"""Build records: atomic outputs leave nothing behind on failure; manifests hash inputs."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common.core.records import (
    atomic_path,
    build_manifest,
    container_image,
    dumps_json,
    hash_tree,
    sha256_file,
    write_json_atomic,
)
from tests.conftest import REPO_ROOT


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


def test_manifest_names_the_container_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """docker/run.sh's two variables give the manifest's "container"; none means native."""
    monkeypatch.delenv("EDGEFORGE_IMAGE", raising=False)
    monkeypatch.delenv("EDGEFORGE_IMAGE_ID", raising=False)
    assert build_manifest(step="unit", inputs={})["container"] is None
    monkeypatch.setenv("EDGEFORGE_IMAGE", "edgeforge/cpu:0123456789ab")
    with pytest.raises(RuntimeError, match="set together"):
        container_image()
    monkeypatch.setenv("EDGEFORGE_IMAGE_ID", "sha256:" + "0" * 64)
    assert build_manifest(step="unit", inputs={})["container"] == {
        "image": "edgeforge/cpu:0123456789ab",
        "id": "sha256:" + "0" * 64,
    }


def dead_pid() -> int:
    """The id of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_temporaries_of_dead_runs_are_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A killed run's temporary goes at the next write of the same output; a live
    process's, another host's, another output's and an ownerless one stay."""
    dest = tmp_path / "qnn"
    with atomic_path(dest) as tmp:
        mine = tmp.parent.name  # .qnn.<pid>@<host>.<random>.tmp
        tmp.write_bytes(b"first")
    owner = f".qnn.{os.getpid()}@"
    assert mine.startswith(owner) and mine.endswith(".tmp")
    host = mine[len(owner) :].split(".")[0]
    other_host = "ffffffff" if host != "ffffffff" else "00000000"
    pid = dead_pid()
    dead = tmp_path / f".qnn.{pid}@{host}.k2j3h4aa.tmp"
    (dead / "qnn").mkdir(parents=True)
    (dead / "qnn" / "weights").write_bytes(b"\0" * (3 << 20))
    kept = [
        tmp_path / f".qnn.{os.getpid()}@{host}.live0000.tmp",  # this process: alive
        tmp_path / f".qnn.{pid}@{other_host}.other000.tmp",  # pids of another host
        tmp_path / f".qnn.1.{pid}@{host}.sibling0.tmp",  # the temporary of ``qnn.1``
        tmp_path / ".qnn.legacy00.tmp",  # made before owners were recorded: unknown
    ]
    for path in kept:
        path.mkdir()
    capsys.readouterr()
    with atomic_path(dest) as tmp:
        tmp.write_bytes(b"second")
    assert dest.read_bytes() == b"second"
    assert not dead.exists()
    assert all(path.is_dir() for path in kept)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and dead.name in lines[0] and "3.0 MiB" in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == sorted(["qnn", *(path.name for path in kept)])


def test_sigterm_removes_the_temporary(tmp_path: Path) -> None:
    """``kill`` (SIGTERM) of a command run by ``run_cli`` runs its ``finally`` blocks: the
    temporary is removed, one ``error:`` line, exit 143."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from common.core.errors import run_cli\n"
        "from common.core.records import atomic_path\n"
        "def main():\n"
        "    with atomic_path(Path(sys.argv[1])) as tmp:\n"
        "        tmp.write_bytes(b'partial')\n"
        "        print(tmp, flush=True)\n"
        "        time.sleep(120)\n"
        "run_cli(main)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "out.bin")],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    partial = Path(proc.stdout.readline().strip())
    assert partial.read_bytes() == b"partial"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.splitlines() == ["error: terminated"]
    assert list(tmp_path.iterdir()) == []

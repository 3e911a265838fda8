"""Build records: atomic outputs and ``manifest.json``.

Every artifact is written to a temporary sibling and renamed into place, so an interrupted
or failed build never leaves a half-written file or directory behind, and a later ``make``
sees either the old complete output or nothing. Every artifact directory carries a
manifest with what went in (hashes), how (options, seeds) and with what (versions).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from common.core.paths import REPO_ROOT

#: Libraries whose versions change numerics or file formats; recorded in every manifest.
KEY_LIBRARIES = (
    "torch",
    "torchvision",
    "transformers",
    "tokenizers",
    "safetensors",
    "gguf",
    "onnx",
    "onnxruntime",
    "numpy",
    "zstandard",
)

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB weights do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by POSIX relative path, sorted."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


#: Whose a temporary is: ``<pid>@<host>``, host being 8 hex digits of the hostname's hash.
#: A container (docker/run.sh) writes into the same build folder with its own process ids
#: and its own hostname, so a pid is only judged on the host that owns it.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only on success.

    Works for files and directories: the caller creates whatever it likes at the yielded
    path. On an exception the temporary is removed and ``dest`` is left untouched. The
    yielded path's folder (``.<name>.<pid>@<host>.<random>.tmp``) is private to this call
    and removed with it, so a writer may keep scratch files beside its output there.

    A run killed outright (SIGKILL, out of memory) cannot remove its temporary; the next
    ``atomic_path`` of the same ``dest`` does, once the owning process is gone (see
    :func:`remove_dead_temporaries`).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(dest)
    tmp = Path(
        tempfile.mkdtemp(
            prefix=f".{dest.name}.{os.getpid()}@{_HOST}.", suffix=".tmp", dir=dest.parent
        )
    )
    target = tmp / dest.name
    try:
        yield target
        if not target.exists():
            raise RuntimeError(f"atomic write of {dest} produced nothing")
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(target, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_dead_temporaries(dest: Path) -> list[Path]:
    """Remove the temporaries of ``dest`` whose owning process no longer runs; return them.

    Only names :func:`atomic_path` makes on this host are considered, and a process that
    still exists (even one we may not signal) keeps its temporary. One line on stderr says
    what was removed and how much space it held.
    """
    dest = Path(dest)
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(\d+)@{_HOST}\.[^.]+\.tmp")
    removed: list[Path] = []
    size = 0
    for entry in sorted(dest.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match is None or _process_exists(int(match.group(1))):
            continue
        size += tree_bytes(entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        names = ", ".join(p.name for p in removed)
        print(
            f"[records] removed {len(removed)} temporary of dead runs beside {dest} "
            f"({size / 2**20:.1f} MiB): {names}",
            file=sys.stderr,
        )
    return removed


def _process_exists(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (or of ``path`` itself), links not followed; 0 when
    it does not exist."""
    if not path.exists() and not path.is_symlink():
        return 0
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def write_bytes_atomic(dest: Path, data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def dumps_json(obj: Any) -> str:
    """Canonical JSON (sorted keys, 2-space indent, trailing newline): same data, same bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json_atomic(dest: Path, obj: Any) -> None:
    """Write ``obj`` as canonical JSON to ``dest`` atomically."""
    write_bytes_atomic(dest, dumps_json(obj).encode())


def library_versions(names: Iterable[str] = KEY_LIBRARIES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None when absent), for the manifest."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo: Path | None = None) -> str | None:
    """The checkout's commit (with ``-dirty`` when it has local changes), or None."""
    cwd = repo or REPO_ROOT
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def container_image() -> dict[str, str] | None:
    """The image a step runs in (``USE_DOCKER=1``), or None when it runs natively.

    docker/run.sh passes the image's tag and id (the sha256 of its configuration, which
    names every layer) in the environment; the manifest records both, so an artifact says
    which exact environment made it. Only one of the two set means a broken launcher.
    """
    tag, image_id = os.environ.get("EDGEFORGE_IMAGE"), os.environ.get("EDGEFORGE_IMAGE_ID")
    if tag is None and image_id is None:
        return None
    if not tag or not image_id:
        raise RuntimeError(
            "EDGEFORGE_IMAGE and EDGEFORGE_IMAGE_ID must be set together (docker/run.sh sets both)"
        )
    return {"image": tag, "id": image_id}


def build_manifest(
    *,
    step: str,
    inputs: Mapping[str, Path],
    outputs: Path | None = None,
    recipe: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    toolchains: Mapping[str, str] | None = None,
    checks: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Describe one build step: inputs, recipe, options, checks, versions, commit, image.

    ``inputs`` maps a label to a file or a directory (directories are hashed file by
    file). ``outputs``, when given, is a directory whose files are hashed too, excluding
    the manifest itself, so a consumer can check an artifact bundle is complete.
    ``container`` is the image the step ran in (:func:`container_image`; None natively).
    """

    def describe(path: Path) -> dict[str, Any]:
        path = Path(path)
        if path.is_dir():
            return {"path": str(path), "files": hash_tree(path)}
        return {"path": str(path), "sha256": sha256_file(path)}

    manifest: dict[str, Any] = {
        "step": step,
        "inputs": {label: describe(p) for label, p in sorted(inputs.items())},
        "recipe": dict(recipe) if recipe is not None else None,
        "options": dict(options or {}),
        **({"checks": dict(checks)} if checks is not None else {}),
        "versions": {
            "python": platform.python_version(),
            **library_versions(),
            **dict(toolchains or {}),
        },
        "git_commit": git_commit(),
        "container": container_image(),
        "command": sys.argv,
    }
    if outputs is not None:
        files = hash_tree(Path(outputs))
        files.pop("manifest.json", None)
        manifest["outputs"] = files
    return manifest

"""Per-piece outputs kept across runs, so a killed build continues from its last complete piece.

Compiling a 7B model's pieces takes hours; a build killed (or crashed, or out of memory)
at piece 40 of 70 should not start again at piece 1. A long per-piece step therefore
writes each piece's outputs into its own entry of a :class:`PieceCache` folder, named
``<piece>.<key>`` where the key is a hash of everything that went into it (the input
file's bytes, the options, the toolchain's version). An entry appears by an atomic rename
only once complete, so a present entry is a finished piece; the next run with the same
inputs finds it and skips the work, while a changed input or option gives a new key and
is built afresh. After a run succeeds, :meth:`PieceCache.prune` removes entries it did not
use, so the folder holds one build's pieces, not every build ever made. Temporaries of a
killed run are removed when the same entry is built again (:func:`atomic_path`) or pruned.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.core.records import atomic_path, sha256_file

#: Hex digits of the key in an entry's name (64 bits: no collisions among a build's pieces).
KEY_CHARS = 16


def cache_key(parts: Mapping[str, Any]) -> str:
    """The hash of ``parts`` (JSON-able values; a path by its file's sha256, or None when
    there is no such file: where the build folder lies never changes a key; an array or
    tensor by its dtype, shape and bytes)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return {"sha256": sha256_file(value)} if value.is_file() else None
        if hasattr(value, "detach"):  # a torch tensor, without importing torch here
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            data = np.ascontiguousarray(value)
            digest = hashlib.sha256(data.reshape(-1).view(np.uint8)).hexdigest()
            return {"dtype": str(data.dtype), "shape": list(data.shape), "sha256": digest}
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    text = json.dumps(plain(parts), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class PieceCache:
    """One folder of per-piece entries; safe to use from several threads at once."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._used: set[str] = set()
        self._reused: list[str] = []
        self._lock = threading.Lock()

    def entry(self, name: str, key: str) -> Path:
        return self.root / f"{name}.{key[:KEY_CHARS]}"

    def fetch_or_build(self, name: str, key: str, build: Callable[[Path], None]) -> Path:
        """The entry of ``name`` for ``key``: as found, or made by ``build(folder)``, which
        writes the piece's outputs into ``folder`` (renamed into place when it returns)."""
        entry = self.entry(name, key)
        with self._lock:
            self._used.add(entry.name)
        if entry.is_dir():
            with self._lock:
                self._reused.append(name)
            return entry
        with atomic_path(entry) as tmp:
            tmp.mkdir()
            build(tmp)
        return entry

    @property
    def reused(self) -> list[str]:
        """Pieces found complete from an earlier run, in the order they were asked for."""
        return list(self._reused)

    def prune(self) -> list[str]:
        """Remove every entry (and temporary) this run did not use; their names."""
        removed = []
        for path in sorted(self.root.iterdir()):
            if path.name not in self._used:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed.append(path.name)
        if removed:
            print(
                f"[cache] removed {len(removed)} unused entr{'y' if len(removed) == 1 else 'ies'} "
                f"of {self.root}",
                file=sys.stderr,
            )
        return removed

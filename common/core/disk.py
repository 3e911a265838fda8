"""Disk preflight: a step that writes tens of gigabytes says so before it starts.

At real size the intermediate files, not the artifact, set a build's disk use: Qwen-7B's
float ONNX pieces alone are about 60 GB. A build that fills the disk after an hour of work
ends in an ``error:`` line anyway (:mod:`common.core.errors`), but by then the hour is
spent; :func:`disk_preflight` compares the step's estimate with the free space where it
writes, before any heavy work, and stops with one line naming both.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.core.errors import EdgeforgeError
from common.core.resources import gib


@dataclass(frozen=True)
class DiskEstimate:
    """What a step writes at its fullest, by part (``{"float ONNX pieces": bytes, ...}``),
    less what earlier runs left that it reuses (``reused``, already on the disk)."""

    step: str
    parts: Mapping[str, int]
    reused: int = 0

    @property
    def total(self) -> int:
        return max(0, sum(self.parts.values()) - self.reused)

    def describe(self) -> str:
        parts = ", ".join(f"{name} {gib(n)}" for name, n in self.parts.items() if n)
        reused = f", less {gib(self.reused)} reused from an earlier run" if self.reused else ""
        return f"{gib(self.total)} ({parts}{reused})"


def free_bytes(where: Path) -> int:
    """Free bytes on the filesystem that holds ``where`` (or its nearest existing parent)."""
    path = Path(where).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def disk_preflight(estimate: DiskEstimate, where: Path, remedy: str) -> None:
    """Stop with one line when ``estimate`` exceeds the free space under ``where``;
    ``remedy`` says what lowers the need."""
    free = free_bytes(where)
    if estimate.total > free:
        raise EdgeforgeError(
            f"{estimate.step} needs about {estimate.describe()} of disk under {where}, and "
            f"{gib(free)} is free there; {remedy}"
        )

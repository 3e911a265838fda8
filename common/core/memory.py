"""Memory preflight: estimate a step's peak before the heavy work, stop early if it cannot fit.

A step that runs out of memory an hour in (or gets the machine's other jobs killed) is the
worst way to learn a model is too big. Each step therefore estimates its peak from the
checkpoint's headers, the config and its options, and compares it with a cap:
``MAX_MEMORY`` when the user gives one, otherwise what the machine has available now
(``MemAvailable``, or the container's cgroup limit when that is lower). Over the cap, one
``error:`` line names the estimate, its parts, the cap, and the option that lowers it.
The measured peak is recorded afterwards in every ``report.json``
(:mod:`common.core.resources`), so estimates can be checked against reality.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.core.errors import EdgeforgeError
from common.core.resources import gib, kib_field

GIB = 2**30

#: What Python with torch, transformers and onnxruntime imported holds before any model
#: (measured 0.58 GiB resident with the project's pinned versions), with a margin.
RUNTIME_BYTES = int(0.75 * GIB)

_SIZE_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": GIB,
               "GB": GIB, "T": 2**40, "TB": 2**40}  # fmt: skip


def parse_size(text: str, option: str = "MAX_MEMORY") -> int:
    """Bytes from ``4GB`` / ``512MB`` / ``1000000`` (binary units); errors name ``option``."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?B?)\s*", str(text).upper())
    if not match or float(match.group(1)) <= 0:
        raise EdgeforgeError(f"{option}: expected a size such as 16GB or 512MB, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _cgroup_room(cgroup: Path) -> int | None:
    """``memory.max − memory.current`` of this process's cgroup (v2), None if unlimited."""
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        used = int((cgroup / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    return max(int(limit) - used, 0)


def available_bytes(
    meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """What this process may still allocate: the smaller of the machine's ``MemAvailable``
    and its cgroup's room; None where neither can be read (then no cap applies)."""
    machine = kib_field(meminfo, "MemAvailable")
    found = [x for x in (machine, _cgroup_room(cgroup)) if x is not None]
    return min(found) if found else None


@dataclass(frozen=True)
class MemoryCap:
    """The bytes a step may use and where that figure came from (for the error line)."""

    bytes: int
    source: str

    @classmethod
    def resolve(cls, max_memory: str | int | None) -> MemoryCap | None:
        """``MAX_MEMORY`` when given (a size or bytes), else what is available now."""
        if max_memory is not None and max_memory != "":
            nbytes = max_memory if isinstance(max_memory, int) else parse_size(max_memory)
            return cls(nbytes, f"MAX_MEMORY={gib(nbytes)}")
        available = available_bytes()
        if available is None:
            return None
        return cls(available, f"the {gib(available)} this machine has available (MAX_MEMORY)")


@dataclass(frozen=True)
class Estimate:
    """A step's estimated peak, by part (``{"float32 model": bytes, ...}``)."""

    step: str
    parts: Mapping[str, int]

    @property
    def total(self) -> int:
        return RUNTIME_BYTES + sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {gib(n)}" for name, n in self.parts.items() if n)
        return f"{gib(self.total)} ({parts}, runtime {gib(RUNTIME_BYTES)})"

    def to_json(self) -> dict[str, int]:
        """For ``report.json``: the estimate beside the measured peak."""
        return {"total": self.total, "runtime": RUNTIME_BYTES, **self.parts}


def preflight(estimate: Estimate, cap: MemoryCap | None, lower: str) -> None:
    """Stop with one line when ``estimate`` exceeds ``cap``; ``lower`` says what to change
    (an option that lowers the peak, with its own estimate where there is one)."""
    if cap is not None and estimate.total > cap.bytes:
        raise EdgeforgeError(
            f"{estimate.step} needs about {estimate.describe()}, over {cap.source}; {lower}"
        )


def room_bytes(max_memory: str | int | None) -> int | None:
    """What this process's children may still use: ``MAX_MEMORY`` less what this process
    holds now, or else what the machine has available now (which already counts it);
    None where neither can be read."""
    if max_memory is None or max_memory == "":
        return available_bytes()
    cap = MemoryCap.resolve(max_memory)
    assert cap is not None  # a given MAX_MEMORY always resolves
    return cap.bytes - (kib_field(Path("/proc/self/status"), "VmRSS") or 0)


class MemoryGate:
    """Admits concurrent work while the bytes it is admitted at stay within ``budget``.

    Parallel jobs (tool processes) each need a known amount of memory; a job waits until
    the running ones leave room for it. One job is always admitted when nothing else runs,
    however large (the preflight has checked that the largest fits on its own). ``budget``
    None admits everything (no cap could be read)."""

    def __init__(self, budget: int | None) -> None:
        import threading

        self.budget = budget
        self.used = 0
        self._changed = threading.Condition()

    @contextmanager
    def admitted(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of the budget while the block runs."""
        with self._changed:
            while self.used and self.budget is not None and self.used + nbytes > self.budget:
                self._changed.wait()
            self.used += nbytes
        try:
            yield
        finally:
            with self._changed:
                self.used -= nbytes
                self._changed.notify_all()

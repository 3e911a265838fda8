"""Measured resources of a step: its process's peak memory and its children's.

Every ``report.json`` records what its step cost (``"resources"``, written by
:meth:`common.steps.phases.Run.resources`); this module measures it and renders its one
``report.md`` line. It sits in ``core`` so any layer's report writer can render it.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

#: ``ru_maxrss`` is in kilobytes on Linux, in bytes on macOS.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024
#: Seconds between two looks at the child processes (a child that lives less is missed).
CHILD_SAMPLE_SECONDS = 0.5


def kib_field(path: Path, name: str) -> int | None:
    """The ``<name>:  N kB`` field of a /proc file (``status``, ``meminfo``) in bytes; None
    when the file cannot be read (no /proc, a process that has exited) or lacks it."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) * 1024
    return None


def _vmhwm(pid: int | str) -> int | None:
    """``VmHWM`` of a live process in bytes (None without /proc, or once it has exited)."""
    return kib_field(Path(f"/proc/{pid}/status"), "VmHWM")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux's ``VmHWM``). It never
    decreases, so the value at a phase's end covers every earlier phase.

    ``getrusage``'s ``ru_maxrss`` is only the fallback (no /proc, e.g. macOS): on Linux it
    also counts the parent's memory at the fork that started this process (a build run from
    pytest would report pytest's peak).
    """
    hwm = _vmhwm("self")
    if hwm is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT
    return hwm


def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (children of children too: tools run via a shell)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue  # ended while we looked
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def tree_rss_bytes(root: int) -> int:
    """Resident bytes of ``root`` and every live descendant now: what the machine holds for
    a command that runs through make, shells and tools."""
    pids = {root, *descendants(root)}
    return sum(kib_field(Path(f"/proc/{pid}/status"), "VmRSS") or 0 for pid in pids)


class TreePeak:
    """The largest :func:`tree_rss_bytes` of process ``root`` seen while it runs, sampled
    every ``seconds`` in a background thread until :meth:`stop` (which returns it): what a
    command and all the tools it starts held at once, as a ``MAX_MEMORY`` cap means it."""

    def __init__(self, root: int, seconds: float = CHILD_SAMPLE_SECONDS) -> None:
        self.bytes = 0
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(seconds):
                self.bytes = max(self.bytes, tree_rss_bytes(root))

        self._thread = threading.Thread(target=loop, name="tree-rss", daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.bytes


class ChildPeak:
    """The largest peak RSS of this process's children, sampled in a background thread.

    A child's memory (tpu-mlir tools, the simulator, compilers) is its own, never part of
    :func:`peak_rss_bytes`. The kernel's own figure (``RUSAGE_CHILDREN``) cannot be used:
    it counts this process's memory at each fork as the child's. So live descendants'
    ``VmHWM`` (their own peak since they started) is read every
    :data:`CHILD_SAMPLE_SECONDS`; a child that ends sooner is missed. ``None`` without /proc.
    The thread ends with :meth:`stop` or when the object is dropped.
    """

    def __init__(self) -> None:
        self.bytes: int | None = 0 if Path("/proc/self/status").is_file() else None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if self.bytes is not None:
            args = (weakref.ref(self), self._stop)
            threading.Thread(
                target=ChildPeak._loop, args=args, name="child-rss", daemon=True
            ).start()

    def sample(self) -> int | None:
        """Look at the live descendants now; the largest peak seen so far."""
        if self.bytes is None:
            return None
        peaks = [_vmhwm(pid) or 0 for pid in descendants(os.getpid())]
        with self._lock:
            self.bytes = max([self.bytes, *peaks])
            return self.bytes

    def stop(self) -> None:
        self._stop.set()

    @staticmethod
    def _loop(ref: weakref.ref[ChildPeak], stop: threading.Event) -> None:
        while not stop.wait(CHILD_SAMPLE_SECONDS):
            sampler = ref()
            if sampler is None:
                return
            sampler.sample()
            del sampler  # hold no reference while waiting, so the object can be dropped


def gib(n: int) -> str:
    """Bytes as GiB with two decimals (how reports and logs print memory)."""
    return f"{n / 2**30:.2f} GiB"


def resources_line(record: dict[str, Any]) -> str:
    """The one ``report.md`` line of a :meth:`Run.resources` record, as a paragraph of its
    own when appended to a document that ends in a newline."""
    line = f"**Resources:** peak RSS {gib(record['peak_rss_bytes'])}"
    estimate = record.get("estimated_peak_bytes")
    if estimate:
        line += f" (estimated before the run: {gib(estimate['total'])})"
    if record["children_peak_rss_bytes"]:
        line += f" (largest child process: {gib(record['children_peak_rss_bytes'])})"
    phases = ", ".join(f"{p['name']} {p['seconds']:.1f} s" for p in record["phases"])
    return f"\n{line}; {phases}\n" if phases else f"\n{line}\n"

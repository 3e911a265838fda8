"""A target run as named phases, logged and timed the same way by every target.

Every target's ``build.py`` declares its phases once (``PHASES``, in order; the template is
resolve → reference → export → compile → verify → package, with the phases a target has)
and marks each as it starts::

    run = Run("qnn", PHASES)
    run.phase("resolve")
    ...
    run.phase("export")

A phase ends when the next starts (or at :meth:`Run.finish`), so phases need no extra
indentation around existing code. Progress goes to stderr as ``[qnn] [3/6 export] ...``;
stdout stays for what a script is asked to print. Marking a phase that is not declared, or
out of order, is a programming error and raises at once, so the declared list stays true.

Each phase's seconds and the process's peak resident memory when it ended are kept, and
:meth:`Run.resources` turns them into the ``"resources"`` record every ``report.json``
carries (:func:`common.core.resources.resources_line` is its line in ``report.md``), so a
report says what its step cost, not only what it produced.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from common.core.memory import Estimate, MemoryCap, preflight
from common.core.resources import ChildPeak, gib, peak_rss_bytes


class Run:
    """The phases of one target run: which one is at work, how long each took, and the
    process's peak memory when each ended."""

    def __init__(self, target: str, phases: Sequence[str]) -> None:
        if len(set(phases)) != len(phases) or not phases:
            raise ValueError(f"{target}: phases must be distinct and non-empty: {phases}")
        self.target = target
        self.phases = tuple(phases)
        #: Wall seconds of every finished phase, in order.
        self.seconds: dict[str, float] = {}
        #: :func:`peak_rss_bytes` when each finished phase ended (non-decreasing).
        self.peak_rss: dict[str, int] = {}
        self._children = ChildPeak()
        self._current: str | None = None
        self._started = time.monotonic()
        #: The preflight's estimate of the peak (:meth:`preflight`), kept for the report.
        self.estimate: Estimate | None = None

    def phase(self, name: str) -> None:
        """End the phase at work (if any) and start ``name``, the next declared one or a
        later one (a target may skip a phase, e.g. ``compile`` for a dry run)."""
        if name not in self.phases:
            raise ValueError(f"{self.target}: phase {name!r} is not declared in {self.phases}")
        done = self.phases.index(self._current) if self._current is not None else -1
        if self.phases.index(name) <= done:
            raise ValueError(f"{self.target}: phase {name!r} after {self._current!r}")
        self._close()
        self._current = name
        self.log("started")

    def log(self, message: str) -> None:
        """One progress line on stderr, tagged with the target and the phase at work."""
        where = f"[{self.target}]"
        if self._current is not None:
            where += f" [{self.phases.index(self._current) + 1}/{len(self.phases)} {self._current}]"
        print(f"{where} {message}", file=sys.stderr, flush=True)

    def preflight(self, estimate: Estimate, cap: MemoryCap | None, lower: str) -> None:
        """Check ``estimate`` against ``cap`` before the heavy work (one ``error:`` line,
        naming ``lower``, when it does not fit) and keep it for :meth:`resources`."""
        preflight(estimate, cap, lower)
        self.estimate = estimate
        self.log(f"memory: estimated peak {estimate.describe()}")

    def finish(self) -> dict[str, float]:
        """End the last phase; the seconds of every phase that ran."""
        self._close()
        self._current = None
        self._children.sample()
        self._children.stop()
        return dict(self.seconds)

    def resources(self) -> dict[str, Any]:
        """What the run has cost so far, JSON-ready (``report.json``'s ``"resources"``).

        ``peak_rss_bytes`` is this process's peak so far and ``children_peak_rss_bytes`` the
        largest child's (sampled: see :class:`ChildPeak`; ``None`` where it cannot be
        measured). ``phases`` lists each phase's ``name``, ``seconds`` and ``peak_rss_bytes``
        (the process's peak when it ended, so the phase where it jumps is the one that needed
        the memory); a list, because report.json's keys are sorted.
        ``estimated_peak_bytes`` is the preflight's estimate by part (None without one),
        to compare with the measured peak. A report is written inside its last phase
        (``package``): that phase, named by ``recorded_during``, is counted up to this
        call; ``None`` after :meth:`finish`.
        """
        peak = peak_rss_bytes()
        phases = [
            {"name": name, "seconds": seconds, "peak_rss_bytes": self.peak_rss[name]}
            for name, seconds in self.seconds.items()
        ]
        if self._current is not None:
            so_far = round(time.monotonic() - self._started, 1)
            phases.append({"name": self._current, "seconds": so_far, "peak_rss_bytes": peak})
        return {
            "peak_rss_bytes": peak,
            "children_peak_rss_bytes": self._children.sample(),
            "phases": phases,
            "recorded_during": self._current,
            "estimated_peak_bytes": None if self.estimate is None else self.estimate.to_json(),
        }

    def _close(self) -> None:
        now = time.monotonic()
        if self._current is not None:
            self.seconds[self._current] = round(now - self._started, 1)
            self.peak_rss[self._current] = peak_rss_bytes()
            self.log(
                f"done in {self.seconds[self._current]:.1f} s "
                f"(peak RSS so far {gib(self.peak_rss[self._current])})"
            )
        self._started = now

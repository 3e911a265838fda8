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
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence


class Run:
    """The phases of one target run: which one is at work, and how long each took."""

    def __init__(self, target: str, phases: Sequence[str]) -> None:
        if len(set(phases)) != len(phases) or not phases:
            raise ValueError(f"{target}: phases must be distinct and non-empty: {phases}")
        self.target = target
        self.phases = tuple(phases)
        #: Wall seconds of every finished phase, in order.
        self.seconds: dict[str, float] = {}
        self._current: str | None = None
        self._started = time.monotonic()

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

    def finish(self) -> dict[str, float]:
        """End the last phase; the seconds of every phase that ran."""
        self._close()
        self._current = None
        return dict(self.seconds)

    def _close(self) -> None:
        now = time.monotonic()
        if self._current is not None:
            self.seconds[self._current] = round(now - self._started, 1)
            self.log(f"done in {self.seconds[self._current]:.1f} s")
        self._started = now

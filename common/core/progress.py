"""Progress bars for a terminal and for a log file alike.

tqdm draws one line it rewrites with ``\\r``; told ``disable=None`` it draws nothing at all
when stderr is not a terminal, which is where long builds run (``make … > log``, CI, the
bench): a 40-minute profile then printed nothing between "started" and "done". Every bar
of the project comes from :func:`progress`: on a terminal it is tqdm's own; elsewhere it
writes a plain line (done/total, rate, elapsed and ETA) at most every
:data:`LOG_SECONDS`, and one when it ends.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

#: Seconds between two lines of a bar written to a log.
LOG_SECONDS = 30.0


class _Lines:
    """A stream that turns tqdm's carriage returns into new lines."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(text.replace("\r", "\n").replace("\n\n", "\n"))

    def flush(self) -> None:
        self.stream.flush()


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: float | None = None,
    unit: str = "it",
    enabled: bool = True,
    **options: Any,
) -> tqdm:
    """A tqdm bar over ``iterable`` (or ``total`` steps, advanced with ``update``) named
    ``desc``; nothing at all when not ``enabled``. See the module docstring for logs."""
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    stream = sys.stderr
    if not stream.isatty():
        options = {"file": _Lines(stream), "mininterval": LOG_SECONDS, "ascii": True,
                   "ncols": 100, **options}  # fmt: skip
    return tqdm(iterable, desc=desc, total=total, unit=unit, **options)

"""Errors a user can act on, and the one place that turns them into exit codes.

The project's convention: bad input exits 2 with one line naming the file,
field or option; a failed numerical check exits 1. Library code raises these; CLI entry
points wrap their body in :func:`run_cli` so users never see a traceback for their own
mistakes.
"""

from __future__ import annotations

import errno
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import NoReturn


class EdgeforgeError(Exception):
    """Bad input: a missing file, a malformed recipe, an unsupported option (exit 2)."""

    exit_code = 2


class CheckFailed(EdgeforgeError):
    """A verification gate did not pass: the artifact is wrong (exit 1)."""

    exit_code = 1


def fail(message: str) -> NoReturn:
    """Raise an :class:`EdgeforgeError`; a short spelling for validation code."""
    raise EdgeforgeError(message)


def reported_error(stderr: str) -> str | None:
    """The message of the last ``error:`` line a child edgeforge process printed (what
    :func:`run_cli` writes), or None: a parent relays the child's own words, not its tail."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    return errors[-1].removeprefix("error: ") if errors else None


class Terminated(BaseException):
    """SIGTERM arrived (``kill``, ``timeout``, make stopping its jobs). A BaseException, so
    no ``except Exception`` swallows it on its way out through every ``finally``."""


def _terminate(signum: int, _frame: FrameType | None) -> NoReturn:
    """Turn SIGTERM into :class:`Terminated`; a second SIGTERM, during the cleanup this
    starts, kills at once (the next run removes what is left, see ``atomic_path``)."""
    signal.signal(signum, signal.SIG_DFL)
    raise Terminated


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run ``main`` and exit: errors we raised become one ``error:`` line and their code.

    SIGTERM is handled like Ctrl-C: ``finally`` blocks run (atomic writes remove their
    temporaries, which can be gigabytes) before the exit with 143, 128 + SIGTERM, the
    status a shell reports for a terminated process.
    """
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = main()
    except EdgeforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("error: terminated", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        # The write that failed removed its temporary on the way out (atomic_path).
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"error: no space left on the device{where}; free disk space (a 1.8B "
              "build needs several GB under BUILD_DIR) and run the same command again: "
              "complete pieces are reused", file=sys.stderr)  # fmt: skip
        sys.exit(1)
    sys.exit(code or 0)

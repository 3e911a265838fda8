"""Errors a user can act on, and the one place that turns them into exit codes.

The project's convention: bad input exits 2 with one line naming the file,
field or option; a failed numerical check exits 1. Library code raises these; CLI entry
points wrap their body in :func:`run_cli` so users never see a traceback for their own
mistakes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
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


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run ``main`` and exit: errors we raised become one ``error:`` line and their code."""
    try:
        code = main()
    except EdgeforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)

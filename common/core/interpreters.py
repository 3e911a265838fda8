"""The Python 3.10 interpreter the tpu-mlir venv is made from, found one way for all callers.

tpu-mlir is published for CPython 3.10 only, while edgeforge runs on 3.11. Two callers need
the same 3.10: ``targets/sophgo-bm1684x/setup_toolchain.py`` (``make sophgo-toolchain``,
which creates the venv from it) and ``docker/image.sh sophgo``, which copies that very
interpreter into the sophgo image (Debian 12 has no ``python3.10`` package) and fills the
wheelhouse with its pip (the venv's wheels are cp310). Standard library only, so the
image script runs it with the host's ``python3.11`` and ``PYTHONPATH`` set to the checkout::

    python3.11 -m common.core.interpreters [--python PATH]   # prints sys.base_prefix of it
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
from pathlib import Path

from common.core.errors import EdgeforgeError, run_cli


def find_python310(explicit: str | None) -> str:
    """A working Python 3.10: ``--python``/``$PYTHON310``, ``python3.10`` on PATH, or pyenv's."""
    candidates = [explicit or os.environ.get("PYTHON310") or "", "python3.10"]
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/3.10.*/bin/python3.10"), reverse=True)
    for candidate in filter(None, candidates):
        exe = shutil.which(candidate) or candidate
        try:
            out = subprocess.run(
                [exe, "-c", "import sys; print(sys.version_info[:2] == (3, 10))"],
                capture_output=True,
                text=True,
                check=False,
            )
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.strip() == "True":
            return exe
    raise EdgeforgeError(
        "Python 3.10 not found (tpu-mlir is published for cp310 only): install it with "
        "'pyenv install 3.10.13' or your distribution's python3.10, or pass "
        "PYTHON310=/path/to/python3.10"
    )


def base_prefix(python: str) -> Path:
    """The installation folder of ``python`` (``sys.base_prefix``: a venv's own interpreter's
    prefix, not the venv), which holds ``bin/``, ``lib/python3.10`` and ``libpython``."""
    out = subprocess.run(
        [python, "-c", "import sys; print(sys.base_prefix)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description="print the Python 3.10 installation folder")
    parser.add_argument("--python", help="Python 3.10 interpreter (default: search)")
    args = parser.parse_args()
    python = find_python310(args.python)
    print(f"{python}\t{base_prefix(python)}")
    return 0


if __name__ == "__main__":
    run_cli(main)

"""``make sophgo-toolchain`` input errors: one clear line, exit 2, no traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.conftest import CliResult, assert_clean_error, run_python

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "targets" / "sophgo-bm1684x" / "setup_toolchain.py"


def run_setup(*args: str, env: dict[str, str]) -> CliResult:
    return run_python(str(SCRIPT), *args, env=env)


def test_missing_python310_says_how_to_get_it(tmp_path: Path) -> None:
    """No 3.10 anywhere (the given interpreter is 3.11, PATH and pyenv have none)."""
    bare_bin = tmp_path / "bin"
    bare_bin.mkdir()
    env = {**os.environ, "PATH": str(bare_bin), "PYENV_ROOT": str(tmp_path / "pyenv")}
    env.pop("PYTHON310", None)
    result = run_setup("--venv", str(tmp_path / "venv"), "--python", sys.executable, env=env)
    assert_clean_error(result, "Python 3.10 not found", "pyenv install 3.10", "PYTHON310=")
    assert not (tmp_path / "venv").exists()

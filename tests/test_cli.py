"""Bad input through the user's entry point: one error line, non-zero exit, no output left.

Each case runs ``python -m common.steps.cli`` as ``make`` does and checks that the step left
nothing in build/ (no report, no half-written model directory, no temp directories).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import zstandard

from common.core.errors import reported_error
from tests.conftest import assert_clean_error, run_cli, run_python


def _leftovers(build: Path) -> list[str]:
    if not build.exists():
        return []
    return sorted(str(p.relative_to(build)) for p in build.rglob("*") if "logs" not in p.parts)


def test_unknown_model(tmp_path: Path) -> None:
    result = run_cli("eval", "--model", "qwen9-900b", "--build-dir", str(tmp_path))
    assert_clean_error(result, "unknown MODEL 'qwen9-900b'", "smollm2-135m", "tiny-qwen2")
    assert _leftovers(tmp_path) == []


def test_recipe_with_extra_field(tmp_path: Path) -> None:
    recipe = json.loads(Path("models/tiny-qwen2.json").read_text())
    recipe["name"] = "broken"
    recipe["eval"]["windows"] = 3
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(recipe))
    build = tmp_path / "build"
    result = run_cli("model", "--model", str(path), "--build-dir", str(build))
    assert_clean_error(result, str(path), "$.eval", "windows")
    assert _leftovers(build) == []


def test_model_dir_missing(tmp_path: Path) -> None:
    build = tmp_path / "build"
    result = run_cli(
        "eval",
        "--model",
        "qwen2.5-1.5b",
        "--model-path",
        str(tmp_path / "nowhere"),
        "--build-dir",
        str(build),
    )
    assert_clean_error(result, "nowhere", "config.json")
    assert _leftovers(build) == []


def test_model_dir_without_weights(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen2_dir, model)
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    build = tmp_path / "build"
    result = run_cli(
        "eval", "--model", "qwen2.5-1.5b", "--model-path", str(model), "--build-dir", str(build)
    )
    assert_clean_error(result, str(model))
    assert _leftovers(build) == []


def test_truncated_safetensors(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen2_dir, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    build = tmp_path / "build"
    result = run_cli(
        "eval", "--model", "qwen2.5-1.5b", "--model-path", str(model), "--build-dir", str(build)
    )
    assert_clean_error(result, "model.safetensors", "truncated")
    assert _leftovers(build) == []


def test_unsupported_model_type(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen2_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "opt"
    (model / "config.json").write_text(json.dumps(config))
    build = tmp_path / "build"
    result = run_cli(
        "eval", "--model", "qwen2.5-1.5b", "--model-path", str(model), "--build-dir", str(build)
    )
    assert_clean_error(result, "opt", "llama", "qwen2")
    assert _leftovers(build) == []


def _corrupt_zst(path: Path) -> None:
    good = zstandard.ZstdCompressor().compress(b'{"text": "hello"}\n' * 1000)
    path.write_bytes(good[: len(good) // 2] + b"\x00garbage" * 50)


@pytest.mark.parametrize(
    ("filename", "write"),
    [
        ("val.jsonl.zst", _corrupt_zst),
        ("val.jsonl.zst", lambda p: p.write_text('{"text": "plain text, not compressed"}\n')),
        ("empty.jsonl", lambda p: p.write_text("")),
        ("short.jsonl", lambda p: p.write_text('{"text": "In the beginning."}\n')),
    ],
    ids=["corrupt-zst", "not-zstd", "empty", "too-few-tokens"],
)
def test_bad_corpus(
    filename: str, write, tmp_path: Path, session_build: Path, tiny_qwen2_dir: Path
) -> None:
    corpus = tmp_path / filename
    write(corpus)
    step_dir = session_build / "tiny-qwen2"
    before = _leftovers(step_dir)
    result = run_cli(
        "eval", "--model", "tiny-qwen2", "--corpus", str(corpus), "--build-dir", str(session_build)
    )
    assert_clean_error(result, str(corpus))
    assert _leftovers(step_dir) == before  # no new or half-written eval output


def test_tiny_eval_writes_report(session_build: Path, tiny_qwen2_dir: Path) -> None:
    result = run_cli("eval", "--model", "tiny-qwen2", "--build-dir", str(session_build))
    assert result.returncode == 0, result.stderr
    out = session_build / "tiny-qwen2" / "eval"
    report = json.loads((out / "report.json").read_text())
    assert {"model", "ppl", "tokens", "seq_len"} <= set(report)
    assert report["tokens"] == report["num_windows"] * (report["seq_len"] - 1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["versions"]["torch"] == "2.14.1"
    assert set(manifest["outputs"]) == {"report.json", "report.md"}
    assert "perplexity" in result.stdout


def test_a_full_disk_is_one_error_line() -> None:
    """Disk full mid-write (a 1.8B build's 3.5 GB ``.mllm``): one ``error:`` line saying
    what to do, not an OSError traceback; other OS errors still surface as they are."""
    code = (
        "import errno\n"
        "from common.core.errors import run_cli\n"
        "def main():\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device', 'out/model.mllm')\n"
        "run_cli(main)\n"
    )
    result = run_python("-c", code)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: no space left on the device writing")
    assert "Traceback" not in result.stderr and "run the same command again" in result.stderr
    other = run_python("-c", code.replace("errno.ENOSPC", "errno.EACCES"))
    assert other.returncode == 1 and "PermissionError" in other.stderr


def test_a_child_processes_error_line_is_relayed() -> None:
    """A parent (the sweep, the QNN compile) relays the message of the last ``error:``
    line its child printed through ``run_cli``, and nothing when there is none."""
    code = (
        "from common.core.errors import EdgeforgeError, run_cli\n"
        "def main():\n"
        "    raise EdgeforgeError('PRESET=w9: no such preset')\n"
        "run_cli(main)\n"
    )
    child = run_python("-c", code)
    assert child.returncode == 2
    assert reported_error("progress 3/4\n" + child.stderr) == "PRESET=w9: no such preset"
    assert reported_error("Traceback (most recent call last):\n  ...\nValueError: x") is None

"""The real model: SmolLM2-135M from its GGUF, and the same weights as a qwen2 checkpoint.

These run ``make eval``'s code path on real pretrained weights and real English, so the
numbers mean something: a dequantized 135M model on the WEB Bible scores tens, not
thousands, and answers the canary prompt.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.conftest import run_cli

pytestmark = pytest.mark.smollm2

#: Relative perplexity difference allowed between the llama and qwen2 checkpoints.
PPL_RTOL = 1e-4


@pytest.fixture(scope="module")
def smollm2_report(session_build: Path, smollm2_dir: Path) -> dict:
    result = run_cli("eval", "--model", "smollm2-135m", "--build-dir", str(session_build))
    assert result.returncode == 0, result.stderr
    return json.loads((session_build / "smollm2-135m" / "eval" / "report.json").read_text())


def test_converted_checkpoint_is_plain_fp32(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] is True
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert dtypes == {"F32"}
    manifest = json.loads((smollm2_dir / "manifest.json").read_text())
    assert manifest["inputs"]["gguf"]["sha256"].startswith("b179c952")


def test_real_perplexity_and_canary(smollm2_report: dict) -> None:
    assert math.isfinite(smollm2_report["ppl"])
    assert 5 < smollm2_report["ppl"] < 100, smollm2_report["ppl"]
    assert smollm2_report["tokens"] == 16 * 511
    assert smollm2_report["generation"]["passed"] is True
    assert "Paris" in smollm2_report["generation"]["output"]


def test_layer_by_layer_eval_equals_whole_model(
    smollm2_report: dict, smollm2_dir: Path, tmp_path: Path
) -> None:
    """make eval reads a text model one part at a time; SEQUENTIAL=0 loads it whole. Same
    perplexity, bit for bit, and the same canary answer."""
    assert smollm2_report["layer_by_layer"] is True
    result = run_cli(
        "eval", "--model", "smollm2-135m", "--model-path", str(smollm2_dir),
        "--build-dir", str(tmp_path), "--sequential", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    whole = json.loads((tmp_path / "smollm2-135m" / "eval" / "report.json").read_text())
    assert whole["layer_by_layer"] is False
    assert (whole["ppl"], whole["generation"]) == (
        smollm2_report["ppl"],
        smollm2_report["generation"],
    )


def test_qwen2_version_has_same_perplexity(
    session_build: Path, smollm2_qwen2_dir: Path, smollm2_report: dict
) -> None:
    config = json.loads((smollm2_qwen2_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    manifest = json.loads((smollm2_qwen2_dir / "manifest.json").read_text())
    assert manifest["checks"]["max_abs_logit_diff_vs_source"] <= 1e-4
    result = run_cli("eval", "--model", "smollm2-135m-qwen2", "--build-dir", str(session_build))
    assert result.returncode == 0, result.stderr
    report = json.loads((session_build / "smollm2-135m-qwen2" / "eval" / "report.json").read_text())
    assert abs(report["ppl"] - smollm2_report["ppl"]) / smollm2_report["ppl"] <= PPL_RTOL
    assert "Paris" in report["generation"]["output"]


def test_rebuild_is_skipped_when_up_to_date(session_build: Path, smollm2_dir: Path) -> None:
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    result = run_cli("model", "--model", "smollm2-135m", "--build-dir", str(session_build))
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stderr
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before

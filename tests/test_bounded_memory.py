"""Steps that run one layer at a time stay under a memory cap half the model's float32 size.

A random qwen2 in real-model proportions (hidden 1024, 42 layers, bf16 on disk like the
hub's, sharded) whose float32 weights are more than twice ``MAX_MEMORY``: a whole-model
step could not even hold it, yet ``make profile`` with rotation, ``make cpu`` and ``make
axera`` (text) build it within the cap, as measured by the step itself
(``report.json["resources"]``, the process's VmHWM). The tokenizer is tiny-qwen2's
(vocabulary 1024).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.core.memory import parse_size
from common.models.streaming import float32_bytes
from tests.conftest import assert_clean_error, capped_rotated_profile, random_qwen2, run_python

CAP = "1.25GB"
#: Any recipe of the model's architecture takes MODEL_PATH; this one is a qwen2.
RECIPE = "qwen1.5-1.8b"


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2_dir: Path) -> Path:
    out = random_qwen2(tmp_path_factory.mktemp("big") / "model", tiny_qwen2_dir, layers=42)
    assert float32_bytes(out) >= 2 * parse_size(CAP)
    return out


def _peak(report: Path) -> int:
    resources = json.loads(report.read_text())["resources"]
    assert resources["estimated_peak_bytes"]["total"] <= parse_size(CAP)
    return resources["peak_rss_bytes"]


def test_rotated_profile_within_the_cap(big_model: Path, tmp_path: Path) -> None:
    result = capped_rotated_profile(RECIPE, big_model, tmp_path, CAP)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _peak(tmp_path / RECIPE / "profile-hadamard" / "report.json") <= parse_size(CAP)
    whole = run_python(
        "-m", "common.steps.profile_cli", "profile", "--model", RECIPE, "--model-path",
        str(big_model), "--build-dir", str(tmp_path / "w"), "--sequential", "0",
        "--max-memory", CAP,
    )  # fmt: skip
    assert_clean_error(whole, "make profile (whole model) needs about", "SEQUENTIAL=1")


def test_cpu_within_the_cap(big_model: Path, tmp_path: Path) -> None:
    result = run_python(
        "targets/cpu-fp32-rotated/build.py", "--model", RECIPE, "--model-path", str(big_model),
        "--build-dir", str(tmp_path), "--eval-windows", "2", "--seq-len", "64",
        "--max-memory", CAP,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / RECIPE / "cpu-fp32-rotated"
    assert _peak(out / "report.json") <= parse_size(CAP)
    assert (out / "model" / "model.safetensors.index.json").is_file()  # fp32: sharded
    assert (out / "model.mllm").stat().st_size > 2 * parse_size(CAP)


def test_axera_within_the_cap(big_model: Path, tmp_path: Path) -> None:
    """The text path: the bf16 embedding table, and the greedy checks with float and bf16
    embeddings, each token through every layer as it is read."""
    result = run_python(
        "targets/axera-ax650/build.py", "--model", RECIPE, "--model-path", str(big_model),
        "--build-dir", str(tmp_path), "--max-new-tokens", "2", "--max-memory", CAP,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = tmp_path / RECIPE / "axera-ax650" / "report.json"
    assert _peak(report) <= parse_size(CAP)
    assert json.loads(report.read_text())["bf16_embeddings_greedy_match"] is True


def test_axera_vision_language_within_the_cap(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, tiny_qwen2_5_vl_dir: Path
) -> None:
    """A Qwen2.5-VL whose language model alone is twice the cap: the vision tower is read
    whole for its export and checks, then each language layer per greedy token."""
    from transformers import AutoConfig

    from common.export.random_checkpoint import write_random_checkpoint

    config = AutoConfig.from_pretrained(tiny_qwen2_5_vl_dir)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 1024, 4096, 42
    text.num_attention_heads = text.num_key_value_heads = 8
    text.layer_types = ["full_attention"] * text.num_hidden_layers
    config.vision_config.out_hidden_size = text.hidden_size  # the merger feeds the LM
    text.rope_parameters["mrope_section"] = [16, 24, 24]  # head_dim 128, as in the 3B
    model = tmp_path_factory.mktemp("big-vl") / "model"
    write_random_checkpoint(config, model, tokenizer_dir=tiny_qwen2_5_vl_dir)
    assert float32_bytes(model) >= 2 * parse_size(CAP)
    result = run_python(
        "targets/axera-ax650/build.py", "--model", "qwen2.5-vl-3b", "--model-path", str(model),
        "--build-dir", str(tmp_path), "--max-new-tokens", "2", "--image-size", "112",
        "--max-memory", CAP,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = tmp_path / "qwen2.5-vl-3b" / "axera-ax650" / "report.json"
    assert _peak(report) <= parse_size(CAP)
    assert json.loads(report.read_text())["greedy_match"] is True

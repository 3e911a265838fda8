"""Qwen1 (``qwen-7b``: its modeling code ships in the checkpoint) outside SOPHGO.

Remote code runs only where a step supports it and the recipe allows it
(``source.trust_remote_code``), never after a prompt: ``make profile`` profiles
Qwen1 layer by layer; every other step refuses it with one line naming the steps that do
support it. The checkpoint is the tiny fixture the SOPHGO tests use (tests/conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.analysis.profiling import profile_model, profile_sequential
from common.core.errors import EdgeforgeError
from common.core.recipes import load_recipe
from common.inputs.data import CALIB_CORPUS, sample_windows
from common.models.loading import load_model, load_tokenizer
from common.models.qwen import load_qwen_model
from common.models.streaming import StreamedModel
from common.steps.model_build import build_model
from tests.conftest import (
    QWEN1_SUPPORTED,
    assert_clean_error,
    assert_no_prompt,
    assert_qwen1_refused,
    build_qwen1_checkpoint,
    run_python,
)


def test_loaders_refuse_qwen1_and_name_the_steps(tiny_qwen1_dir: Path) -> None:
    for load in (load_model, load_tokenizer):
        with pytest.raises(EdgeforgeError) as err:
            load(tiny_qwen1_dir)
        message = str(err.value)
        assert message.startswith(f"{tiny_qwen1_dir}: model_type 'qwen' (Qwen1) runs the ")
        assert message.endswith(QWEN1_SUPPORTED) and "\n" not in message
    assert load_tokenizer(tiny_qwen1_dir, trust_remote_code=True)("Paris").input_ids


def test_only_a_recipe_allows_remote_code(tiny_qwen1_dir: Path, tmp_path: Path) -> None:
    """MODEL_PATH pointing a recipe without trust_remote_code at a Qwen1 checkpoint stops
    before any step runs its code; qwen-7b's recipe allows it."""
    with pytest.raises(EdgeforgeError, match=r"qwen1\.5-1\.8b\.json: \$\.source\.trust_remote"):
        build_model(load_recipe("qwen1.5-1.8b"), tmp_path, tiny_qwen1_dir)
    assert build_model(load_recipe("qwen-7b"), tmp_path, tiny_qwen1_dir) == tiny_qwen1_dir


@pytest.mark.parametrize("modeling", ["modeling_qwen.py", "modeling_qwen_latest.py"])
def test_sequential_profile_of_qwen1_equals_whole_model(
    tiny_qwen2_dir: Path, tmp_path: Path, modeling: str
) -> None:
    """Layer by layer, each block gets what Qwen1's own stack hands it. The trained context
    is cut to 16 so 40-token windows take the dynamic-NTK rotary and logn-scaled branches,
    which read the buffers the remote code computes (not stored in the checkpoint)."""
    model_dir = build_qwen1_checkpoint(tmp_path / "qwen1", tiny_qwen2_dir, modeling)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "seq_length": 16}))
    tokenizer = load_tokenizer(model_dir, trust_remote_code=True)
    windows = sample_windows([CALIB_CORPUS], tokenizer, 2, 40, seed=0)
    whole = profile_model(load_qwen_model(model_dir), windows).results()
    streamed = StreamedModel(model_dir, trust_remote_code=True)
    assert whole == profile_sequential(streamed, windows).results()
    assert len(whole) == 2 * 5 + 1  # qkv, o, gate, up, down per layer and the LM head
    with pytest.raises(EdgeforgeError, match=r"Qwen1 runs the checkpoint's own modeling code"):
        StreamedModel(model_dir)


def test_make_profile_on_qwen1(tiny_qwen1_dir: Path, tmp_path: Path) -> None:
    """Qwen1 is profiled one layer at a time by default; the whole-model path refuses it."""
    result = run_python(
        "-m", "common.steps.profile_cli", "profile",
        "--model", "qwen-7b", "--model-path", str(tiny_qwen1_dir), "--build-dir", str(tmp_path),
        "--num-samples", "2", "--seq-len", "32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_prompt(result.stdout + result.stderr)
    out = tmp_path / "qwen-7b" / "profile"
    report = json.loads((out / "report.json").read_text())
    # the fused qkv projection reads what q reads: its input fills the q columns
    assert [row["layer"] for row in report["layers"]] == [0, 1]
    assert all(row["q_input_absmax"] > 0 and row["down_input_absmax"] > 0
               for row in report["layers"])  # fmt: skip
    phases = [p["name"] for p in report["resources"]["phases"]]
    assert phases == ["calibrate", "profile", "package"]
    doc = json.loads((out / "profile.json").read_text())
    assert "transformer.h.1.attn.c_attn" in doc["ori"] and "lm_head" in doc["ori"]


#: Every step without Qwen1 support, how it is run, and how its error names it.
REFUSING = {
    "eval": (("-m", "common.steps.cli", "eval"), "make eval"),
    "profile": (
        ("-m", "common.steps.profile_cli", "profile", "--sequential", "0"),
        "make profile with SEQUENTIAL=0",
    ),
    "simulate": (("-m", "common.steps.profile_cli", "simulate"), "make simulate"),
    "cpu": (("targets/cpu-fp32-rotated/build.py",), "this step"),
    "axera": (("targets/axera-ax650/build.py",), "this step"),
}
# qnn and autoround refuse it too, tested in their own suites (tests/targets/…), whose tox
# envs install the extras those scripts check for before they look at the model.


@pytest.mark.parametrize("step", sorted(REFUSING))
def test_steps_without_qwen1_support_refuse_it(
    tiny_qwen1_dir: Path, tmp_path: Path, step: str
) -> None:
    """One ``error:`` line, exit 2, no prompt and no traceback, with stdin closed."""
    argv, named = REFUSING[step]
    result = run_python(
        *argv, "--model", "qwen-7b", "--model-path", str(tiny_qwen1_dir),
        "--build-dir", str(tmp_path),
    )  # fmt: skip
    assert_qwen1_refused(result, named)
    assert not (tmp_path / "qwen-7b").exists()  # refused before writing anything


def test_rotating_qwen1_is_refused_in_one_line(tiny_qwen1_dir: Path, tmp_path: Path) -> None:
    """Qwen1 fuses q/k/v (c_attn): rotation would have to split it, so it is refused."""
    result = run_python(
        "-m", "common.steps.profile_cli", "profile", "--rotate", "hadamard",
        "--model", "qwen-7b", "--model-path", str(tiny_qwen1_dir), "--build-dir", str(tmp_path),
        "--num-samples", "1", "--seq-len", "16",
    )  # fmt: skip
    assert_clean_error(result, "residual rotation needs separate", "ROTATE=none")

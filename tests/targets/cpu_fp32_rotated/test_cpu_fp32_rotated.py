"""``make cpu`` end to end: tiny models for every path, one SmolLM2-135M run for real numbers.

The script is run the way make runs it (``python targets/cpu-fp32-rotated/build.py``),
into the session build directory where conftest built the models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from common.analysis.accuracy import accuracy_line
from common.core.errors import CheckFailed
from common.core.records import sha256_file
from common.export.mllm_format import read_mllm
from common.models import get_adapter
from common.models.loading import load_model
from common.quant.rotation import load_rotation, make_rotation, save_rotation
from tests.conftest import (
    REPO_ROOT,
    CliResult,
    assert_clean_error,
    assert_gates,
    assert_same_tokenizer,
    import_target,
    run_python,
)

SCRIPT = REPO_ROOT / "targets" / "cpu-fp32-rotated" / "build.py"
TARGET = "cpu-fp32-rotated"
REPORT_KEYS = {"ppl_fp32", "ppl_rotated", "ppl_ratio", "max_abs_logit_diff", "top1_agreement"}
#: Outputs that must be byte-identical when rebuilt with the same seed.
STABLE_FILES = ("model.mllm", "rotation.safetensors", "model/model.safetensors",
                "model/config.json")  # fmt: skip


def run_target(build_dir: Path, *args: str) -> CliResult:
    return run_python(str(SCRIPT), "--build-dir", str(build_dir), *args,
                      env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})  # fmt: skip


def _ok(result: CliResult) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def _report(build_dir: Path, model: str) -> dict:
    return json.loads((build_dir / model / TARGET / "report.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(session_build: Path, tiny_qwen2_dir: Path) -> Path:
    _ok(run_target(session_build, "--model", "tiny-qwen2", "--seed", "5"))
    return session_build / "tiny-qwen2" / TARGET


def test_tiny_outputs_and_gates(tiny_run: Path, tiny_qwen2_dir: Path) -> None:
    for name in ("model/config.json", "model/tokenizer.json", "model.mllm",
                 "rotation.safetensors", "manifest.json", "report.json", "report.md",
                 "outliers.png"):  # fmt: skip
        assert (tiny_run / name).is_file(), name
    report = json.loads((tiny_run / "report.json").read_text())
    assert set(report) >= REPORT_KEYS
    assert report["passed"] is True
    assert_gates(report, {"ppl_ratio", "top1_agreement"})
    assert_same_tokenizer(report["tokenizer"], tiny_run / "model", tiny_qwen2_dir)
    assert abs(report["ppl_ratio"] - 1) < 1e-5
    assert report["top1_agreement"] == 1.0
    assert report["max_abs_logit_diff"] < 1e-4  # float32 rounding on |logits| ≲ 5
    accuracy = report["accuracy"]  # the block every target's report carries
    assert accuracy["ppl_ratio"] == report["ppl_ratio"] and accuracy["top1_agreement"] == 1.0
    assert accuracy["rows"] == report["num_windows"] * report["seq_len"]
    assert accuracy["windows"] == report["num_windows"]
    assert accuracy_line(accuracy) in (tiny_run / "report.md").read_text()
    assert len(report["per_layer"]) == 2
    for row in report["per_layer"]:
        assert row["hidden_cosine_min"] > 0.999999
    assert report["rotation"] == {**report["rotation"], "mode": "hadamard", "seed": 5,
                                  "untied_embeddings": True}  # fmt: skip
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["options"]["seed"] == 5 and manifest["options"]["rotate_mode"] == "hadamard"
    assert set(manifest["outputs"]) >= {"model.mllm", "rotation.safetensors", "report.json"}
    assert (tiny_run / "outliers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![max|x|/RMS(x) per layer](outliers.png)" in (tiny_run / "report.md").read_text()


def test_tiny_report_records_measured_resources(tiny_run: Path) -> None:
    """The step's measured peak memory and seconds per phase, written while packaging, and
    the estimate it checked before loading the model. A text model has no reference phase:
    the original is read layer by layer while verifying."""
    resources = json.loads((tiny_run / "report.json").read_text())["resources"]
    phases = resources["phases"]
    assert [p["name"] for p in phases] == ["resolve", "export", "verify", "package"]
    assert resources["estimated_peak_bytes"]["total"] > resources["estimated_peak_bytes"]["runtime"]
    assert resources["recorded_during"] == "package"
    peaks = [p["peak_rss_bytes"] for p in phases]
    assert peaks[0] > 0 and peaks == sorted(peaks) and resources["peak_rss_bytes"] == peaks[-1]
    assert all(p["seconds"] >= 0 for p in phases)
    assert resources["children_peak_rss_bytes"] is not None
    assert "\n**Resources:** peak RSS " in (tiny_run / "report.md").read_text()


def test_tiny_artifacts_agree(tiny_run: Path, tiny_qwen2_dir: Path) -> None:
    """The HF directory loads as-is; model.mllm holds exactly its weights under mllm names;
    rotation.safetensors holds the seeded matrices."""
    rotated = load_model(tiny_run / "model")
    adapter = get_adapter(rotated)
    assert not adapter.tie_word_embeddings
    stored = read_mllm(tiny_run / "model.mllm")
    state = rotated.state_dict()
    assert len(stored) == len(state)  # untied: every parameter exactly once
    code, q = stored["model.layers.1.self_attn.q_proj.weight"]
    assert code == 0
    want = adapter.layers()[1].linears["q"].weight
    assert torch.equal(torch.from_numpy(q.copy()).reshape(want.shape), want)
    code, norm = stored["model.norm.weight"]
    assert code == 0 and (norm == 1).all()
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(stored)
    rotation = load_rotation(tiny_run / "rotation.safetensors")
    expected = make_rotation(adapter.hidden_size, adapter.head_dim, adapter.num_layers,
                             "hadamard", 5)  # fmt: skip
    assert torch.equal(rotation.R, expected.R)


def test_rerun_same_seed_is_byte_identical(tiny_run: Path, session_build: Path) -> None:
    first = {name: sha256_file(tiny_run / name) for name in STABLE_FILES}
    _ok(run_target(session_build, "--model", "tiny-qwen2", "--seed", "5"))
    assert {name: sha256_file(tiny_run / name) for name in STABLE_FILES} == first


def test_other_seed_and_mode_differ(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    build = tmp_path / "b"
    (build / "tiny-qwen2").mkdir(parents=True)
    (build / "tiny-qwen2" / "model").symlink_to(tiny_qwen2_dir)
    _ok(run_target(build, "--model", "tiny-qwen2", "--rotate-mode", "orthogonal", "--seed", "1",
                   "--eval-windows", "2"))  # fmt: skip
    report = _report(build, "tiny-qwen2")
    assert report["passed"] and report["rotation"]["mode"] == "orthogonal"


def test_vl_language_model_and_image_prompt(session_build: Path, tiny_qwen2_vl_dir: Path) -> None:
    _ok(run_target(session_build, "--model", "tiny-qwen2-vl"))
    report = _report(session_build, "tiny-qwen2-vl")
    assert report["passed"]
    assert_gates(report, {"ppl_ratio", "top1_agreement", "image_top1_agreement"})
    image = report["image_prompt"]
    assert image["tokens"] > 16 and image["top1_agreement"] == 1.0
    assert image["max_abs_diff"] < 1e-4
    assert report["rotation"]["rotated_merger_output"].endswith("merger.mlp.2")
    stored = read_mllm(session_build / "tiny-qwen2-vl" / TARGET / "model.mllm")
    assert "visual.merger.mlp.2.weight" in stored
    assert "model.layers.0.self_attn.v_proj.bias" in stored
    # written part by part, read whole by plain from_pretrained: the original's logits
    import torch

    from common.models.loading import load_model

    rotated = load_model(session_build / "tiny-qwen2-vl" / TARGET / "model")
    ids = torch.arange(1, 40)[None]
    with torch.inference_mode():
        want = load_model(tiny_qwen2_vl_dir)(input_ids=ids).logits
        assert torch.allclose(rotated(input_ids=ids).logits, want, atol=1e-4)


def test_r_path_from_mllm_cuda_pickle(tmp_path: Path, session_build: Path,
                                      tiny_qwen2_dir: Path) -> None:  # fmt: skip
    """A rotation saved by the mllm convertor on a GPU is reused, on the CPU."""
    adapter = get_adapter(load_model(tiny_qwen2_dir))
    rotation = make_rotation(adapter.hidden_size, adapter.head_dim, adapter.num_layers,
                             "orthogonal", 11)  # fmt: skip
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save({"R": rotation.R, "R_v": list(rotation.R_v)}, tmp_path / "R.bin")
    finally:
        torch.serialization.location_tag = original
    build = tmp_path / "b"
    (build / "tiny-qwen2").mkdir(parents=True)
    (build / "tiny-qwen2" / "model").symlink_to(tiny_qwen2_dir)
    _ok(run_target(build, "--model", "tiny-qwen2", "--r-path", str(tmp_path / "R.bin"),
                   "--eval-windows", "2"))  # fmt: skip
    saved = load_rotation(build / "tiny-qwen2" / TARGET / "rotation.safetensors")
    assert torch.equal(saved.R, rotation.R)
    assert _report(build, "tiny-qwen2")["rotation"]["format"] == "torch-pickle"


# ----------------------------------------------------------------------- bad input


def _recipe(tmp_path: Path, name: str, overrides: dict) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({
        "name": name, "description": "tiny qwen2 with an odd width", "model_type": "qwen2",
        "source": {"kind": "tiny", "seed": 0, "vocab_size": 512, "overrides": overrides},
        "eval": {"seq_len": 32, "num_windows": 2},
    }))  # fmt: skip
    return path


def test_hidden_size_without_hadamard(tmp_path: Path) -> None:
    recipe = _recipe(
        tmp_path,
        "tiny-qwen2-w90",
        {"hidden_size": 90, "num_attention_heads": 9, "num_key_value_heads": 3},
    )
    result = run_target(tmp_path / "b", "--model", str(recipe))
    assert_clean_error(result, "hidden_size 90", "rotate_mode=orthogonal")
    _ok(run_target(tmp_path / "b", "--model", str(recipe), "--rotate-mode", "orthogonal"))


def test_r_path_shape_mismatch(tmp_path: Path, session_build: Path, tiny_qwen2_dir: Path) -> None:
    save_rotation(tmp_path / "big.safetensors", make_rotation(128, 16, 2, "hadamard", 0))
    result = run_target(session_build, "--model", "tiny-qwen2",
                        "--r-path", str(tmp_path / "big.safetensors"))  # fmt: skip
    assert_clean_error(result, f"R_path={tmp_path / 'big.safetensors'}", "hidden_size is 64")


def test_r_path_not_a_rotation_file(tmp_path: Path, session_build: Path,
                                    tiny_qwen2_dir: Path) -> None:  # fmt: skip
    (tmp_path / "notes.bin").write_bytes(b"definitely not a rotation")
    result = run_target(session_build, "--model", "tiny-qwen2",
                        "--r-path", str(tmp_path / "notes.bin"))  # fmt: skip
    assert_clean_error(result, str(tmp_path / "notes.bin"), "not a rotation file")
    result = run_target(session_build, "--model", "tiny-qwen2",
                        "--r-path", str(tiny_qwen2_dir / "model.safetensors"))  # fmt: skip
    assert_clean_error(result, "model.safetensors", "not a rotation file")


def _qnn_config(tmp_path: Path, model_config: dict) -> Path:
    base = {"model_type": "qwen2", "tokenizer_name": "t", "model_name": "m"}
    data = {
        "profile_config": {"dataset_path": "d", "output_path": "o", "num_samples": 2,
                           "no_bias": True, "model_config": {**base, "online_rotation": True,
                                                             "random_rotate": True}},
        "export_config": {"scale_file": "s", "output_model": "m.pth",
                          "model_config": {**base, **model_config}},
    }  # fmt: skip
    path = tmp_path / "qnn.json"
    path.write_text(json.dumps(data))
    return path


def test_config_random_rotate_and_r_path(tmp_path: Path) -> None:
    config = _qnn_config(tmp_path, {"online_rotation": True, "random_rotate": True,
                                    "R_path": "R.bin"})  # fmt: skip
    result = run_target(tmp_path / "b", "--model", "tiny-qwen2", "--config", str(config))
    assert_clean_error(result, "$.export_config.model_config.R_path", "mutually exclusive")


def test_config_saves_rotation_where_asked(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    config = _qnn_config(tmp_path, {"online_rotation": True, "random_rotate": True,
                                    "save_rotation": "R/saved.safetensors"})  # fmt: skip
    build = tmp_path / "b"
    (build / "tiny-qwen2").mkdir(parents=True)
    (build / "tiny-qwen2" / "model").symlink_to(tiny_qwen2_dir)
    _ok(run_target(build, "--model", "tiny-qwen2", "--config", str(config),
                   "--eval-windows", "2"))  # fmt: skip
    saved = (tmp_path / "R" / "saved.safetensors").read_bytes()
    assert saved == (build / "tiny-qwen2" / TARGET / "rotation.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--rotate-mode", "qr"], ["ROTATE_MODE=qr", "hadamard, orthogonal"]),
        (["--seed", "abc"], ["SEED=abc"]),
        (["--seed", "-1"], ["SEED=-1"]),
        (["--eval-windows", "0"], ["EVAL_WINDOWS=0"]),
        (["--config", "/nonexistent/qnn.json"], ["CONFIG=/nonexistent/qnn.json", "not exist"]),
    ],
)
def test_bad_options(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    assert_clean_error(run_target(tmp_path, "--model", "tiny-qwen2", *args), *fragments)


def test_failed_gate_raises_after_writing_report(
    tmp_path: Path, tiny_qwen2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotation that breaks the model (layer 0's o_proj perturbed as it is written) must
    fail the gate, exit 1."""
    import common.quant.transforms

    real = common.quant.transforms.rotate_layer

    def broken(adapter, layer, rotation):  # type: ignore[no-untyped-def]
        real(adapter, layer, rotation)
        if layer.index == 0:
            with torch.no_grad():
                layer.linears["o"].weight.mul_(3.0)

    monkeypatch.setattr(common.quant.transforms, "rotate_layer", broken)
    module = import_target("cpu-fp32-rotated")
    build = tmp_path / "b"
    (build / "tiny-qwen2").mkdir(parents=True)
    (build / "tiny-qwen2" / "model").symlink_to(tiny_qwen2_dir)
    with pytest.raises(CheckFailed, match="fails its gates") as exc:
        module.main(["--model", "tiny-qwen2", "--build-dir", str(build), "--eval-windows", "2"])
    assert exc.value.exit_code == 1
    report = _report(build, "tiny-qwen2")
    assert report["passed"] is False


# ----------------------------------------------------------------------- real model


@pytest.mark.smollm2
def test_smollm2_end_to_end(session_build: Path, smollm2_dir: Path) -> None:
    """SmolLM2-135M on 4 × 256 held-out tokens (the full gate run is `make cpu`)."""
    _ok(run_target(session_build, "--model", "smollm2-135m", "--eval-windows", "4",
                   "--seq-len", "256", "--stats-windows", "1"))  # fmt: skip
    report = _report(session_build, "smollm2-135m")
    assert report["passed"]
    assert abs(report["ppl_ratio"] - 1) < 1e-3 and report["top1_agreement"] >= 0.999
    assert report["max_abs_logit_diff"] < 1e-3  # float32 rounding on |logits| ≲ 35
    assert report["rotation"]["untied_embeddings"] is True
    rows = report["per_layer"]
    assert len(rows) == 30
    # Rotation flattens the residual-stream outliers that q_proj reads.
    before = sum(r["q_input_ratio_original"] for r in rows)
    after = sum(r["q_input_ratio_rotated"] for r in rows)
    assert after < 0.5 * before, (before, after)
    stored = read_mllm(session_build / "smollm2-135m" / TARGET / "model.mllm")
    assert len(stored) == 30 * 9 + 3

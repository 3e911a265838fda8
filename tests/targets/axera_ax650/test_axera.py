"""`make axera` end to end on the tiny VL models and the real SmolLM2, plus every bad input.

The build script is run as a user runs it (a subprocess, exit codes, one error line); the
Pulsar2 compile itself cannot run here, so the tests check everything it would consume.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from common.export.calibration_pack import read_calibration_tar
from common.export.vision_export import greedy_tokens
from common.models.loading import load_model, load_tokenizer
from common.quant.bf16 import bf16_to_fp32
from tests.conftest import (
    REPO_ROOT,
    CliResult,
    assert_clean_error,
    assert_gates,
    assert_same_tokenizer,
    import_target,
    run_python,
)

TARGET_DIR = REPO_ROOT / "targets" / "axera-ax650"
IMAGES = REPO_ROOT / "data" / "images"


pulsar2 = import_target("axera-ax650", "pulsar2")
build = import_target("axera-ax650")


def run_build(*args: str) -> CliResult:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not (Path(p) / "pulsar2").exists())  # fmt: skip
    return run_python(str(TARGET_DIR / "build.py"), *args, env=env)


def _ok(result: CliResult) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def image_out(session_build: Path, tiny_qwen2_5_vl_dir: Path) -> Path:
    out = session_build / "axera-image"
    _ok(run_build("--model", "tiny-qwen2.5-vl", "--build-dir", str(session_build),
                  "--out", str(out)))  # fmt: skip
    return out


def test_image_mode_output_directory(image_out: Path, tiny_qwen2_5_vl_dir: Path) -> None:
    report = json.loads((image_out / "report.json").read_text())
    assert report["mode"] == "image" and report["passed"]
    assert_gates(report, {"embeddings_bf16_max_rel", "onnx_cos_vs_torch", "greedy_match"})
    assert_same_tokenizer(report["tokenizer"], image_out, tiny_qwen2_5_vl_dir)
    assert report["onnx_cos_vs_torch"] >= 0.9999
    assert report["onnx_max_abs"] < 1e-4
    assert report["greedy_match"] is True
    assert report["greedy_tokens"]["torch"] == report["greedy_tokens"]["onnx_fed"]
    assert len(report["greedy_tokens"]["torch"]) == 8
    assert all(row["cosine"] > 0.9999 for row in report["per_layer"])
    # Tiny processor caps at 224² → grid 16×16 → 256 patches → 64 tokens per image.
    assert report["size"] == 224 and report["visual_tokens"] == 64
    assert report["visual_tokens"] < report["prompt_tokens"] <= report["prefill_len"]
    assert report["prefill_len"] % 64 == 0
    for name in ("build.sh", "manifest.json", "report.md", "config.json", "tokenizer.json",
                 "processor_config.json", "chat_template.jinja", pulsar2_embed_name(),
                 "vision/config.json", "vision/hidden_states.tar",
                 "vision/tiny-qwen2.5-vl_vision.onnx"):  # fmt: skip
        assert (image_out / name).is_file(), name
    manifest = json.loads((image_out / "manifest.json").read_text())
    assert "vision/tiny-qwen2.5-vl_vision.onnx" in manifest["outputs"]


def pulsar2_embed_name() -> str:
    return "model.embed_tokens.weight.bfloat16.bin"


def test_onnx_graph_contract(image_out: Path) -> None:
    model = onnx.load(str(image_out / "vision/tiny-qwen2.5-vl_vision.onnx"))
    assert model.opset_import[0].version >= 16
    (inp,) = model.graph.input
    (out,) = model.graph.output
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "hidden_states" and dims == [1, 3, 256, 392]
    assert out.name == "hidden_states_out"
    assert [d.dim_value for d in out.type.tensor_type.shape.dim] == [64, 64]
    ops = {n.op_type for n in model.graph.node}
    assert "Softmax" in ops and not ops & {"Loop", "If", "NonZero"}  # static graph


def test_pulsar2_config_and_calibration(image_out: Path, tiny_qwen2_5_vl_dir: Path) -> None:
    config = json.loads((image_out / "vision/config.json").read_text())
    quant = config["quant"]
    (inp,) = quant["input_configs"]
    assert inp["tensor_name"] == "hidden_states"
    assert inp["calibration_dataset"] == "hidden_states.tar" and inp["calibration_size"] == 4
    assert inp["calibration_format"] == "Image"
    assert inp["calibration_mean"] == pytest.approx([122.7709383, 116.7460125, 104.09373615])
    assert inp["calibration_std"] == pytest.approx([68.5005327, 66.6321579, 70.32316305])
    assert quant["calibration_method"] == "MinMax" and quant["precision_analysis"] is True
    assert quant["layer_configs"][0]["data_type"] == "U16"
    assert config["input_processors"][0] == {
        "tensor_name": "hidden_states", "tensor_format": "BGR", "tensor_layout": "NCHW",
        "src_dtype": "U8", "src_layout": "NHWC",
    }  # fmt: skip
    assert config["npu_mode"] == "NPU3" and config["model_type"] == "ONNX"
    # Calibration samples are exactly the uint8 pictures (as OpenCV will decode them).
    from common.inputs import vl_preprocess as vp
    from common.models.loading import load_processor

    processor = load_processor(tiny_qwen2_5_vl_dir)
    geo = vp.geometry(processor, 224)
    paths = vp.list_frames(IMAGES, "images")
    layout, _ = vp.uint8_layout(processor, vp.prepare_frames(paths, geo, processor), geo, "image")
    samples = read_calibration_tar(image_out / "vision/hidden_states.tar", "image")
    assert sorted(samples) == sorted(p.stem + ".png" for p in paths)
    for path, picture in zip(paths, layout, strict=True):
        assert np.array_equal(samples[path.stem + ".png"], picture.numpy())


def test_build_sh_commands(image_out: Path, tiny_qwen2_5_vl_dir: Path) -> None:
    script = (image_out / "build.sh").read_text()
    report = json.loads((image_out / "report.json").read_text())
    assert "pulsar2 build --input tiny-qwen2.5-vl_vision.onnx --config config.json" in script
    assert "--target_hardware AX650" in script
    assert (f'pulsar2 llm_build --input_path "$MODEL_DIR" --output_path axmodel --kv_cache_len '
            f"1023 --hidden_state_type bf16 --prefill_len {report['prefill_len']} --parallel 8 "
            "--chip AX650") in script  # fmt: skip
    (line,) = [x for x in script.splitlines() if x.startswith("MODEL_DIR=${MODEL_DIR:-")]
    default = line.removeprefix("MODEL_DIR=${MODEL_DIR:-").removesuffix("}")
    assert (image_out / default).resolve() == tiny_qwen2_5_vl_dir.resolve()
    assert subprocess.run(["bash", "-n", str(image_out / "build.sh")], check=False).returncode == 0


def test_embeddings_are_rne_bf16_of_the_table(image_out: Path, tiny_qwen2_5_vl_dir: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(tiny_qwen2_5_vl_dir / "model.safetensors")
    (table,) = [v for k, v in weights.items() if k.endswith("embed_tokens.weight")]
    words = np.fromfile(image_out / pulsar2_embed_name(), dtype="<u2").reshape(table.shape)
    expected = table.float().bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(words, expected)
    assert np.abs(bf16_to_fp32(words) - table.float().numpy()).max() < 0.01


def test_video_mode_stepwise_equals_whole(session_build: Path, tiny_qwen2_5_vl_dir: Path) -> None:
    out = session_build / "axera-video"
    _ok(run_build("--model", "tiny-qwen2.5-vl", "--build-dir", str(session_build), "--mode",
                  "video", "--video-size", "168", "--calib-format", "npy", "--bf16-truncate",
                  "--out", str(out)))  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    # 4 frames → 2 temporal steps of 12×12 patches → 36 tokens each; the ONNX runs per step
    # and its concatenation is compared with the whole-video PyTorch tower.
    assert report["mode"] == "video" and report["steps"] == 2 and report["visual_tokens"] == 72
    assert report["onnx_cos_vs_torch"] >= 0.9999 and report["greedy_match"] is True
    assert report["embeddings"]["rounding"] == "truncate"
    config = json.loads((out / "vision/config.json").read_text())
    assert config["quant"]["input_configs"][0]["calibration_format"] == "Numpy"
    samples = read_calibration_tar(out / "vision/hidden_states.tar", "npy")
    assert sorted(samples) == ["h0.npy", "h1.npy"]
    assert samples["h0.npy"].shape == (144, 392, 3) and samples["h0.npy"].dtype == np.uint8


def test_qwen2_vl_image_mode(session_build: Path, tiny_qwen2_vl_dir: Path) -> None:
    out = session_build / "axera-qwen2-vl"
    _ok(run_build("--model", "tiny-qwen2-vl", "--build-dir", str(session_build),
                  "--image-size", "112", "--out", str(out)))  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["onnx_cos_vs_torch"] >= 0.9999 and report["greedy_match"] is True
    assert report["visual_tokens"] == 16


@pytest.mark.smollm2
def test_llm_only_path_smollm2(session_build: Path, smollm2_dir: Path) -> None:
    result = run_build("--model", "smollm2-135m", "--build-dir", str(session_build))
    _ok(result)
    out = session_build / "smollm2-135m" / "axera-ax650"
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "llm" and report["visual_tokens"] == 0 and report["passed"]
    assert_gates(report, {"embeddings_bf16_max_rel"})
    assert report["onnx_cos_vs_torch"] is None and report["prefill_len"] == 128
    assert report["bf16_embeddings_greedy_match"] is True
    # Read one part at a time, the greedy check still decodes what generate() does.
    inputs = build.text_inputs(load_tokenizer(smollm2_dir), "What is the capital of France?")
    want = greedy_tokens(load_model(smollm2_dir), inputs, 8)
    assert report["bf16_embeddings_greedy_tokens"]["float"] == want
    assert report["resources"]["estimated_peak_bytes"]["largest part (float32)"] > 0
    assert (out / pulsar2_embed_name()).stat().st_size == 49152 * 576 * 2
    assert not (out / "vision").exists()
    assert "pulsar2 llm_build" in (out / "build.sh").read_text()
    assert "NPU compile step NOT run" in result.stdout
    assert f"bash {out / 'build.sh'}" in result.stdout


@pytest.mark.smollm2
def test_derived_qwen2_package_tokenizes_like_smollm2(
    session_build: Path, smollm2_dir: Path, smollm2_qwen2_dir: Path
) -> None:
    """The qwen2 rewrite's package is checked against SmolLM2's own tokenizer, not its own."""
    _ok(run_build("--model", "smollm2-135m-qwen2", "--build-dir", str(session_build)))
    out = session_build / "smollm2-135m-qwen2" / "axera-ax650"
    report = json.loads((out / "report.json").read_text())
    assert report["passed"]
    assert_same_tokenizer(report["tokenizer"], out, smollm2_dir)
    assert "tokenizer | identical to the source's" in (out / "report.md").read_text()


# ------------------------------------------------------------------ bad input


def test_prompt_longer_than_prefill(session_build: Path, tiny_qwen2_5_vl_dir: Path) -> None:
    result = run_build("--model", "tiny-qwen2.5-vl", "--build-dir", str(session_build),
                       "--image-size", "56", "--prefill-len", "16", "--out",
                       str(session_build / "never"))  # fmt: skip
    assert_clean_error(result, "--prefill-len: prefill_len 16 < prompt length", "4 visual")
    assert not (session_build / "never").exists()


def _main_error(*args: str) -> str:
    """In-process run (no interpreter start-up) that must fail with a user error."""
    from common.core.errors import EdgeforgeError

    with pytest.raises(EdgeforgeError) as info:
        build.main(list(args))
    assert type(info.value) is EdgeforgeError  # bad input (exit 2), not a failed check
    return str(info.value)


def test_bad_sizes(session_build: Path, tiny_qwen2_5_vl_dir: Path) -> None:
    common = ("--model", "tiny-qwen2.5-vl", "--build-dir", str(session_build))
    # The declared minimum (one 28 px merge window of the Qwen2-VL family), before any work.
    assert "--image-size=20: must be >= 28" in _main_error(*common, "--image-size", "20")
    assert "--image-size: 448×448 px is outside the model processor's pixel budget" in (
        _main_error(*common, "--image-size", "448")
    )


def test_rounded_size_is_reported(session_build: Path, tiny_qwen2_5_vl_dir: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = session_build / "axera-rounded"
    assert (
        build.main(
            [
                "--model",
                "tiny-qwen2.5-vl",
                "--build-dir",
                str(session_build),
                "--image-size",
                "60",
                "--max-new-tokens",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "60 is not a multiple of 28; rounded to 56" in capsys.readouterr().err  # a note
    report = json.loads((out / "report.json").read_text())
    assert report["size"] == 56 and any("rounded to 56" in n for n in report["notes"])


def test_calibration_folder_errors(session_build: Path, tmp_path: Path,
                                   tiny_qwen2_5_vl_dir: Path) -> None:  # fmt: skip
    common = ("--model", "tiny-qwen2.5-vl", "--build-dir", str(session_build), "--out",
              str(tmp_path / "never"))  # fmt: skip
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no images" in _main_error(*common, "--calib-dir", str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes((IMAGES / "rocket.jpg").read_bytes())
    (broken / "b.jpg").write_bytes(b"\xff\xd8 truncated")
    assert "b.jpg: not a readable image" in _main_error(*common, "--calib-dir", str(broken))
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    from PIL import Image

    Image.new("RGB", (20, 20)).save(tiny / "x.png")
    assert "x.png: 20×20 px is smaller than one merge window" in _main_error(
        *common, "--calib-dir", str(tiny)
    )
    assert not (tmp_path / "never").exists()  # nothing half-written


def test_mode_does_not_fit_model(session_build: Path, tiny_qwen2_dir: Path) -> None:
    assert_clean_error(run_build("--model", "tiny-qwen2", "--build-dir", str(session_build),
                                 "--mode", "image"),
                       "--mode image: tiny-qwen2 is a text-only qwen2 model")  # fmt: skip


def test_prefill_default_alignment() -> None:
    assert pulsar2.default_prefill_len(270, text_only=False) == 320
    assert pulsar2.default_prefill_len(500, text_only=False) == 512
    assert pulsar2.default_prefill_len(37, text_only=True) == 128

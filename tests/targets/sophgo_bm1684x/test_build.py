"""``make sophgo`` end to end on tiny-qwen2, and its input errors."""

from __future__ import annotations

import json
from pathlib import Path

from common.tpu_mlir import Toolchain
from tests.conftest import CliResult, assert_clean_error, run_python

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "targets" / "sophgo-bm1684x" / "build.py"


def run_build(*args: str) -> CliResult:
    return run_python(str(SCRIPT), *args)


def test_unknown_mode_and_chip(session_build: Path) -> None:
    base = ("--model", "tiny-qwen2", "--build-dir", str(session_build))
    assert_clean_error(run_build(*base, "--mode", "int3"), "MODE='int3'", "w4bf16")
    assert_clean_error(run_build(*base, "--chip", "bm1999"), "CHIP='bm1999'", "bm1688")


def test_seq_len_beyond_rotary_range(session_build: Path, tiny_qwen2_dir: Path) -> None:
    limit = json.loads((tiny_qwen2_dir / "config.json").read_text())["max_position_embeddings"]
    result = run_build(
        "--model", "tiny-qwen2", "--build-dir", str(session_build), "--seq-len", str(limit + 1)
    )
    assert_clean_error(result, f"SEQ_LEN={limit + 1}", "max_position_embeddings")


def test_missing_toolchain(session_build: Path, tmp_path: Path) -> None:
    result = run_build(
        "--model", "tiny-qwen2", "--build-dir", str(session_build), "--venv", str(tmp_path)
    )
    assert_clean_error(result, "make sophgo-toolchain")


def test_tiny_qwen2_bf16_package(session_build: Path, tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    result = run_build(
        "--model", "tiny-qwen2", "--build-dir", str(session_build), "--seq-len", "64",
        "--max-new-tokens", "8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = session_build / "tiny-qwen2" / "sophgo-bm1684x" / "bf16"
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "bf16" and report["chip"] == "bm1684x"
    assert report["tpu_mlir_version"] == "1.30.2"
    assert len(report["pieces"]) == 2 * 2 + 5
    for piece in report["pieces"]:
        assert piece["cos"] >= 0.999, piece  # simulator vs onnxruntime
        # the tools' own checks: transform (top vs onnxruntime), deploy (tpu vs top, bmodel
        # vs tpu)
        assert len(piece["tool_cos"]) == 3 and piece["tool_passed"], piece
        assert min(piece["tool_cos"]) >= 0.999, piece
    assert report["greedy_match_tokens"] == report["greedy_total_tokens"] >= 1
    # every decode step's logits (simulated bf16 bmodels) against HF's float logits
    assert report["decode_logits_cos_min"] >= 0.999
    assert (out / "tiny-qwen2_bf16_seq64_1dev.bmodel").stat().st_size > 0
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["versions"]["tpu_mlir"] == "1.30.2"
    assert "tiny-qwen2_bf16_seq64_1dev.bmodel" in json.dumps(manifest["outputs"])
    assert "| block_cache_1 |" in (out / "report.md").read_text()
    info = Toolchain(REPO / ".venv-tpu-mlir").run(
        "model_tool", ["--info", str(out / "tiny-qwen2_bf16_seq64_1dev.bmodel")], tmp_path,
        tmp_path / "info.log",
    )  # fmt: skip
    for index, piece in enumerate(report["pieces"]):  # one net per piece, in order
        assert f"net {index}: [{piece['name']}]" in info
    assert info.count("kernel_module size") == 1  # the 5.6 MB kernel is stored once

"""``make qnn`` on the HTP emulator (needs onnxruntime-qnn: ``tox -e qnn``).

Strict sessions, EPContext compilation and binary metadata on a hand-built QDQ graph; then
the whole target on tiny-qwen2 run the way make runs it, its outputs re-read here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from common.analysis.simulate import apply_plan, transformed_model
from common.backends import qdq, qnn_ep
from common.core.errors import EdgeforgeError
from common.export.mllm_format import read_mllm
from common.models import get_adapter, iter_linears
from tests.conftest import (
    REPO_ROOT,
    CliResult,
    assert_clean_error,
    assert_gates,
    assert_same_tokenizer,
    run_python,
)

SCRIPT = REPO_ROOT / "targets" / "qnn" / "build.py"
sys.path.insert(0, str(SCRIPT.parent))
import mllm_int8  # noqa: E402  (target folder module)

LINEAR_SUFFIXES = ("weight", "weight.scale", "input_scale", "output_scale", "clip_input",
                   "clip_output")  # fmt: skip


def _qdq_matmul(path: Path, batch: int | str) -> Path:
    """A QDQ MatMul [batch, 64] x [64, 32] quantized by onnxruntime's QNN recipe."""
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    rng = np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 32])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    feeds = iter([{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(4)])
    config = get_qnn_qdq_config(
        model,
        type("R", (), {"get_next": lambda s: next(feeds, None)})(),
        activation_type=QuantType.QUInt16,
    )
    quantize(model, str(path), config)
    return path


def test_strict_session_and_context_metadata(tmp_path: Path) -> None:
    model = _qdq_matmul(tmp_path / "mm.qdq.onnx", 4)
    for name in ("SM8650", "SM8750"):
        soc = qnn_ep.soc_by_name(name)
        options = qnn_ep.provider_options(soc)
        session = qnn_ep.strict_session(model, options)
        assert qnn_ep.node_assignment(session) == {
            qnn_ep.EP_NAME: {"QuantizeLinear": 2, "DequantizeLinear": 3, "MatMul": 1}
        }
        ctx = tmp_path / name / "mm_ctx.onnx"
        ctx.parent.mkdir()
        binary = qnn_ep.compile_context(model, ctx, options)
        assert binary.is_file() and binary.parent == ctx.parent  # embed mode 0
        info = qnn_ep.check_binary_target(binary, soc)
        assert (info.soc_model, info.htp_arch, info.vtcm_mb) == (soc.soc_model, soc.htp_arch, 8)
        assert qnn_ep.node_assignment(qnn_ep.strict_session(ctx, options)) == {
            qnn_ep.EP_NAME: {"EPContext": 1}
        }
        x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
        np.testing.assert_allclose(
            qnn_ep.strict_session(ctx, options).run(None, {"x": x})[0],
            session.run(None, {"x": x})[0],
            atol=0.05,
        )
    with pytest.raises(EdgeforgeError, match=r"socModel/arch/VTCM MB/opt level \(69, 79"):
        qnn_ep.check_binary_target(binary, qnn_ep.soc_by_name("SM8650"))


def test_rejected_graph_names_the_ops_instead_of_falling_back(tmp_path: Path) -> None:
    model = _qdq_matmul(tmp_path / "dyn.qdq.onnx", "N")  # HTP needs static shapes
    options = qnn_ep.provider_options(qnn_ep.soc_by_name("SM8650"))
    with pytest.raises(EdgeforgeError, match=r"does not support these nodes.*MatMul x1"):
        qnn_ep.strict_session(model, options)
    with pytest.raises(EdgeforgeError, match="does not support these nodes"):
        qnn_ep.compile_context(model, tmp_path / "dyn_ctx.onnx", options)


def run_target(build_dir: Path, *args: str) -> CliResult:
    return run_python(str(SCRIPT), "--build-dir", str(build_dir), *args)


@pytest.fixture(scope="module")
def tiny_profile(session_build: Path, tiny_qwen2_dir: Path) -> Path:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "common.steps.profile_cli",
            "profile",
            "--model",
            "tiny-qwen2",
            "--build-dir",
            str(session_build),
            "--num-samples",
            "8",
            "--seq-len",
            "64",
            "--rotate",
            "hadamard",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return session_build / "tiny-qwen2" / "profile-hadamard" / "profile.json"  # make qnn's


@pytest.fixture(scope="module")
def tiny_run(session_build: Path, tiny_profile: Path) -> Path:
    result = run_target(
        session_build,
        "--model",
        "tiny-qwen2",
        "--prefill-len",
        "16",
        "--kv-len",
        "24",
        "--socs",
        "SM8650,SM8850",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return session_build / "tiny-qwen2" / "qnn"


def test_tiny_report_and_binaries(tiny_run: Path, tiny_qwen2_dir: Path) -> None:
    report = json.loads((tiny_run / "report.json").read_text())
    assert_same_tokenizer(report["tokenizer"], tiny_run / "tokenizer", tiny_qwen2_dir)
    assert_gates(
        report,
        {
            "min_piece_cos_vs_float",
            "pieces_not_all_on_qnn",
            "end_to_end_top1_agreement",
            "mllm_int8_max_abs_diff",
        },
    )
    assert report["passed"] is True
    assert (report["soc_model"], report["htp_arch"], report["qnn_version"]) == (57, 75, "2.51.0")
    assert report["rounding"] == "gptq"
    names = [row["name"] for row in report["layers"]]
    assert names == ["block_0", "block_1", "block_cache_0", "block_cache_1", "lm_head"]
    for row in report["layers"]:
        assert row["all_nodes_on_qnn"] is True
        assert row["cos_vs_float"] >= 0.999, row
        assert row["cos_vs_cpu_qdq"] >= 0.995, row
        for soc_name, soc in (("SM8650", (57, 75)), ("SM8850", (87, 81))):
            binary = tiny_run / row["binaries"][soc_name]["bin"]
            info = qnn_ep.read_binary_info(binary)  # read back here, not trusted from the report
            assert (info.soc_model, info.htp_arch) == soc
    assert report["end_to_end"]["top1_agreement"] >= 0.95
    assert report["end_to_end"]["cos"] >= 0.99
    assert report["mllm_int8"]["max_abs_diff"] <= 1e-4
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["versions"]["onnxruntime-qnn"] == "2.7.0"
    assert "report.md" in manifest["outputs"] and "layers.png" in manifest["outputs"]


def test_int8_mllm_tensor_list_and_logits(tiny_run: Path, tiny_qwen2_dir: Path) -> None:
    stored = read_mllm(tiny_run / "model.int8.mllm")
    plan = json.loads((tiny_run / "quant_plan.json").read_text())
    assert plan["transforms"]["rotation"]["mode"] == "hadamard"  # make qnn's default profile
    with transformed_model(tiny_qwen2_dir, plan["transforms"]) as (model, _):
        adapter = get_adapter(model)  # the model as the plan assumes it: rotated
    for name, role, linear in iter_linears(adapter):
        if role == "lm_head":
            assert stored["lm_head.weight"][0] == 0  # F32
            continue
        for suffix in LINEAR_SUFFIXES:
            assert f"{name}.{suffix}" in stored, f"{name}.{suffix}"
        code, levels = stored[f"{name}.weight"]
        assert code == 16 and levels.size == linear.weight.numel()  # I8 [in, out]
        assert stored[f"{name}.clip_input"][0] == 16
        if linear.bias is not None:
            assert stored[f"{name}.bias"][0] == 0  # F32 bias (quant_bias off)
    ids = torch.arange(1, 17)[None] % adapter.vocab_size
    handles = apply_plan(adapter, plan)
    with torch.no_grad():
        want = adapter.model(ids).logits
    for h in handles:
        h.remove()
    with transformed_model(tiny_qwen2_dir, plan["transforms"]) as (model, _):
        fresh = get_adapter(model)
    with torch.no_grad():
        for p in fresh.model.parameters():
            p.mul_(0.0)  # nothing of the float model may survive: all comes from the file
    handles = mllm_int8.load_int8_mllm(tiny_run / "model.int8.mllm", fresh, plan)
    with torch.no_grad():
        got = fresh.model(ids).logits
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--socs", "SM8650,SM9999"), ("SoC 'SM9999' is not supported", "SM8650 (57/v75)")),
        (("--preset", "w3a3"), ("precision preset 'w3a3' is unknown", "w8a16, w8a8, w4a16")),
        (("--rounding", "stochastic"), ("ROUNDING: 'stochastic' is unknown", "gptq, nearest")),
        (("--rotate", "givens"), ("ROTATE: 'givens' is unknown", "hadamard, orthogonal, none")),
        (("--gptq-seq-len", "1"), ("GPTQ_SEQ_LEN: a GPTQ window needs at least 2 tokens",)),
    ],
)
def test_bad_options(
    session_build: Path, args: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    assert_clean_error(run_target(session_build, "--model", "tiny-qwen2", *args), *fragments)


def test_every_preset_has_gates() -> None:
    """A preset without gates would fail with a KeyError after every piece was compiled."""
    spec = importlib.util.spec_from_file_location("qnn_build", SCRIPT)
    qnn_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qnn_build)
    assert set(qnn_build.GATES) == set(qdq.PRESETS)


def test_profile_from_another_model(
    session_build: Path, tiny_profile: Path, tmp_path: Path
) -> None:
    doc = json.loads(tiny_profile.read_text())
    doc["edgeforge"]["model"] = "tiny-qwen2-vl"
    foreign = tmp_path / "profile.json"
    foreign.write_text(json.dumps(doc))
    result = run_target(session_build, "--model", "tiny-qwen2", "--profile", str(foreign))
    assert_clean_error(result, str(foreign), "made for model 'tiny-qwen2-vl'")


def test_shadow_layers_from_another_model(
    session_build: Path, tiny_profile: Path, tmp_path: Path
) -> None:
    """make simulate's decision is read when present, and checked like the profile."""
    build_dir = tmp_path / "build"
    (build_dir / "tiny-qwen2" / "simulate").mkdir(parents=True)
    (build_dir / "tiny-qwen2" / "model").symlink_to(session_build / "tiny-qwen2" / "model")
    decision = build_dir / "tiny-qwen2" / "simulate" / "shadow_layers.json"
    decision.write_text(json.dumps({"model": "smollm2-135m", "t01m_clip_threshold": 8.0}))
    result = run_target(build_dir, "--model", "tiny-qwen2", "--profile", str(tiny_profile))
    assert_clean_error(result, str(decision), "made for model 'smollm2-135m'")


def test_rotation_disagreeing_with_the_profile(session_build: Path, tiny_profile: Path) -> None:
    """ROTATE= picks the default profile; with an explicit PROFILE= it must agree."""
    result = run_target(
        session_build, "--model", "tiny-qwen2", "--profile", str(tiny_profile), "--rotate", "none"
    )
    assert_clean_error(
        result, str(tiny_profile), "ROTATE=none but this profile's rotation is hadamard"
    )


def test_missing_default_profile_names_the_rotation(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    build_dir = tmp_path / "build"
    (build_dir / "tiny-qwen2").mkdir(parents=True)
    (build_dir / "tiny-qwen2" / "model").symlink_to(tiny_qwen2_dir)
    result = run_target(build_dir, "--model", "tiny-qwen2")
    assert_clean_error(
        result, "profile-hadamard/profile.json: profile not found", "ROTATE=hadamard"
    )

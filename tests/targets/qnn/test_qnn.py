"""``make qnn`` on the HTP emulator (needs onnxruntime-qnn: ``tox -e qnn``).

Strict sessions, EPContext compilation and binary metadata on a hand-built QDQ graph; then
the whole target on tiny-qwen2 run the way make runs it, its outputs re-read here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from common.analysis.accuracy import accuracy_line
from common.analysis.layerwise import Parts
from common.analysis.simulate import apply_plan, transformed_model
from common.backends import qdq, qnn_ep
from common.core.errors import EdgeforgeError
from common.export.mllm_format import read_mllm
from common.models import get_adapter, iter_linears
from common.models.loading import load_model
from common.models.streaming import StreamedModel
from common.quant.schemes import Weights, int_bits
from common.quant.transforms import Transforms
from tests.conftest import (
    REPO_ROOT,
    CliResult,
    assert_clean_error,
    assert_gates,
    assert_qwen1_refused,
    assert_same_tokenizer,
    import_target,
    kill_after_entries,
    random_qwen2,
    run_python,
)

SCRIPT = REPO_ROOT / "targets" / "qnn" / "build.py"
mllm_int8 = import_target("qnn", "mllm_int8")
pipeline = import_target("qnn", "pipeline")
qnn_report = import_target("qnn", "report")

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


def test_context_binaries_are_reproducible(tmp_path: Path) -> None:
    """The same QDQ model compiled again, and from another folder, after other compiles
    in this process: the same EPContext model and binary, byte for byte (compiled
    in-process from a path, both the graph name and QNN's tensor ids differed)."""
    model = _qdq_matmul(tmp_path / "mm.qdq.onnx", 4)
    moved = tmp_path / "elsewhere" / "mm.qdq.onnx"
    moved.parent.mkdir()
    shutil.copy(model, moved)
    options = qnn_ep.provider_options(qnn_ep.soc_by_name("SM8650"))
    built = []
    for i, source in enumerate((model, model, moved)):
        ctx = tmp_path / f"out{i}" / "mm_ctx.onnx"
        ctx.parent.mkdir()
        binary = qnn_ep.compile_context(source, ctx, options)
        built.append((ctx.read_bytes(), binary.read_bytes()))
    assert built[0] == built[1] == built[2]


def _qdq_block(tmp_path: Path, tokenizer_dir: Path, config: Any, seq: int = 8) -> Path:
    """Block 0 of a random checkpoint of ``config`` for ``seq`` tokens, exported and
    quantized (w8a16, fixed encodings) as make qnn quantizes it: the QDQ model's path."""
    from common.export import piece_export as pe
    from common.export.random_checkpoint import write_random_checkpoint

    model_dir = write_random_checkpoint(config, tmp_path / "model", tokenizer_dir=tokenizer_dir)
    streamed = StreamedModel(model_dir)
    adapter = streamed.adapter
    pe.export_pieces(adapter, seq, tmp_path, only=lambda n: n == "block_0",
                     parts=Parts(adapter, streamed), progress=False)  # fmt: skip
    scheme = qdq.preset_by_name("w8a16")
    with Parts(adapter, streamed).layer(adapter.layers()[0]) as layer:
        weights = {
            n: m.weight.detach()
            for n, m in zip(layer.linear_names.values(), layer.linears.values(), strict=True)
        }
        roles = dict(zip(layer.linear_names.values(), layer.linears, strict=True))
        plan = qdq.QdqPlan("block_0", scheme, {}, {
            name: qdq.LinearPlan(role, scheme.weights, qdq.Encoding.grid(8.0, 16),
                                 qdq.Encoding.grid(40.0, 16))
            for name, role in roles.items()
        })  # fmt: skip
        specs = pe.piece_signatures(pe.piece_dims(adapter, seq))["block"][0]
        feeds = [
            {
                spec[0]: t.numpy()
                for spec, t in zip(specs, pe.example_inputs(specs, 1024), strict=True)
            }
        ]
        static = qdq.static_float_model(tmp_path / "block_0.onnx", tmp_path / "static.onnx")
        qdq.quantize_piece(static, tmp_path / "qdq.onnx", plan=plan, weights=weights,
                           calibration=feeds * 2)  # fmt: skip
    (tmp_path / "ctx").mkdir()
    return tmp_path / "qdq.onnx"


def test_multi_head_attention_block_compiles(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    """A block whose KV heads are all its heads (Qwen1.5-1.8B, Qwen-7B) exports no KV
    repeat, and its QDQ graph compiles: a 1-fold ``Tile`` there crashed QNN's compiler
    (SIGSEGV) at the first block of a 1.8B build."""
    from transformers import Qwen2Config

    config = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512,
    )  # fmt: skip
    model = _qdq_block(tmp_path, tiny_qwen2_dir, config)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "block_0.onnx")).graph.node}
    assert not ops & {"Tile", "Expand"}, ops
    options = qnn_ep.provider_options(qnn_ep.soc_by_name("SM8650"))
    binary = qnn_ep.compile_context(model, tmp_path / "ctx" / "b_ctx.onnx", options)
    assert binary.is_file()


def _product_operands(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The DequantizeLinear feeding the second input of each MatMul of two activations (not
    of a weight, nor of a float one) in a QDQ ``graph``."""
    producers = {out: node for node in graph.node for out in node.output}
    weights = {init.name for init in graph.initializer}
    feeding = [producers.get(node.input[1]) for node in graph.node if node.op_type == "MatMul"]
    return [
        dq
        for dq in feeding
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] not in weights
    ]


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def test_attention_products_run_on_the_htp_as_their_qdq_graph(tmp_path: Path) -> None:
    """A product of two 16-bit activations (Q·Kᵀ, P·V) as onnxruntime's QNN recipe
    quantizes it (both uint16): the HTP cuts the second operand to 8 bits, 0.67 % off the
    QDQ graph run as written on CPU. qdq.signed_matmul_operands re-quantizes that operand
    to int16 symmetric, and the HTP then runs the graph as written (0.012 %)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    rng = np.random.default_rng(0)
    shapes = {"q": [1, 2, 56, 16], "k": [1, 2, 16, 56]}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["q", "k"], ["scores"], name="qk")],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 2, 56, 56])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    samples = [
        {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()} for _ in range(3)
    ]
    feeds = iter(samples[1:])
    config = get_qnn_qdq_config(
        model,
        type("R", (), {"get_next": lambda s: next(feeds, None)})(),
        activation_type=QuantType.QUInt16,
    )
    path = tmp_path / "qk.qdq.onnx"
    quantize(model, str(path), config)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options = qnn_ep.provider_options(qnn_ep.soc_by_name("SM8650"))

    def cpu_and_htp(model_path: Path) -> tuple[np.ndarray, np.ndarray]:
        cpu = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        htp = qnn_ep.strict_session(model_path, options)
        return cpu.run(None, samples[0])[0], htp.run(None, samples[0])[0]

    assert _relative_error(*cpu_and_htp(path)) > 5e-3  # the HTP's 8-bit cut
    qdq_model = onnx.load(str(path))
    assert qdq.signed_matmul_operands(qdq_model) == ["k_DequantizeLinear_Output"]
    onnx.save(qdq_model, str(tmp_path / "qk.int16.onnx"))
    assert _relative_error(*cpu_and_htp(tmp_path / "qk.int16.onnx")) < 5e-4


def test_block_products_take_a_signed_second_operand(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    """make qnn's w8a16 QDQ block (GQA, so K and V pass a repeat) feeds both of its
    activation products an int16 second operand."""
    from transformers import Qwen2Config

    config = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512,
    )  # fmt: skip
    graph = onnx.load(str(_qdq_block(tmp_path, tiny_qwen2_dir, config))).graph
    inits = {init.name: init for init in graph.initializer}
    operands = _product_operands(graph)
    assert len(operands) == 2
    assert {inits[dq.input[2]].data_type for dq in operands} == {TensorProto.INT16}


def test_auto_opt_mode_lowers_only_a_graph_that_runs_out(
    tmp_path: Path, tiny_qwen2_dir: Path
) -> None:
    """A Qwen2 block with q/k/v biases at hidden 576, 32 tokens (make qnn's PREFILL_LEN):
    graph finalization at mode 3 runs out
    of memory (the error names OPT_MODE); OPT_MODE=auto's modes compile it at 1 and say
    why. A small block stays at 3."""
    from transformers import Qwen2Config

    soc = qnn_ep.soc_by_name("SM8650")
    config = Qwen2Config(
        hidden_size=576, intermediate_size=1152, num_hidden_layers=1, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=1024, max_position_embeddings=512,
    )  # fmt: skip
    model = _qdq_block(tmp_path / "big", tiny_qwen2_dir, config, seq=32)
    ctx = tmp_path / "big" / "ctx" / "b_ctx.onnx"
    with pytest.raises(EdgeforgeError, match=r"MEM_ALLOC.*OPT_MODE=auto"):
        qnn_ep.compile_at_modes(model, ctx, soc, qnn_ep.DEFAULT_VTCM_MB, (3,))
    compiled = qnn_ep.compile_at_modes(model, ctx, soc, qnn_ep.DEFAULT_VTCM_MB,
                                       qnn_ep.AUTO_OPT_MODES)  # fmt: skip
    assert compiled.opt_mode == 1 and "OPT_MODE 3 ran out of memory" in compiled.lowered_because
    info = qnn_ep.check_binary_target(compiled.binary, soc, qnn_ep.DEFAULT_VTCM_MB, 1)
    assert info.optimization_level == 1
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 64, 128, 4
    config.num_key_value_heads = 2
    small = _qdq_block(tmp_path / "small", tiny_qwen2_dir, config)
    kept = qnn_ep.compile_at_modes(small, tmp_path / "small" / "ctx" / "b_ctx.onnx", soc,
                                   qnn_ep.DEFAULT_VTCM_MB, qnn_ep.AUTO_OPT_MODES)  # fmt: skip
    assert (kept.opt_mode, kept.lowered_because) == (3, None)


def test_a_graph_starts_at_mode_1_once_its_twin_ran_out() -> None:
    """Under OPT_MODE=auto the same piece kind of a later layer (same graph, other weights)
    starts at mode 1 on the SoC where an earlier one ran out, naming it; other kinds and
    SoCs still try 3 first, and a numbered mode is never changed."""
    socs = [qnn_ep.soc_by_name("SM8650"), qnn_ep.soc_by_name("SM8750")]
    first = {"SM8650": ((3, 1), None), "SM8750": ((3, 1), None)}
    choice = pipeline.ModeChoice(qnn_ep.AUTO_OPT_MODE)
    assert choice.of("block_0", socs) == first
    ran_out = {"SM8650": {"lowered_because": "OPT_MODE 3 ran out of memory at graph "
                          "finalization"}, "SM8750": {"lowered_because": None}}  # fmt: skip
    choice.saw({"name": "block_0", "binaries": ran_out})
    later = choice.of("block_11", socs)
    assert later["SM8650"][0] == (1,) and later["SM8650"][1].startswith("block_0 (the same")
    assert later["SM8750"] == ((3, 1), None)
    assert choice.of("block_cache_0", socs) == first == choice.of("lm_head", socs)
    choice.saw(
        {"name": "block_11", "binaries": {"SM8650": {"lowered_because": later["SM8650"][1]}}}
    )
    assert choice.of("block_12", socs)["SM8650"][1].startswith("block_0 (the same")
    strict = pipeline.ModeChoice(2)
    strict.saw({"name": "block_0", "binaries": ran_out})
    assert strict.of("block_1", socs) == {"SM8650": ((2,), None), "SM8750": ((2,), None)}


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
        "--keep-qdq",  # the graphs the plan test reads
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return session_build / "tiny-qwen2" / "qnn"


def test_killed_build_continues_from_its_last_complete_piece(
    tiny_run: Path, tiny_profile: Path, tiny_qwen2_dir: Path, tmp_path: Path
) -> None:
    """Kill a build (SIGKILL, no cleanup) once GPTQ and two pieces are done; the same
    command then reuses them, builds only the rest, and reports the numbers and writes
    the binaries of an uninterrupted build (``tiny_run``)."""
    args = [
        str(SCRIPT), "--build-dir", str(tmp_path), "--model", "tiny-qwen2", "--model-path",
        str(tiny_qwen2_dir), "--profile", str(tiny_profile), "--prefill-len", "16",
        "--kv-len", "24", "--socs", "SM8650,SM8850", "--keep-qdq",
    ]  # fmt: skip
    cache = tmp_path / "tiny-qwen2" / "qnn-pieces"
    kept = kill_after_entries(args, cache)
    assert 3 <= len(kept) < 6, kept  # killed midway: GPTQ's levels and complete pieces only
    result = run_python(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "tiny-qwen2" / "qnn"
    report = json.loads((out / "report.json").read_text())
    assert "gptq" in report["reused_from_cache"] and len(report["reused_from_cache"]) >= 3
    assert "reused from an earlier run" in result.stderr
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # dead temporaries gone
    want = json.loads((tiny_run / "report.json").read_text())  # uninterrupted, same inputs
    for key in ("layers", "end_to_end", "mllm_int8", "float_linears"):
        assert report[key] == want[key], key
    # The context binaries are complete and where the report says; their bytes are not
    # compared: QNN numbers its tensors per process and names graphs after the model path.
    for row in want["layers"]:
        for binary in row["binaries"].values():
            assert (out / binary["ctx"]).is_file() and (out / binary["bin"]).is_file()
    assert (out / "model.int8.mllm").read_bytes() == (tiny_run / "model.int8.mllm").read_bytes()


def test_preflight_stops_before_the_build(
    tiny_profile: Path, session_build: Path, tiny_qwen2_dir: Path, tmp_path: Path
) -> None:
    """Over MAX_MEMORY, one line naming the estimate by part, before any output. The
    largest piece is a decoder layer at 7x its float32 weights, or the LM head at 4x
    (built from a narrow copy), at 7x when the plan keeps it float."""
    build = import_target("qnn", "build")
    result = run_target(
        tmp_path, "--model", "tiny-qwen2", "--profile", str(tiny_profile), "--max-memory", "1MB"
    )
    assert_clean_error(result, "make qnn needs about", "over MAX_MEMORY=0.00 GiB")
    assert not (tmp_path / "tiny-qwen2" / "qnn").exists()
    streamed = StreamedModel(tiny_qwen2_dir)
    layer = streamed.largest_layer_bytes()
    head = streamed.part_bytes("model.embed_tokens")
    assert 7 * layer < 4 * head < 7 * head  # tiny-qwen2's vocabulary outweighs a layer
    narrow = dict(build.memory_estimate(streamed, gptq=False).parts)
    assert narrow["LM head while built (4x its weights)"] == 4 * head
    whole = dict(build.memory_estimate(streamed, gptq=False, head_narrow=False).parts)
    assert whole["LM head while built (7x its weights)"] == 7 * head
    assert "onnxruntime, QNN backend, captured activations" in whole
    deep = StreamedModel(random_qwen2(tmp_path / "deep", tiny_qwen2_dir, layers=1))
    parts = dict(build.memory_estimate(deep, gptq=False).parts)
    assert deep.largest_layer_bytes() > 64 * 2**20  # and a 4 MiB head
    assert parts["largest decoder layer while built (7x its weights)"] == 7 * (
        deep.largest_layer_bytes()
    )


def test_disk_estimate_covers_the_build(tiny_run: Path, tiny_qwen2_dir: Path) -> None:
    """The disk preflight's estimate against the files the tiny build wrote (two SoCs,
    GPTQ), at its fullest moment, the package: the cache entries' QDQ graphs and binaries
    covered within 15 % (the overheads are set from larger graphs), the ``.mllm`` and
    GPTQ's levels within 10 %."""
    build = import_target("qnn", "build")
    plan = qdq.load_qdq_plan(tiny_run / "quant_plan.json")
    estimate = build.disk_estimate(StreamedModel(tiny_qwen2_dir), plan, 2, None, True, 0)
    entries = list((tiny_run.parent / "qnn-pieces").iterdir())
    pieces = [path for entry in entries for path in entry.rglob("*") if path.suffix == ".onnx"]
    binaries = [path for entry in entries for path in entry.rglob("*_qnn.bin")]
    assert len(pieces) == 3 * 5 and len(binaries) == 2 * 5  # QDQ + a context per SoC
    written = {
        "compiled pieces (QDQ graphs and binaries)": sum(
            path.stat().st_size for path in pieces + binaries
        ),
        "int8 .mllm": (tiny_run / "model.int8.mllm").stat().st_size,
        "GPTQ levels": sum(e.stat().st_size for e in tiny_run.parent.glob("qnn-pieces/gptq.*/*")),
    }
    assert estimate.parts.keys() == written.keys()  # the package outweighs the float pieces
    compiled = "compiled pieces (QDQ graphs and binaries)"
    assert written[compiled] <= estimate.parts[compiled] <= 1.15 * written[compiled]
    for part in ("int8 .mllm", "GPTQ levels"):
        assert abs(estimate.parts[part] - written[part]) <= 0.1 * written[part], part
    assert estimate.total == sum(estimate.parts.values())


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
    # The common accuracy block, from the same chain's logits on the held-out windows.
    accuracy = report["end_to_end"]["accuracy"]
    assert accuracy["graph"] == "QNN HTP emulator, every piece"
    assert accuracy["top1_agreement"] == report["end_to_end"]["top1_agreement"]
    assert (accuracy["rows"], accuracy["windows"]) == (report["end_to_end"]["tokens"], 32)
    assert accuracy["ppl_tokens"] == 32 * 15  # each window's rows but its last
    assert 0.95 < accuracy["ppl_ratio"] < 1.05  # random weights: a spread-out softmax
    low, high = accuracy["top1_interval_95"]
    assert low <= accuracy["top1_agreement"] <= high
    assert accuracy_line(accuracy) in (tiny_run / "report.md").read_text()
    # report.md ranks the pieces by how much each loses by itself, worst first.
    ranked = sorted(report["layers"], key=lambda r: (r["cos_vs_float"] - 1.0, r["name"]))
    line = ", ".join(
        f"{r['name']} ({1.0 - r['cos_vs_float']:.2e})" for r in ranked[: qnn_report.RANKED]
    )
    assert line in (tiny_run / "report.md").read_text()
    assert report["mllm_int8"]["max_abs_diff"] <= 1e-4
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["versions"]["onnxruntime-qnn"] == "2.7.0"
    assert "report.md" in manifest["outputs"] and "layers.png" in manifest["outputs"]
    # the binaries and the .mllm each have their plan; no third description of the encodings
    assert {"quant_plan.json", "model.int8.plan.json"} <= set(manifest["outputs"])
    assert "qnn_scales.json" not in manifest["outputs"]


def test_block_quantized_int4_pieces_on_htp(
    tiny_profile: Path, tiny_qwen2_dir: Path, tmp_path: Path
) -> None:
    """``PRESET=w4a16``: int4 weights with a scale per 32 input columns, written as ONNX's
    blocked DequantizeLinear, compile all on QNN for the oldest and newest HTP of the
    table (v73, v81) and run on the emulator as their QDQ graph does on CPU. A model whose
    linears the groups do not divide is refused (the build checks before any work)."""
    common = ("--model", "tiny-qwen2", "--profile", str(tiny_profile), "--preset", "w4a16")
    result = run_target(
        tmp_path, *common, "--prefill-len", "16", "--kv-len", "24", "--socs", "SM8550,SM8850",
        "--keep-qdq", "--e2e-windows", "4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "tiny-qwen2" / "qnn"
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "quant_plan.json").read_text())
    assert {json.dumps(t["weight"], sort_keys=True) for t in plan["tensors"].values()} == {
        json.dumps({"dtype": "int4", "granularity": "group", "group_size": 32,
                    "symmetric": True, "rounding": "gptq", "scales": "mse"}, sort_keys=True)
    }  # fmt: skip
    for row in report["layers"]:
        assert row["all_nodes_on_qnn"] and row["cos_vs_cpu_qdq"] >= 0.9999, row
        for soc_name, arch in (("SM8550", 73), ("SM8850", 81)):
            info = qnn_ep.read_binary_info(out / row["binaries"][soc_name]["bin"])
            assert info.htp_arch == arch
    for piece in ("block_0", "block_cache_1"):
        graph = onnx.load(str(out / "qdq" / f"{piece}.onnx"))
        inits = {i.name: i for i in graph.graph.initializer}
        weights = [
            n for n in graph.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].data_type == TensorProto.INT4
        ]  # fmt: skip
        assert len(weights) == 7, piece
        for node in weights:  # [in, out] levels, a scale per block of 32 input rows
            assert {a.name: a.i for a in node.attribute} == {"axis": 0, "block_size": 32}
            levels, scale = (list(inits[node.input[i]].dims) for i in (0, 1))
            assert scale == [levels[0] // 32, levels[1]], (piece, levels, scale)
    from transformers import AutoConfig, AutoModelForCausalLM

    build = import_target("qnn", "build")
    config = AutoConfig.from_pretrained(tiny_qwen2_dir)
    config.hidden_size = 48  # a group of 32 columns does not divide it
    with torch.device("meta"):
        odd = get_adapter(AutoModelForCausalLM.from_config(config))
    with pytest.raises(EdgeforgeError, match="q_proj reads 48 inputs, which PRESET=w4a16's"):
        build.check_groups(odd, qdq.preset_by_name("w4a16"), tmp_path / "config.json")
    build.check_groups(odd, qdq.preset_by_name("w8a16"), tmp_path / "config.json")


def test_sweep_tables_the_presets(tiny_profile: Path, tmp_path: Path) -> None:
    """``make qnn-sweep``: each preset built as make qnn builds it, its package kept under
    ``qnn-sweep/<preset>/``, and one table whose numbers are those packages' own: the
    accuracy block, the binaries' bytes (int4 blocks are smaller than int8 rows)."""
    sweep = REPO_ROOT / "targets" / "qnn" / "sweep.py"
    common = ("--model", "tiny-qwen2", "--build-dir", str(tmp_path))
    refused = run_python(str(sweep), *common, "--presets", "w8a16,w3a3")
    assert_clean_error(refused, "PRESETS=w8a16,w3a3: expected a comma list of")
    result = run_python(
        str(sweep), *common, "--presets", "w8a16,w4a16", "--profile", str(tiny_profile),
        "--prefill-len", "16", "--kv-len", "24", "--e2e-windows", "4", "--rounding", "nearest",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "tiny-qwen2" / "qnn-sweep"
    rows = {r["preset"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    assert list(rows) == ["w8a16", "w4a16"]
    for preset, row in rows.items():
        report = json.loads((out / preset / "report.json").read_text())
        assert report["preset"] == preset
        accuracy = report["end_to_end"]["accuracy"]
        assert (row["ppl_ratio"], row["top1_agreement"]) == (
            accuracy["ppl_ratio"],
            accuracy["top1_agreement"],
        )
        binaries = list((out / preset).glob("*/*_qnn.bin"))
        assert row["binary_bytes"] == sum(b.stat().st_size for b in binaries) and len(binaries) == 5
        assert f"| `{preset}` | {row['ppl_ratio']:.4f} |" in (out / "sweep.md").read_text()
    assert rows["w4a16"]["binary_bytes"] < rows["w8a16"]["binary_bytes"]
    assert not (tmp_path / "tiny-qwen2" / "qnn").exists()  # each package moved to the sweep


def _weights_in(graph: onnx.ModelProto, floats: dict[str, np.ndarray]) -> dict[str, tuple]:
    """Each linear's ``(MatMul, weight DequantizeLinear or None)`` in a QDQ graph, found by
    its weight: a float linear keeps ``W^T`` itself; a quantized one is the linear whose
    ``W^T`` its dequantized levels are closest to (GPTQ moves levels, never the layer)."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    producers = {o: n for n in graph.graph.node for o in n.output}
    found: dict[str, tuple] = {}
    for node in graph.graph.node:
        dq = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if node.op_type != "MatMul" or (dq is None and node.input[1] not in inits):
            continue
        if dq is None:
            name = next(n for n, w in floats.items() if np.array_equal(w, inits[node.input[1]]))
        elif dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            weight = inits[dq.input[0]].astype(np.float32) * inits[dq.input[1]]
            errors = sorted(
                (float(np.abs(w - weight).mean()), n)
                for n, w in floats.items()
                if w.shape == weight.shape
            )
            assert len(errors) == 1 or errors[0][0] < 0.1 * errors[1][0], errors[:2]
            name = errors[0][1]
        else:
            continue  # an activation x activation MatMul (attention)
        assert name not in found, name
        found[name] = (node, dq)
    return found


def test_quant_plan_regenerates_the_binaries_encodings(
    tiny_run: Path, tiny_qwen2_dir: Path
) -> None:
    """``quant_plan.json`` alone gives the QDQ graphs the binaries were compiled from: the
    overrides regenerated from the file equal every linear input/output Q/DQ encoding and
    weight type in each graph, float linears are float there, and every other activation
    has the calibrated width the file states."""
    plan = qdq.QdqPlan.from_json(json.loads((tiny_run / "quant_plan.json").read_text()))
    assert (plan.scheme.name, plan.scheme.weights.rounding) == ("w8a16", "gptq")
    with transformed_model(tiny_qwen2_dir, plan.transforms) as (model, _):
        floats = {
            n: m.weight.detach().float().T.numpy() for n, _r, m in iter_linears(get_adapter(model))
        }
    report = json.loads((tiny_run / "report.json").read_text())
    assert sorted(plan.float_linears()) == report["float_linears"]
    seen: set[str] = set()
    for row in report["layers"]:
        for binary in row["binaries"].values():  # each compiled from the QDQ graph below
            assert (tiny_run / binary["ctx"]).is_file() and (tiny_run / binary["bin"]).is_file()
        graph = onnx.load(str(tiny_run / "qdq" / f"{row['name']}.onnx"))
        protos = {i.name: i for i in graph.graph.initializer}
        inits = {name: onnx.numpy_helper.to_array(i) for name, i in protos.items()}
        producers = {o: n for n in graph.graph.node for o in n.output}
        quantizers = {n.input[0]: n for n in graph.graph.node if n.op_type == "QuantizeLinear"}
        for name, (matmul, weight_dq) in _weights_in(graph, floats).items():
            linear, feeding = plan.linears[name], producers.get(matmul.input[0])
            seen.add(name)
            if linear.is_float:
                assert weight_dq is None and feeding.op_type != "DequantizeLinear", name
                assert matmul.output[0] not in quantizers, name
                continue
            for encoding, dq_or_q in (
                (linear.input, feeding),
                (linear.output, quantizers[matmul.output[0]]),
            ):
                want = qdq.activation_override(encoding)
                scale, zero = inits[dq_or_q.input[1]], inits[dq_or_q.input[2]]
                assert dq_or_q.op_type in ("DequantizeLinear", "QuantizeLinear"), name
                assert scale.dtype == np.float32 and scale == want["scale"], name
                assert zero.dtype == want["zero_point"].dtype and zero == want["zero_point"], name
            levels = protos[weight_dq.input[0]]
            int_type = {4: TensorProto.INT4, 8: TensorProto.INT8}[linear.weight.bits]
            assert levels.data_type == int_type, name
            assert linear.weight.granularity == "per_channel" and linear.weight.symmetric
            assert inits[weight_dq.input[1]].shape == (levels.dims[1],)  # one scale per row
            assert not inits[weight_dq.input[2]].any()  # symmetric: zero points 0
        # The attention products' second operands are re-quantized to int16 on their way
        # into the MatMul (qdq.signed_matmul_operands); every other activation is calibrated.
        operands = {dq.input[0] for dq in _product_operands(graph.graph)}
        zero_of = {
            q.output[0]: inits[q.input[2]].dtype for q in quantizers.values() if q.input[2] in inits
        }
        signed = operands & zero_of.keys()
        assert len(signed) == (2 if row["name"].startswith("block") else 0), row["name"]
        assert {zero_of[t] for t in signed} <= {np.dtype("int16")}
        calibrated = {dtype for tensor, dtype in zero_of.items() if tensor not in signed}
        assert calibrated == {np.dtype(f"uint{int_bits(plan.scheme.activations)}")}
    assert seen == set(plan.linears)


def test_int8_mllm_tensor_list_and_logits(tiny_run: Path, tiny_qwen2_dir: Path) -> None:
    stored = read_mllm(tiny_run / "model.int8.mllm")
    plan = json.loads((tiny_run / "model.int8.plan.json").read_text())
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
    # Read part by part, rotated as the plan says, every parameter zeroed before the
    # file's values go in: nothing of the float model may survive, all comes from the file.
    streamed = StreamedModel(tiny_qwen2_dir)
    parts = Parts(streamed.adapter, streamed, Transforms.of(streamed.adapter, plan["transforms"]))
    zeroed = parts.then(lambda module: [p.data.zero_() for p in module.parameters()])
    got = mllm_int8.file_logits(zeroed, plan, tiny_run / "model.int8.mllm", ids)
    assert (got - want).abs().max().item() <= 1e-4


def test_int8_mllm_streamed_equals_whole(
    tiny_run: Path, tiny_qwen2_dir: Path, tiny_profile: Path, tmp_path: Path
) -> None:
    """The build writes the file one part at a time; written again from the whole
    transformed model in memory, the bytes are the same."""
    plan = json.loads((tiny_run / "model.int8.plan.json").read_text())
    stats = json.loads(tiny_profile.read_text())["edgeforge"]["stats"]
    with transformed_model(tiny_qwen2_dir, plan["transforms"]) as (model, _):
        mllm_int8.write_int8_mllm(tmp_path / "whole.mllm", Parts(get_adapter(model)), plan, stats)
    assert (tmp_path / "whole.mllm").read_bytes() == (tiny_run / "model.int8.mllm").read_bytes()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--socs", "SM8650,SM9999"), ("SOCS=SM8650,SM9999: 'SM9999' is not one of", "SM8850")),
        (("--preset", "w3a3"), ("PRESET=w3a3: 'w3a3' is not one of", "w8a16, w8a8, w4a16")),
        (("--rounding", "stochastic"), ("ROUNDING=stochastic: 'stochastic' is not one of",)),
        (("--rotate", "givens"), ("ROTATE=givens:", "hadamard, orthogonal, none")),
        (("--gptq-seq-len", "1"), ("--gptq-seq-len=1: must be >= 2",)),
        (("--kv-len", "16"), ("KV_LEN: must exceed PREFILL_LEN (32)",)),
    ],
)
def test_bad_options(
    session_build: Path, args: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    assert_clean_error(run_target(session_build, "--model", "tiny-qwen2", *args), *fragments)


def test_every_preset_has_gates() -> None:
    """A preset without gates would fail with a KeyError after every piece was compiled."""
    qnn_build = import_target("qnn")
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


def test_qwen1_is_refused(tiny_qwen1_dir: Path, tmp_path: Path) -> None:
    """Qwen1 runs its checkpoint's own code, which this target does not support: one clean
    error line naming the steps that do, no prompt, nothing written."""
    assert_qwen1_refused(
        run_target(tmp_path, "--model", "qwen-7b", "--model-path", str(tiny_qwen1_dir))
    )
    assert not (tmp_path / "qwen-7b").exists()


#: The tiny VL recipes' picture side (their targets.qnn): 4 merged vision tokens a picture.
VL_IMAGE_SIZE = "56"


def _picture_profile(build_dir: Path, model: str, model_dir: Path, *pictures: str) -> Path:
    """make qnn's default (rotated) profile of a tiny VL model, ``pictures`` its image flags."""
    result = run_python(
        "-m", "common.steps.profile_cli", "profile", "--model", model, "--model-path",
        str(model_dir), "--build-dir", str(build_dir), "--rotate", "hadamard",
        "--num-samples", "8", "--seq-len", "64", *pictures,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return build_dir / model / "profile-hadamard" / "profile.json"


@pytest.fixture(scope="module", params=["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def vl_run(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_qwen2_vl_dir: Path,
    tiny_qwen2_5_vl_dir: Path,
) -> tuple[str, Path, Path, CliResult]:
    """``make qnn`` of a tiny VL model (the recipe's PREFILL_LEN 56, KV_LEN 64, 56 px
    pictures), after a profile that saw data/images at that size, as make runs them."""
    model = request.param
    model_dir = tiny_qwen2_vl_dir if model == "tiny-qwen2-vl" else tiny_qwen2_5_vl_dir
    build_dir = tmp_path_factory.mktemp(model)
    images = ("--images", str(REPO_ROOT / "data" / "images"), "--image-size", VL_IMAGE_SIZE)
    _picture_profile(build_dir, model, model_dir, *images)
    result = run_target(build_dir, "--model", model, "--model-path", str(model_dir))
    return model, model_dir, build_dir / model / "qnn", result


def test_vision_language_model_on_htp(vl_run: tuple[str, Path, Path, CliResult]) -> None:
    """The language model of a Qwen2-VL / Qwen2.5-VL on the HTP: its pieces take 3-row
    M-RoPE positions, every piece is all on QNN within the w8a16 cosine gate, and the
    prefill chain runs picture prompts (the float tower's vision embeddings spliced over
    the placeholder rows) as well as text. The .mllm carries the vision tower in F32.

    Top-1 agreement of a random tiny model sits at the w8a16 gate: a sixth of its rows
    are near ties (float top-2 margin < 0.05 logit std), and int8 weights alone, rounded
    to nearest in torch, agree on 0.961 of 1024 held-out rows. So tiny-qwen2.5-vl's
    measurements (104 picture-prompt rows, 448 text rows) land on either side of 0.95
    from one change to the next, and its build may exit 1 on those gates after writing
    everything. Its other gates must pass, and each agreement must stay within sampling
    noise of the gate: two binomial standard errors at 0.95 for its row count.

    The vision tower runs on the HTP too: each piece within the w8a16 gate, and the image
    chain (picture -> vision binaries -> language binaries) agrees with the float tower and
    language model as closely as the picture prompts fed the float tower's embeddings."""
    model, model_dir, out, result = vl_run
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    failed = {g["name"] for g in report["gates"] if not g["passed"]}
    assert result.returncode == (1 if failed else 0), result.stderr[-3000:]
    top1_gates = {
        f"{key}_top1_agreement" for key in ("end_to_end", "picture_prompts", "image_chain")
    }
    allowed = top1_gates if model == "tiny-qwen2.5-vl" else set()
    assert failed <= allowed, report["gates"]
    assert_gates(
        report,
        {
            "min_piece_cos_vs_float",
            "pieces_not_all_on_qnn",
            "min_vision_piece_cos_vs_float",
            "vision_pieces_not_all_on_qnn",
            *top1_gates,
            "image_chain_decode_top1_agreement",
            "mllm_int8_max_abs_diff",
        },
    )
    for row in report["layers"] + report["vision_pieces"]:
        assert row["all_nodes_on_qnn"] is True and row["cos_vs_float"] >= 0.999, row

    def floor(rows: int) -> float:
        """The gate, less two binomial standard errors for tiny-qwen2.5-vl's near ties."""
        return 0.95 - (2 * (0.95 * 0.05 / rows) ** 0.5 if model == "tiny-qwen2.5-vl" else 0)

    text = report["end_to_end"]
    assert text["top1_agreement"] >= floor(text["tokens"]) and text["cos"] >= 0.999
    pictures, chain = report["picture_prompts"], report["image_chain"]
    shipped = sorted(path.name for path in (REPO_ROOT / "data" / "images").glob("*.jpg"))
    assert pictures["images"] == shipped
    assert pictures["vision_tokens"] == [4] * len(pictures["images"])
    assert pictures["cos"] >= 0.999, pictures
    assert pictures["top1_agreement"] >= floor(pictures["tokens"]), pictures
    # The whole chain: picture -> vision binaries -> language binaries, against float.
    assert [r["name"] for r in report["vision_pieces"]] == [
        "vision_embed",
        "vision_block_0",
        "vision_block_1",
        "vision_merger",
    ]
    assert chain["vision_merged_vs_torch"]["cos"] >= 0.999, chain
    assert chain["cos"] >= 0.999 and chain["top1_agreement"] >= floor(chain["tokens"]), chain
    # Each prompt goes on with the float model's greedy tokens (as many as PREFILL_LEN 56
    # holds, up to 8), teacher-forced through the prefill binaries and decoded one step
    # each by the decode binaries.
    generated = chain["generated_tokens"]
    assert len(generated) == len(shipped) and all(1 <= n <= 8 for n in generated), chain
    assert chain["tokens"] == pictures["tokens"] + sum(generated), chain
    assert chain["next_token_cos"] >= 0.999, chain
    decode = chain["decode"]
    assert decode["tokens"] == sum(generated) and decode["cos"] >= 0.999, decode
    assert decode["top1_agreement"] >= floor(decode["tokens"]), decode
    vision_plan = qdq.load_qdq_plan(out / "vision_quant_plan.json")
    assert vision_plan.scheme.name == "w8a16" and vision_plan.scheme.weights.rounding == "nearest"
    tower = get_adapter(load_model(model_dir))
    names = {n for n, _r, _m in iter_linears(tower, include_lm_head=False, include_vision=True)}
    names -= {n for n, _r, _m in iter_linears(tower, include_lm_head=False)}
    assert set(vision_plan.linears) == names | {"model.visual.patch_embed.proj"}
    # The app prepares pictures with the packaged processor, as the model's does.
    assert report["processor"]["equal"] and (out / "tokenizer" / "processor_config.json").is_file()
    embed = onnx.load(str(out / "SM8650" / "vision_embed_ctx.onnx"), load_external_data=False)
    dims = [d.dim_value for d in embed.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 16, 3 * 2 * 14 * 14]  # 56 px: 4x4 patches of 2 frames x 14 x 14 x RGB
    for name, rows in (("block_0", 56), ("block_cache_0", 1)):
        graph = onnx.load(str(out / "SM8650" / f"{name}_ctx.onnx"), load_external_data=False)
        shape = next(i for i in graph.graph.input if i.name == "position_ids")
        dims = [d.dim_value for d in shape.type.tensor_type.shape.dim]
        assert dims == [3, 1, rows], (name, dims)
    tensors = read_mllm(out / "model.int8.mllm")
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as stored:
        tower = {k for k in stored.keys() if ".visual." in k or k.startswith("visual.")}  # noqa: SIM118
        patch = next(k for k in tower if k.endswith("patch_embed.proj.weight"))
        want = stored.get_tensor(patch).float().numpy()
    visual = {n for n in tensors if n.startswith("visual.")}
    assert len(visual) == len(tower) > 0
    code, got = tensors["visual.patch_embed.proj.weight"]
    assert got.dtype == np.float32, code
    np.testing.assert_array_equal(got.reshape(want.shape), want)


def test_auto_verify_samples_what_a_full_emulation_cannot_afford() -> None:
    """``VERIFY=auto`` runs Qwen1.5-1.8B's checks in full (about 9 min of emulator calls:
    the bench built it in 74 min) and samples Qwen2.5-VL-3B's (about 6 h: 36 layers at
    PREFILL_LEN 320, 17 calls each, and a 32-block tower at 1024 patches)."""
    sampling = import_target("qnn", "sampling")
    head = sampling.Stack(1, 311_164_928, 1, 1).seconds(1)
    text = sampling.Stack(24, 50_343_936, 32, 9)
    qwen = sampling.emulator_policy("auto", text, sampling.Stack(24, 50_343_936, 1, 1), None, head)
    assert qwen.mode == "full" and qwen.layers == tuple(range(24)) and qwen.note() is None
    assert 5 * 60 < qwen.estimated_seconds == qwen.estimated_full_seconds < 15 * 60
    lm, tower = 77_070_336, 19_702_784
    vl = sampling.emulator_policy(
        "auto", sampling.Stack(36, lm, 320, 17), sampling.Stack(36, lm, 1, 33),
        sampling.Stack(32, tower, 1024, 5), head,
    )  # fmt: skip
    assert vl.mode == "sample" and vl.layers == (0, 18, 35) and vl.vision_blocks == (0, 16, 31)
    assert 5 * 3600 < vl.estimated_full_seconds < 8 * 3600 and vl.estimated_seconds < 3600
    assert "VERIFY=full runs it anyway" in vl.reason
    assert vl.emulated("block_cache_18") and vl.emulated("vision_block_31")
    assert not vl.emulated("block_17") and not vl.emulated("vision_block_7")
    assert vl.emulated("lm_head") and vl.emulated("vision_embed") and vl.emulated("vision_merger")
    record = vl.to_json()
    assert len(record["layers_on_cpu_qdq"]) == 33 and len(record["vision_blocks_on_cpu_qdq"]) == 29


@pytest.fixture(scope="module")
def deep_vl(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2_5_vl_dir: Path) -> Path:
    """tiny-qwen2.5-vl five language layers and five vision blocks deep (block 2 global,
    the others windowed), random bf16 weights: what a sample of first/middle/last leaves
    out is a real middle."""
    from transformers import AutoConfig

    from common.export.random_checkpoint import write_random_checkpoint

    config = AutoConfig.from_pretrained(tiny_qwen2_5_vl_dir)
    config.text_config.num_hidden_layers = 5
    config.text_config.layer_types = ["full_attention"] * 5
    config.vision_config.depth, config.vision_config.fullatt_block_indexes = 5, [2]
    out = tmp_path_factory.mktemp("deep-vl") / "model"
    return write_random_checkpoint(config, out, tokenizer_dir=tiny_qwen2_5_vl_dir)


def test_sampled_verification_emulates_first_middle_last(deep_vl: Path, tmp_path: Path) -> None:
    """``VERIFY=sample``: the first, middle and last layers and vision blocks, the LM head,
    patch embedding and merger run on the emulator, with the very rows a full verification
    gives them (each is scored on its float golden input); the other pieces are compiled
    for every SoC and loaded all on QNN, run in the chain as their QDQ graph on CPU, and
    scored nowhere, which the gate, the report and the log say. The chain's end-to-end
    numbers stay those of a full verification within the HTP's own rounding."""
    model = "qwen2.5-vl-3b"  # a hub recipe, so MODEL_PATH names the checkpoint
    images = ("--images", str(REPO_ROOT / "data" / "images"), "--image-size", VL_IMAGE_SIZE)
    profile = _picture_profile(tmp_path, model, deep_vl, *images)
    reports = {}
    for verify in ("sample", "full"):
        result = run_target(
            tmp_path / verify, "--model", model, "--model-path", str(deep_vl), "--profile",
            str(profile), "--rounding", "nearest", "--verify", verify, "--prefill-len", "56",
            "--kv-len", "64", "--e2e-windows", "8", *images,
        )  # fmt: skip
        assert "Traceback" not in result.stderr and result.returncode in (0, 1), result.stderr
        out = tmp_path / verify / model / "qnn"
        reports[verify] = (json.loads((out / "report.json").read_text()), out, result)
    sampled, out, result = reports["sample"]
    full = reports["full"][0]
    assert sampled["verify"]["mode"] == "sample" and full["verify"]["mode"] == "full"
    assert sampled["verify"]["reason"] == "asked for (VERIFY=sample)"
    assert sampled["verify"]["emulated_layers"] == [0, 2, 4]
    assert sampled["verify"]["layers_on_cpu_qdq"] == [1, 3]
    assert sampled["verify"]["emulated_vision_blocks"] == [0, 2, 4]
    assert full["verify"]["emulated_layers"] == [0, 1, 2, 3, 4]
    emulated = {"block_0", "block_2", "block_4", "block_cache_0", "block_cache_2",
                "block_cache_4", "lm_head", "vision_embed", "vision_block_0", "vision_block_2",
                "vision_block_4", "vision_merger"}  # fmt: skip
    rows = {r["name"]: r for r in sampled["layers"] + sampled["vision_pieces"]}
    full_rows = {r["name"]: r for r in full["layers"] + full["vision_pieces"]}
    assert rows.keys() == full_rows.keys() and len(rows) == 11 + 7
    for name, row in rows.items():
        assert row["all_nodes_on_qnn"] is True, row
        for binary in row["binaries"].values():  # compiled for every SoC, sampled or not
            assert (out / binary["ctx"]).is_file() and (out / binary["bin"]).is_file()
        if name in emulated:
            assert row["emulated"] and row == full_rows[name], name
        else:
            assert not row["emulated"] and row["cos_vs_float"] is None, row
            assert row["cpu_qdq_cos_vs_float"] == full_rows[name]["cpu_qdq_cos_vs_float"]
    gate = next(g for g in sampled["gates"] if g["name"] == "min_piece_cos_vs_float")
    assert "7 of 11 pieces on the emulator (VERIFY=sample)" in gate["detail"]
    assert gate["value"] == min(rows[n]["cos_vs_float"] for n in emulated if "vision" not in n)
    assert any(n.startswith("VERIFY=sample (asked for") for n in sampled["notes"])
    assert "not run (VERIFY=sample)" in (out / "report.md").read_text()
    assert "VERIFY=sample" in result.stderr
    assert not full["notes"]
    for key in ("end_to_end", "picture_prompts", "image_chain"):
        assert abs(sampled[key]["cos"] - full[key]["cos"]) < 1e-3, key
        assert abs(sampled[key]["top1_agreement"] - full[key]["top1_agreement"]) <= 0.05, key
    # The accuracy block says which graph computed the chain: sampled, partly CPU QDQ.
    assert full["end_to_end"]["accuracy"]["graph"] == "QNN HTP emulator, every piece"
    assert sampled["end_to_end"]["accuracy"]["graph"] == (
        "QNN HTP emulator for decoder layers [0, 2, 4] of 5, the other layers' QDQ graphs on "
        "onnxruntime CPU"
    )


def test_windowed_vision_pieces_on_htp(tiny_qwen2_5_vl_dir: Path, tmp_path: Path) -> None:
    """Qwen2.5-VL's window attention on the HTP: at 224 px its first block attends within
    4 windows under a constant -1e4 mask (the 56 px builds have one window, no mask).
    Every vision piece within the w8a16 gate, the chained binaries' merged tokens against
    Hugging Face's tower, and a second build served from the cache with the same rows."""
    from common.core.piece_cache import PieceCache
    from common.export.vision_export import image_prompt_inputs
    from common.inputs.vl_preprocess import geometry
    from common.models.loading import load_processor

    vision = import_target("qnn", "vision")
    adapter = get_adapter(load_model(tiny_qwen2_5_vl_dir))
    processor = load_processor(tiny_qwen2_5_vl_dir)
    geo = geometry(processor, 224)
    paths = sorted((REPO_ROOT / "data" / "images").glob("*.jpg"))
    inputs = [pair[0] for pair in image_prompt_inputs(processor, ["Describe."], paths, 224)]
    pixels = [i["pixel_values"] for i in inputs]
    ref = vision.reference(adapter, geo, pixels, tmp_path / "float")
    plan = vision.plan(ref, "w8a16", "tiny-qwen2.5-vl")

    def build(
        out: Path, float_dir: Path
    ) -> tuple[list[dict[str, Any]], list[np.ndarray], PieceCache]:
        cache = PieceCache(tmp_path / "cache")
        setup = pipeline.PieceSetup(
            adapter, float_dir, tmp_path / "work", out, out / "qdq", [qnn_ep.soc_by_name("SM8650")],
            qnn_ep.DEFAULT_VTCM_MB, pipeline.ModeChoice("auto"), cache, qnn_ep.qnn_versions(),
            lambda _piece: True,
        )  # fmt: skip
        return (*vision.build(setup, geo, ref, plan, "key", pixels), cache)

    rows, merged, _ = build(tmp_path / "a", tmp_path / "float")
    for row in rows:
        assert row["all_nodes_on_qnn"] and row["cos_vs_float"] >= 0.999, row
    assert not list((tmp_path / "float").glob("*.onnx"))  # each float piece gone once built
    features = [ve_features(adapter, i) for i in inputs]
    assert vision.merged_similarity(merged, features)["cos"] >= 0.999
    # A second run exports its float pieces afresh, and its cache keys find the first's.
    vision.reference(adapter, geo, pixels, tmp_path / "float-again")
    again, merged_again, cache = build(tmp_path / "b", tmp_path / "float-again")
    assert again == rows and sorted(cache.reused) == sorted(ref.names)
    assert all(np.array_equal(a, b) for a, b in zip(merged, merged_again, strict=True))


def ve_features(adapter: Any, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Hugging Face's tower on one picture prompt's patches: ``{"image": [n, H]}``."""
    from common.export.vision_export import torch_vision_features

    flat, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    return {"image": torch_vision_features(adapter, flat.float(), grid)}


def test_vision_language_profile_without_pictures_is_refused(
    tiny_qwen2_vl_dir: Path, tmp_path: Path
) -> None:
    """A VL model's profile made from text alone would leave picture tokens outside its
    ranges: one error line naming the fix, before any piece is exported."""
    profile = _picture_profile(tmp_path, "tiny-qwen2-vl", tiny_qwen2_vl_dir)
    result = run_target(
        tmp_path, "--model", "tiny-qwen2-vl", "--model-path", str(tiny_qwen2_vl_dir)
    )
    assert_clean_error(result, str(profile), "made from text only", "IMAGES=data/images")
    assert not (tmp_path / "tiny-qwen2-vl" / "qnn").exists()


def test_picture_prompt_longer_than_the_prefill_graph_is_refused(
    tiny_qwen2_vl_dir: Path, tmp_path: Path
) -> None:
    """Pictures that make a prompt longer than PREFILL_LEN stop the build up front, with
    the length needed (the prompt and one generated token), before any weight is read. An
    IMAGE_SIZE off the 28 px grid is rounded as the processor would, with a note."""
    images = ("--images", str(REPO_ROOT / "data" / "images"), "--image-size", VL_IMAGE_SIZE)
    _picture_profile(tmp_path, "tiny-qwen2-vl", tiny_qwen2_vl_dir, *images)
    result = run_target(
        tmp_path, "--model", "tiny-qwen2-vl", "--model-path", str(tiny_qwen2_vl_dir),
        "--image-size", "100", "--prefill-len", "56",
    )  # fmt: skip
    assert "IMAGE_SIZE: 100 is not a multiple of 28; rounded to 112" in result.stderr
    assert_clean_error(result, "PREFILL_LEN=56 is too short", "IMAGE_SIZE=112", "at least 66")
    assert not (tmp_path / "tiny-qwen2-vl" / "qnn").exists()


def test_levels_come_a_piece_at_a_time(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    """Round-to-nearest levels are computed from the part in memory when a piece asks,
    GPTQ's are read back from their cache entry: the same tensors as the whole model's,
    and a second build finds GPTQ's entry instead of running it again."""
    from common.core.piece_cache import PieceCache

    pipeline, qnn_build = import_target("qnn", "pipeline"), import_target("qnn")
    whole = get_adapter(load_model(tiny_qwen2_dir))
    want = qdq.nearest_levels({n: m.weight for n, _r, m in iter_linears(whole)}, Weights("int8"))
    streamed = StreamedModel(tiny_qwen2_dir)
    parts, lazy = (
        Parts(streamed.adapter, streamed),
        pipeline.NearestLevels(streamed.adapter, Weights("int8")),
    )
    assert sorted(lazy) == sorted(want)
    seen = []
    for layer in streamed.adapter.layers():
        with parts.layer(layer):
            seen += [(n, lazy[n]) for n in layer.linear_names.values()]
    with parts.head():
        seen.append((streamed.adapter.lm_head_path, lazy[streamed.adapter.lm_head_path]))
    stored, key = qnn_build.gptq_levels(PieceCache(tmp_path), {"inputs": 1}, lambda: want)
    again, same_key = qnn_build.gptq_levels(
        PieceCache(tmp_path), {"inputs": 1}, lambda: pytest.fail("GPTQ ran again")
    )
    assert same_key == key and sorted(stored) == sorted(want)
    for name, got in [*seen, *((n, stored[n]) for n in want), *((n, again[n]) for n in want)]:
        assert torch.equal(got[0], want[name][0]) and torch.equal(got[1], want[name][1]), name

"""QDQ conversion (common/backends/qdq.py) on a tiny-qwen2 decoder layer, on onnxruntime CPU:
the profile's scales and our int8 weights must be what the QDQ graph holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from common.backends import qdq
from common.core.errors import EdgeforgeError
from common.export import onnx_files
from common.export import piece_export as pe
from common.models import get_adapter, iter_linears
from common.models.loading import load_model
from common.quant.int8 import quantize_weight, symmetric_scale
from common.quant.schemes import SCHEMES, QuantScheme, Weights, float_activation_plan, int_bits
from tests.test_onnx_files import SMALL, assert_one_data_file, names

SEQ = 8


@pytest.fixture(scope="module")
def layer(tiny_qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Float block_0 (static), its linears' weights and measured ranges, and inputs."""
    out = tmp_path_factory.mktemp("qdq")
    adapter = get_adapter(load_model(tiny_qwen2_dir))
    pe.export_pieces(adapter, SEQ, out, only=lambda n: n == "block_0", progress=False)
    static = qdq.static_float_model(out / "block_0.onnx", out / "block_0.static.onnx")
    ids = {id(m) for m in adapter.layers()[0].linears.values()}
    linears = {n: m for n, _r, m in iter_linears(adapter) if id(m) in ids}
    roles = {n: r for n, r, m in iter_linears(adapter) if id(m) in ids}
    ranges: dict[str, list[float]] = {n: [0.0, 0.0] for n in linears}
    hooks = [
        m.register_forward_hook(
            lambda _m, a, y, n=n: ranges[n].__setitem__(
                slice(0, 2),
                [
                    max(ranges[n][0], a[0].abs().max().item()),
                    max(
                        ranges[n][1],
                        (y - (_m.bias if _m.bias is not None else 0)).abs().max().item(),
                    ),
                ],
            )
        )
        for n, m in linears.items()
    ]
    feeds = []
    for seed in range(5):
        tokens = torch.randint(
            0, adapter.vocab_size, (SEQ,), generator=torch.Generator().manual_seed(seed)
        ).tolist()
        pre = pe.prefill_inputs(tokens, SEQ)
        with torch.no_grad():
            hidden = adapter.embed_tokens()(torch.from_numpy(pre["input_ids"]).long())
            adapter.model(torch.tensor([tokens]))
        feeds.append(
            {
                "input_states": hidden.numpy(),
                "position_ids": pre["position_ids"],
                "attention_mask": pre["attention_mask"],
            }
        )
    for h in hooks:
        h.remove()
    weights = {n: m.weight.detach() for n, m in linears.items()}
    return {
        "dir": out,
        "static": static,
        "weights": weights,
        "roles": roles,
        "ranges": {n: tuple(r) for n, r in ranges.items()},
        "feeds": feeds,
    }


def _plan(layer: dict, preset: str, headroom: float = 1.0) -> qdq.QdqPlan:
    """A plan for block_0: the preset's width per role over the measured ranges."""
    scheme = qdq.preset_by_name(preset)
    linears = {}
    for name, (i, o) in layer["ranges"].items():
        role = layer["roles"][name]
        sides = [
            qdq.Encoding.grid(absmax, int_bits(scheme.activation(role, side)), headroom)
            for absmax, side in ((i, "input"), (o, "output"))
        ]
        linears[name] = qdq.LinearPlan(role, scheme.weights, *sides)
    return qdq.QdqPlan("block_0", scheme, {}, linears)


def _quantize(layer: dict, preset: str) -> tuple[Path, dict]:
    """Quantize block_0 with the preset's widths over the measured ranges."""
    dest = layer["dir"] / f"block_0.{preset}.onnx"
    sites = qdq.quantize_piece(
        layer["static"],
        dest,
        plan=_plan(layer, preset),
        weights=layer["weights"],
        calibration=layer["feeds"][:4],
    )
    return dest, sites


def _weight_dq(model: onnx.ModelProto, site: qdq.LinearSite) -> onnx.NodeProto:
    """The DequantizeLinear feeding a linear's MatMul its weight."""
    feeding = {m.input[1] for m in model.graph.node if m.name == site.matmul}
    return next(
        n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in feeding
    )


def _q_params(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per quantized tensor: (scale, zero point) of its QuantizeLinear."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {
        n.input[0]: (inits[n.input[1]], inits[n.input[2]])
        for n in model.graph.node
        if n.op_type == "QuantizeLinear"
    }


def _cos(path: Path, layer: dict) -> float:
    ref = ort.InferenceSession(
        str(layer["dir"] / "block_0.onnx"), providers=["CPUExecutionProvider"]
    )
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = layer["feeds"][4]  # held out of calibration
    return min(
        pe.cosine(a, b) for a, b in zip(got.run(None, feeds), ref.run(None, feeds), strict=True)
    )


def test_w8a16_imposes_profile_scales_and_our_weights(layer: dict) -> None:
    path, sites = _quantize(layer, "w8a16")
    model = onnx.load(str(path))
    params = _q_params(model)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name, site in sites.items():
        in_range, out_range = layer["ranges"][name]
        for tensor, rng in ((site.input, in_range), (site.output, out_range)):
            scale, zero = params[tensor]
            assert zero.dtype == np.uint16 and int(zero) == 32768
            assert float(scale) == pytest.approx(float(symmetric_scale(rng, 16)), rel=1e-6)
        dq = _weight_dq(model, site)
        levels, w_scale = quantize_weight(layer["weights"][name], "per_channel")
        np.testing.assert_array_equal(inits[dq.input[0]], levels.T.numpy())
        np.testing.assert_array_equal(inits[dq.input[1]], w_scale.reshape(-1).numpy())
    assert _cos(path, layer) > 0.995


def test_w8a8_keeps_scores_and_the_swiglu_interior_in_16_bits(layer: dict) -> None:
    """w8a8: every linear reads 8 bits except down_proj; the attention scores, gate/up's
    outputs and the SiLU between them and down_proj are 16-bit; q/k/v/o write 8 bits."""
    path, sites = _quantize(layer, "w8a8")
    model = onnx.load(str(path))
    params = _q_params(model)
    static = onnx.load(str(layer["static"]))
    scores = qdq.score_tensors(static)
    assert scores, "no attention score tensors found"
    for tensor in scores:
        if tensor in params:
            assert params[tensor][1].dtype == np.uint16, tensor
    (down,) = (site for name, site in sites.items() if name.endswith("down_proj"))
    interior = qdq.swiglu_interior(static, down)
    producers = {out: n.op_type for n in static.graph.node for out in n.output}
    assert sorted(producers[t] for t in interior) == ["Mul", "Sigmoid"]  # SiLU = x·σ(x)
    for tensor in interior:
        assert params[tensor][1].dtype == np.uint16, tensor
    for name, site in sites.items():  # o_proj's input encoding comes from P·V (calibrated)
        if name.endswith("down_proj"):  # mixed precision: reads and writes 16 bits
            assert params[site.input][1].dtype == np.uint16, name
            assert params[site.output][1].dtype == np.uint16, name
            continue
        if not name.endswith("o_proj"):
            assert params[site.input][1].dtype == np.uint8, name
        wide = name.endswith(("gate_proj", "up_proj"))
        assert params[site.output][1].dtype == (np.uint16 if wide else np.uint8), name
    assert _cos(path, layer) > 0.99


def test_residual_stream_and_norms_stay_float(layer: dict) -> None:
    """Both presets leave the residual Adds and the RMSNorms on them unquantized."""
    static = onnx.load(str(layer["static"]))
    stream = qdq.residual_tensors(static)
    assert stream[0] == "input_states" and len(stream) == 3  # input, after attn, after MLP
    excluded = qdq.float_nodes(static)
    assert sorted(n.op_type for n in static.graph.node if n.name in excluded) == [
        "Add",
        "Add",
        "RMSNormalization",
        "RMSNormalization",
    ]
    for preset in ("w8a16", "w8a8"):
        params = _q_params(onnx.load(str(_quantize(layer, preset)[0])))
        assert not set(stream) & set(params), preset


def test_w4a16_holds_our_int4_blocks_and_is_coarser(layer: dict) -> None:
    """``w4a16``: int4 levels with one scale per 32 input columns of a row, as ONNX's
    blocked DequantizeLinear (axis 0 of the ``[in, out]`` weight, ``block_size`` 32)."""
    path, sites = _quantize(layer, "w4a16")
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    for name, site in sites.items():
        dq = _weight_dq(model, site)
        weight = layer["weights"][name]
        levels, scale = quantize_weight(weight, "group", 4, 32, "mse")  # int8.py grid
        assert scale.shape == (weight.shape[0], weight.shape[1] // 32)
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT4
        stored = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int8)
        np.testing.assert_array_equal(stored, levels.T.numpy())
        assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": 32}, name
        np.testing.assert_array_equal(numpy_helper.to_array(inits[dq.input[1]]), scale.T)
        zero = numpy_helper.to_array(inits[dq.input[2]])
        assert zero.shape == scale.T.shape and not zero.any()
    cos = _cos(path, layer)
    assert 0.95 < cos < _cos(_quantize(layer, "w8a16")[0], layer)


def test_one_group_a_row_is_the_per_channel_layout(layer: dict) -> None:
    """Levels with one scale per row (a group as wide as the row) keep the per-channel
    DequantizeLinear (axis 1, a scale per output channel): nothing blocked."""
    path, sites = _quantize(layer, "w8a16")
    model = onnx.load(str(path))
    for site in sites.values():
        assert {a.name: a.i for a in _weight_dq(model, site).attribute} == {"axis": 1}


def test_rms_norms_fused_into_one_node(layer: dict) -> None:
    """The exporter's Pow/ReduceMean/Add/Sqrt/Div/Mul RMSNorm becomes RMSNormalization
    (input and post-attention norm), computing the same function."""
    model = onnx.load(str(layer["static"]))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("RMSNormalization") == 2 and "Pow" not in ops and "Sqrt" not in ops
    unfused = ort.InferenceSession(
        str(layer["dir"] / "block_0.onnx"), providers=["CPUExecutionProvider"]
    )
    fused = ort.InferenceSession(str(layer["static"]), providers=["CPUExecutionProvider"])
    feeds = layer["feeds"][4]
    for a, b in zip(fused.run(None, feeds), unfused.run(None, feeds), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _stats(role: str, absmax: float, p999: float, out: float = 3.0, out_p999: float = 1.0) -> dict:
    return {
        "role": role,
        "input": {"absmax": absmax, "abs_p999": p999},
        "output": {"absmax": out, "abs_p999": out_p999},
    }


def test_qdq_plan_float_for_shadow_and_extreme_tensors() -> None:
    """A shadow (no-clip) tensor of the .mllm plan stays float; so does a 16-bit tensor
    whose abs-max is beyond FLOAT_RATIO_16 x its p99.9, and with either side the whole
    linear; others take the scheme's width for their role."""
    ratio = qdq.FLOAT_RATIO_16
    stats = {
        "a": _stats("q", 4.0, 1.0, 2.0),
        "b": _stats("o", 9.0, 1.0),
        "c": _stats("gate", 2.0 * ratio, 1.0),
        "down": _stats("down", 5.0, 1.0),
    }
    mllm_plan = {
        "tensors": {
            "a": {"input": {"shadow": False}, "output": {}},
            "b": {"input": {"shadow": True}, "output": {}},
            "c": {"input": {}, "output": {}},
            "down": {"input": {}, "output": {}},
        }
    }
    got = qdq.qdq_plan(mllm_plan, stats, qdq.preset_by_name("w8a8"), name="t").linears
    grid, kept = qdq.Encoding.grid, qdq.Encoding.kept_float
    assert (got["a"].input, got["a"].output) == (grid(4.0, 8), grid(2.0, 8))
    assert (got["b"].input, got["b"].output) == (kept(9.0, "shadow"), kept(3.0, "linear"))
    assert got["b"].weight == Weights("float16")
    # w8a8's down_proj reads and writes 16 bits (with the 16-bit headroom); gate_proj reads
    # 8 and writes 16 (its output is the SwiGLU interior).
    assert (got["down"].input, got["down"].output) == (grid(5.0, 16, 2.0), grid(3.0, 16, 2.0))
    assert (got["c"].input, got["c"].output) == (grid(2.0 * ratio, 8), grid(3.0, 16, 2.0))
    assert got["down"].input.range == 10.0 and got["down"].input.zero_point == 32768
    assert got["a"].weight == Weights("int8", rounding="gptq")
    wide = qdq.qdq_plan(mllm_plan, stats, qdq.preset_by_name("w8a16"), name="t")
    assert wide.linears["a"].input == grid(4.0, 16, qdq.HEADROOM_16)
    assert wide.linears["c"].input == kept(2.0 * ratio, "ratio")
    assert wide.float_linears() == {"b", "c"}


def test_plan_to_encodings_to_plan_roundtrips_exactly() -> None:
    """The written form (JSON) gives back the same plan, and the same JSON; every scale is
    a float32 value, the one the Q/DQ initializer stores and the one the old writer
    imposed (``symmetric_scale(abs-max x headroom)``), so regeneration is bit-exact."""
    stats = {
        "l.q": _stats("q", 0.1 + 0.2, 1 / 3, 1 / 7),
        "l.down": _stats("down", 2946.0, 1.43, 129.001),
        "l.tiny": _stats("up", 1e-7, 1e-8, 3e4),
        "lm_head": _stats("lm_head", 41.7, 9.9, 1234.5678, 100.0),
    }
    mllm_plan = {
        "tensors": {n: {"input": {}, "output": {}} for n in stats},
        "transforms": {"rotation": {"mode": "hadamard", "seed": 0}},
    }
    mllm_plan["tensors"]["l.q"]["output"] = {"shadow": True}
    for preset in qdq.PRESETS:
        scheme = qdq.preset_by_name(preset).with_weights(rounding="nearest")
        plan = qdq.qdq_plan(mllm_plan, stats, scheme, name="roundtrip")
        doc = json.loads(json.dumps(plan.to_json()))
        again = qdq.QdqPlan.from_json(doc)
        assert again == plan and again.to_json() == doc, preset
        for name, linear in again.linears.items():
            for side, enc in (("input", linear.input), ("output", linear.output)):
                if enc.bits is None:
                    continue
                headroom = qdq.HEADROOM_16 if enc.bits == 16 else 1.0
                step = float(symmetric_scale(stats[name][side]["absmax"] * headroom, enc.bits))
                assert enc.scale == float(np.float32(enc.scale)) == step
                override = qdq.activation_override(enc)
                assert override["scale"].dtype == np.float32
                assert float(override["scale"]) == enc.scale
                assert int(override["zero_point"]) == enc.zero_point
    assert plan.linears["l.down"].is_float and plan.linears["lm_head"].input.bits == 16
    tampered = json.loads(json.dumps(plan.to_json()))
    tampered["tensors"]["lm_head"]["input"]["scale"] *= 1.0000001
    with pytest.raises(EdgeforgeError, match="is not the symmetric grid over range"):
        qdq.QdqPlan.from_json(tampered)
    tampered = json.loads(json.dumps(plan.to_json()))
    tampered["calibrated"]["bits"] = 8
    with pytest.raises(EdgeforgeError, match="statements"):
        qdq.QdqPlan.from_json(tampered)


def test_load_qdq_plan_refuses_other_plans(tmp_path: Path) -> None:
    """The .mllm's plan and a bmodel's are not the binaries' plan: one clear error each."""
    path = tmp_path / "quant_plan.json"
    path.write_text(json.dumps({"format": "edgeforge-quant-plan-v1", "tensors": {}}))
    with pytest.raises(EdgeforgeError, match="not an edgeforge plan"):
        qdq.load_qdq_plan(path)
    bmodel = float_activation_plan(SCHEMES["w8bf16"], [("l", "q")], name="n", artifact="a")
    path.write_text(json.dumps(bmodel))
    with pytest.raises(EdgeforgeError, match="not a QNN binaries' quant plan"):
        qdq.load_qdq_plan(path)


def test_float_linear_keeps_float_weight(layer: dict) -> None:
    """A linear whose encoding is float is left out of quantization entirely."""
    dest = layer["dir"] / "block_0.float_down.onnx"
    plan = _plan(layer, "w8a16", qdq.HEADROOM_16)
    down = next(n for n in plan.linears if n.endswith("down_proj"))
    plan.linears[down] = qdq.LinearPlan(
        "down",
        Weights("float16"),
        qdq.Encoding.kept_float(1.0, "ratio"),
        qdq.Encoding.kept_float(1.0, "linear"),
    )
    sites = qdq.quantize_piece(
        layer["static"],
        dest,
        plan=plan,
        weights=layer["weights"],
        calibration=layer["feeds"][:4],
    )
    model = onnx.load(str(dest))
    matmul = next(n for n in model.graph.node if n.name == sites[down].matmul)
    assert matmul.input[1] in {i.name for i in model.graph.initializer}  # float weight
    # ... and reads a float input: SwiGLU's Sigmoid/Mul chain back to gate and up runs in
    # float, nothing on it is quantized.
    static = onnx.load(str(layer["static"]))
    interior = qdq.float_input_nodes(static, sites, [down])
    ops = sorted(n.op_type for n in static.graph.node if n.name in interior)
    assert ops == ["Mul", "Mul", "Sigmoid"]
    outputs = {o for n in static.graph.node if n.name in interior for o in n.output}
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert not outputs & quantized
    assert _cos(dest, layer) > 0.995


def test_unknown_preset_and_foreign_weights(layer: dict) -> None:
    with pytest.raises(EdgeforgeError, match="w8a16, w8a8, w4a16"):
        qdq.preset_by_name("w2a2")
    model = onnx.load(str(layer["static"]))
    with pytest.raises(EdgeforgeError, match="0 MatMul nodes carry its weight"):
        qdq.linear_sites(model, {"x": torch.zeros(64, 64)})


def test_masked_scores_saturate_the_mask(layer: dict) -> None:
    """The Softmax input reaches SOFTMAX_FLOOR below the pre-mask scores' encoding, not
    down to the −1e4 mask, so its 16-bit step stays fine (measured, not assumed)."""
    path, _ = _quantize(layer, "w8a16")
    model, floats = onnx.load(str(path)), onnx.load(str(layer["static"]))
    params = _q_params(model)
    producers = {o: n for n in floats.graph.node for o in n.output}
    softmaxes = [n for n in floats.graph.node if n.op_type == "Softmax"]
    assert softmaxes
    for node in softmaxes:
        masked = node.input[0]
        scores = producers[masked].input[0]

        def bounds(tensor: str) -> tuple[float, float]:
            scale, zero = params[tensor]
            return (0 - float(zero)) * float(scale), (65535 - float(zero)) * float(scale)

        lo, hi = bounds(scores)
        m_lo, m_hi = bounds(masked)
        assert m_lo == pytest.approx(lo - qdq.SOFTMAX_FLOOR, abs=2 * float(params[masked][0]))
        assert m_hi == pytest.approx(hi, abs=2 * float(params[masked][0]))
        assert float(params[masked][0]) < 1e-2  # the −1e4 mask alone would force ~0.15


def test_schemes_without_htp_types_are_refused() -> None:
    """Any width but these would silently get 8-bit types in the QDQ graph; the other
    schemes of the registry are another backend's."""
    w8a16 = qdq.preset_by_name("w8a16")
    with pytest.raises(EdgeforgeError, match=r"scheme w2: weights int2; .* int4, int8 only"):
        qdq.check_htp(QuantScheme("w2", Weights("int2"), "int16"))
    with pytest.raises(EdgeforgeError, match=r"scheme bf16: weights bfloat16"):
        qdq.check_htp(QuantScheme("bf16", Weights("bfloat16"), "bfloat16"))
    with pytest.raises(EdgeforgeError, match=r"scheme a: activations float16; .* int8, int16"):
        qdq.check_htp(QuantScheme("a", w8a16.weights, "float16"))
    with pytest.raises(EdgeforgeError, match=r"scheme d: down bfloat16"):
        qdq.check_htp(QuantScheme("d", w8a16.weights, "int16", down="bfloat16"))
    groups = "the QDQ writer writes symmetric per-channel weights and symmetric int4 groups only"
    with pytest.raises(EdgeforgeError, match=f"weights int8 group, symmetric True; {groups}"):
        qdq.check_htp(w8a16.with_weights(granularity="group", group_size=32))
    w4a16 = qdq.preset_by_name("w4a16")  # int4 groups of 32: HTP block quantization
    assert (w4a16.weights.granularity, w4a16.weights.group_size) == ("group", 32)
    with pytest.raises(EdgeforgeError, match=f"weights int4 group, symmetric False; {groups}"):
        qdq.check_htp(w4a16.with_weights(symmetric=False, scales="absmax"))
    with pytest.raises(EdgeforgeError, match="rounding autoround"):
        qdq.check_htp(w8a16.with_weights(rounding="autoround"))
    with pytest.raises(EdgeforgeError, match="the LM head piece is quantized"):
        qdq.check_htp(QuantScheme("h", w8a16.weights, "int16", lm_head="float32"))
    with pytest.raises(EdgeforgeError, match="precision preset 'w4bf16' is unknown"):
        qdq.preset_by_name("w4bf16")


def test_large_pieces_keep_their_data_file(
    layer: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``EXTERNAL_DATA_BYTES`` (lowered to a few KiB: the path of Qwen-7B's 2.32 GiB
    lm_head) a float piece with external data gives a static and a QDQ model that are each
    a ``.onnx`` and its ``.onnx.data``, nothing else, and compute exactly what the
    single-file ones compute; under the real threshold both are single files."""
    feeds = layer["feeds"][4]

    def build(float_model: Path, out: Path) -> tuple[Path, Path]:
        static = qdq.static_float_model(float_model, out / "block_0.static.onnx")
        qdq.quantize_piece(
            static,
            out / "block_0.onnx",
            plan=_plan(layer, "w8a16"),
            weights=layer["weights"],
            calibration=layer["feeds"][:4],
        )
        return static, out / "block_0.onnx"

    single = build(layer["dir"] / "block_0.onnx", tmp_path / "single")
    assert names(tmp_path / "single") == {"block_0.static.onnx", "block_0.onnx"}
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_BYTES", SMALL)
    float_model = tmp_path / "float" / "block_0.onnx"
    with onnx_files.onnx_destination(float_model) as written:
        shutil.copy(layer["dir"] / "block_0.onnx", written)
    split = build(float_model, tmp_path / "split")
    assert names(float_model.parent) == {"block_0.onnx", "block_0.onnx.data"}
    assert names(tmp_path / "split") == {
        "block_0.static.onnx",
        "block_0.static.onnx.data",
        "block_0.onnx",
        "block_0.onnx.data",
    }
    for one, two in zip(single, split, strict=True):
        assert_one_data_file(two)
        got = ort.InferenceSession(str(two), providers=["CPUExecutionProvider"]).run(None, feeds)
        want = ort.InferenceSession(str(one), providers=["CPUExecutionProvider"]).run(None, feeds)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("preset", ["w8a16", "w4a16"])
def test_narrow_head_gives_the_whole_heads_bytes(
    tiny_qwen2_dir: Path, tmp_path: Path, preset: str
) -> None:
    """The LM head quantized from its narrow copy (``NARROW_ROWS`` of tiny-qwen2's 1024
    rows: onnxruntime never holds the vocab-wide weights) is the QDQ model of the whole
    head, byte for byte, and so computes the same logits."""
    adapter = get_adapter(load_model(tiny_qwen2_dir))
    pe.export_pieces(adapter, SEQ, tmp_path, only=lambda n: n == "lm_head", progress=False)
    ((name, head),) = [(n, m) for n, r, m in iter_linears(adapter) if r == "lm_head"]
    scheme = qdq.preset_by_name(preset)
    bits = int_bits(scheme.activations)
    plan = qdq.QdqPlan(
        "lm_head",
        scheme,
        {},
        {
            name: qdq.LinearPlan(
                "lm_head",
                scheme.weights,
                qdq.Encoding.grid(6.0, bits),
                qdq.Encoding.grid(30.0, bits),
            )
        },
    )
    gen = torch.Generator().manual_seed(0)
    feeds = [{"hidden_states": torch.randn(1, head.in_features, generator=gen).numpy()}]
    weights = {name: head.weight.detach()}
    levels = qdq.nearest_levels(weights, scheme.weights)
    common = dict(plan=plan, weights=weights, calibration=feeds * 4, levels=levels)
    static = qdq.static_float_model(tmp_path / "lm_head.onnx", tmp_path / "static.onnx")
    qdq.quantize_piece(static, tmp_path / "whole.onnx", **common)
    narrow = pe.export_narrow_head(adapter, tmp_path / "narrow", qdq.NARROW_ROWS)
    assert onnx.load(str(narrow)).graph.output[0].type.tensor_type.shape.dim[-1].dim_value == 16
    qdq.quantize_narrow(narrow, tmp_path / "built.onnx", work_dir=tmp_path, **common)
    assert (tmp_path / "built.onnx").read_bytes() == (tmp_path / "whole.onnx").read_bytes()
    floats = qdq.QdqPlan(
        "lm_head",
        scheme,
        {},
        {
            name: qdq.LinearPlan(
                "lm_head",
                Weights(qdq.HTP_FLOAT),
                qdq.Encoding.kept_float(6.0, "ratio"),
                qdq.Encoding.kept_float(30.0, "linear"),
            )
        },
    )
    assert not qdq.narrowable(floats, weights)
    with pytest.raises(EdgeforgeError, match="only a quantized linear's QDQ"):
        qdq.quantize_narrow(
            narrow, tmp_path / "no.onnx", work_dir=tmp_path, **{**common, "plan": floats}
        )
    assert not (tmp_path / "no.onnx").exists()

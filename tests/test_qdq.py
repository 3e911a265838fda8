"""QDQ conversion (common/backends/qdq.py) on a tiny-qwen2 decoder layer, on onnxruntime CPU:
the profile's scales and our int8 weights must be what the QDQ graph holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from common.backends import qdq
from common.core.errors import EdgeforgeError
from common.export import piece_export as pe
from common.models import get_adapter, iter_linears
from common.models.loading import load_model
from common.quant.int8 import quantize, quantize_weight, symmetric_scale

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
        "ranges": {n: tuple(r) for n, r in ranges.items()},
        "feeds": feeds,
    }


def _quantize(layer: dict, preset: str) -> tuple[Path, dict]:
    """Quantize block_0 with the preset's widths, as plan_encodings gives them."""
    dest = layer["dir"] / f"block_0.{preset}.onnx"
    widths = qdq.preset_by_name(preset)

    def bits(name: str) -> int:
        return widths.down_bits if name.endswith("down_proj") else widths.act_bits

    sites = qdq.quantize_piece(
        layer["static"],
        dest,
        encodings={
            n: (qdq.Encoding(i, bits(n)), qdq.Encoding(o, bits(n)))
            for n, (i, o) in layer["ranges"].items()
        },
        weights=layer["weights"],
        calibration=layer["feeds"][:4],
        preset=qdq.preset_by_name(preset),
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


def test_w8a8_keeps_attention_scores_in_16_bits(layer: dict) -> None:
    path, sites = _quantize(layer, "w8a8")
    model = onnx.load(str(path))
    params = _q_params(model)
    scores = qdq.score_tensors(onnx.load(str(layer["static"])))
    assert scores, "no attention score tensors found"
    for tensor in scores:
        if tensor in params:
            assert params[tensor][1].dtype == np.uint16, tensor
    for name, site in sites.items():  # o_proj's input encoding comes from P·V (calibrated)
        if name.endswith("down_proj"):  # mixed precision: reads and writes 16 bits
            assert params[site.input][1].dtype == np.uint16, name
            assert params[site.output][1].dtype == np.uint16, name
        elif not name.endswith("o_proj"):
            assert params[site.input][1].dtype == np.uint8, name
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


def test_w4a16_holds_our_int4_levels_and_is_coarser(layer: dict) -> None:
    path, sites = _quantize(layer, "w4a16")
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    for name, site in sites.items():
        dq = _weight_dq(model, site)
        weight = layer["weights"][name]
        scale = symmetric_scale(weight.abs().amax(dim=1, keepdim=True), 4)
        levels = quantize(weight, scale, 4)  # common.quant.int8 on the 4-bit grid
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT4
        stored = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int8)
        np.testing.assert_array_equal(stored, levels.T.numpy())
        np.testing.assert_array_equal(
            numpy_helper.to_array(inits[dq.input[1]]), scale.reshape(-1).numpy()
        )
    cos = _cos(path, layer)
    assert 0.95 < cos < _cos(_quantize(layer, "w8a16")[0], layer)


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


def test_plan_encodings_float_for_shadow_and_extreme_tensors() -> None:
    """A shadow (no-clip) tensor of the plan stays float; so does a 16-bit tensor whose
    abs-max is beyond FLOAT_RATIO_16 x its p99.9; others take the preset's width."""
    ratio = qdq.FLOAT_RATIO_16
    stats = {
        "a": {"input": {"absmax": 4.0, "abs_p999": 1.0}, "output": {"absmax": 2.0, "abs_p999": 1}},
        "b": {"input": {"absmax": 9.0, "abs_p999": 1.0}, "output": {"absmax": 3.0, "abs_p999": 1}},
        "c": {
            "input": {"absmax": 2.0 * ratio, "abs_p999": 1.0},
            "output": {"absmax": 3.0, "abs_p999": 1.0},
        },
        "down": {
            "role": "down",
            "input": {"absmax": 5.0, "abs_p999": 1.0},
            "output": {"absmax": 3.0, "abs_p999": 1.0},
        },
    }
    plan = {
        "tensors": {
            "a": {"input": {"shadow": False}, "output": {}},
            "b": {"input": {"shadow": True}, "output": {}},
            "c": {"input": {}, "output": {}},
            "down": {"input": {}, "output": {}},
        }
    }
    got = qdq.plan_encodings(plan, stats, qdq.preset_by_name("w8a8"))
    assert got == {
        "a": (qdq.Encoding(4.0, 8), qdq.Encoding(2.0, 8)),
        "b": (qdq.Encoding(9.0, None), qdq.Encoding(3.0, 8)),
        "c": (qdq.Encoding(2.0 * ratio, 8), qdq.Encoding(3.0, 8)),
        # w8a8's down_proj reads and writes 16 bits (with the 16-bit headroom).
        "down": (qdq.Encoding(10.0, 16), qdq.Encoding(6.0, 16)),
    }
    assert qdq.float_linears(got) == {"b"}
    wide = qdq.plan_encodings(plan, stats, qdq.preset_by_name("w8a16"))
    assert wide["a"] == (qdq.Encoding(8.0, 16), qdq.Encoding(4.0, 16))  # HEADROOM_16 = 2
    assert qdq.float_linears(wide) == {"b", "c"}


def test_float_linear_keeps_float_weight(layer: dict) -> None:
    """A linear whose encoding is float is left out of quantization entirely."""
    dest = layer["dir"] / "block_0.float_down.onnx"
    encodings = {
        n: (qdq.Encoding(i * 2, 16), qdq.Encoding(o * 2, 16))
        for n, (i, o) in layer["ranges"].items()
    }
    down = next(n for n in encodings if n.endswith("down_proj"))
    encodings[down] = (qdq.Encoding(1.0, None), qdq.Encoding(1.0, None))
    sites = qdq.quantize_piece(
        layer["static"],
        dest,
        encodings=encodings,
        weights=layer["weights"],
        calibration=layer["feeds"][:4],
        preset=qdq.preset_by_name("w8a16"),
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


def test_preset_widths_without_htp_types_are_refused() -> None:
    """Any width but these would silently get 8-bit types in the QDQ graph."""
    with pytest.raises(EdgeforgeError, match=r"preset w6: weight_bits 6; .* \(4, 8\) only"):
        qdq.Preset("w6", 6, 16, 16, 16)
    with pytest.raises(EdgeforgeError, match=r"preset a12: act_bits 12; .* \(8, 16\) only"):
        qdq.Preset("a12", 8, 12, 16, 16)
    with pytest.raises(EdgeforgeError, match="down_bits 32"):
        qdq.Preset("d32", 8, 16, 16, 32)

"""QDQ conversion (common/qdq.py) on a tiny-qwen2 decoder layer, on onnxruntime CPU:
the profile's scales and our int8 weights must be what the QDQ graph holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from common import piece_export as pe
from common import qdq
from common.errors import EdgeforgeError
from common.int8 import quantize_weight, symmetric_scale
from common.models import get_adapter, iter_linears
from common.models.loading import load_model

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
    dest = layer["dir"] / f"block_0.{preset}.onnx"
    sites = qdq.quantize_piece(
        layer["static"],
        dest,
        ranges=layer["ranges"],
        weights=layer["weights"],
        calibration=layer["feeds"][:4],
        preset=qdq.preset_by_name(preset),
    )
    return dest, sites


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
        dq = next(
            n
            for n in model.graph.node
            if n.op_type == "DequantizeLinear"
            and n.output[0] in {m.input[1] for m in model.graph.node if m.name == site.matmul}
        )
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
        if not name.endswith("o_proj"):
            assert params[site.input][1].dtype == np.uint8, name
    assert _cos(path, layer) > 0.99


def test_w4a16_runs_and_is_coarser(layer: dict) -> None:
    path, _ = _quantize(layer, "w4a16")
    cos = _cos(path, layer)
    assert 0.95 < cos < _cos(_quantize(layer, "w8a16")[0], layer)


def test_unknown_preset_and_foreign_weights(layer: dict) -> None:
    with pytest.raises(EdgeforgeError, match="w8a16, w8a8, w4a16"):
        qdq.preset_by_name("w2a2")
    model = onnx.load(str(layer["static"]))
    with pytest.raises(EdgeforgeError, match="0 MatMul nodes carry its weight"):
        qdq.linear_sites(model, {"x": torch.zeros(64, 64)})

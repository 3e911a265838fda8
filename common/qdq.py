"""Float ONNX piece → QDQ ONNX for QNN HTP, with OUR scales and OUR integer weights.

onnxruntime's QNN quantization recipe (``get_qnn_qdq_config`` + ``quantize``) decides
where Q/DQ pairs go, which ops need 16-bit ``Convert`` nodes, and the layouts HTP accepts
(research/qnn-ort.md §4). Left alone it would also pick every scale from its own
calibration and round the weights its own way; the whole point of the plan is that the
profile's ranges are what ship. So:

* each linear's input and output activation gets a *fixed* scale from the profile
  (tensor-quantization overrides with ``scale``/``zero_point``): a symmetric grid over
  ``absmax`` — ``absmax / qmax(bits)`` with the unsigned zero point at mid-range, which is
  the same grid as the signed symmetric one :mod:`common.int8` simulates;
* int8 weights are replaced after quantization by :func:`common.int8.quantize_weight`
  (symmetric per output channel), so the QDQ graph and the ``.mllm`` hold the same bytes;
* the remaining activations (norm internals, rope, softmax) have no profile entry and are
  calibrated MinMax on golden inputs captured from the float model.

Presets: ``w8a16`` (default; int8 weights, 16-bit activations), ``w8a8`` (8-bit
activations except the attention scores/probabilities, which lose all resolution in 8
bits next to a −1e4 mask: measured cos 0.93 → 0.999; the P·V product feeding o_proj
keeps a calibrated encoding), ``w4a16`` (int4 per-channel weights,
rounded by onnxruntime: :mod:`common.int8` has no 4-bit grid yet).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import EdgeforgeError
from common.int8 import qmax, quantize_weight, symmetric_scale


@dataclass(frozen=True)
class Preset:
    """Bit widths of one precision preset."""

    name: str
    weight_bits: int
    act_bits: int
    score_bits: int


PRESETS: dict[str, Preset] = {
    "w8a16": Preset("w8a16", 8, 16, 16),
    "w8a8": Preset("w8a8", 8, 8, 16),
    "w4a16": Preset("w4a16", 4, 16, 16),
}
DEFAULT_PRESET = "w8a16"


def preset_by_name(name: str) -> Preset:
    """The preset called ``name``, or an error listing them."""
    if name not in PRESETS:
        raise EdgeforgeError(f"precision preset {name!r} is unknown; known: {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class LinearSite:
    """Where one linear sits in an exported graph: its MatMul, the activation feeding it,
    its pre-bias output, and the float ``[in, out]`` weight initializer."""

    name: str
    matmul: str
    input: str
    output: str
    weight: str


def linear_sites(model: Any, weights: Mapping[str, torch.Tensor]) -> dict[str, LinearSite]:
    """Locate each linear by its weight: the exporter folds ``W`` into a ``[in, out]``
    initializer ``W^T`` feeding a MatMul, and scope names do not survive method calls, so
    the bytes are the only reliable key."""
    from onnx import numpy_helper

    candidates: dict[tuple[int, ...], list[tuple[Any, np.ndarray]]] = {}
    inits = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            array = numpy_helper.to_array(inits[node.input[1]])
            candidates.setdefault(array.shape, []).append((node, array))
    sites: dict[str, LinearSite] = {}
    for name, weight in weights.items():
        want = weight.detach().float().T.numpy()
        found = [n for n, a in candidates.get(want.shape, []) if np.array_equal(a, want)]
        if len(found) != 1:
            raise EdgeforgeError(
                f"{name}: {len(found)} MatMul nodes carry its weight in the exported graph "
                "(expected exactly 1)"
            )
        node = found[0]
        sites[name] = LinearSite(name, node.name, node.input[0], node.output[0], node.input[1])
    return sites


def score_tensors(model: Any) -> list[str]:
    """Attention score/probability tensors: every Softmax output and the chain of
    single-consumer Add/Div/Mul between it and the MatMul that makes the scores."""
    producers = {out: node for node in model.graph.node for out in node.output}
    tensors: list[str] = []
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        tensors.append(node.output[0])
        tensor = node.input[0]
        while tensor in producers:
            tensors.append(tensor)
            producer = producers[tensor]
            if producer.op_type == "MatMul":
                break
            if producer.op_type not in ("Add", "Div", "Mul", "Cast"):
                raise EdgeforgeError(
                    f"attention scores: unexpected {producer.op_type} {producer.name!r} "
                    "between the score MatMul and Softmax"
                )
            tensor = producer.input[0]
    return tensors


#: Ops whose output onnxruntime's QDQ quantizer gives its input's encoding: an override on
#: their output is ignored, so it must be placed on the tensor that feeds them.
_SHARED_ENCODING_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


def encoding_chain(model: Any, tensor: str) -> list[str]:
    """``tensor`` and every tensor upstream of it through shape-only ops (they all carry
    the same values, so one fixed encoding fits all of them)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    chain = [tensor]
    while chain[-1] in producers and producers[chain[-1]].op_type in _SHARED_ENCODING_OPS:
        chain.append(producers[chain[-1]].input[0])
    return chain


def activation_override(absmax: float, bits: int) -> dict[str, Any]:
    """A fixed unsigned QDQ encoding equal to the signed symmetric grid over ``absmax``:
    scale ``absmax / qmax``, zero point mid-range (128 or 32768)."""
    from onnxruntime.quantization import QuantType

    scale = float(symmetric_scale(absmax, bits))
    if bits == 8:
        return {
            "quant_type": QuantType.QUInt8,
            "scale": np.array(scale, np.float32),
            "zero_point": np.array(qmax(8) + 1, np.uint8),
        }
    return {
        "quant_type": QuantType.QUInt16,
        "scale": np.array(scale, np.float32),
        "zero_point": np.array(qmax(16) + 1, np.uint16),
    }


def overrides_for(
    model: Any,
    sites: Mapping[str, LinearSite],
    ranges: Mapping[str, tuple[float, float]],
    preset: Preset,
) -> dict[str, list[dict[str, Any]]]:
    """Tensor overrides: profile scales on linear inputs/outputs, 16-bit scores for
    ``w8a8``, int4 per-channel weights for ``w4a16``."""
    from onnxruntime.quantization import QuantType

    overrides: dict[str, list[dict[str, Any]]] = {}
    scores = set(score_tensors(model)) if preset.score_bits != preset.act_bits else set()
    producers = {out: node for node in model.graph.node for out in node.output}
    for name, site in sites.items():
        in_range, out_range = ranges[name]
        chain = encoding_chain(model, site.input)
        head = producers.get(chain[-1])
        # P·V reads 16-bit probabilities; onnxruntime's mixed-precision pass converts its
        # output (o_proj's input) itself and fails on an imposed encoding there, so w8a8
        # leaves that one tensor calibrated.
        if not (head is not None and any(t in scores for t in head.input)):
            for tensor in chain:
                overrides[tensor] = [activation_override(in_range, preset.act_bits)]
        overrides[site.output] = [activation_override(out_range, preset.act_bits)]
        if preset.weight_bits == 4:
            overrides[site.weight] = [{"quant_type": QuantType.QInt4, "symmetric": True, "axis": 1}]
        else:
            overrides[site.weight] = [{"quant_type": QuantType.QInt8, "symmetric": True, "axis": 1}]
    for tensor in scores:
        overrides.setdefault(tensor, [{"quant_type": QuantType.QUInt16}])
    return overrides


class _Feeds:
    """onnxruntime CalibrationDataReader over a list of input dicts."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]):
        self._feeds = iter(list(feeds))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return dict(next(self._feeds, None) or {}) or None


def replace_weights(
    model: Any, sites: Mapping[str, LinearSite], weights: Mapping[str, torch.Tensor]
) -> None:
    """Put :func:`common.int8.quantize_weight`'s per-channel int8 levels and scales into
    each linear's weight DequantizeLinear (layout ``[in, out]``, axis 1)."""
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    dq_by_output = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    matmuls = {n.name: n for n in model.graph.node}
    for name, site in sites.items():
        dq = dq_by_output.get(matmuls[site.matmul].input[1])
        if dq is None or dq.input[0] not in inits:
            raise EdgeforgeError(f"{name}: quantizer left no weight DequantizeLinear")
        levels, scale = quantize_weight(weights[name], "per_channel")
        q = levels.T.contiguous().numpy().astype(np.int8)
        if numpy_helper.to_array(inits[dq.input[0]]).shape != q.shape:
            raise EdgeforgeError(f"{name}: weight shape differs from the exported graph")
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(q, dq.input[0]))
        inits[dq.input[1]].CopyFrom(
            numpy_helper.from_array(scale.reshape(-1).numpy().astype(np.float32), dq.input[1])
        )
        inits[dq.input[2]].CopyFrom(
            numpy_helper.from_array(np.zeros(q.shape[1], np.int8), dq.input[2])
        )


def static_float_model(float_model: Path, dest: Path) -> Path:
    """Fold the exporter's leftovers HTP rejects — ``Shape`` → ``Reshape`` chains on
    static shapes, float→float ``Cast`` — with onnxruntime's basic graph optimizations
    (constant folding, redundant-node elimination); the function is unchanged."""
    import onnxruntime as ort

    from common.records import atomic_path

    with atomic_path(dest) as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(tmp)
        so.intra_op_num_threads = 1
        ort.InferenceSession(  # MatMul+Add→Gemm would hide each linear's pre-bias output
            str(float_model),
            so,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=["MatMulAddFusion"],
        )
    return dest


def quantize_piece(
    float_model: Path,
    dest: Path,
    *,
    ranges: Mapping[str, tuple[float, float]],
    weights: Mapping[str, torch.Tensor],
    calibration: Iterable[Mapping[str, np.ndarray]],
    preset: Preset,
) -> dict[str, LinearSite]:
    """Write the QDQ model of ``float_model`` to ``dest`` (see the module docstring).

    ``ranges`` maps each linear to its profile ``(input absmax, output absmax)``;
    ``weights`` to its float ``[out, in]`` weight (as the adapter holds it).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from common.records import atomic_path

    model = onnx.load(str(float_model))
    sites = linear_sites(model, weights)
    act_type = QuantType.QUInt16 if preset.act_bits == 16 else QuantType.QUInt8
    config = get_qnn_qdq_config(
        model,
        _Feeds(list(calibration)),
        activation_type=act_type,
        weight_type=QuantType.QInt8,
        weight_symmetric=True,
        init_overrides=overrides_for(model, sites, ranges, preset),
    )
    with atomic_path(dest) as tmp:
        quantize(model, str(tmp), config)
        qdq = onnx.load(str(tmp))
        if preset.weight_bits == 8:
            replace_weights(qdq, sites, weights)
        onnx.save(qdq, str(tmp))
    return sites

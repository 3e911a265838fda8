"""Float ONNX piece → QDQ ONNX for QNN HTP, with OUR scales and OUR integer weights.

onnxruntime's QNN quantization recipe (``get_qnn_qdq_config`` + ``quantize``) decides
where Q/DQ pairs go, which ops need 16-bit ``Convert`` nodes, and the layouts HTP
accepts. Left alone it would also pick every scale from its own
calibration and round the weights its own way; the whole point of the plan is that the
profile's ranges are what ship. So:

* each linear's input and output activation gets a *fixed* scale from the profile
  (tensor-quantization overrides with ``scale``/``zero_point``): a symmetric grid over
  ``absmax`` — ``absmax / qmax(bits)`` with the unsigned zero point at mid-range, which is
  the same grid as the signed symmetric one :mod:`common.quant.int8` simulates;
* integer weights are replaced after quantization by ours (:func:`replace_weights`):
  symmetric per output channel on :mod:`common.quant.int8`'s grid, rounded by GPTQ
  (:mod:`common.backends.sequential_gptq`) or to nearest (:func:`nearest_levels`);
* each decomposed RMSNorm becomes one ``RMSNormalization`` node (:func:`fuse_rms_norms`);
* the masked attention scores get an encoding that saturates the −1e4 mask instead of
  spending the grid on it (:func:`tighten_masked_scores`);
* the remaining activations (norm internals, rope, softmax) have no profile entry and are
  calibrated MinMax on golden inputs captured from the float model.

The residual stream and its RMSNorms stay float (fp16 on HTP; :func:`float_nodes`).

Presets: ``w8a16`` (default; int8 weights, 16-bit activations), ``w8a8`` (8-bit
activations except the attention scores/probabilities, which lose all resolution in 8
bits next to a −1e4 mask: measured cos 0.93 → 0.999; the P·V product feeding o_proj
keeps a calibrated encoding; and the down_proj inputs, 16-bit — the ``w8a8_best`` plan of
``make simulate``: the attention sink drives them to ~3000 against a bulk of ~1, and at
8 bits 12 of SmolLM2's 61 pieces fell below cos 0.99), ``w4a16`` (int4 per-channel
weights on :mod:`common.quant.int8`'s 4-bit grid).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.core.errors import EdgeforgeError
from common.quant.int8 import qmax, quantize_weight, symmetric_scale


@dataclass(frozen=True)
class Preset:
    """Bit widths of one precision preset."""

    name: str
    weight_bits: int
    act_bits: int
    score_bits: int
    #: down_proj's input and output: the input holds the MLP's attention-sink outliers; the
    #: output goes along because HTP's MatMul reads and writes one activation width (and it
    #: feeds the float residual Add, so its width costs nothing downstream).
    down_bits: int

    #: Widths the QDQ writer has HTP types for: others would fall back to 8 bits unnoticed.
    WEIGHT_BITS = (4, 8)
    ACTIVATION_BITS = (8, 16)

    def __post_init__(self) -> None:
        activations = {"act_bits": self.act_bits, "score_bits": self.score_bits,
                       "down_bits": self.down_bits}  # fmt: skip
        if self.weight_bits not in self.WEIGHT_BITS:
            raise EdgeforgeError(
                f"preset {self.name}: weight_bits {self.weight_bits}; the QDQ writer has HTP "
                f"types for {self.WEIGHT_BITS} only"
            )
        for field, bits in activations.items():
            if bits not in self.ACTIVATION_BITS:
                raise EdgeforgeError(
                    f"preset {self.name}: {field} {bits}; the QDQ writer has HTP types for "
                    f"{self.ACTIVATION_BITS} only"
                )


PRESETS: dict[str, Preset] = {
    "w8a16": Preset("w8a16", 8, 16, 16, 16),
    "w8a8": Preset("w8a8", 8, 8, 16, 16),
    "w4a16": Preset("w4a16", 4, 16, 16, 16),
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


def residual_tensors(model: Any) -> list[str]:
    """The residual stream of a piece: its hidden-state input and each ``Add`` that
    carries it forward (after attention, after the MLP)."""
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    stream = [model.graph.input[0].name]
    while stream:
        adds = [n for n in consumers.get(stream[-1], []) if n.op_type == "Add"]
        if len(adds) != 1:
            break
        stream.append(adds[0].output[0])
    return stream


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


#: Range headroom of 16-bit linear encodings over the profile's abs-max. The profile's
#: abs-max is a sample maximum that held-out tokens exceed (SmolLM2 block_1 down_proj
#: output: profile 129, a held-out attention-sink row 160 — clipped, cos 0.9967), and at
#: 16 bits one bit of range costs nothing measurable, so 16-bit grids cover 2x abs-max.
#: 8-bit grids keep the profile's range exactly (a bit there is half the resolution).
HEADROOM_16 = 2.0


#: A 16-bit tensor whose abs-max exceeds this many times its abs-p99.9 stays float (fp16 on
#: HTP): its bulk would get fewer than 2^15 / (2 · 64) = 256 levels, an 8-bit grid's worth.
#: SmolLM2 layer 11 down_proj: input abs-max 2946 vs p99.9 1.43 (ratio 2060); on 16 bits
#: its decode graph reached cos 0.9944, its ordinary rows quantized away.
FLOAT_RATIO_16 = 64.0


@dataclass(frozen=True)
class Encoding:
    """A linear activation's fixed symmetric encoding: the range it covers and its width
    (``bits`` None: the tensor stays float, fp16 on HTP)."""

    absmax: float
    bits: int | None


def plan_encodings(
    plan: Mapping[str, Any], stats: Mapping[str, Any], preset: Preset
) -> dict[str, tuple[Encoding, Encoding]]:
    """``(input, output)`` encodings of every linear in the quant plan.

    A QNN graph has no CPU shadow op to recompute what saturates, so a tensor the plan
    (its ``T`` rule) makes a *shadow* one — outliers too far beyond p99.9 for an 8-bit
    grid — stays float, the way mllm computes shadow outliers in float; so does a 16-bit
    tensor beyond :data:`FLOAT_RATIO_16`. Every other tensor gets the preset's width over
    its abs-max (16-bit ones with :data:`HEADROOM_16`) — down_proj inputs (profile role
    ``down``) and outputs the preset's ``down_bits``. With ``clip_all`` (no ``T``) the
    plan has no shadow tensors. A linear the ``.mllm`` keeps in float (the LM head) is
    still quantized in its QNN piece, at the preset width.
    """
    out: dict[str, tuple[Encoding, Encoding]] = {}
    for name, entry in plan["tensors"].items():
        pair = []
        width = preset.down_bits if stats[name].get("role") == "down" else preset.act_bits
        for side in ("input", "output"):
            st = stats[name][side]
            absmax = float(st["absmax"])
            bits: int | None = width
            if entry[side].get("shadow") or (
                bits == 16 and absmax > FLOAT_RATIO_16 * float(st["abs_p999"])
            ):
                bits = None
            pair.append(Encoding(absmax * (HEADROOM_16 if bits == 16 else 1.0), bits))
        out[name] = (pair[0], pair[1])
    return out


def float_linears(encodings: Mapping[str, tuple[Encoding, Encoding]]) -> set[str]:
    """Linears computed in float: either activation side has no integer encoding."""
    return {n for n, pair in encodings.items() if any(e.bits is None for e in pair)}


def overrides_for(
    model: Any,
    sites: Mapping[str, LinearSite],
    encodings: Mapping[str, tuple[Encoding, Encoding]],
    preset: Preset,
) -> dict[str, list[dict[str, Any]]]:
    """Tensor overrides: the plan's encodings on linear inputs/outputs, 16-bit scores for
    ``w8a8``, int4 per-channel weights for ``w4a16``."""
    from onnxruntime.quantization import QuantType

    overrides: dict[str, list[dict[str, Any]]] = {}
    scores = set(score_tensors(model)) if preset.score_bits != preset.act_bits else set()
    producers = {out: node for node in model.graph.node for out in node.output}
    floats = float_linears(encodings)
    for name, site in sites.items():
        if name in floats:
            continue
        in_enc, out_enc = encodings[name]
        chain = encoding_chain(model, site.input)
        head = producers.get(chain[-1])
        # P·V reads 16-bit probabilities; onnxruntime's mixed-precision pass converts its
        # output (o_proj's input) itself and fails on an imposed encoding there, so w8a8
        # leaves that one tensor calibrated.
        if not (head is not None and any(t in scores for t in head.input)):
            for tensor in chain:
                overrides[tensor] = [activation_override(in_enc.absmax, in_enc.bits)]
        overrides[site.output] = [activation_override(out_enc.absmax, out_enc.bits)]
        if preset.weight_bits == 4:
            overrides[site.weight] = [{"quant_type": QuantType.QInt4, "symmetric": True, "axis": 1}]
        else:
            overrides[site.weight] = [{"quant_type": QuantType.QInt8, "symmetric": True, "axis": 1}]
    for tensor in scores:
        overrides.setdefault(tensor, [{"quant_type": QuantType.QUInt16}])
    return overrides


def float_nodes(model: Any) -> list[str]:
    """Nodes left in float (run in fp16 on HTP): the residual ``Add`` nodes and the
    RMSNorms reading the residual stream.

    Why: attention-sink rows carry values near 2e4 in SmolLM2's middle layers while
    ordinary rows are ~1, so even a 16-bit grid has a step of ~0.4 on the stream (block_12:
    cos 0.9989 on CPU and HTP alike; w8a8's 8-bit grid zeroes ordinary rows: V cos 0.29).
    fp16 keeps ~3 significant digits at any magnitude: block_12 cos 0.99982 on HTP. The
    linears around them keep their integer encodings; the norm's output is quantized
    straight onto the next linear's grid.
    """
    stream = residual_tensors(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    names = [producers[t].name for t in stream if t in producers]
    names += [
        n.name for n in model.graph.node if n.op_type == "RMSNormalization" and n.input[0] in stream
    ]
    return names


#: Elementwise ops an activation function is built from (SwiGLU's Sigmoid·Mul, GELU's Erf).
_ELEMENTWISE_OPS = ("Mul", "Sigmoid", "Add", "Sub", "Div", "Tanh", "Erf", "Relu", "Neg", "Pow")


def float_input_nodes(
    model: Any, sites: Mapping[str, LinearSite], floats: Iterable[str]
) -> list[str]:
    """The elementwise nodes computing a float linear's input (SwiGLU: the gate's Sigmoid,
    its Mul and the gate·up Mul), back to the MatMuls they read, so they run in float
    (fp16 on HTP) as well.

    Why: a linear stays float because its input spans outliers no integer grid holds, and
    that input is these nodes' output; quantized there, it would still be rounded to a
    calibrated grid over the outliers. SmolLM2 layer 11 decode, ``w8a8``: the down_proj
    input on an 8-bit grid over 2659 (a step of 21 against a bulk near 1) gave cos 0.966;
    with these nodes in float, 0.996.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    names: list[str] = []
    for name in floats:
        stack = [sites[name].input]
        while stack:
            node = producers.get(stack.pop())
            if node is None or node.op_type not in _ELEMENTWISE_OPS or node.name in names:
                continue
            names.append(node.name)
            stack.extend(node.input)
    return names


#: How far below the lowest real attention score the masked-scores encoding reaches.
#: Blocked entries (score + −1e4 mask) saturate there; their softmax weight is then at most
#: e^-32 ≈ 1e-14 of any visible entry's, i.e. still zero.
SOFTMAX_FLOOR = 32.0


def _qdq_params(model: Any) -> dict[str, tuple[Any, Any]]:
    """Per quantized tensor: the ``(scale, zero point)`` initializers of its QuantizeLinear."""
    inits = {init.name: init for init in model.graph.initializer}
    return {
        n.input[0]: (inits[n.input[1]], inits[n.input[2]])
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and n.input[1] in inits and len(n.input) > 2
    }


def _encoding_inits(model: Any, tensor: str) -> set[tuple[str, str]]:
    """``(scale, zero point)`` initializer names of the Q of ``tensor`` and of every DQ
    reading that Q's output (they may or may not share initializers)."""
    quantized = {
        n.output[0]
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] == tensor
    }
    return {
        (n.input[1], n.input[2])
        for n in model.graph.node
        if (n.op_type == "QuantizeLinear" and n.input[0] == tensor)
        or (n.op_type == "DequantizeLinear" and n.input[0] in quantized)
    }


def tighten_masked_scores(model: Any, float_model: Any) -> list[str]:
    """Re-encode each Softmax input (scores + additive mask) over ``[lo − SOFTMAX_FLOOR,
    hi]``, ``[lo, hi]`` being the calibrated encoding of the scores before the mask.

    Why: calibrated MinMax stretches that encoding down to the −1e4 of blocked positions,
    so even 16 bits leave a step of ~0.15 on the visible scores — ±7% on their softmax
    weights (tiny-qwen2 decode graph: HTP cos 0.9982 → 0.9998 with this). Edits ``model``
    (the QDQ graph) in place; returns the re-encoded tensors.
    """
    from onnx import numpy_helper

    producers = {out: node for node in float_model.graph.node for out in node.output}
    params = _qdq_params(model)
    inits = {init.name: init for init in model.graph.initializer}
    done = []
    for node in float_model.graph.node:
        masked = node.input[0] if node.op_type == "Softmax" else None
        add = producers.get(masked) if masked else None
        if add is None or add.op_type != "Add" or masked not in params:
            continue
        scores = add.input[0]
        if scores not in params:
            continue
        scale, zero = (numpy_helper.to_array(t) for t in params[scores])
        levels = np.iinfo(zero.dtype)
        lo = (levels.min - float(zero)) * float(scale)
        hi = (levels.max - float(zero)) * float(scale)
        zero_dtype = numpy_helper.to_array(params[masked][1]).dtype
        span = np.iinfo(zero_dtype)
        floor = lo - SOFTMAX_FLOOR
        new_scale = np.float32((hi - floor) / (span.max - span.min))
        new_zero = np.clip(round(span.min - floor / float(new_scale)), span.min, span.max)
        for name_s, name_z in _encoding_inits(model, masked):
            inits[name_s].CopyFrom(numpy_helper.from_array(np.array(new_scale), name_s))
            inits[name_z].CopyFrom(numpy_helper.from_array(np.array(new_zero, zero_dtype), name_z))
        done.append(masked)
    return done


class _Feeds:
    """onnxruntime CalibrationDataReader over a list of input dicts."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]):
        self._feeds = iter(list(feeds))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return dict(next(self._feeds, None) or {}) or None


#: ``name -> (levels [out, in] int8, scale [out, 1])``: the integer weights a piece ships.
WeightLevels = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def nearest_levels(
    weights: Mapping[str, torch.Tensor], bits: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Round-to-nearest :data:`WeightLevels` of float ``[out, in]`` weights on
    :mod:`common.quant.int8`'s symmetric per-output-channel grid."""
    return {name: quantize_weight(w, "per_channel", bits) for name, w in weights.items()}


def replace_weights(
    model: Any, sites: Mapping[str, LinearSite], levels: WeightLevels, bits: int
) -> None:
    """Put each linear's integer levels (transposed to ``[in, out]``, axis 1; ONNX ``INT4``
    for 4 bits) and per-channel scales into its weight DequantizeLinear."""
    import ml_dtypes
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    dq_by_output = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    matmuls = {n.name: n for n in model.graph.node}
    for name, site in sites.items():
        dq = dq_by_output.get(matmuls[site.matmul].input[1])
        if dq is None or dq.input[0] not in inits:
            raise EdgeforgeError(f"{name}: quantizer left no weight DequantizeLinear")
        q = levels[name][0].T.contiguous().numpy().astype(np.int8)
        scale = levels[name][1].reshape(-1).numpy().astype(np.float32)
        if numpy_helper.to_array(inits[dq.input[0]]).shape != q.shape:
            raise EdgeforgeError(f"{name}: weight shape differs from the exported graph")
        dtype = ml_dtypes.int4 if bits == 4 else np.int8
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(q.astype(dtype), dq.input[0]))
        inits[dq.input[1]].CopyFrom(numpy_helper.from_array(scale, dq.input[1]))
        inits[dq.input[2]].CopyFrom(
            numpy_helper.from_array(np.zeros(q.shape[1], dtype), dq.input[2])
        )


#: Opset of the QDQ graphs: 23 has ``RMSNormalization`` (and 16-bit Q/DQ, which needs 21).
QDQ_OPSET = 23


def _const_value(model: Any, tensor: str) -> np.ndarray | None:
    """The value of ``tensor`` if it is an initializer or a ``Constant`` output."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == tensor:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == tensor:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def _rms_norm_match(model: Any, pow_node: Any, consumers: Mapping[str, list[Any]]) -> Any:
    """``(x, weight, eps, nodes)`` when ``pow_node`` starts the exporter's decomposed
    RMSNorm ``weight * (x / sqrt(mean(x^2, -1) + eps))``; else ``None``."""

    def only(tensor: str, op: str) -> Any:
        users = consumers.get(tensor, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    x = pow_node.input[0]
    exponent = _const_value(model, pow_node.input[1])
    if exponent is None or exponent.size != 1 or float(exponent) != 2.0:
        return None
    mean = only(pow_node.output[0], "ReduceMean")
    add = mean and only(mean.output[0], "Add")
    sqrt = add and only(add.output[0], "Sqrt")
    div = sqrt and only(sqrt.output[0], "Div")
    scale = div and only(div.output[0], "Mul")
    if not scale or div.input[0] != x:
        return None
    axes = [a.ints for a in mean.attribute if a.name == "axes"]
    keep = [a.i for a in mean.attribute if a.name == "keepdims"]
    eps = _const_value(model, add.input[1])
    weight_name = scale.input[0] if scale.input[1] == div.output[0] else scale.input[1]
    weight = _const_value(model, weight_name)
    if list(axes[0] if axes else []) != [-1] or keep not in ([], [1]) or eps is None:
        return None
    if weight is None or weight.ndim != 1:
        return None
    return x, weight_name, float(eps), [pow_node, mean, add, sqrt, div, scale]


def fuse_rms_norms(model: Any) -> int:
    """Replace every decomposed RMSNorm with one opset-23 ``RMSNormalization`` node.

    Why: quantized op by op, the decomposition needs an encoding for ``x^2`` and its mean,
    whose range spans the squared outliers of the residual stream (attention-sink rows),
    so ordinary rows' variances round to a few levels or to zero and their normalized
    output blows up (SmolLM2 layers 12-16: CPU QDQ cos 0.47-0.80). HTP fuses the pattern
    into its own RmsNorm and ignores those encodings, so the CPU reference and the device
    disagreed. One node has only an input and an output encoding: same on both.
    Returns how many norms were fused; the model is edited in place.
    """
    from onnx import helper

    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    fused = 0
    drop: set[int] = set()
    for node in list(model.graph.node):
        if node.op_type != "Pow" or id(node) in drop:
            continue
        match = _rms_norm_match(model, node, consumers)
        if match is None:
            continue
        x, weight, eps, nodes = match
        scale = nodes[-1]
        norm = helper.make_node(
            "RMSNormalization",
            [x, weight],
            [scale.output[0]],
            name=f"{scale.name or node.name}_rmsnorm",
            axis=-1,
            epsilon=eps,
        )
        model.graph.node.insert(list(model.graph.node).index(node), norm)
        drop.update(id(n) for n in nodes)
        fused += 1
    kept = [n for n in model.graph.node if id(n) not in drop]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    used = {t for n in kept for t in n.input}
    inits = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, QDQ_OPSET)
    return fused


def static_float_model(float_model: Path, dest: Path) -> Path:
    """Fold the exporter's leftovers HTP rejects — ``Shape`` → ``Reshape`` chains on
    static shapes, float→float ``Cast`` — with onnxruntime's basic graph optimizations
    (constant folding, redundant-node elimination), and fuse each decomposed RMSNorm into
    one ``RMSNormalization`` (:func:`fuse_rms_norms`); the function is unchanged."""
    import onnx
    import onnxruntime as ort

    from common.core.records import atomic_path

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
        model = onnx.load(str(tmp))
        fuse_rms_norms(model)
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
    return dest


def quantize_piece(
    float_model: Path,
    dest: Path,
    *,
    encodings: Mapping[str, tuple[Encoding, Encoding]],
    weights: Mapping[str, torch.Tensor],
    calibration: Iterable[Mapping[str, np.ndarray]],
    preset: Preset,
    levels: WeightLevels | None = None,
) -> dict[str, LinearSite]:
    """Write the QDQ model of ``float_model`` to ``dest`` (see the module docstring).

    ``encodings`` maps each linear to its ``(input, output)`` :class:`Encoding`
    (:func:`plan_encodings`); ``weights`` to its float ``[out, in]`` weight (as the
    adapter holds it; it locates the linear in the graph); ``levels`` to the integer
    weights to ship (e.g. GPTQ's, :mod:`common.backends.sequential_gptq`) — by default
    :func:`nearest_levels` of ``weights``.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from common.core.records import atomic_path

    model = onnx.load(str(float_model))
    sites = linear_sites(model, weights)
    floats = float_linears(encodings) & set(sites)
    act_type = QuantType.QUInt16 if preset.act_bits == 16 else QuantType.QUInt8
    config = get_qnn_qdq_config(
        model,
        _Feeds(list(calibration)),
        activation_type=act_type,
        weight_type=QuantType.QInt8,
        weight_symmetric=True,
        init_overrides=overrides_for(model, sites, encodings, preset),
        nodes_to_exclude=float_nodes(model)
        + [site.matmul for name, site in sites.items() if name in floats]
        + float_input_nodes(model, sites, floats),
    )
    with atomic_path(dest) as tmp:
        quantize(model, str(tmp), config)
        qdq = onnx.load(str(tmp))
        quantized = {n: site for n, site in sites.items() if n not in floats}
        chosen = nearest_levels(weights, preset.weight_bits) if levels is None else levels
        replace_weights(qdq, quantized, chosen, preset.weight_bits)
        tighten_masked_scores(qdq, model)
        onnx.save(qdq, str(tmp))
    return sites

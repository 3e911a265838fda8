"""Float ONNX piece → QDQ ONNX for QNN HTP, with OUR scales and OUR integer weights, all
read from the binaries' quant plan.

onnxruntime's QNN quantization recipe (``get_qnn_qdq_config`` + ``quantize``) decides
where Q/DQ pairs go, which ops need 16-bit ``Convert`` nodes, and the layouts HTP
accepts. Left alone it would also pick every scale from its own
calibration and round the weights its own way; the whole point of the plan is that the
profile's ranges are what ship. So:

* each linear's input and output activation gets a *fixed* scale from the plan
  (tensor-quantization overrides with ``scale``/``zero_point``): a symmetric grid over
  the profile's ``absmax`` — ``absmax / qmax(bits)`` with the unsigned zero point at
  mid-range, which is the same grid as the signed symmetric one :mod:`common.quant.int8`
  simulates;
* integer weights are replaced after quantization by ours (:func:`replace_weights`):
  symmetric per output channel on :mod:`common.quant.int8`'s grid, rounded by GPTQ
  (:mod:`common.backends.sequential_gptq`) or to nearest (:func:`nearest_levels`);
* each decomposed RMSNorm becomes one ``RMSNormalization`` node (:func:`fuse_rms_norms`);
* the masked attention scores get an encoding that saturates the −1e4 mask instead of
  spending the grid on it (:func:`tighten_masked_scores`);
* the remaining activations (norm internals, rope, softmax) have no profile entry and are
  calibrated MinMax on golden inputs captured from the float model;
* with 16-bit activations, the second operand of each product of two activations (K, V)
  is re-quantized to int16 in front of its MatMul (:func:`signed_matmul_operands`): HTP
  cuts a uint16 one to 8 bits.

The residual stream and its RMSNorms stay float (fp16 on HTP; :func:`float_nodes`).

**The plan.** :func:`qdq_plan` turns the ``.mllm``'s quant plan (its shadow tensors), the
profile (ranges) and a scheme (widths) into a :class:`QdqPlan`: per linear its weight
(int4/int8 per channel or int4 per group, GPTQ or nearest, or float) and per side the
exact encoding imposed (width, abs-max, covered range, float32 scale, zero point) or the
float fallback and why.
``make qnn`` writes it as ``quant_plan.json`` beside the binaries and the QDQ step reads it
back from that file (:func:`load_qdq_plan`): what the file says is what was built.

Presets (:data:`PRESETS`, entries of :data:`common.quant.schemes.SCHEMES`): ``w8a16``
(default; int8 weights, 16-bit activations), ``w8a8`` (8-bit activations except the
attention scores/probabilities, which lose all resolution in 8 bits next to a −1e4 mask:
measured cos 0.93 → 0.999; the P·V product feeding o_proj keeps a calibrated encoding;
the down_proj inputs, 16-bit — the ``w8a8_best`` plan of ``make simulate``: the
attention sink drives them to ~3000 against a bulk of ~1, and at 8 bits 12 of SmolLM2's
61 pieces fell below cos 0.99; and the SwiGLU interior, gate/up's outputs to down_proj's
input, 16-bit (:func:`swiglu_interior`: top-1 0.81 → 0.90; the MLP's MatMuls then compute
on 16-bit activations, q/k/v/o on 8-bit ones), ``w4a16`` (int4 weights with one scale per
32 input columns of a row, each the clip of the group's abs-max that rounds it best, on
:mod:`common.quant.int8`'s 4-bit grid: ONNX's blocked
DequantizeLinear, which the QNN EP compiles to HTP block-quantized weights on v73, v75,
v79 and v81; one scale per output channel had SmolLM2 agree with float on 0.715 of
next tokens).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.core.errors import EdgeforgeError
from common.export import onnx_files
from common.export.onnx_files import INLINE_TENSOR_BYTES, data_file, onnx_destination
from common.quant.int8 import qmax, quantize_weight, symmetric_scale
from common.quant.schemes import (
    PLAN_FORMAT,
    ROLE_OVERRIDES,
    QuantScheme,
    Weights,
    int_bits,
    scheme_by_name,
    schemes_for,
)

#: The schemes ``PRESET=`` may name, and the default.
PRESETS = schemes_for("qnn")
DEFAULT_PRESET = "w8a16"
#: Widths the QDQ writer has HTP types for: others would fall back to 8 bits unnoticed.
HTP_WEIGHTS = ("int4", "int8")
HTP_ACTIVATIONS = ("int8", "int16")
#: Weight roundings ``make qnn`` computes (``ROUNDING=``).
HTP_ROUNDINGS = ("gptq", "nearest")


def check_htp(scheme: QuantScheme) -> QuantScheme:
    """``scheme`` if the QDQ writer can build it for HTP, else an error naming the field.

    Weights: int4/int8, symmetric per output channel, or int4 per group of input columns
    (:func:`replace_weights` writes those layouts), GPTQ or nearest; every activation
    int8 or int16; the LM head quantized (its piece is an HTP graph like the blocks: a
    float override has no meaning here).
    """
    weights = scheme.weights
    if weights.dtype not in HTP_WEIGHTS:
        raise EdgeforgeError(
            f"scheme {scheme.name}: weights {weights.dtype}; the QDQ writer has HTP types for "
            f"{', '.join(HTP_WEIGHTS)} only"
        )
    grouped_int4 = weights.granularity == "group" and weights.dtype == "int4"
    if not (weights.granularity == "per_channel" or grouped_int4) or not weights.symmetric:
        raise EdgeforgeError(
            f"scheme {scheme.name}: weights {weights.dtype} {weights.granularity}, symmetric "
            f"{weights.symmetric}; the QDQ writer writes symmetric per-channel weights and "
            "symmetric int4 groups only"
        )
    if weights.rounding not in HTP_ROUNDINGS:
        raise EdgeforgeError(
            f"scheme {scheme.name}: rounding {weights.rounding}; make qnn rounds by "
            f"{', '.join(HTP_ROUNDINGS)} only"
        )
    integer_roles = [role for role in ROLE_OVERRIDES if role != "lm_head"]
    for field, dtype in (
        ("activations", scheme.activations),
        *((role, scheme.activation(role)) for role in integer_roles),
    ):
        if dtype not in HTP_ACTIVATIONS:
            raise EdgeforgeError(
                f"scheme {scheme.name}: {field} {dtype}; the QDQ writer has HTP types for "
                f"{', '.join(HTP_ACTIVATIONS)} only"
            )
    if scheme.lm_head is not None:
        raise EdgeforgeError(
            f"scheme {scheme.name}: lm_head {scheme.lm_head}; the LM head piece is quantized "
            "like the other linears"
        )
    return scheme


def preset_by_name(name: str) -> QuantScheme:
    """The scheme ``PRESET=name`` names, checked buildable (or an error listing them)."""
    return check_htp(scheme_by_name(name, PRESETS, "precision preset"))


@dataclass(frozen=True)
class LinearSite:
    """Where one linear sits in an exported graph: its MatMul, the activation feeding it,
    its pre-bias output, and the float ``[in, out]`` weight initializer."""

    name: str
    matmul: str
    input: str
    output: str
    weight: str


def linear_sites(
    model: Any, weights: Mapping[str, torch.Tensor], base_dir: Path | None = None
) -> dict[str, LinearSite]:
    """Locate each linear by its weight: the exporter folds ``W`` into a ``[in, out]``
    initializer ``W^T`` feeding a MatMul, and scope names do not survive method calls, so
    the bytes are the only reliable key. ``base_dir`` is the model file's folder, where a
    model loaded without its external data reads it."""
    from onnx import numpy_helper

    candidates: dict[tuple[int, ...], list[tuple[Any, np.ndarray]]] = {}
    inits = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            array = numpy_helper.to_array(inits[node.input[1]], str(base_dir or ""))
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


def _quant_type(bits: int) -> tuple[Any, type[np.unsignedinteger]]:
    """onnxruntime's activation type for a ``bits``-wide HTP activation, and its numpy one."""
    from onnxruntime.quantization import QuantType

    return {8: (QuantType.QUInt8, np.uint8), 16: (QuantType.QUInt16, np.uint16)}[bits]


def activation_override(encoding: Encoding) -> dict[str, Any]:
    """The tensor override imposing ``encoding`` (an integer one) on a QDQ tensor."""
    quant_type, dtype = _quant_type(encoding.bits)
    return {
        "quant_type": quant_type,
        "scale": np.array(encoding.scale, np.float32),
        "zero_point": np.array(encoding.zero_point, dtype),
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

#: What a float fallback's ``float_reason`` means (written into the plan for its reader).
FLOAT_REASONS = {
    "shadow": "the .mllm plan's T rule makes it a shadow (no-clip) tensor, and a QNN graph "
    "has no CPU shadow op to recompute what saturates",
    "ratio": f"16 bits, abs-max above {FLOAT_RATIO_16:g} x abs-p99.9: the bulk would get "
    "fewer levels than an 8-bit grid",
    "linear": "the linear's other side is float, so the whole linear runs in float",
}
#: How a float tensor runs on HTP (``enable_htp_fp16_precision``; float32 in the graph).
HTP_FLOAT = "float16"


@dataclass(frozen=True)
class Encoding:
    """One linear activation as the QDQ graph holds it: a fixed unsigned grid — ``scale``
    (a float32 value) with ``zero_point`` at mid-range, the signed symmetric grid over
    ``range`` — or, with ``bits`` None, float (fp16 on HTP) for ``float_reason``.
    ``absmax`` is the profile's abs-max the decision read."""

    absmax: float
    bits: int | None
    range: float | None = None
    scale: float | None = None
    zero_point: int | None = None
    float_reason: str | None = None

    @classmethod
    def grid(cls, absmax: float, bits: int, headroom: float = 1.0) -> Encoding:
        """The symmetric ``bits`` grid over ``absmax · headroom``: scale ``range / qmax``
        rounded to float32 (what a Q/DQ initializer stores), zero point ``qmax + 1``."""
        value_range = absmax * headroom
        scale = float(symmetric_scale(value_range, bits))
        return cls(absmax, bits, value_range, scale, qmax(bits) + 1)

    @classmethod
    def kept_float(cls, absmax: float, reason: str) -> Encoding:
        return cls(absmax, None, float_reason=reason)

    def to_json(self) -> dict[str, Any]:
        if self.bits is None:
            return {"dtype": HTP_FLOAT, "absmax": self.absmax, "float_reason": self.float_reason}
        return {
            "dtype": f"uint{self.bits}",
            "bits": self.bits,
            "absmax": self.absmax,
            "range": self.range,
            "scale": self.scale,
            "zero_point": self.zero_point,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str) -> Encoding:
        """The encoding ``doc`` states, refused unless it is one the writer could have
        made: a known float reason, or an HTP width whose scale is the float32 grid step
        over its range and whose zero point is mid-range."""
        if doc["dtype"] == HTP_FLOAT:
            if doc["float_reason"] not in FLOAT_REASONS:
                raise EdgeforgeError(f"{where}: float_reason {doc['float_reason']!r} is unknown")
            return cls.kept_float(doc["absmax"], doc["float_reason"])
        encoding = cls(doc["absmax"], doc["bits"], doc["range"], doc["scale"], doc["zero_point"])
        if doc["dtype"] != f"uint{encoding.bits}" or f"int{encoding.bits}" not in HTP_ACTIVATIONS:
            raise EdgeforgeError(f"{where}: dtype {doc['dtype']} / bits {encoding.bits}")
        step = float(symmetric_scale(encoding.range, encoding.bits))
        if (encoding.scale, encoding.zero_point) != (step, qmax(encoding.bits) + 1):
            raise EdgeforgeError(
                f"{where}: scale {encoding.scale!r} / zero point {encoding.zero_point} is not "
                f"the symmetric grid over range {encoding.range!r} ({step!r}, "
                f"{qmax(encoding.bits) + 1})"
            )
        return encoding


@dataclass(frozen=True)
class LinearPlan:
    """One linear of the binaries: its weight (float when either side is float) and the
    encodings of its input and its pre-bias output."""

    role: str
    weight: Weights
    input: Encoding
    output: Encoding

    @property
    def is_float(self) -> bool:
        return self.weight.bits is None


@dataclass(frozen=True)
class QdqPlan:
    """What the QNN binaries hold (see the module docstring); ``quant_plan.json``."""

    name: str
    scheme: QuantScheme
    transforms: dict[str, Any]
    linears: dict[str, LinearPlan]

    def float_linears(self) -> set[str]:
        """Linears computed in float (fp16 on HTP)."""
        return {name for name, linear in self.linears.items() if linear.is_float}

    def statements(self) -> dict[str, Any]:
        """What the plan states beyond its linears, all implied by its scheme: the widths
        of the calibrated activations and of the attention scores, what stays float."""
        calibrated = int_bits(self.scheme.activations)
        scores = int_bits(self.scheme.activation("scores"))
        swiglu = int_bits(self.scheme.activation("swiglu"))
        return {
            "artifact": "QNN HTP context binaries <SOC>/<piece>_ctx.onnx + _qnn.bin, each "
            "compiled from qdq/<piece>.onnx",
            "calibrated": {
                "dtype": f"uint{calibrated}",
                "bits": calibrated,
                "what": "every activation without a tensors entry (norm outputs, rope, "
                "attention internals): MinMax over golden calibration inputs captured from "
                "the float pieces; the LM head is quantized like the blocks",
            },
            "swiglu": {
                "dtype": f"uint{swiglu}",
                "bits": swiglu,
                "what": "the SwiGLU interior: gate_proj's and up_proj's outputs (their "
                "tensors entries) and, calibrated MinMax, the elementwise tensors between "
                "them and down_proj's input (the gate's Sigmoid, the SiLU product); a "
                "MatMul reads and writes one width on HTP, so where this is wider than the "
                "input's entry, the input is converted to it in front of the MatMul",
            },
            "scores": {
                "dtype": f"uint{scores}",
                "bits": scores,
                "what": "attention scores and probabilities: calibrated MinMax, each "
                "Softmax input re-encoded to saturate the -1e4 mask "
                f"{SOFTMAX_FLOOR:g} below the pre-mask scores",
            },
            "float": "the residual Adds and the RMSNorms reading the residual stream, and a "
            "float linear with the elementwise SwiGLU nodes feeding it: fp16 on HTP",
            "rules": {
                "headroom_16": HEADROOM_16,
                "float_ratio_16": FLOAT_RATIO_16,
                "float_reasons": FLOAT_REASONS,
            },
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "name": self.name,
            "scheme": self.scheme.to_json(),
            "transforms": self.transforms,
            **self.statements(),
            "tensors": {
                name: {
                    "role": linear.role,
                    "weight": linear.weight.to_json(),
                    "input": linear.input.to_json(),
                    "output": linear.output.to_json(),
                }
                for name, linear in self.linears.items()
            },
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str = "quant plan") -> QdqPlan:
        """The plan ``doc`` states, refused when its statements are not the ones its scheme
        implies or a linear mixes float and integer sides."""
        if doc.get("format") != PLAN_FORMAT:
            raise EdgeforgeError(f"{where}: not an edgeforge plan (format != {PLAN_FORMAT!r})")
        linears = {}
        for name, entry in doc["tensors"].items():
            sides = [
                Encoding.from_json(entry[s], f"{where}: {name}.{s}") for s in ("input", "output")
            ]
            linear = LinearPlan(entry["role"], Weights.from_json(entry["weight"]), *sides)
            if any(e.bits is None for e in sides) != linear.is_float:
                raise EdgeforgeError(
                    f"{where}: {name}: a linear with a float side has float weights, and only it"
                )
            linears[name] = linear
        plan = cls(
            doc["name"], check_htp(QuantScheme.from_json(doc["scheme"])), doc["transforms"], linears
        )
        stated = {key: doc.get(key) for key in plan.statements()}
        if stated != plan.statements():
            raise EdgeforgeError(
                f"{where}: its statements (artifact, calibrated, swiglu, scores, float, rules) "
                f"are not those of scheme {plan.scheme.name} with this code's rules"
            )
        return plan


def qdq_plan(
    mllm_plan: Mapping[str, Any], stats: Mapping[str, Any], scheme: QuantScheme, *, name: str
) -> QdqPlan:
    """The binaries' plan for every linear of ``mllm_plan`` (the ``.mllm``'s quant plan).

    A QNN graph has no CPU shadow op to recompute what saturates, so a tensor the ``.mllm``
    plan (its ``T`` rule) makes a *shadow* one — outliers too far beyond p99.9 for an 8-bit
    grid — stays float, the way mllm computes shadow outliers in float; so does a 16-bit
    tensor beyond :data:`FLOAT_RATIO_16`, and with either side float the whole linear.
    Every other tensor gets the scheme's width for its role and side (down_proj's input and
    output: ``down``; gate_proj's and up_proj's outputs: ``swiglu``) over its abs-max in
    ``stats`` (16-bit ones with :data:`HEADROOM_16`). With ``clip_all`` (no ``T``) there
    are no shadow tensors. A linear the ``.mllm`` keeps in
    float (the LM head) is still quantized in its QNN piece, at the scheme's width.
    """
    check_htp(scheme)
    linears = {
        linear: linear_plan(
            stats[linear], scheme, shadow=tuple(bool(entry[s].get("shadow")) for s in SIDES)
        )
        for linear, entry in mllm_plan["tensors"].items()
    }
    return QdqPlan(name, scheme, dict(mllm_plan.get("transforms") or {}), linears)


#: The two activations of a linear a plan encodes.
SIDES = ("input", "output")


def linear_plan(
    stats: Mapping[str, Any], scheme: QuantScheme, shadow: Sequence[bool] = (False, False)
) -> LinearPlan:
    """One linear's plan from its profile ``stats`` (``role``, and each side's ``absmax``
    and ``abs_p999``) under :func:`qdq_plan`'s rules; ``shadow`` names the sides the
    ``.mllm`` plan keeps as shadow tensors."""
    role = stats["role"]
    sides = []
    for side, shadowed in zip(SIDES, shadow, strict=True):
        bits = int_bits(scheme.activation(role, side))
        absmax = float(stats[side]["absmax"])
        if shadowed:
            sides.append(Encoding.kept_float(absmax, "shadow"))
        elif bits == 16 and absmax > FLOAT_RATIO_16 * float(stats[side]["abs_p999"]):
            sides.append(Encoding.kept_float(absmax, "ratio"))
        else:
            sides.append(Encoding.grid(absmax, bits, HEADROOM_16 if bits == 16 else 1.0))
    weight = scheme.weight(role)
    if any(e.bits is None for e in sides):
        sides = [e if e.bits is None else Encoding.kept_float(e.absmax, "linear") for e in sides]
        weight = Weights(HTP_FLOAT)
    return LinearPlan(role, weight, sides[0], sides[1])


def calibrated_plan(
    stats: Mapping[str, Mapping[str, Any]], scheme: QuantScheme, *, name: str
) -> QdqPlan:
    """The plan of linears no ``.mllm`` plan covers (a vision tower's, which the ``.mllm``
    keeps float), each from ``stats`` observed on the build's own calibration inputs
    (:class:`common.analysis.profiling.ActivationProfiler`), by :func:`linear_plan`'s rules
    with no shadow tensors."""
    check_htp(scheme)
    return QdqPlan(name, scheme, {}, {n: linear_plan(s, scheme) for n, s in stats.items()})


def load_qdq_plan(path: Path) -> QdqPlan:
    """The binaries' plan as ``path`` states it (the QDQ step's only source of encodings)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeforgeError(f"{path}: cannot read the binaries' quant plan ({exc})") from None
    try:
        return QdqPlan.from_json(doc, str(path))
    except (KeyError, TypeError, AttributeError) as exc:
        raise EdgeforgeError(f"{path}: not a QNN binaries' quant plan ({exc!r})") from None


def overrides_for(
    model: Any, sites: Mapping[str, LinearSite], plan: QdqPlan
) -> dict[str, list[dict[str, Any]]]:
    """Tensor overrides: the plan's encodings on linear inputs/outputs and its weight widths
    (int4 or int8, symmetric per channel), and the scores' width where it differs from the
    calibrated activations' (``w8a8``)."""
    from onnxruntime.quantization import QuantType

    overrides: dict[str, list[dict[str, Any]]] = {}
    score_dtype = plan.scheme.activation("scores")
    scores = set(score_tensors(model)) if score_dtype != plan.scheme.activations else set()
    producers = {out: node for node in model.graph.node for out in node.output}
    swiglu_dtype = plan.scheme.activation("swiglu")
    swiglu_type = _quant_type(int_bits(swiglu_dtype))[0]
    for name, site in sites.items():
        linear = plan.linears[name]
        if linear.is_float:
            continue
        if linear.role == "down" and swiglu_dtype != plan.scheme.activations:
            for tensor in swiglu_interior(model, site):
                overrides[tensor] = [{"quant_type": swiglu_type}]
        chain = encoding_chain(model, site.input)
        head = producers.get(chain[-1])
        # P·V reads 16-bit probabilities; onnxruntime's mixed-precision pass converts its
        # output (o_proj's input) itself and fails on an imposed encoding there, so w8a8
        # leaves that one tensor calibrated.
        if not (head is not None and any(t in scores for t in head.input)):
            for tensor in chain:
                overrides[tensor] = [activation_override(linear.input)]
        overrides[site.output] = [activation_override(linear.output)]
        weight_type = QuantType.QInt4 if linear.weight.bits == 4 else QuantType.QInt8
        overrides[site.weight] = [{"quant_type": weight_type, "symmetric": True, "axis": 1}]
    score_type = _quant_type(int_bits(score_dtype))[0]
    for tensor in scores:
        overrides.setdefault(tensor, [{"quant_type": score_type}])
    return overrides


def swiglu_interior(model: Any, down: LinearSite) -> list[str]:
    """The tensors computed elementwise from gate_proj's and up_proj's outputs before the
    product that is ``down``'s input (SiLU's Sigmoid and Mul): the calibrated part of the
    ``swiglu`` role, whose linear sides the plan encodes.

    Why they matter: with them and the gate/up outputs on 8 bits, SmolLM2's ``w8a8`` chain
    agreed with float on 0.81 of next tokens (2048 held-out tokens); on 16 bits, 0.90, the
    largest gain of any class of tensors measured (attention input, rope, q/k/v and o_proj
    outputs, P·V: 0.82-0.85 each). Clipping the 8-bit gate/up grids instead (range abs-max
    / 2) lost more (0.80): their outliers are real. HTP's MatMul reads and writes one width
    (the QNN EP refuses a uint8-in, uint16-out one), so gate_proj and up_proj then compute
    on their 8-bit input converted to 16 bits.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    product = producers[encoding_chain(model, down.input)[-1]]
    return [t for node in _elementwise_upstream(producers, [product]) for t in node.output]


#: Norms left in float where they read the residual stream (a ViT's LayerNorm too).
_NORMS = ("RMSNormalization", "LayerNormalization")


def float_nodes(model: Any) -> list[str]:
    """Nodes left in float (run in fp16 on HTP): the residual ``Add`` nodes and the
    norms reading the residual stream.

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
    names += [n.name for n in model.graph.node if n.op_type in _NORMS and n.input[0] in stream]
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
        heads = [producers[sites[name].input]] if sites[name].input in producers else []
        found = _elementwise_upstream(producers, heads)
        names += [n.name for n in heads + found if n.op_type in _ELEMENTWISE_OPS]
    return list(dict.fromkeys(names))


def _elementwise_upstream(producers: Mapping[str, Any], heads: Sequence[Any]) -> list[Any]:
    """The elementwise nodes (:data:`_ELEMENTWISE_OPS`) feeding ``heads``, transitively,
    up to the first node of another kind (a MatMul, a graph input, a constant)."""
    found: list[Any] = []
    stack = [t for head in heads for t in head.input]
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.op_type not in _ELEMENTWISE_OPS or node in found:
            continue
        found.append(node)
        stack.extend(node.input)
    return found


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


def signed_matmul_operands(model: Any) -> list[str]:
    """Re-quantize the second operand of every ``MatMul`` of two unsigned 16-bit
    activations (the attention scores' K side, P·V's V side) to signed symmetric 16 bits,
    by a ``QuantizeLinear``/``DequantizeLinear`` pair (an HTP ``Convert``) in front of the
    MatMul; returns the re-quantized tensors.

    HTP cuts such an operand to 8 bits: measured on SM8650 and SM8750, a 56x16x56 product
    of two uint16 tensors is 0.67 % off its own QDQ graph (what an 8-bit operand gives on
    the CPU), the same product with the second operand int16 0.012 %. The int16 grid is
    the symmetric one over the uint16 grid's range, so nothing in range clips.
    """
    import onnx
    from onnx import numpy_helper

    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {init.name: init for init in model.graph.initializer}
    done = []
    for node in list(model.graph.node):
        if node.op_type != "MatMul":
            continue
        dqs = [producers.get(t) for t in node.input]
        if not all(dq is not None and dq.op_type == "DequantizeLinear" for dq in dqs):
            continue
        if any(dq.input[0] in inits for dq in dqs):  # a weight: not two activations
            continue
        zeros = [inits.get(dq.input[2]) if len(dq.input) > 2 else None for dq in dqs]
        if not all(z is not None and z.data_type == onnx.TensorProto.UINT16 for z in zeros):
            continue
        dq = dqs[1]
        scale = float(numpy_helper.to_array(inits[dq.input[1]]))
        zero = float(numpy_helper.to_array(zeros[1]))
        absmax = max(zero, 65535.0 - zero) * scale
        tensor = node.input[1]
        names = [f"{tensor}_int16_{part}" for part in ("scale", "zero_point", "q", "dq")]
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array(absmax / 32767.0, np.float32), names[0]),
            numpy_helper.from_array(np.array(0, np.int16), names[1]),
        ])  # fmt: skip
        at = list(model.graph.node).index(node)
        model.graph.node.insert(at, onnx.helper.make_node(
            "DequantizeLinear", [names[2], names[0], names[1]], [names[3]], names[3]
        ))  # fmt: skip
        model.graph.node.insert(at, onnx.helper.make_node(
            "QuantizeLinear", [tensor, names[0], names[1]], [names[2]], names[2]
        ))  # fmt: skip
        node.input[1] = names[3]
        done.append(tensor)
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
    weights: Mapping[str, torch.Tensor], spec: Weights
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Round-to-nearest :data:`WeightLevels` of float ``[out, in]`` weights on
    :mod:`common.quant.int8`'s symmetric grid as ``spec`` says: its width, one scale per
    output channel or per ``group_size`` input columns of it, chosen by its ``scales``."""
    granularity = "group" if spec.group_size else "per_channel"
    return {
        n: quantize_weight(w, granularity, spec.bits, spec.group_size, spec.scales)
        for n, w in weights.items()
    }


def _weight_dq(model: Any, site: LinearSite) -> Any:
    """The DequantizeLinear that feeds ``site``'s MatMul its integer weight initializer."""
    inits = {init.name for init in model.graph.initializer}
    matmul = next((n for n in model.graph.node if n.name == site.matmul), None)
    for node in model.graph.node:
        if (
            matmul is not None
            and node.op_type == "DequantizeLinear"
            and node.output[0] == matmul.input[1]
            and node.input[0] in inits
        ):
            return node
    raise EdgeforgeError(f"{site.name}: quantizer left no weight DequantizeLinear")


def replace_weights(
    model: Any, sites: Mapping[str, LinearSite], levels: WeightLevels, bits: Mapping[str, int]
) -> None:
    """Put each linear's integer levels (transposed to ``[in, out]``; ONNX ``INT4`` where
    its ``bits`` are 4) and scales into its weight DequantizeLinear: per output channel
    (axis 1), or per block of input columns when the levels come with a scale per group
    (``[out, groups]``): then axis 0 and ``block_size``, ONNX's blocked dequantization,
    which the QNN EP compiles to HTP block-quantized weights (tested on v73-v81).

    Only the shapes of the quantizer's weights are read, so ``model`` may be loaded
    without its external data; the new tensors are held in memory."""
    import ml_dtypes
    from onnx import helper, numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    for name, site in sites.items():
        dq = _weight_dq(model, site)
        q = levels[name][0].T.contiguous().numpy().astype(np.int8)
        scale = levels[name][1]
        if tuple(inits[dq.input[0]].dims) != q.shape:
            raise EdgeforgeError(f"{name}: weight shape differs from the exported graph")
        dtype = ml_dtypes.int4 if bits[name] == 4 else np.int8
        groups = scale.shape[1] if scale.dim() == 2 else 1
        if groups > 1:  # [groups, out] blocks of consecutive input rows
            scale = scale.T.contiguous().numpy().astype(np.float32)
            del dq.attribute[:]
            dq.attribute.extend([
                helper.make_attribute("axis", 0),
                helper.make_attribute("block_size", q.shape[0] // groups),
            ])  # fmt: skip
        else:
            scale = scale.reshape(-1).numpy().astype(np.float32)
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(q.astype(dtype), dq.input[0]))
        inits[dq.input[1]].CopyFrom(numpy_helper.from_array(scale, dq.input[1]))
        inits[dq.input[2]].CopyFrom(
            numpy_helper.from_array(np.zeros(scale.shape, dtype), dq.input[2])
        )


#: Opset of the QDQ graphs: 23 has ``RMSNormalization`` (and 16-bit Q/DQ, which needs 21).
QDQ_OPSET = 23


def _const_tensor(model: Any, tensor: str) -> Any:
    """The TensorProto of ``tensor`` if it is an initializer or a ``Constant`` output."""
    for init in model.graph.initializer:
        if init.name == tensor:
            return init
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == tensor:
            return node.attribute[0].t
    return None


def _const_value(model: Any, tensor: str) -> np.ndarray | None:
    """The value of ``tensor`` if it is an initializer or a ``Constant`` output. For
    scalars (an exponent, an epsilon), which stay in the proto when the weights are
    external data: this reads no data file."""
    from onnx import numpy_helper

    found = _const_tensor(model, tensor)
    return None if found is None else numpy_helper.to_array(found)


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
    weight = _const_tensor(model, weight_name)  # its shape only: it may be external data
    if list(axes[0] if axes else []) != [-1] or keep not in ([], [1]) or eps is None:
        return None
    if weight is None or len(weight.dims) != 1:
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
    one ``RMSNormalization`` (:func:`fuse_rms_norms`); the function is unchanged.

    Written through :func:`onnx_destination`. A large piece (one whose weights are in
    :func:`data_file` ``(float_model)``, e.g. Qwen-7B's lm_head) keeps them out of the
    proto, which protobuf cannot serialize past 2 GiB: onnxruntime writes the optimized
    tensors to an external file, and the fusion edits and checks the graph without
    loading them. A small one is written exactly as before, one file.
    """
    import onnx
    import onnxruntime as ort

    with onnx_destination(dest) as written:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(written)
        so.intra_op_num_threads = 1
        if data_file(float_model).is_file():  # a large piece, and so its optimized model
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", data_file(written).name
            )
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes",
                str(INLINE_TENSOR_BYTES),
            )
        ort.InferenceSession(  # MatMul+Add→Gemm would hide each linear's pre-bias output
            str(float_model),
            so,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=["MatMulAddFusion"],
        )
        model = onnx.load(str(written), load_external_data=False)
        fuse_rms_norms(model)
        _save_edited(model, written)
        onnx.checker.check_model(str(written))  # by path: reads no tensor data
    return dest


def _save_edited(model: Any, path: Path) -> None:
    """Save ``model``, loaded from ``path`` without its external data and then edited, back
    to ``path`` (a path :func:`onnx_destination` yielded).

    Without external data it is one file, as the tool wrote it. With
    :func:`data_file` ``(path)`` (the tool wrote the model large) its tensors stay in that
    file, and those the edits put in memory of at least :data:`INLINE_TENSOR_BYTES` go to a
    second file beside it instead of the proto, which could pass 2 GiB;
    :func:`onnx_destination` gathers both into the destination's data file.
    """
    import onnx

    onnx.save_model(
        model,
        str(path),
        save_as_external_data=data_file(path).is_file(),
        location=f"{path.name}.edits.data",
        size_threshold=INLINE_TENSOR_BYTES,
    )


@contextlib.contextmanager
def _without_preprocess_advice() -> Iterator[None]:
    """Drop the advice onnxruntime's ``quantize`` logs twice per call on the root logger, to
    run its pre-processing (shape inference and graph optimization) first: our pieces are
    quantized as exported on purpose, since the plan's encodings name their tensors, so the
    advice is 120 lines of noise on a SmolLM2 build. Everything else it logs still shows."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def quantize_piece(
    float_model: Path,
    dest: Path,
    *,
    plan: QdqPlan,
    weights: Mapping[str, torch.Tensor],
    calibration: Iterable[Mapping[str, np.ndarray]],
    levels: WeightLevels | None = None,
) -> dict[str, LinearSite]:
    """Write the QDQ model of ``float_model`` to ``dest`` (see the module docstring).

    Every encoding and width comes from ``plan`` (:class:`QdqPlan`, as read back from
    ``quant_plan.json``); ``weights`` maps each linear of the piece to its float
    ``[out, in]`` weight (as the adapter holds it; it locates the linear in the graph);
    ``levels`` to the integer weights to ship (e.g. GPTQ's,
    :mod:`common.backends.sequential_gptq`) — by default rounded to nearest at the plan's
    width (:func:`nearest_levels`).

    Written through :func:`onnx_destination`. onnxruntime reads ``float_model`` by path,
    so a large piece's tensors (in :func:`data_file` ``(float_model)``) are never one proto,
    which protobuf cannot serialize past 2 GiB; its QDQ model is written with external data
    too, and the weights and scores are replaced without loading the rest.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    model = onnx.load(str(float_model), load_external_data=False)
    sites = linear_sites(model, weights, float_model.parent)
    floats = plan.float_linears() & set(sites)
    calibrated = int_bits(plan.scheme.activations)
    config = get_qnn_qdq_config(
        str(float_model),
        _Feeds(list(calibration)),
        activation_type=QuantType.QUInt16 if calibrated == 16 else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        weight_symmetric=True,
        init_overrides=overrides_for(model, sites, plan),
        nodes_to_exclude=float_nodes(model)
        + [site.matmul for name, site in sites.items() if name in floats]
        + float_input_nodes(model, sites, floats),
    )
    # onnxruntime's own rule for a model with external data, stated because _save_edited
    # relies on it: a large piece's QDQ model comes with data_file(written).
    config.use_external_data_format = data_file(float_model).is_file()
    with onnx_destination(dest) as written, _without_preprocess_advice():
        quantize(str(float_model), str(written), config)  # large: data_file(written) too
        qdq = onnx.load(str(written), load_external_data=False)
        quantized = {n: site for n, site in sites.items() if n not in floats}
        bits = {n: plan.linears[n].weight.bits for n in quantized}
        chosen = levels
        if chosen is None:
            chosen = {
                n: nearest_levels({n: weights[n]}, plan.linears[n].weight)[n] for n in quantized
            }
        replace_weights(qdq, quantized, chosen, bits)
        tighten_masked_scores(qdq, model)
        signed_matmul_operands(qdq)
        _save_edited(qdq, written)
    return sites


#: Output rows of the narrow copy of a piece that :func:`quantize_narrow` quantizes.
NARROW_ROWS = 16


def narrowable(plan: QdqPlan, names: Iterable[str]) -> bool:
    """Whether :func:`quantize_narrow` can build the piece of these linears: each is
    quantized, so both its encodings are the plan's and its weights are replaced."""
    return all(not plan.linears[name].is_float for name in names)


def quantize_narrow(
    narrow_model: Path,
    dest: Path,
    *,
    plan: QdqPlan,
    weights: Mapping[str, torch.Tensor],
    calibration: Iterable[Mapping[str, np.ndarray]],
    levels: WeightLevels,
    work_dir: Path,
) -> dict[str, LinearSite]:
    """Write the QDQ model of a piece whose linears each write a graph output (the LM head)
    from ``narrow_model``, the same piece exported with each linear's first
    :data:`NARROW_ROWS` output rows only (:func:`common.export.piece_export.export_narrow_head`):
    the narrow piece is quantized (:func:`static_float_model`, :func:`quantize_piece`),
    then each linear gets its whole ``levels`` and its output its whole width.

    Why: onnxruntime's ``quantize`` holds about 5x a piece's float weights (6.6 GiB for
    Qwen1.5-1.8B's 1.24 GB LM head: the 8 GiB build's peak) to round weights that
    :func:`replace_weights` discards anyway. With each linear quantized
    (:func:`narrowable`), both its encodings are fixed by the plan and its output is the
    graph's, so nothing onnxruntime decides depends on the rows left out: the bytes equal
    :func:`quantize_piece` on the whole piece (tested). ``weights`` are the whole float
    ``[out, in]`` weights; scratch files go to ``work_dir``."""
    import onnx

    if not narrowable(plan, weights):
        raise EdgeforgeError(
            f"{plan.name}: a linear of {', '.join(weights)} is float in the plan; only a "
            "quantized linear's QDQ can be built from a narrow copy"
        )
    rows = NARROW_ROWS
    static = static_float_model(narrow_model, work_dir / f"{narrow_model.stem}.narrow.static.onnx")
    narrow_qdq = work_dir / f"{narrow_model.stem}.narrow.qdq.onnx"
    sites = quantize_piece(
        static,
        narrow_qdq,
        plan=plan,
        weights={name: w[:rows] for name, w in weights.items()},
        calibration=calibration,
        levels={name: (levels[name][0][:rows], levels[name][1][:rows]) for name in weights},
    )
    model = onnx.load(str(narrow_qdq))
    outputs = {out.name: out for out in model.graph.output}
    inits = {init.name: init for init in model.graph.initializer}
    for name, site in sites.items():
        if site.output not in outputs:  # its Q/DQ pair keeps the graph output's name
            raise EdgeforgeError(f"{name}: its output is not a graph output of {narrow_model}")
        width = weights[name].shape[0]
        outputs[site.output].type.tensor_type.shape.dim[-1].dim_value = width
        inits[_weight_dq(model, site).input[0]].dims[-1] = width  # as replace_weights checks
    bits = {name: plan.linears[name].weight.bits for name in sites}
    replace_weights(model, sites, levels, bits)
    with onnx_destination(dest) as written:
        onnx.save_model(
            model,
            str(written),
            save_as_external_data=model.ByteSize() > onnx_files.EXTERNAL_DATA_BYTES,
            location=data_file(written).name,
            size_threshold=INLINE_TENSOR_BYTES,
        )
    return sites

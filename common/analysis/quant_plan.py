"""The quant plan: every quantization decision for one model, as one JSON document.

Exporters and the simulator read only this file, so what was measured is what ships: per
linear, the weight dtype and granularity, the bias handling, and for its input and output
the dtype (int8, int16 or float32), the static range and scale, whether values beyond the
range saturate (``clip``) or are recomputed in float by the shadow op (``shadow``); plus
the model transforms it assumes (residual rotation, online Hadamard on down_proj inputs)
and the shadow layers (decoder layers whose down_proj input is a shadow tensor, which the
mllm runtime hard-coded in C++).

A plan is a pure function of the profile (statistics of the model *as transformed*) and
:class:`PlanOptions`. It describes the mllm ``.mllm`` artifact (``make qnn`` writes it as
``model.int8.plan.json``); an artifact built differently gets its own plan, named by a
:mod:`common.quant.schemes` scheme — the QNN context binaries' is
:class:`common.backends.qdq.QdqPlan`, made from this one, the profile and the preset.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from common.core.errors import EdgeforgeError
from common.quant.int8 import WEIGHT_GRANULARITIES, keeps_range, qmax

PLAN_FORMAT = "edgeforge-quant-plan-v1"
_DTYPES = {8: "int8", 16: "int16", None: "float32"}
_BITS = {v: k for k, v in _DTYPES.items()}
#: ``….layers.N.`` (transformers' decoders) or ``transformer.h.N.`` (Qwen1's GPT-2 paths).
_LAYER_INDEX = re.compile(r"\.(?:layers|h)\.(\d+)\.")


@dataclass(frozen=True)
class PlanOptions:
    """How to turn a profile into a plan (the knobs of ``make simulate``).

    ``act_bits``/``output_bits``/``weight_bits`` of None mean float32; ``qkv_input_bits`` /
    ``qkv_output_bits`` override the width of q/k/v inputs / (quantized) outputs, as the
    mllm NPU runtime runs those in int16. ``threshold`` (T)
    applies mllm's no-clip rule to the inputs of ``shadow_roles``; None means ``clip_all``.
    ``input_bits`` overrides the activation width of named linears' inputs (mixed precision,
    e.g. 16-bit down_proj inputs); ``float_inputs`` keeps named inputs in float.
    """

    weight_bits: int | None = 8
    weight_granularity: str = "per_channel"
    act_bits: int | None = 8
    qkv_input_bits: int | None = None
    output_bits: int | None = None
    qkv_output_bits: int | None = None
    threshold: float | None = None
    shadow_roles: tuple[str, ...] = ("down",)
    input_bits: dict[str, int] = field(default_factory=dict)
    float_inputs: tuple[str, ...] = ()
    quant_bias: bool = False
    quantize_lm_head: bool = False

    def check(self) -> None:
        for what, bits in (
            ("weight_bits", self.weight_bits),
            ("act_bits", self.act_bits),
            ("qkv_input_bits", self.qkv_input_bits),
            ("output_bits", self.output_bits),
            ("qkv_output_bits", self.qkv_output_bits),
            *((f"input_bits[{k}]", v) for k, v in self.input_bits.items()),
        ):
            if bits not in (None, 8, 16):
                raise EdgeforgeError(f"{what}: expected 8, 16 or none (float), got {bits!r}")
        if self.weight_bits not in (None, 8):
            raise EdgeforgeError(
                f"weight_bits: only int8 weights are planned, got {self.weight_bits}"
            )
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            raise EdgeforgeError(
                f"weight_granularity: {self.weight_granularity!r} is not one of "
                f"{', '.join(WEIGHT_GRANULARITIES)}"
            )
        if self.threshold is not None and not self.threshold > 0:
            raise EdgeforgeError(f"T (t01m_clip_threshold): must be > 0, got {self.threshold!r}")


def _tensor_entry(stats: dict[str, Any], bits: int | None, *, clip: bool) -> dict[str, Any]:
    """One activation's plan: a clipped tensor covers abs-max, a shadow one abs-p99.9."""
    if bits is None:
        return {"dtype": "float32"}
    value_range = stats["absmax"] if clip else stats["abs_p999"]
    value_range = max(value_range, 1e-5)
    return {
        "dtype": _DTYPES[bits],
        "range": value_range,
        "scale": value_range / qmax(bits),
        "clip": clip,
        "shadow": not clip,
    }


def layer_index(name: str) -> int | None:
    """Decoder layer index in a linear's dotted name (None for lm_head and vision)."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match and ".visual." not in name else None


def build_plan(
    profile: dict[str, Any],
    options: PlanOptions,
    *,
    name: str,
    transforms: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The plan for every linear in ``profile`` (see the module docstring)."""
    options.check()
    stats = profile["edgeforge"]["stats"]
    unknown = sorted(n for n in {*options.input_bits, *options.float_inputs} if n not in stats)
    if unknown:
        raise EdgeforgeError(f"plan options name linears not in the profile: {', '.join(unknown)}")
    tensors: dict[str, Any] = {}
    shadow_layers: set[int] = set()
    for linear, st in stats.items():
        role = st["role"]
        if role == "lm_head" and not options.quantize_lm_head:
            tensors[linear] = {
                "role": role,
                "weight": {"dtype": "float32"},
                "bias": None,
                "input": {"dtype": "float32"},
                "output": {"dtype": "float32"},
            }
            continue
        qkv = role in ("q", "k", "v")
        in_bits = options.qkv_input_bits if qkv and options.qkv_input_bits else options.act_bits
        out_bits = (
            options.qkv_output_bits if qkv and options.qkv_output_bits else options.output_bits
        )
        in_bits = options.input_bits.get(linear, in_bits)
        if linear in options.float_inputs:
            in_bits = None
        candidate = options.threshold is not None and role in options.shadow_roles
        clip_in = not candidate or keeps_range(
            st["input"]["absmax"], st["input"]["abs_p999"], options.threshold
        )
        clip_out = not candidate or keeps_range(
            st["output"]["absmax"], st["output"]["abs_p999"], options.threshold
        )
        entry = {
            "role": role,
            "weight": (
                {"dtype": "int8", "granularity": options.weight_granularity}
                if options.weight_bits
                else {"dtype": "float32"}
            ),
            "bias": ("int32" if options.quant_bias else "float32") if st.get("has_bias") else None,
            "input": _tensor_entry(st["input"], in_bits, clip=clip_in),
            "output": _tensor_entry(st["output"], out_bits, clip=clip_out),
        }
        if entry["input"].get("shadow") or entry["output"].get("shadow"):
            index = layer_index(linear)
            if index is not None:
                shadow_layers.add(index)
        tensors[linear] = entry
    return {
        "format": PLAN_FORMAT,
        "name": name,
        "options": {
            **asdict(options),
            "shadow_roles": list(options.shadow_roles),
            "float_inputs": list(options.float_inputs),
        },
        "transforms": transforms or {},
        "tensors": tensors,
        "shadow_layers": sorted(shadow_layers),
        "summary": summarize(tensors),
    }


def npu_precision_map(profile: dict[str, Any], threshold: float) -> PlanOptions:
    """The mllm NPU runtime's precision map (v1 ``modeling_qwen_npu_v2.hpp``) as options:
    q/k/v inputs and outputs int16; o/gate/up int8; every linear output quantized (int8);
    down_proj inputs int16, except in the shadow layers that T selects, where they are
    int8 with the float shadow correction. The shadow set depends only on the statistics
    and T, so it is read from a first plan and the other down_proj inputs are widened.
    """
    base = PlanOptions(qkv_input_bits=16, qkv_output_bits=16, output_bits=8, threshold=threshold)
    shadow = set(build_plan(profile, base, name="probe")["summary"]["no_clip_input_name"])
    wide = {
        name: 16
        for name, st in profile["edgeforge"]["stats"].items()
        if st["role"] == "down" and name not in shadow
    }
    return replace(base, input_bits=wide)


def summarize(tensors: dict[str, Any]) -> dict[str, Any]:
    """Counts per input dtype, and the shadow / float inputs by name (the seed's summary)."""
    dtypes: dict[str, int] = {}
    for entry in tensors.values():
        dtypes[entry["input"]["dtype"]] = dtypes.get(entry["input"]["dtype"], 0) + 1
    return {
        "input_dtypes": dict(sorted(dtypes.items())),
        "no_clip_input_name": [n for n, e in tensors.items() if e["input"].get("shadow")],
        "no_clip_output_name": [n for n, e in tensors.items() if e["output"].get("shadow")],
        "float_input_name": [
            n
            for n, e in tensors.items()
            if e["input"]["dtype"] == "float32" and e["role"] != "lm_head"
        ],
    }


def bits_of(entry: dict[str, Any]) -> int | None:
    """Integer width of a planned tensor (None = float)."""
    return _BITS[entry["dtype"]]


def load_plan(path: Path) -> dict[str, Any]:
    """Read a plan, checking its format marker (exporters call this)."""
    try:
        plan = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EdgeforgeError(f"{path}: quant plan not found; run make simulate first") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeforgeError(f"{path}: not a quant plan JSON ({exc})") from None
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise EdgeforgeError(f"{path}: not an edgeforge quant plan (format != {PLAN_FORMAT!r})")
    return plan

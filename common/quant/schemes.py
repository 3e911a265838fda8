"""Named precision schemes: the one quantization vocabulary every target speaks.

A :class:`QuantScheme` says how a model's linears are stored and computed: the weights
(:class:`Weights`: integer width, granularity, symmetry, how the levels are rounded — or a
float dtype), the activations between them (an integer width, symmetric and static per
tensor, or a float dtype), and the roles that differ (attention scores, down_proj's input
and output, the SwiGLU interior, the LM head). It is the shape of compressed-tensors'
``QuantizationScheme`` and of auto-round's presets: one type, and the names people type are
entries of :data:`SCHEMES` — QNN's ``PRESET=w8a16|w8a8|w4a16``, SOPHGO's
``MODE=bf16|f16|w8bf16|w4bf16`` and AutoRound's default ``w4g32``. A backend states which
entries it can build and refuses the widths it has no type for; a build that overrides a
knob (``ROUNDING=``, ``Q_GROUP_SIZE=``) derives a new scheme with
:meth:`QuantScheme.with_weights`, so the plan written beside the artifact names what was
really built.

Dtypes are spelled as in the quant plans: ``int2``..``int16``, ``bfloat16``, ``float16``,
``float32``. Pure data: no torch, nothing above :mod:`common.core`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from common.core.errors import EdgeforgeError

#: Format marker of the plans written beside artifacts (QNN binaries, bmodels): per linear
#: ``{"role", "weight", "input", "output"}``, the scheme they came from, the artifact named.
PLAN_FORMAT = "edgeforge-artifact-plan-v1"
FLOAT_DTYPES = ("bfloat16", "float16", "float32")
#: Integer weight widths some backend stores (2/3 bits: AutoRound's GPTQ/AutoRound layouts).
WEIGHT_DTYPES = ("int2", "int3", "int4", "int8", *FLOAT_DTYPES)
#: Activation widths: integer ones are static, per tensor and symmetric.
ACTIVATION_DTYPES = ("int8", "int16", *FLOAT_DTYPES)
#: ``per_channel``: one scale per output row; ``per_tensor``: one for the weight; ``group``:
#: one per ``group_size`` consecutive input columns of a row.
GRANULARITIES = ("per_channel", "per_tensor", "group")
#: How integer levels are chosen on the grid: to nearest, by GPTQ (error feedback over
#: calibration inputs), or by AutoRound's signed-gradient rounding.
ROUNDINGS = ("nearest", "gptq", "autoround")
#: How a weight scale is chosen: over its row's/group's abs-max, or (``mse``) the clip of
#: that abs-max with the least squared rounding error (:func:`common.quant.int8.weight_scale`).
SCALE_RULES = ("absmax", "mse")
#: Roles whose activation width a scheme may set apart from the others.
ROLE_OVERRIDES = ("scores", "down", "swiglu", "lm_head")
#: The linear sides a role override covers though the linear's own role differs: gate_proj
#: and up_proj *read* the MLP's input at the linear width, and their outputs are SwiGLU's.
SIDE_ROLES = {("gate", "output"): "swiglu", ("up", "output"): "swiglu"}


def int_bits(dtype: str) -> int | None:
    """Width of an integer dtype (``int8`` → 8); None for a float dtype."""
    return None if dtype in FLOAT_DTYPES else int(dtype.removeprefix("int"))


@dataclass(frozen=True)
class Weights:
    """How a linear's weight is stored: an integer grid, or a float dtype (``dtype`` is one
    of :data:`FLOAT_DTYPES`, and the grid fields keep their defaults)."""

    dtype: str
    granularity: str = "per_channel"
    #: Input columns per scale when ``granularity`` is ``group``; None otherwise.
    group_size: int | None = None
    #: Zero point 0; otherwise each scale has its own zero point (tpu-mlir's W4/W8 default).
    symmetric: bool = True
    rounding: str = "nearest"
    #: How each scale is chosen (:data:`SCALE_RULES`).
    scales: str = "absmax"

    def __post_init__(self) -> None:
        if self.dtype not in WEIGHT_DTYPES:
            raise EdgeforgeError(
                f"weights: dtype {self.dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}"
            )
        if self.bits is None:
            grid = (self.granularity, self.group_size, self.symmetric, self.rounding, self.scales)
            if grid != ("per_channel", None, True, "nearest", "absmax"):
                raise EdgeforgeError(
                    f"weights: {self.dtype} weights are not quantized; granularity, group "
                    "size, symmetry, rounding and scales describe integer grids only"
                )
            return
        if self.scales not in SCALE_RULES:
            raise EdgeforgeError(
                f"weights: scales {self.scales!r} is not one of {', '.join(SCALE_RULES)}"
            )
        if self.scales != "absmax" and (self.granularity == "per_tensor" or not self.symmetric):
            raise EdgeforgeError(
                f"weights: scales {self.scales} is a rule for symmetric per-row or per-group "
                f"grids, not {self.granularity}, symmetric {self.symmetric}"
            )
        if self.granularity not in GRANULARITIES:
            raise EdgeforgeError(
                f"weights: granularity {self.granularity!r} is not one of "
                f"{', '.join(GRANULARITIES)}"
            )
        grouped = self.granularity == "group"
        if grouped != (isinstance(self.group_size, int) and self.group_size > 0):
            raise EdgeforgeError(
                f"weights: granularity {self.granularity} with group_size {self.group_size!r} "
                "(a positive group size goes with granularity 'group', and only there)"
            )
        if self.rounding not in ROUNDINGS:
            raise EdgeforgeError(
                f"weights: rounding {self.rounding!r} is not one of {', '.join(ROUNDINGS)}"
            )

    @property
    def bits(self) -> int | None:
        """Integer width, or None for float weights."""
        return int_bits(self.dtype)

    def to_json(self) -> dict[str, Any]:
        """The plan-file form: ``{"dtype"}`` for float weights, every grid field otherwise."""
        if self.bits is None:
            return {"dtype": self.dtype}
        return {
            "dtype": self.dtype,
            "granularity": self.granularity,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "rounding": self.rounding,
            # Stated where it is not the abs-max every backend's grids had before it.
            **({"scales": self.scales} if self.scales != "absmax" else {}),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Weights:
        return cls(**doc)


@dataclass(frozen=True)
class QuantScheme:
    """A named precision plan: weights, the activations between linears, and the roles
    that differ (None: as the other activations)."""

    name: str
    weights: Weights
    activations: str
    #: Attention scores and probabilities (next to a −1e4 mask, 8 bits lose them).
    scores: str | None = None
    #: down_proj's input and output (the input holds the MLP's attention-sink outliers).
    down: str | None = None
    #: The SwiGLU interior: gate_proj's and up_proj's outputs and what is computed from them
    #: elementwise (the gate's Sigmoid, SiLU's product) up to down_proj's input.
    swiglu: str | None = None
    #: A float dtype the LM head's weight and activations keep; None: quantized like the
    #: other linears.
    lm_head: str | None = None
    #: The backends that build this scheme (``qnn``, ``sophgo``, ``autoround``): their
    #: ``PRESET=``/``MODE=`` choices are the entries naming them. Registry data, not part of
    #: what an artifact holds: plans leave it out and equality ignores it.
    backends: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    def __post_init__(self) -> None:
        for field in ("activations", *ROLE_OVERRIDES):
            dtype = getattr(self, field)
            if dtype is None and field != "activations":
                continue
            if dtype not in ACTIVATION_DTYPES:
                raise EdgeforgeError(
                    f"scheme {self.name}: {field} {dtype!r} is not one of "
                    f"{', '.join(ACTIVATION_DTYPES)}"
                )
        if self.lm_head is not None and self.lm_head not in FLOAT_DTYPES:
            raise EdgeforgeError(
                f"scheme {self.name}: lm_head {self.lm_head!r}: a role override of the LM head "
                f"keeps it float ({', '.join(FLOAT_DTYPES)})"
            )

    def activation(self, role: str, side: str = "input") -> str:
        """The activation dtype on the ``side`` (``input`` or ``output``) of a linear of
        ``role``, or of a role override's tensors (``scores``, ``swiglu``): the override
        covering it (:data:`SIDE_ROLES`, else its role's), else :attr:`activations`."""
        role = SIDE_ROLES.get((role, side), role)
        override = getattr(self, role) if role in ROLE_OVERRIDES else None
        return override or self.activations

    def weight(self, role: str) -> Weights:
        """How a linear of ``role`` stores its weight (a float LM head keeps its dtype)."""
        if role == "lm_head" and self.lm_head is not None:
            return Weights(self.lm_head)
        return self.weights

    def with_weights(self, **changes: Any) -> QuantScheme:
        """This scheme with some weight fields changed (a build's ``ROUNDING=`` or
        ``Q_GROUP_SIZE=``): the plan then names what was built, not the registry entry."""
        return replace(self, weights=replace(self.weights, **changes))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights": self.weights.to_json(),
            "activations": self.activations,
            **{role: getattr(self, role) for role in ROLE_OVERRIDES},
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> QuantScheme:
        return cls(**{**doc, "weights": Weights.from_json(doc["weights"])})


#: Every named scheme. QNN's rounding default is GPTQ (``ROUNDING=nearest`` replaces it);
#: tpu-mlir's weight-only modes quantize per group (``--q_group_size``, its default 64,
#: which it applies to W8 as well as W4) with a zero point per group (no ``--q_symmetric``),
#: rounded to nearest, and keep the LM head in the half type.
QNN, SOPHGO = ("qnn",), ("sophgo",)
SCHEMES: dict[str, QuantScheme] = {
    scheme.name: scheme
    for scheme in (
        # QNN HTP: symmetric int weights, static symmetric activations.
        QuantScheme("w8a16", Weights("int8", rounding="gptq"), "int16", backends=QNN),
        # 8-bit activations except where 8 bits measurably fail (common.backends.qdq).
        QuantScheme(
            "w8a8",
            Weights("int8", rounding="gptq"),
            "int8",
            scores="int16",
            down="int16",
            swiglu="int16",
            backends=QNN,
        ),
        # Block-quantized int4: a scale per 32 input columns (QNN EP: blocked DQ on HTP),
        # each the clip of its group's abs-max with the least rounding error.
        QuantScheme(
            "w4a16",
            Weights("int4", granularity="group", group_size=32, rounding="gptq", scales="mse"),
            "int16",
            backends=QNN,
        ),
        # SOPHGO tpu-mlir (model_deploy --quantize BF16 / F16 / W8BF16 / W4BF16).
        QuantScheme("bf16", Weights("bfloat16"), "bfloat16", backends=SOPHGO),
        QuantScheme("f16", Weights("float16"), "float16", backends=SOPHGO),
        QuantScheme(
            "w8bf16",
            Weights("int8", granularity="group", group_size=64, symmetric=False),
            "bfloat16",
            lm_head="bfloat16",
            backends=SOPHGO,
        ),
        QuantScheme(
            "w4bf16",
            Weights("int4", granularity="group", group_size=64, symmetric=False),
            "bfloat16",
            lm_head="bfloat16",
            backends=SOPHGO,
        ),
        # AutoRound's default: int4 groups of 32, symmetric, signed-gradient rounding; the
        # checkpoint is dequantized at run time (verified in float32), LM head untouched.
        QuantScheme(
            "w4g32",
            Weights("int4", granularity="group", group_size=32, rounding="autoround"),
            "float32",
            lm_head="float32",
            backends=("autoround",),
        ),
    )
}


def schemes_for(backend: str) -> tuple[str, ...]:
    """The names of the schemes ``backend`` builds, in registry order."""
    return tuple(name for name, scheme in SCHEMES.items() if backend in scheme.backends)


def scheme_by_name(name: str, among: Iterable[str], what: str) -> QuantScheme:
    """The scheme ``name`` if it is one of ``among`` (the entries a backend builds), or an
    error naming ``what`` the user set and the choices."""
    choices = tuple(among)
    if name not in choices:
        raise EdgeforgeError(f"{what} {name!r} is unknown; known: {', '.join(choices)}")
    return SCHEMES[name]


def float_activation_plan(
    scheme: QuantScheme,
    linears: Iterable[tuple[str, str]],
    *,
    name: str,
    artifact: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The plan of an artifact whose activations stay float (weight-only or float schemes):
    per linear ``(name, role)``, its weight and its input/output dtype. No profile is
    involved: with float activations the scheme alone decides every tensor. A scheme with
    integer activations needs their ranges, i.e. its backend's own plan, and is refused."""
    widths = (scheme.activations, *(getattr(scheme, role) for role in ROLE_OVERRIDES))
    if any(d is not None and int_bits(d) for d in widths):
        raise EdgeforgeError(
            f"scheme {scheme.name}: integer activations need ranges from a profile; "
            "this plan covers float activations only"
        )
    tensors = {}
    for linear, role in linears:
        tensors[linear] = {
            "role": role,
            "weight": scheme.weight(role).to_json(),
            **{side: {"dtype": scheme.activation(role, side)} for side in ("input", "output")},
        }
    return {
        "format": PLAN_FORMAT,
        "name": name,
        "artifact": artifact,
        "scheme": scheme.to_json(),
        **(extra or {}),
        "tensors": tensors,
    }

"""The one scheme type (common/quant/schemes.py): registry, validation, JSON form."""

from __future__ import annotations

import json

import pytest

from common.core.errors import EdgeforgeError
from common.quant.schemes import (
    PLAN_FORMAT,
    SCHEMES,
    QuantScheme,
    Weights,
    float_activation_plan,
    int_bits,
    scheme_by_name,
)


def test_every_registered_scheme_roundtrips_through_json() -> None:
    for name, scheme in SCHEMES.items():
        assert scheme.name == name
        doc = json.loads(json.dumps(scheme.to_json()))
        assert QuantScheme.from_json(doc) == scheme, name


def test_targets_names_resolve_to_what_each_means() -> None:
    w8a8 = SCHEMES["w8a8"]
    assert w8a8.activation("q") == "int8"
    assert w8a8.activation("scores") == w8a8.activation("down") == "int16"
    # gate/up read the MLP input at 8 bits; their outputs are the 16-bit SwiGLU interior
    assert w8a8.activation("gate") == w8a8.activation("up", "input") == "int8"
    assert w8a8.activation("gate", "output") == w8a8.activation("swiglu") == "int16"
    assert w8a8.activation("q", "output") == "int8"
    assert w8a8.weight("lm_head") == Weights("int8", rounding="gptq")  # QNN quantizes it
    w4bf16 = SCHEMES["w4bf16"]
    assert w4bf16.weights == Weights("int4", "group", 64, symmetric=False)
    assert w4bf16.weight("lm_head") == Weights("bfloat16")
    assert w4bf16.activation("lm_head") == "bfloat16"
    autoround = SCHEMES["w4g32"]  # AutoRound's default: W4, groups of 32, symmetric
    assert autoround.weights == Weights("int4", "group", 32, True, "autoround")
    assert int_bits(autoround.activations) is None and int_bits("int16") == 16
    assert SCHEMES["w8a16"].with_weights(rounding="nearest").weights.rounding == "nearest"
    assert SCHEMES["w8a16"].weights.rounding == "gptq"  # frozen: the registry is unchanged
    # w4a16 chooses each group's step by least rounding error; a plan states it, and only
    # where it is not the abs-max grid every other scheme has.
    assert SCHEMES["w4a16"].weights.to_json()["scales"] == "mse"
    assert "scales" not in SCHEMES["w8a16"].weights.to_json()


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: Weights("int6"), "dtype 'int6'"),
        (lambda: Weights("int4", "group"), "group_size None"),
        (lambda: Weights("int4", group_size=32), "granularity per_channel with group_size 32"),
        (lambda: Weights("int8", rounding="stochastic"), "rounding 'stochastic'"),
        (lambda: Weights("bfloat16", rounding="gptq"), "bfloat16 weights are not quantized"),
        (lambda: Weights("bfloat16", scales="mse"), "bfloat16 weights are not quantized"),
        (lambda: Weights("int4", scales="minmax"), "scales 'minmax' is not one of"),
        (lambda: Weights("int8", "per_tensor", scales="mse"), "not per_tensor, symmetric True"),
        (lambda: Weights("int4", "group", 64, False, scales="mse"), "group, symmetric False"),
        (lambda: QuantScheme("x", Weights("int8"), "int12"), "activations 'int12'"),
        (lambda: QuantScheme("x", Weights("int8"), "int8", lm_head="int8"), "keeps it float"),
    ],
)
def test_invalid_schemes_are_refused(build, fragment: str) -> None:
    with pytest.raises(EdgeforgeError, match=fragment):
        build()


def test_lookup_names_the_choices() -> None:
    assert scheme_by_name("w8bf16", ("bf16", "w8bf16"), "MODE") is SCHEMES["w8bf16"]
    with pytest.raises(EdgeforgeError, match="MODE 'w8a16' is unknown; known: bf16, w8bf16"):
        scheme_by_name("w8a16", ("bf16", "w8bf16"), "MODE")


def test_float_activation_plan_states_each_linear() -> None:
    linears = [("layers.0.q", "q"), ("head", "lm_head")]
    plan = float_activation_plan(SCHEMES["w4g32"], linears, name="n", artifact="a")
    assert plan["format"] == PLAN_FORMAT and plan["scheme"] == SCHEMES["w4g32"].to_json()
    assert plan["tensors"]["layers.0.q"] == {
        "role": "q",
        "weight": SCHEMES["w4g32"].weights.to_json(),
        "input": {"dtype": "float32"},
        "output": {"dtype": "float32"},
    }
    assert plan["tensors"]["head"]["weight"] == {"dtype": "float32"}
    with pytest.raises(EdgeforgeError, match="integer activations need ranges"):
        float_activation_plan(SCHEMES["w8a16"], linears, name="n", artifact="a")

"""Quant plans from a profile: ranges, clip/shadow decisions, mixed precision, bad options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.analysis.profiling import profile_document
from common.analysis.quant_plan import (
    PLAN_FORMAT,
    PlanOptions,
    build_plan,
    layer_index,
    load_plan,
    npu_precision_map,
)
from common.analysis.threshold_sweep import (
    candidate_plans,
    check_thresholds,
    run_sweep,
    shadow_decision,
)
from common.core.errors import EdgeforgeError


def _side(absmax: float, p999: float) -> dict[str, float]:
    return {
        "max": absmax,
        "p999": p999,
        "absmax": absmax,
        "abs_p999": p999,
        "mean": 0.0,
        "std": 1.0,
    }


def _profile() -> dict:
    stats = {}
    for layer, down_ratio in ((0, 3.0), (1, 3000.0)):
        for role, proj in (("q", "self_attn.q_proj"), ("down", "mlp.down_proj")):
            ratio = down_ratio if role == "down" else 2.0
            stats[f"model.layers.{layer}.{proj}"] = {
                "role": role,
                "has_bias": role == "q",
                "input": _side(ratio, 1.0),
                "output": _side(4.0, 2.0),
            }
    stats["lm_head"] = {
        "role": "lm_head",
        "has_bias": False,
        "input": _side(5.0, 1.0),
        "output": _side(20.0, 9.0),
    }
    return profile_document(stats, {"model": "fake"})


def test_clip_all_uses_abs_max_and_int8() -> None:
    plan = build_plan(_profile(), PlanOptions(), name="w8a8")
    entry = plan["tensors"]["model.layers.1.mlp.down_proj"]["input"]
    assert entry == {
        "dtype": "int8",
        "range": 3000.0,
        "scale": 3000.0 / 127,
        "clip": True,
        "shadow": False,
    }
    assert plan["tensors"]["lm_head"]["input"]["dtype"] == "float32"
    assert plan["tensors"]["model.layers.0.self_attn.q_proj"]["bias"] == "float32"
    assert plan["tensors"]["model.layers.0.mlp.down_proj"]["bias"] is None
    assert plan["format"] == PLAN_FORMAT and plan["shadow_layers"] == []


def test_threshold_marks_outlier_down_inputs_as_shadow() -> None:
    plan = build_plan(_profile(), PlanOptions(threshold=64), name="t64")
    shadow = plan["tensors"]["model.layers.1.mlp.down_proj"]["input"]
    assert shadow["shadow"] and not shadow["clip"] and shadow["range"] == 1.0
    assert plan["tensors"]["model.layers.0.mlp.down_proj"]["input"]["clip"]
    assert plan["tensors"]["model.layers.1.self_attn.q_proj"]["input"]["clip"]  # not a shadow role
    assert plan["shadow_layers"] == [1]
    assert plan["summary"]["no_clip_input_name"] == ["model.layers.1.mlp.down_proj"]
    every = build_plan(_profile(), PlanOptions(threshold=1), name="t1")
    assert every["shadow_layers"] == [0, 1]


def test_mixed_precision_and_float_inputs() -> None:
    opts = PlanOptions(
        qkv_input_bits=16,
        input_bits={"model.layers.1.mlp.down_proj": 16},
        float_inputs=("model.layers.0.mlp.down_proj",),
        output_bits=8,
    )
    plan = build_plan(_profile(), opts, name="mixed")
    t = plan["tensors"]
    assert t["model.layers.0.self_attn.q_proj"]["input"]["dtype"] == "int16"
    assert t["model.layers.1.mlp.down_proj"]["input"]["scale"] == 3000.0 / 32767
    assert t["model.layers.0.mlp.down_proj"]["input"] == {"dtype": "float32"}
    assert t["model.layers.0.mlp.down_proj"]["output"]["dtype"] == "int8"


def test_npu_precision_map_widens_all_but_the_shadow_down_inputs() -> None:
    profile = _profile()
    plan = build_plan(profile, npu_precision_map(profile, 64.0), name="npu")
    t = plan["tensors"]
    q = t["model.layers.0.self_attn.q_proj"]
    assert q["input"]["dtype"] == q["output"]["dtype"] == "int16"
    assert q["output"]["scale"] == 4.0 / 32767
    clipped, shadow = t["model.layers.0.mlp.down_proj"], t["model.layers.1.mlp.down_proj"]
    assert clipped["input"] == {
        "dtype": "int16",
        "range": 3.0,
        "scale": 3.0 / 32767,
        "clip": True,
        "shadow": False,
    }
    assert shadow["input"]["dtype"] == "int8" and shadow["input"]["shadow"]
    assert shadow["input"]["scale"] == 1.0 / 127  # the p99.9 range, outliers in float
    assert clipped["output"]["dtype"] == "int8"
    assert plan["shadow_layers"] == [1]
    assert t["lm_head"]["input"] == {"dtype": "float32"}


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (PlanOptions(threshold=0), "T"),
        (PlanOptions(threshold=-1.0), "T"),
        (PlanOptions(act_bits=4), "act_bits"),
        (PlanOptions(qkv_output_bits=4), "qkv_output_bits"),
        (PlanOptions(weight_granularity="per_row"), "weight_granularity"),
        (PlanOptions(input_bits={"nope": 16}), "nope"),
    ],
)
def test_bad_plan_options(options: PlanOptions, fragment: str) -> None:
    with pytest.raises(EdgeforgeError, match=fragment):
        build_plan(_profile(), options, name="bad")


def test_sweep_rule_prefers_fewest_special_inputs_within_tolerance() -> None:
    plans = candidate_plans(_profile(), PlanOptions(), [1, 64, 1e7], {})
    names = [p["name"] for p in plans]
    assert names == ["T=1", "T=64", "T=1e+07", "down_int16"]
    fake_ppl = {"T=1": 10.0, "T=64": 10.05, "T=1e+07": 30.0, "down_int16": 10.0}
    sweep = run_sweep(plans, lambda p: {"ppl": fake_ppl[p["name"]]})
    assert sweep["chosen"] == "T=64"  # 1 special input, within 1 % of the best (10.0)
    decision = shadow_decision(sweep, "fake")
    assert decision["shadow_layers"] == [1] and decision["t01m_clip_threshold"] == 64
    for bad in ([], [0], [-2.0]):
        with pytest.raises(EdgeforgeError, match="T"):
            check_thresholds(bad)


def test_layer_index_and_load_plan(tmp_path: Path) -> None:
    assert layer_index("model.layers.11.mlp.down_proj") == 11
    assert layer_index("lm_head") is None
    plan = build_plan(_profile(), PlanOptions(), name="x")
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert load_plan(tmp_path / "plan.json") == plan
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(EdgeforgeError, match="not an edgeforge quant plan"):
        load_plan(tmp_path / "other.json")
    with pytest.raises(EdgeforgeError, match="not found"):
        load_plan(tmp_path / "missing.json")

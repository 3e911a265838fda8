"""Threshold sweep: choose T and the shadow layers by measurement, not by hand.

mllm's ``eval_quantize_threshold`` printed an accuracy per T and left the choice (and the
C++ shadow-layer list) to a person. Here every candidate plan is scored and a stated rule
picks one: **the candidate with the fewest non-int8 down_proj inputs (shadow or 16-bit)
whose perplexity is within ``tolerance`` (1 %) of the best candidate's**; ties go to the
lower perplexity. The decision is written to ``shadow_layers.json``, which exporters read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from common.analysis.quant_plan import PlanOptions, build_plan
from common.core.errors import EdgeforgeError

#: mllm's sweep list (eval_quantize_threshold.py); 1e7 means "no shadow tensor".
DEFAULT_THRESHOLDS: tuple[float, ...] = (1, 2, 4, 8, 16, 24, 32, 64, 128, 152, 10_000_000)
DEFAULT_TOLERANCE = 0.01
RULE = (
    "fewest down_proj inputs not in plain int8 (shadow or 16-bit) among candidates whose "
    "perplexity is within {tol:.0%} of the best candidate's; ties: lower perplexity"
)


def check_thresholds(thresholds: Sequence[float]) -> list[float]:
    """Sorted unique T values; every T must be > 0."""
    if not thresholds:
        raise EdgeforgeError("thresholds (T list): empty; give at least one T > 0")
    for t in thresholds:
        if not isinstance(t, int | float) or not t > 0:
            raise EdgeforgeError(f"thresholds (T list): every T must be > 0, got {t!r}")
    return sorted(set(float(t) for t in thresholds))


def candidate_plans(
    profile: dict[str, Any],
    base: PlanOptions,
    thresholds: Sequence[float],
    transforms: dict[str, Any],
) -> list[dict[str, Any]]:
    """One plan per T (shadow down_proj inputs by mllm's rule), plus all down_proj inputs
    in int16 (the mixed-precision lever); plans with identical shadow sets are merged."""
    plans: list[dict[str, Any]] = []
    seen: set[tuple[str, ...]] = set()
    for t in check_thresholds(thresholds):
        plan = build_plan(
            profile, replace(base, threshold=t), name=f"T={t:g}", transforms=transforms
        )
        key = tuple(plan["summary"]["no_clip_input_name"])
        if key in seen:
            continue
        seen.add(key)
        plans.append(plan)
    downs = {n: 16 for n, st in profile["edgeforge"]["stats"].items() if st["role"] == "down"}
    plans.append(
        build_plan(
            profile,
            replace(base, threshold=None, input_bits=downs),
            name="down_int16",
            transforms=transforms,
        )
    )
    return plans


def special_inputs(plan: dict[str, Any]) -> int:
    """How many down_proj inputs are not plain int8 (shadow, 16-bit or float)."""
    return sum(
        1
        for e in plan["tensors"].values()
        if e["role"] == "down" and (e["input"]["dtype"] != "int8" or e["input"].get("shadow"))
    )


def run_sweep(
    plans: list[dict[str, Any]],
    score: Callable[[dict[str, Any]], dict[str, Any]],
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """Score every plan and choose one by :data:`RULE`; returns rows and the decision."""
    rows = []
    for plan in plans:
        metrics = score(plan)
        rows.append(
            {
                "name": plan["name"],
                "threshold": plan["options"]["threshold"],
                "special_down_inputs": special_inputs(plan),
                "shadow_layers": plan["shadow_layers"],
                "no_clip_input_name": plan["summary"]["no_clip_input_name"],
                **{k: v for k, v in metrics.items() if k != "argmax"},
            }
        )
    best = min(r["ppl"] for r in rows)
    eligible = [
        (r, p) for r, p in zip(rows, plans, strict=True) if r["ppl"] <= best * (1 + tolerance)
    ]
    chosen_row, chosen_plan = min(
        eligible, key=lambda rp: (rp[0]["special_down_inputs"], rp[0]["ppl"])
    )
    return {
        "rule": RULE.format(tol=tolerance),
        "rows": rows,
        "chosen": chosen_row["name"],
        "plan": chosen_plan,
    }


def shadow_decision(sweep: dict[str, Any], model: str) -> dict[str, Any]:
    """The ``shadow_layers.json`` document exporters read (never hard-coded lists)."""
    plan = sweep["plan"]
    return {
        "model": model,
        "rule": sweep["rule"],
        "chosen": sweep["chosen"],
        "t01m_clip_threshold": plan["options"]["threshold"],
        "shadow_layers": plan["shadow_layers"],
        "no_clip_input_name": plan["summary"]["no_clip_input_name"],
        "int16_input_name": [
            n for n, e in plan["tensors"].items() if e["input"]["dtype"] == "int16"
        ],
    }

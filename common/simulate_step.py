"""The ``make simulate`` step: W8A8 variants of one model, scored against FP32.

Each variant is a quant plan (:mod:`common.quant_plan`) built from a profile of the model
*as that variant transforms it*, simulated (:mod:`common.simulate`) and scored on the
held-out corpus. The threshold sweep (:mod:`common.threshold_sweep`) picks ``w8a8_best``
and writes ``shadow_layers.json``. Output: ``build/<MODEL>/simulate/`` with
``report.json`` (``ppl_ratio`` keyed by variant, details, the best plan), ``report.md``,
``plans/<variant>.json``, ``shadow_layers.json``, ``manifest.json``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from common.errors import CheckFailed, EdgeforgeError
from common.profile_step import ProfileSettings, calibration_windows
from common.quant_plan import PlanOptions, build_plan
from common.recipes import Recipe, model_build_dir
from common.records import atomic_path, build_manifest, write_bytes_atomic, write_json_atomic
from common.threshold_sweep import DEFAULT_THRESHOLDS, candidate_plans, run_sweep, shadow_decision

#: W8A16 must cost at most this ppl ratio (a failed gate exits 1 after the report).
W8A16_GATE = 1.01
DEFAULT_T = 64.0  # both mllm QNN configs


@dataclass(frozen=True)
class SimulateSettings:
    """Options of ``make simulate`` (T=, CLIP_ALL=, ROTATE=, …)."""

    calibration: ProfileSettings
    threshold: float = DEFAULT_T
    clip_all: bool = True
    rotate_mode: str = "hadamard"
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    eval_corpus: str = ""
    num_windows: int | None = None
    seq_len: int | None = None

    def check(self) -> None:
        self.calibration.check()
        if not self.threshold > 0:
            raise EdgeforgeError(f"T (t01m_clip_threshold): must be > 0, got {self.threshold!r}")


def _variants(settings: SimulateSettings) -> dict[str, tuple[dict[str, Any], PlanOptions | None]]:
    rot = {"rotation": {"mode": settings.rotate_mode, "seed": settings.calibration.seed}}
    rot_online = {**rot, "online_hadamard": True}
    base = PlanOptions(threshold=None if settings.clip_all else settings.threshold)
    return {
        "fp32": ({}, None),
        "w8a16": ({}, PlanOptions(act_bits=16)),
        "w8a8_clip_all": ({}, PlanOptions()),
        "w8a8_clip_all_int8_out": ({}, PlanOptions(output_bits=8)),
        "w8a8_shadow": ({}, PlanOptions(threshold=settings.threshold)),
        "w8a8_rotated_clip_all": (rot, base),
        "w8a8_rotated_online_down": (rot_online, base),
        "w8a8_rotated_online_down_int8_out": (rot_online, replace(base, output_bits=8)),
    }


def _profile(
    model_dir: Path, transforms: dict[str, Any], windows: Any, no_bias: bool
) -> dict[str, Any]:
    from common.profiling import profile_document, profile_model
    from common.simulate import transformed_model

    with transformed_model(model_dir, transforms) as (model, _):
        stats = profile_model(model, windows, no_bias=no_bias).results()
    return profile_document(
        stats, {"model": str(model_dir), "transforms": transforms, "tokens": windows.numel()}
    )


def render(report: dict[str, Any]) -> str:
    lines = [
        f"# W8A8 simulation: {report['model']}",
        "",
        f"Held-out: {report['eval']['num_windows']} × {report['eval']['seq_len']} tokens; "
        f"calibration: {report['calibration']['num_samples']}"
        f" × {report['calibration']['seq_len']}.",
        "",
        "| variant | ppl | × FP32 | top-1 vs FP32 | last-token acc |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, v in report["variants"].items():
        lines.append(
            f"| {name} | {v['ppl']:.4f} | {v['ppl_ratio']:.4f} | {v.get('top1_agreement', 1.0):.4f}"
            f" | {v['last_token_accuracy']:.4f} |"
        )
    sweep = report["sweep"]
    lines += [
        "",
        "## Threshold sweep (rotated + online down_proj Hadamard)",
        "",
        f"Rule: {sweep['rule']}.",
        f"Chosen: **{sweep['chosen']}**.",
        "",
        "| candidate | special down inputs | shadow layers | ppl | × FP32 |",
        "|---|---:|---|---:|---:|",
    ]
    for r in sweep["rows"]:
        lines.append(
            f"| {r['name']} | {r['special_down_inputs']} | {r['shadow_layers']} | {r['ppl']:.4f} "
            f"| {r['ppl_ratio']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def run_simulate(
    recipe: Recipe, model_dir: Path, settings: SimulateSettings, build_dir: Path | None = None
) -> dict[str, Any]:
    """Profile, plan, simulate and score every variant; write ``build/<MODEL>/simulate/``."""
    from common.data import eval_windows
    from common.models.loading import load_tokenizer
    from common.simulate import evaluate, simulate_plan, transformed_model

    settings.check()
    defaults = recipe.eval_defaults
    seq_len = settings.seq_len or defaults.get("seq_len", 512)
    num_windows = settings.num_windows or defaults.get("num_windows", 16)
    try:
        held_out = eval_windows(
            [settings.eval_corpus], load_tokenizer(model_dir), num_windows, seq_len
        )
    except EdgeforgeError as exc:
        raise EdgeforgeError(f"--eval-corpus: {exc}") from None
    calib = calibration_windows(model_dir, settings.calibration)
    no_bias = settings.calibration.no_bias
    profiles: dict[str, dict[str, Any]] = {}
    plans: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, Any]] = {}
    reference = None
    for name, (transforms, options) in _variants(settings).items():
        print(f"[simulate] {name}", file=sys.stderr, flush=True)
        if options is None:
            with transformed_model(model_dir, {}) as (model, _):
                scores = evaluate(model, held_out)
            reference = scores["argmax"]
            scores["top1_agreement"] = 1.0
        else:
            key = repr(sorted(transforms.items()))
            if key not in profiles:
                profiles[key] = _profile(model_dir, transforms, calib, no_bias)
            plan = build_plan(profiles[key], options, name=name, transforms=transforms)
            plans[name] = plan
            scores = simulate_plan(model_dir, plan, held_out, reference)
        results[name] = {k: v for k, v in scores.items() if k != "argmax"}
    fp32_ppl = results["fp32"]["ppl"]
    sweep_base = _variants(settings)["w8a8_rotated_online_down"]
    sweep_profile = profiles[repr(sorted(sweep_base[0].items()))]
    candidates = candidate_plans(sweep_profile, PlanOptions(), settings.thresholds, sweep_base[0])

    def score(plan: dict[str, Any]) -> dict[str, Any]:
        print(f"[simulate] sweep {plan['name']}", file=sys.stderr, flush=True)
        s = simulate_plan(model_dir, plan, held_out, reference)
        return {**s, "ppl_ratio": s["ppl"] / fp32_ppl}

    sweep = run_sweep(candidates, score)
    best = sweep["plan"]
    best_row = next(r for r in sweep["rows"] if r["name"] == sweep["chosen"])
    results["w8a8_best"] = {
        k: best_row[k] for k in ("ppl", "nll", "tokens", "last_token_accuracy", "top1_agreement")
    }
    plans["w8a8_best"] = best
    for v in results.values():
        v["ppl_ratio"] = v["ppl"] / fp32_ppl
    report = {
        "model": recipe.name,
        "ppl_ratio": {name: v["ppl_ratio"] for name, v in results.items()},
        "variants": results,
        "eval": {"corpus": settings.eval_corpus, "num_windows": num_windows, "seq_len": seq_len},
        "calibration": asdict(settings.calibration),
        "sweep": {k: v for k, v in sweep.items() if k != "plan"},
        "w8a8_best_plan": best,
        "gates": {
            "w8a16_max_ratio": W8A16_GATE,
            "w8a16_passed": results["w8a16"]["ppl_ratio"] <= W8A16_GATE,
        },
    }
    out_dir = model_build_dir(recipe, build_dir) / "simulate"
    with atomic_path(out_dir) as tmp:
        (tmp / "plans").mkdir(parents=True)
        for name, plan in plans.items():
            write_json_atomic(tmp / "plans" / f"{name}.json", plan)
        write_json_atomic(tmp / "shadow_layers.json", shadow_decision(sweep, recipe.name))
        write_json_atomic(tmp / "report.json", report)
        write_bytes_atomic(tmp / "report.md", render(report).encode())
        write_json_atomic(
            tmp / "manifest.json",
            build_manifest(
                step="simulate",
                inputs={
                    "calibration_corpus": Path(settings.calibration.corpus),
                    "eval_corpus": Path(settings.eval_corpus),
                    "model_config": model_dir / "config.json",
                },
                outputs=tmp,
                recipe=recipe.data,
                options={**asdict(settings), "thresholds": list(settings.thresholds)},
            ),
        )
    print(render(report), file=sys.stdout)
    if not report["gates"]["w8a16_passed"]:
        raise CheckFailed(
            f"{recipe.name}: W8A16 costs ×{results['w8a16']['ppl_ratio']:.4f} perplexity, over "
            f"the ×{W8A16_GATE} gate (report: {out_dir / 'report.json'})"
        )
    return report


def parse_thresholds(values: Sequence[str]) -> tuple[float, ...]:
    """``--thresholds 1,2,4`` → floats; a non-number names the option."""
    out = []
    for v in values:
        try:
            out.append(float(v))
        except ValueError:
            raise EdgeforgeError(f"--thresholds: {v!r} is not a number") from None
    return tuple(out)

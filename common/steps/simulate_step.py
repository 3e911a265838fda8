"""The ``make simulate`` step: W8A8 variants of one model, scored against FP32.

Each variant is a quant plan (:mod:`common.analysis.quant_plan`) built from a profile of the model
*as that variant transforms it*, simulated (:mod:`common.analysis.simulate`) and scored on the
held-out corpus. The threshold sweep (:mod:`common.analysis.threshold_sweep`) picks ``w8a8_best``
and writes ``shadow_layers.json``. Output: ``build/<MODEL>/simulate/`` with
``report.json`` (``ppl_ratio`` keyed by variant, details, the best plan), ``report.md``,
``plans/<variant>.json``, ``shadow_layers.json``, ``manifest.json``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.analysis.quant_plan import PlanOptions, build_plan, npu_precision_map
from common.analysis.threshold_sweep import (
    DEFAULT_THRESHOLDS,
    candidate_plans,
    run_sweep,
    shadow_decision,
)
from common.core.errors import CheckFailed, EdgeforgeError
from common.core.gates import Gate, failures, gate, markdown_table, records
from common.core.recipes import Recipe, model_build_dir
from common.core.records import atomic_path, build_manifest, write_bytes_atomic, write_json_atomic
from common.core.resources import resources_line
from common.steps.phases import Run
from common.steps.preflight import layerwise_preflight
from common.steps.profile_step import ProfileSettings, calibration_windows

if TYPE_CHECKING:
    from common.models.streaming import StreamedModel

#: W8A16 must cost at most this ppl ratio (a failed gate exits 1 after the report).
W8A16_GATE = 1.01
#: ``w8a8_best`` (int8 everywhere but at most the down_proj inputs) must cost at most this.
BEST_GATE = 1.05
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


#: A variant's options: fixed, or derived from the profile (the NPU precision map).
Options = PlanOptions | Callable[[dict[str, Any]], PlanOptions] | None


def _variants(settings: SimulateSettings) -> dict[str, tuple[dict[str, Any], Options]]:
    rot = {"rotation": {"mode": settings.rotate_mode, "seed": settings.calibration.seed}}
    rot_online = {**rot, "online_hadamard": True}
    base = PlanOptions(threshold=None if settings.clip_all else settings.threshold)
    return {
        "fp32": ({}, None),
        "w8a16": ({}, PlanOptions(act_bits=16)),
        "w8a8_clip_all": ({}, PlanOptions()),
        "w8a8_clip_all_int8_out": ({}, PlanOptions(output_bits=8)),
        "w8a8_shadow": ({}, PlanOptions(threshold=settings.threshold)),
        "w8a8_npu_precision_map": ({}, partial(npu_precision_map, threshold=settings.threshold)),
        "w8a8_rotated_clip_all": (rot, base),
        "w8a8_rotated_online_down": (rot_online, base),
        "w8a8_rotated_online_down_int8_out": (rot_online, replace(base, output_bits=8)),
    }


def _profile(
    model_dir: Path,
    transforms: dict[str, Any],
    windows: Any,
    no_bias: bool,
    streamed: StreamedModel | None,
) -> dict[str, Any]:
    """The profile of the model as ``transforms`` make it: one part at a time from
    ``streamed``, else whole."""
    from common.analysis.profiling import profile_document, profile_model, profile_sequential
    from common.analysis.simulate import transformed_model
    from common.quant.transforms import Transforms

    if streamed is not None:
        resolved = Transforms.of(streamed.adapter, transforms)
        profiler = profile_sequential(streamed, windows, transforms=resolved, no_bias=no_bias)
        stats = profiler.results()
    else:
        with transformed_model(model_dir, transforms) as (model, _):
            stats = profile_model(model, windows, no_bias=no_bias).results()
    return profile_document(
        stats, {"model": str(model_dir), "transforms": transforms, "tokens": windows.numel()}
    )


def held_bytes(held_out: Any, calibration: Any) -> Callable[[Any], dict[str, int]]:
    """What a layer-by-layer simulation keeps across parts: the hidden states of the
    held-out and calibration windows (in and out of a layer), a window's logits and the
    rotation matrices (float64)."""
    from common.quant.rotation import rotation_bytes

    def held(adapter: Any) -> dict[str, int]:
        windows = max(held_out.numel(), 0 if calibration is None else calibration.numel())
        return {
            "hidden states": 2 * windows * adapter.hidden_size * 4,
            "one window's logits": held_out.shape[1] * adapter.vocab_size * 4,
            "rotation (float64)": rotation_bytes(adapter),
        }

    return held


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
    lines += ["", "Cost of int8 linear outputs (ppl ratio with ÷ without):"]
    lines += [f"- {base}: ×{cost:.4f}" for base, cost in report["int8_output_cost"].items()]
    lines += ["", "## Gates", "", *markdown_table(report["gates"])]
    return "\n".join(lines + render_sweep(report["sweep"], "rotated + online down_proj Hadamard"))


def render_sweep(sweep: dict[str, Any], what: str) -> list[str]:
    """The threshold-sweep section of a report (simulate's and the sweep step's)."""
    lines = [
        "",
        f"## Threshold sweep ({what})",
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
    return [*lines, ""]


def held_out_windows(
    recipe: Recipe, model_dir: Path, corpus: str, num_windows: int | None, seq_len: int | None
) -> Any:
    """The held-out windows (recipe's eval defaults unless given); errors name the option."""
    from common.inputs.data import eval_windows
    from common.models.loading import load_tokenizer

    defaults = recipe.eval_defaults
    try:
        return eval_windows(
            [corpus],
            load_tokenizer(model_dir),
            num_windows or defaults.get("num_windows", 16),
            seq_len or defaults.get("seq_len", 512),
        )
    except EdgeforgeError as exc:
        raise EdgeforgeError(f"--eval-corpus: {exc}") from None


def sweep_profile(
    model_dir: Path,
    profile: dict[str, Any],
    thresholds: Sequence[float],
    held_out: Any,
    reference: dict[str, Any],
    streamed: StreamedModel | None,
) -> dict[str, Any]:
    """Score every candidate plan of ``profile`` (made on the model as its ``transforms``
    say) against the FP32 ``reference`` scores, one part at a time from ``streamed``
    when given; returns :func:`run_sweep`'s decision."""
    from common.analysis.simulate import simulate_plan

    transforms = profile["edgeforge"].get("transforms", {})
    candidates = candidate_plans(profile, PlanOptions(), thresholds, transforms)

    def score(plan: dict[str, Any]) -> dict[str, Any]:
        print(f"[sweep] {plan['name']}", file=sys.stderr, flush=True)
        s = simulate_plan(model_dir, plan, held_out, reference["argmax"], streamed)
        return {**s, "ppl_ratio": s["ppl"] / reference["ppl"]}

    return run_sweep(candidates, score)


def run_simulate(
    recipe: Recipe, model_dir: Path, settings: SimulateSettings, build_dir: Path | None = None
) -> dict[str, Any]:
    """Profile, plan, simulate and score every variant; write ``build/<MODEL>/simulate/``.
    A model that runs its own code (Qwen1) is refused first: every variant loads through
    transformers' Auto classes."""
    from common.analysis.simulate import score_model, simulate_plan
    from common.models.loading import refuse_remote_code

    settings.check()
    refuse_remote_code(model_dir, "make simulate")
    run = Run("simulate", ("calibrate", "variants", "sweep", "package"))
    run.phase("calibrate")
    held_out = held_out_windows(
        recipe, model_dir, settings.eval_corpus, settings.num_windows, settings.seq_len
    )
    num_windows, seq_len = held_out.shape
    calib = calibration_windows(model_dir, settings.calibration)
    streamed = layerwise_preflight(
        run,
        model_dir,
        "make simulate",
        settings.calibration.max_memory,
        held=held_bytes(held_out, calib),
        copies={"reference model": 1, "variant model": 1},
        sequential=settings.calibration.sequential,
        lower="lower NUM_WINDOWS, NUM_SAMPLES or SEQ_LEN",
    )
    no_bias = settings.calibration.no_bias
    profiles: dict[str, dict[str, Any]] = {}
    plans: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, Any]] = {}
    reference: dict[str, Any] = {}
    run.phase("variants")
    for name, (transforms, options) in _variants(settings).items():
        print(f"[simulate] {name}", file=sys.stderr, flush=True)
        if options is None:
            scores = score_model(model_dir, held_out, streamed=streamed)
            reference = scores
            scores["top1_agreement"] = 1.0
        else:
            key = repr(sorted(transforms.items()))
            if key not in profiles:
                profiles[key] = _profile(model_dir, transforms, calib, no_bias, streamed)
            if callable(options):
                options = options(profiles[key])
            plan = build_plan(profiles[key], options, name=name, transforms=transforms)
            plans[name] = plan
            scores = simulate_plan(model_dir, plan, held_out, reference["argmax"], streamed)
        results[name] = {k: v for k, v in scores.items() if k != "argmax"}
    fp32_ppl = results["fp32"]["ppl"]
    run.phase("sweep")
    sweep_transforms = _variants(settings)["w8a8_rotated_online_down"][0]
    sweep = sweep_profile(
        model_dir,
        profiles[repr(sorted(sweep_transforms.items()))],
        settings.thresholds,
        held_out,
        reference,
        streamed,
    )
    best = sweep["plan"]
    best_row = next(r for r in sweep["rows"] if r["name"] == sweep["chosen"])
    results["w8a8_best"] = {
        k: best_row[k] for k in ("ppl", "nll", "tokens", "last_token_accuracy", "top1_agreement")
    }
    plans["w8a8_best"] = best
    for v in results.values():
        v["ppl_ratio"] = v["ppl"] / fp32_ppl
    ratios = {name: v["ppl_ratio"] for name, v in results.items()}
    checks = gates(ratios)
    report = {
        "model": recipe.name,
        "ppl_ratio": ratios,
        "variants": results,
        "eval": {"corpus": settings.eval_corpus, "num_windows": num_windows, "seq_len": seq_len},
        "calibration": asdict(settings.calibration),
        "sweep": {k: v for k, v in sweep.items() if k != "plan"},
        "w8a8_best_plan": best,
        "int8_output_cost": {
            base: results[f"{base}_int8_out"]["ppl_ratio"] / results[base]["ppl_ratio"]
            for base in ("w8a8_clip_all", "w8a8_rotated_online_down")
        },
        "gates": records(checks),
        "passed": all(g.passed for g in checks),
    }
    run.phase("package")
    report["resources"] = run.resources()  # the package phase up to this point
    out_dir = model_build_dir(recipe, build_dir) / "simulate"
    with atomic_path(out_dir) as tmp:
        (tmp / "plans").mkdir(parents=True)
        for name, plan in plans.items():
            write_json_atomic(tmp / "plans" / f"{name}.json", plan)
        write_json_atomic(tmp / "shadow_layers.json", shadow_decision(sweep, recipe.name))
        write_json_atomic(tmp / "report.json", report)
        markdown = render(report) + resources_line(report["resources"])
        write_bytes_atomic(tmp / "report.md", markdown.encode())
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
    run.finish()
    print(render(report), file=sys.stdout)
    failed = failures(report["gates"])
    if failed:
        raise CheckFailed(
            f"{recipe.name}: {len(failed)} simulation gate(s) failed: {'; '.join(failed)} "
            f"(report: {out_dir / 'report.json'})"
        )
    return report


def gates(ratio: dict[str, float]) -> list[Gate]:
    """The plan table's acceptance gates on the perplexity ratios to FP32."""

    def better(name: str, a: str, b: str) -> Gate:
        return gate(name, ratio[a], "<", ratio[b], f"{a} vs {b}")

    return [
        gate("w8a16", ratio["w8a16"], "<=", W8A16_GATE),
        better("shadow_beats_clip_all", "w8a8_shadow", "w8a8_clip_all"),
        better("rotated_beats_clip_all", "w8a8_rotated_clip_all", "w8a8_clip_all"),
        better("online_down_beats_rotated", "w8a8_rotated_online_down", "w8a8_rotated_clip_all"),
        gate("w8a8_best", ratio["w8a8_best"], "<=", BEST_GATE),
    ]


def parse_thresholds(values: Sequence[str]) -> tuple[float, ...]:
    """``--thresholds 1,2,4`` → floats; a non-number names the option."""
    out = []
    for v in values:
        try:
            out.append(float(v))
        except ValueError:
            raise EdgeforgeError(f"--thresholds: {v!r} is not a number") from None
    return tuple(out)

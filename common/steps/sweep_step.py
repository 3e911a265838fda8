"""The ``make sweep`` step: the threshold sweep on an existing profile, without profiling.

``make simulate`` profiles three transformed models and scores a dozen variants; choosing
T and the shadow layers again (another T list, another held-out set, a profile made with
more calibration or by ``make profile`` on a bigger machine) needs only the
profile. The profile names the transforms it was made under (rotation, online Hadamard),
so every candidate plan is simulated on the model transformed the same way. Writes
``build/<MODEL>/sweep/``: ``report.json``/``report.md`` (per T: shadow tensors, layers,
metrics), ``shadow_layers.json`` (the decision exporters read), ``plan.json`` (the chosen
plan) and ``manifest.json``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.analysis.threshold_sweep import DEFAULT_THRESHOLDS, check_thresholds, shadow_decision
from common.core.recipes import Recipe, model_build_dir
from common.core.records import atomic_path, build_manifest, write_bytes_atomic, write_json_atomic
from common.core.resources import resources_line
from common.steps.phases import Run
from common.steps.preflight import layerwise_preflight


@dataclass(frozen=True)
class SweepSettings:
    """Options of ``make sweep`` (PROFILE=, THRESHOLDS=, held-out size)."""

    profile: Path
    eval_corpus: str
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    num_windows: int | None = None
    seq_len: int | None = None
    max_memory: int | None = None  # bytes; None: what the machine has available
    sequential: bool | None = None  # None: one layer at a time where the model allows


def default_profile(recipe: Recipe, build_dir: Path | None) -> Path:
    """Where ``make profile`` writes the profile this step reads by default."""
    return model_build_dir(recipe, build_dir) / "profile" / "profile.json"


def render(report: dict[str, Any]) -> str:
    from common.steps.simulate_step import render_sweep

    transforms = report["transforms"] or "none"
    lines = [
        f"# Threshold sweep: {report['model']}",
        "",
        f"Profile: `{report['profile']}` (transforms: {transforms}); held-out: "
        f"{report['eval']['num_windows']} × {report['eval']['seq_len']} tokens; "
        f"FP32 ppl {report['fp32']['ppl']:.4f}.",
    ]
    return "\n".join(lines + render_sweep(report["sweep"], "candidates from the profile"))


def run_sweep_step(
    recipe: Recipe, model_dir: Path, settings: SweepSettings, build_dir: Path | None = None
) -> dict[str, Any]:
    """Score the profile's candidate plans against FP32; write ``build/<MODEL>/sweep/``.
    A model that runs its own code (Qwen1) is refused first: the plans are simulated on
    models loaded through transformers' Auto classes."""
    from common.analysis.profiling import load_profile
    from common.analysis.simulate import score_model
    from common.models.loading import refuse_remote_code
    from common.models.streaming import StreamedModel
    from common.steps.simulate_step import held_bytes, held_out_windows, sweep_profile

    thresholds = check_thresholds(settings.thresholds)
    refuse_remote_code(model_dir, "make sweep")
    run = Run("sweep", ("reference", "sweep", "package"))
    run.phase("reference")
    held_out = held_out_windows(
        recipe, model_dir, settings.eval_corpus, settings.num_windows, settings.seq_len
    )
    profile = load_profile(settings.profile, StreamedModel(model_dir).adapter)
    streamed = layerwise_preflight(
        run,
        model_dir,
        "make sweep",
        settings.max_memory,
        held=held_bytes(held_out, None),
        copies={"reference model": 1, "plan model": 1},
        sequential=settings.sequential,
        lower="lower NUM_WINDOWS or SEQ_LEN",
    )
    reference = score_model(model_dir, held_out, streamed=streamed)
    run.phase("sweep")
    sweep = sweep_profile(model_dir, profile, thresholds, held_out, reference, streamed)
    run.phase("package")
    report = {
        "model": recipe.name,
        "profile": str(settings.profile),
        "transforms": profile["edgeforge"].get("transforms", {}),
        "eval": {
            "corpus": settings.eval_corpus,
            "num_windows": held_out.shape[0],
            "seq_len": held_out.shape[1],
        },
        "fp32": {k: v for k, v in reference.items() if k != "argmax"},
        "sweep": {k: v for k, v in sweep.items() if k != "plan"},
        "resources": run.resources(),  # the package phase up to this point
    }
    out_dir = model_build_dir(recipe, build_dir) / "sweep"
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        write_json_atomic(tmp / "plan.json", sweep["plan"])
        write_json_atomic(tmp / "shadow_layers.json", shadow_decision(sweep, recipe.name))
        write_json_atomic(tmp / "report.json", report)
        markdown = render(report) + resources_line(report["resources"])
        write_bytes_atomic(tmp / "report.md", markdown.encode())
        write_json_atomic(
            tmp / "manifest.json",
            build_manifest(
                step="sweep",
                inputs={
                    "profile": settings.profile,
                    "eval_corpus": Path(settings.eval_corpus),
                    "model_config": model_dir / "config.json",
                },
                outputs=tmp,
                recipe=recipe.data,
                options={
                    **asdict(settings),
                    "profile": str(settings.profile),
                    "thresholds": thresholds,
                },
            ),
        )
    run.finish()
    print(render(report), file=sys.stdout)
    return report

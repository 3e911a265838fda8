"""``python -m common.steps.profile_cli profile|simulate|sweep``: the make steps of profiling.

``profile`` writes ``build/<MODEL>/profile/``; ``simulate`` writes
``build/<MODEL>/simulate/`` (variants, threshold sweep, ``shadow_layers.json``); ``sweep``
re-runs the threshold sweep on an existing profile into ``build/<MODEL>/sweep/``.
Bad input exits 2 with one line naming the option; a failed gate exits 1 after the report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.core.errors import run_cli


def _bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1 or true/false, got {text!r}")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="recipe name (models/<name>.json)")
    parser.add_argument("--build-dir", type=Path, default=None)
    parser.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--corpus", default=None, help="calibration corpus (dataset_path)")
    parser.add_argument("--num-samples", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-bias", type=_bool, default=True, help="observe Wx without bias")


def add_sequential(parser: argparse.ArgumentParser) -> None:
    """``--sequential`` (make's ``SEQUENTIAL``) of the steps that run layer by layer."""
    parser.add_argument(
        "--sequential",
        type=_bool,
        default=None,
        help="1: one layer at a time, 0: whole model (default: layers where the model allows)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeforge-profile", description=__doc__)
    sub = parser.add_subparsers(dest="step", required=True)
    prof = sub.add_parser("profile", help="streaming activation statistics of every linear")
    _add_common(prof)
    add_sequential(prof)
    prof.add_argument(
        "--max-memory",
        default=None,
        help="memory cap checked up front, e.g. 8GB (default: what the machine has available)",
    )
    prof.add_argument("--rotate", default=None, help="random_rotate: hadamard or orthogonal")
    prof.add_argument("--r-path", default=None, help="R_path: rotation file to apply first")
    prof.add_argument("--online-down", type=_bool, default=False, help="online Hadamard")
    prof.add_argument(
        "--images", default=None, help="image folder: also profile the vision linears (VL)"
    )
    prof.add_argument("--image-size", type=int, default=224, help="square image side (px)")
    prof.add_argument(
        "--exact-percentiles",
        type=_bool,
        default=False,
        help="count every value into the p99.9 histograms, not only their tails (slower)",
    )
    prof.add_argument(
        "--config-file", type=Path, default=None, help="mllm QNN convertor config (profile_config)"
    )
    sim = sub.add_parser("simulate", help="fake-quant W8A8 variants + threshold sweep")
    _add_common(sim)
    sim.add_argument("--t", type=float, default=None, help="t01m_clip_threshold T (> 0)")
    sim.add_argument("--clip-all", type=_bool, default=True)
    sim.add_argument("--rotate", default="hadamard", help="rotation mode of rotated variants")
    sim.add_argument("--thresholds", default=None, help="comma list of T for the sweep")
    sim.add_argument("--eval-corpus", default=None)
    sim.add_argument("--num-windows", type=int, default=None)
    sim.add_argument("--max-memory", default=None, help="memory cap checked up front, e.g. 16GB")
    add_sequential(sim)
    sweep = sub.add_parser("sweep", help="threshold sweep on an existing profile")
    sweep.add_argument("--model", required=True, help="recipe name (models/<name>.json)")
    sweep.add_argument("--build-dir", type=Path, default=None)
    sweep.add_argument("--model-path", type=Path, default=None)
    sweep.add_argument(
        "--profile", type=Path, default=None, help="default: build/<MODEL>/profile/profile.json"
    )
    sweep.add_argument("--thresholds", default=None, help="comma list of T")
    sweep.add_argument("--eval-corpus", default=None)
    sweep.add_argument("--num-windows", type=int, default=None)
    sweep.add_argument("--seq-len", type=int, default=None)
    sweep.add_argument("--max-memory", default=None, help="memory cap checked up front, e.g. 16GB")
    add_sequential(sweep)
    return parser


def main() -> int:
    args = _parser().parse_args()
    from common.core.memory import parse_size
    from common.core.recipes import load_recipe
    from common.inputs.data import CALIB_CORPUS, EVAL_CORPUS
    from common.steps.model_build import build_model
    from common.steps.profile_step import (
        DEFAULT_SEED,
        DEFAULT_SEQ_LEN,
        ProfileSettings,
        run_profile,
    )

    recipe = load_recipe(args.model)
    if args.step == "sweep":
        from common.analysis.threshold_sweep import DEFAULT_THRESHOLDS
        from common.steps.simulate_step import parse_thresholds
        from common.steps.sweep_step import SweepSettings, default_profile, run_sweep_step

        run_sweep_step(
            recipe,
            build_model(recipe, args.build_dir, args.model_path),
            SweepSettings(
                profile=args.profile or default_profile(recipe, args.build_dir),
                eval_corpus=str(args.eval_corpus or EVAL_CORPUS),
                thresholds=parse_thresholds(args.thresholds.split(","))
                if args.thresholds
                else DEFAULT_THRESHOLDS,
                num_windows=args.num_windows,
                seq_len=args.seq_len,
                max_memory=parse_size(args.max_memory) if args.max_memory else None,
                sequential=args.sequential,
            ),
            args.build_dir,
        )
        return 0
    seq_len = args.seq_len or DEFAULT_SEQ_LEN
    common = {
        "corpus": str(args.corpus or CALIB_CORPUS),
        "seq_len": seq_len,
        "seed": DEFAULT_SEED if args.seed is None else args.seed,
        "no_bias": args.no_bias,
    }
    if args.step == "profile" and args.config_file is not None:
        from common.core.records import write_bytes_atomic
        from common.steps.profile_step import from_qnn_config

        request = from_qnn_config(args.config_file, seq_len)
        request.settings.check()
        out_dir = run_profile(
            recipe,
            build_model(recipe, args.build_dir, request.model_path),
            request.settings,
            args.build_dir,
        )
        write_bytes_atomic(request.output_path, (out_dir / "profile.json").read_bytes())
        if request.save_rotation is not None:
            rotation = (out_dir / "rotation.safetensors").read_bytes()
            write_bytes_atomic(request.save_rotation, rotation)
        return 0
    if args.step == "profile":
        settings = ProfileSettings(
            **common,
            num_samples=128 if args.num_samples is None else args.num_samples,
            sequential=args.sequential,
            max_memory=parse_size(args.max_memory) if args.max_memory else None,
            rotate=None if args.rotate in (None, "", "none") else args.rotate,
            r_path=args.r_path,
            online_down=args.online_down,
            images=args.images,
            image_size=args.image_size,
            exact_percentiles=args.exact_percentiles,
        )
        settings.check()
        run_profile(
            recipe, build_model(recipe, args.build_dir, args.model_path), settings, args.build_dir
        )
        return 0
    from common.analysis.threshold_sweep import DEFAULT_THRESHOLDS
    from common.steps.simulate_step import (
        DEFAULT_T,
        SimulateSettings,
        parse_thresholds,
        run_simulate,
    )

    settings = SimulateSettings(
        calibration=ProfileSettings(
            **common,
            num_samples=32 if args.num_samples is None else args.num_samples,
            sequential=args.sequential,
            max_memory=parse_size(args.max_memory) if args.max_memory else None,
        ),
        threshold=DEFAULT_T if args.t is None else args.t,
        clip_all=args.clip_all,
        rotate_mode=args.rotate,
        thresholds=parse_thresholds(args.thresholds.split(","))
        if args.thresholds
        else DEFAULT_THRESHOLDS,
        eval_corpus=str(args.eval_corpus or EVAL_CORPUS),
        num_windows=args.num_windows,
        seq_len=args.seq_len,
    )
    settings.check()
    run_simulate(
        recipe, build_model(recipe, args.build_dir, args.model_path), settings, args.build_dir
    )
    return 0


if __name__ == "__main__":
    run_cli(main)

"""``make qnn``: the mllm int8 model and QNN HTP context binaries, verified on the emulator.

Reads the activation profile of ``make profile`` (by default the Hadamard-rotated one,
``build/<MODEL>/profile-hadamard/profile.json``; ``--rotate none`` reads the plain
``profile/``; its transforms are applied to the model first) and, when ``make simulate``
has run, its ``shadow_layers.json`` (the chosen ``T``; ``--t`` overrides it). Writes
``build/<MODEL>/qnn/``:

* ``model.int8.mllm`` + ``shadow_layers.json`` + ``quant_plan.json`` (the plan the file was
  written from), re-read and checked to reproduce the fake-quant model's logits;
* ``<SOC>/<piece>_ctx.onnx`` + ``_qnn.bin`` per decoder layer (prefill graph of
  ``PREFILL_LEN`` tokens, decode graph of one token over a ``KV_LEN`` cache) and the LM
  head, compiled by the QNN EP for each SoC, with the SoC/arch read back from the binary;
* ``qnn_scales.json`` (the activation encodings, range and width, imposed on the graphs);
* ``tokenizer/`` (``config.json`` + the tokenizer files, checked to encode like the
  source's under ``AutoTokenizer``);
* ``report.json`` / ``report.md`` (+ ``layers.png``) and ``manifest.json``.

A failed numerical gate raises ``CheckFailed`` (exit 1) after everything is written.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import mllm_int8  # noqa: E402  (this folder; target folders are not packages)
import pipeline  # noqa: E402
import report as rep  # noqa: E402

from common.core.errors import CheckFailed, EdgeforgeError, run_cli  # noqa: E402
from common.core.gates import failures, records  # noqa: E402
from common.core.records import (  # noqa: E402
    atomic_path,
    build_manifest,
    write_bytes_atomic,
    write_json_atomic,
)
from common.models.tokenizer_fidelity import write_tokenizer_dir  # noqa: E402
from common.quant.hadamard import ROTATE_MODES  # noqa: E402

TARGET = "qnn"
DEFAULT_PREFILL_LEN = 32
DEFAULT_KV_LEN = 64
DEFAULT_CALIB_WINDOWS = 16
#: Held-out windows of PREFILL_LEN tokens chained through the prefill binaries end to end.
DEFAULT_E2E_WINDOWS = 8
#: The residual rotation of the profile read by default (``none``: the model as stored).
#: Rotated by default because ``w8a8`` needs it: plain, SmolLM2's layers 12-19 carry
#: outlier channels into the q/k/v and gate/up inputs (12 pieces below cos 0.99, top-1
#: 0.69); rotated, every piece is >= 0.996.
DEFAULT_ROTATE = "hadamard"
ROTATIONS = (*ROTATE_MODES, "none")
#: How integer weights are rounded: GPTQ (``common.backends.sequential_gptq``) or to nearest.
ROUNDINGS = ("gptq", "nearest")
#: GPTQ calibration: windows x tokens (8192 tokens: H of a 1536-wide down_proj input is
#: well conditioned from ~5x its width).
DEFAULT_GPTQ_WINDOWS = 32
DEFAULT_GPTQ_SEQ_LEN = 256
#: Gates per preset: worst per-piece cosine vs float, end-to-end top-1 agreement.
GATES: dict[str, dict[str, float]] = {
    "w8a16": {"layer_cos": 0.999, "top1": 0.95},
    "w8a8": {"layer_cos": 0.99, "top1": 0.0},
    "w4a16": {"layer_cos": 0.95, "top1": 0.0},
}
#: The int8 .mllm must reproduce the fake-quant model's logits this closely.
MLLM_MAX_ABS = 1e-4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="make qnn", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="recipe name (models/<name>.json)")
    p.add_argument("--build-dir", type=Path, default=None)
    p.add_argument("--model-path", type=Path, default=None, help="local HF checkpoint dir")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="profile JSON (default: make profile's for --rotate, "
        "build/<MODEL>/profile-hadamard/profile.json)",
    )
    p.add_argument(
        "--rotate",
        default=None,
        help="rotation of the default profile: hadamard (default), orthogonal or none",
    )
    p.add_argument("--socs", default=None, help="comma list, e.g. SM8650,SM8750")
    p.add_argument("--preset", default=None, help="w8a16 (default), w8a8 or w4a16")
    p.add_argument("--prefill-len", type=int, default=None, help="tokens of the prefill graph")
    p.add_argument("--kv-len", type=int, default=None, help="KV cache rows of the decode graph")
    p.add_argument("--calib-windows", type=int, default=None)
    p.add_argument("--e2e-windows", type=int, default=None, help="held-out windows end to end")
    p.add_argument("--rounding", default=None, help="weight rounding: gptq (default) or nearest")
    p.add_argument("--gptq-windows", type=int, default=None, help="GPTQ calibration windows")
    p.add_argument("--gptq-seq-len", type=int, default=None, help="tokens per GPTQ window")
    p.add_argument("--vtcm-mb", type=int, default=None)
    p.add_argument("--opt-mode", type=int, default=None)
    p.add_argument("--t", type=float, default=None, help="t01m_clip_threshold (no clip_all)")
    p.add_argument("--quant-bias", action="store_true", help="int8 bias in the .mllm")
    return p.parse_args(argv)


def settings(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """CLI options over the recipe's ``targets.qnn`` over the script defaults, checked."""
    from common.backends import qdq, qnn_ep

    def pick(key: str, fallback: Any) -> Any:
        value = getattr(args, key)
        return value if value is not None else defaults.get(key, fallback)

    socs = pick("socs", qnn_ep.DEFAULT_SOC)
    socs = socs.split(",") if isinstance(socs, str) else list(socs)
    out = {
        "socs": [qnn_ep.soc_by_name(s.strip()).name for s in socs if s.strip()],
        "preset": qdq.preset_by_name(pick("preset", qdq.DEFAULT_PRESET)).name,
        "rotate": pick("rotate", DEFAULT_ROTATE),
        "prefill_len": pick("prefill_len", DEFAULT_PREFILL_LEN),
        "kv_len": pick("kv_len", DEFAULT_KV_LEN),
        "calib_windows": pick("calib_windows", DEFAULT_CALIB_WINDOWS),
        "e2e_windows": pick("e2e_windows", DEFAULT_E2E_WINDOWS),
        "rounding": pick("rounding", "gptq"),
        "gptq_windows": pick("gptq_windows", DEFAULT_GPTQ_WINDOWS),
        "gptq_seq_len": pick("gptq_seq_len", DEFAULT_GPTQ_SEQ_LEN),
        "vtcm_mb": pick("vtcm_mb", qnn_ep.DEFAULT_VTCM_MB),
        "opt_mode": pick("opt_mode", qnn_ep.DEFAULT_OPT_MODE),
        "t01m_clip_threshold": pick("t", None),
        "quant_bias": bool(args.quant_bias or defaults.get("quant_bias", False)),
    }
    if not out["socs"]:
        raise EdgeforgeError("SOCS: empty; name at least one SoC")
    if out["rotate"] not in ROTATIONS:
        raise EdgeforgeError(f"ROTATE: {out['rotate']!r} is unknown; known: {', '.join(ROTATIONS)}")
    if out["rounding"] not in ROUNDINGS:
        raise EdgeforgeError(
            f"ROUNDING: {out['rounding']!r} is unknown; known: {', '.join(ROUNDINGS)}"
        )
    for key in (
        "prefill_len",
        "kv_len",
        "calib_windows",
        "e2e_windows",
        "gptq_windows",
        "gptq_seq_len",
        "vtcm_mb",
    ):
        if not isinstance(out[key], int) or out[key] < 1:
            raise EdgeforgeError(f"{key.upper()}: expected a positive integer, got {out[key]!r}")
    if out["gptq_seq_len"] < 2:
        raise EdgeforgeError(
            f"GPTQ_SEQ_LEN: a GPTQ window needs at least 2 tokens, got {out['gptq_seq_len']}"
        )
    if out["kv_len"] <= out["prefill_len"]:
        raise EdgeforgeError(
            f"KV_LEN: must exceed PREFILL_LEN ({out['prefill_len']}) so the decode graph has "
            f"a row for the token after the prompt, got {out['kv_len']}"
        )
    if out["opt_mode"] not in (1, 2, 3):
        raise EdgeforgeError(f"OPT_MODE: expected 1, 2 or 3, got {out['opt_mode']!r}")
    return out


def check_profile(profile: dict[str, Any], recipe_name: str, path: Path) -> dict[str, Any]:
    """The profile's transforms, after checking it was made for this model."""
    meta = profile["edgeforge"]
    if meta.get("model") != recipe_name:
        raise EdgeforgeError(
            f"{path}: profile was made for model {meta.get('model')!r}, not {recipe_name!r}; "
            f"run make profile MODEL={recipe_name}"
        )
    transforms = meta.get("transforms") or {}
    if transforms.get("online_hadamard"):
        raise EdgeforgeError(
            f"{path}: profile assumes an online Hadamard on down_proj inputs, which the QNN "
            "pieces do not contain; profile without --online-down"
        )
    return transforms


def simulate_threshold(path: Path, recipe_name: str) -> float | None:
    """The ``T`` ``make simulate`` chose (``shadow_layers.json``; None = clip_all), after
    checking the file was made for this model."""
    import json

    try:
        doc = json.loads(path.read_text())
        model, threshold = doc["model"], doc["t01m_clip_threshold"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EdgeforgeError(
            f"{path}: not a shadow_layers.json from make simulate ({exc})"
        ) from None
    if model != recipe_name:
        raise EdgeforgeError(
            f"{path}: made for model {model!r}, not {recipe_name!r}; "
            f"run make simulate MODEL={recipe_name}"
        )
    if threshold is not None and not (isinstance(threshold, int | float) and threshold > 0):
        raise EdgeforgeError(f"{path}: t01m_clip_threshold must be > 0 or null, got {threshold!r}")
    return threshold


def f32_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan with every range rounded to float32 (what the .mllm stores), scales
    recomputed from it, so the file and the fake-quant model use the same grid."""
    import numpy as np

    from common.analysis.quant_plan import bits_of
    from common.quant.int8 import qmax

    for entry in plan["tensors"].values():
        for side in ("input", "output"):
            tensor = entry[side]
            if "range" in tensor:
                tensor["range"] = float(np.float32(tensor["range"]))
                tensor["scale"] = tensor["range"] / qmax(bits_of(tensor))
    return plan


def mllm_check(adapter: Any, plan: dict[str, Any], path: Path, ids: list[int]) -> dict[str, Any]:
    """Logits of the fake-quant model vs the model rebuilt from ``path`` alone.

    Mutates ``adapter``'s model (fake-quant weights, then the file's): run last.
    """
    import torch

    from common.analysis.simulate import apply_plan

    batch = torch.tensor([ids])
    handles = apply_plan(adapter, plan)
    with torch.no_grad():
        want = adapter.model(batch).logits.float()
    for h in handles:
        h.remove()
    handles = mllm_int8.load_int8_mllm(path, adapter, plan)
    with torch.no_grad():
        got = adapter.model(batch).logits.float()
    for h in handles:
        h.remove()
    return {"max_abs_diff": float((got - want).abs().max()), "tokens": len(ids)}


def build(args: argparse.Namespace) -> dict[str, Any]:
    from common.analysis.profiling import load_profile
    from common.analysis.quant_plan import PlanOptions, build_plan
    from common.analysis.simulate import transformed_model
    from common.backends import qdq, qnn_ep
    from common.backends.sequential_gptq import sequential_gptq
    from common.core.recipes import load_recipe, model_build_dir
    from common.export import piece_export as pe
    from common.inputs.data import CALIB_CORPUS, EVAL_CORPUS, eval_windows, sample_windows
    from common.models import get_adapter, iter_linears
    from common.models.loading import load_tokenizer
    from common.steps.model_build import build_model, check_packaged_tokenizer
    from common.steps.profile_step import profile_dir_name

    recipe = load_recipe(args.model)
    opts = settings(args, (recipe.data.get("targets") or {}).get(TARGET, {}))
    versions = qnn_ep.qnn_versions()  # fails early, clearly, without the wheel
    socs = [qnn_ep.soc_by_name(s) for s in opts["socs"]]
    preset = qdq.preset_by_name(opts["preset"])
    build_dir = model_build_dir(recipe, args.build_dir)
    rotate = None if opts["rotate"] == "none" else opts["rotate"]
    profile_path = args.profile or build_dir / profile_dir_name(rotate) / "profile.json"
    model_dir = build_model(recipe, args.build_dir, args.model_path)
    out_dir = build_dir / TARGET
    inputs = {"profile": profile_path, "model_config": model_dir / "config.json"}
    decision = build_dir / "simulate" / "shadow_layers.json"
    if args.t is None and decision.is_file():
        opts["t01m_clip_threshold"] = simulate_threshold(decision, recipe.name)
        inputs["shadow_layers"] = decision
    tokenizer = load_tokenizer(model_dir)
    lengths = (opts["prefill_len"], opts["kv_len"])
    window = lengths[0] + 1  # the prompt and the token the decode graph is checked on
    held_out = eval_windows(EVAL_CORPUS, tokenizer, opts["e2e_windows"], window).tolist()
    golden_ids = held_out[0]
    e2e_ids = [ids[: lengths[0]] for ids in held_out]
    calib_ids = sample_windows(CALIB_CORPUS, tokenizer, opts["calib_windows"], window, 0)
    calib_ids = [w.tolist() for w in calib_ids]
    gptq_ids = None
    if opts["rounding"] == "gptq":
        gptq_ids = sample_windows(
            CALIB_CORPUS, tokenizer, opts["gptq_windows"], opts["gptq_seq_len"], 0
        )

    if args.profile is None and not profile_path.is_file():
        raise EdgeforgeError(
            f"{profile_path}: profile not found; run make profile MODEL={recipe.name}"
            + (f" ROTATE={rotate}" if rotate else "")
            + " (make qnn does it for you)"
        )
    profile = load_profile(profile_path)
    transforms = check_profile(profile, recipe.name, profile_path)
    rotation = transforms.get("rotation")
    rotated = "none" if not rotation else rotation.get("mode", f"R_PATH {rotation.get('path')}")
    if (args.profile is None or args.rotate is not None) and rotated != opts["rotate"]:
        raise EdgeforgeError(
            f"{profile_path}: ROTATE={opts['rotate']} but this profile's rotation is "
            f"{rotated}; give a profile of that rotation (make profile ROTATE=<mode> writes "
            "build/<MODEL>/profile-<mode>/) or drop ROTATE="
        )
    stats = profile["edgeforge"]["stats"]
    plan = f32_plan(
        build_plan(
            profile,
            PlanOptions(
                weight_granularity="per_tensor",
                act_bits=8,
                threshold=opts["t01m_clip_threshold"],
                quant_bias=opts["quant_bias"],
            ),
            name=f"{recipe.name}-qnn-int8",
            transforms=transforms,
        )
    )
    with transformed_model(model_dir, transforms) as (model, _), atomic_path(out_dir) as tmp:
        adapter = get_adapter(model)
        load_profile(profile_path, adapter)  # covers every linear of this model
        work = tmp / "_work"
        float_dir = work / "float"
        pe.export_pieces(
            adapter,
            lengths[0],
            float_dir,
            only=lambda n: (n.startswith("block_") and "cache" not in n) or n == "lm_head",
        )
        pe.export_pieces(adapter, lengths[1], float_dir, only=lambda n: "block_cache" in n)
        golden = pipeline.capture(
            pe.onnx_runner(float_dir), adapter, golden_ids, calib_ids, lengths
        )
        encodings = qdq.plan_encodings(plan, stats, preset)
        levels = (
            sequential_gptq(adapter, gptq_ids, preset.weight_bits)
            if gptq_ids is not None
            else qdq.nearest_levels(
                {n: m.weight for n, _r, m in iter_linears(adapter)}, preset.weight_bits
            )
        )
        rows, hiddens = pipeline.build_all(
            adapter,
            float_dir,
            work,
            tmp,
            golden,
            encodings,
            levels,
            preset,
            socs,
            opts["vtcm_mb"],
            opts["opt_mode"],
            e2e_ids,
        )
        e2e = pipeline.end_to_end(adapter, hiddens, e2e_ids)
        write_json_atomic(
            tmp / "qnn_scales.json",
            {
                "preset": preset.name,
                "encodings": {
                    n: {
                        side: {"absmax": e.absmax, "bits": e.bits}
                        for side, e in zip(("input", "output"), pair, strict=True)
                    }
                    for n, pair in encodings.items()
                },
            },
        )
        write_json_atomic(tmp / "quant_plan.json", plan)
        write_json_atomic(
            tmp / "shadow_layers.json",
            {
                "model": recipe.name,
                "t01m_clip_threshold": opts["t01m_clip_threshold"],
                "shadow_layers": plan["shadow_layers"],
                "summary": plan["summary"],
            },
        )
        mllm_int8.write_int8_mllm(tmp / "model.int8.mllm", adapter, plan, stats)
        mllm = mllm_check(adapter, plan, tmp / "model.int8.mllm", golden_ids)
        tokenizer_dir = write_tokenizer_dir(model_dir, tmp / "tokenizer")  # what the app reads
        tokenizer_check = check_packaged_tokenizer(
            recipe, tokenizer_dir, out_dir / "tokenizer", args.build_dir, args.model_path
        )
        shutil.rmtree(work)
        first = rows[0]["binaries"][socs[0].name]
        report = {
            "model": recipe.name,
            "preset": preset.name,
            "rounding": opts["rounding"],
            "prefill_len": lengths[0],
            "kv_len": lengths[1],
            "soc_model": first["soc_model"],
            "htp_arch": first["htp_arch"],
            "socs": {s.name: {"soc_model": s.soc_model, "htp_arch": s.htp_arch} for s in socs},
            "qnn_version": versions["qnn_sdk"],
            "versions": versions,
            "layers": rows,
            "end_to_end": e2e,
            "float_linears": sorted(qdq.float_linears(encodings)),
            "mllm_int8": mllm,
            "tokenizer": tokenizer_check,
        }
        checks = rep.gates(report, GATES[preset.name], MLLM_MAX_ABS)
        report["gates"] = records(checks)
        report["passed"] = all(g.passed for g in checks)
        write_json_atomic(tmp / "report.json", report)
        rep.plot_layers(rows, tmp / "layers.png")
        write_bytes_atomic(tmp / "report.md", rep.render(report).encode())
        manifest = build_manifest(
            step=TARGET,
            inputs=inputs,
            outputs=tmp,
            recipe=recipe.data,
            options=opts,
            toolchains=versions,
        )
        write_json_atomic(tmp / "manifest.json", manifest)
    return report


def main(argv: list[str] | None = None) -> int:
    report = build(parse_args(argv))
    failed = failures(report["gates"])
    if failed:
        raise CheckFailed("; ".join(failed))
    print(
        f"[qnn] {report['model']}: {len(report['layers'])} pieces all on QNN, worst cos "
        f"{min(r['cos_vs_float'] for r in report['layers']):.5f}, end-to-end top-1 "
        f"{report['end_to_end']['top1_agreement']:.3f}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)

"""``make bench-scale``: the named commands at the real sizes users name, with random weights.

No hub is reachable here, so each model is a random-weight checkpoint built from the
public ``config.json`` values shipped in ``bench/configs/`` (Qwen1.5-1.8B, Qwen2.5-VL-3B,
Qwen-7B): bf16, sharded like the hub's, written a tensor at a time
(:mod:`common.export.random_checkpoint`), with the tokenizer (and processor) of the
matching tiny model (ids fit the real vocabulary). Qwen-7B runs the checkpoint's own
modeling code: the Qwen1 code of ``tests/fixtures/qwen1``.

Each step runs as a user types it (``make <step> MODEL=… MODEL_PATH=…``) with
``MAX_MEMORY`` set to the issue's target for that model (8 GiB for 1.8B, 16 GiB for the
others), so a step that cannot meet it stops at its preflight in seconds, and that is
recorded, instead of swapping for hours. While it runs, the resident memory of its whole
process tree is sampled every 0.5 s; the result keeps the exit code, wall time, that peak,
the step's own ``report.json["resources"]`` (per-phase seconds, VmHWM, its estimate) and
its ``error:`` line. Random weights make the numerical checks meaningless, so the bench
gates on memory and completion only; the reports' numbers are kept as they came, and a
step that wrote its report but failed a numerical gate (exit 1: random logits are near
ties, so top-1 agreement falls) counts as completed, with the gates it failed named.

Results merge into ``build/bench/scale.json`` (so models and steps can be run apart);
``--table`` prints the README table from it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bench" / "configs"
QWEN1_CODE = REPO_ROOT / "tests" / "fixtures" / "qwen1"
GIB = 2**30

#: Model → (tiny recipe whose tokenizer/processor it borrows, MAX_MEMORY target in GiB).
MODELS: dict[str, tuple[str, int]] = {
    "qwen1.5-1.8b": ("tiny-qwen2", 8),
    "qwen2.5-vl-3b": ("tiny-qwen2.5-vl", 16),
    "qwen-7b": ("tiny-qwen2", 16),
}

#: Step → make variables of a full run, and of a ``--quick`` one.
STEPS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "profile": ({"ROTATE": "hadamard"}, {"ROTATE": "hadamard", "NUM_SAMPLES": "16"}),
    "cpu": ({}, {"EVAL_WINDOWS": "4", "SEQ_LEN": "256"}),
    "qnn": ({}, {}),
    "sophgo": ({}, {}),
    "axera": ({}, {}),
    "axera-video": ({"MODE": "video"}, {"MODE": "video"}),
    "autoround": ({}, {"ITERS": "20", "NSAMPLES": "8"}),
}
#: Steps that are another make target with other variables (``axera-video``: ``make axera
#: MODE=video``); every other step is its own target.
TARGETS = {"axera-video": "axera"}
#: Per-model changes: Qwen1 fuses q/k/v, which rotation refuses, so it is profiled unrotated.
OVERRIDES = {("qwen-7b", "profile"): {"ROTATE": ""}}


def _run(command: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run ``command``, sampling its tree's RSS; exit code, seconds, peak, error line."""
    from common.core.resources import TreePeak

    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
        sampler = TreePeak(proc.pid)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            code = proc.wait()
        peak = sampler.stop()
    errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    return {
        "exit_code": code,
        "seconds": round(time.monotonic() - started, 1),
        "tree_peak_rss_bytes": peak,
        "error": errors[-1] if errors else None,
        "log": str(log),
    }


def borrow_vision_token_ids(config: Any, tokenizer_dir: Path) -> None:
    """Point a VL config's placeholder ids at the borrowed tokenizer's tokens: it numbers
    them its own way (the model's own tokenizer is not here), and a prompt's pictures are
    found by these ids."""
    from transformers import AutoTokenizer

    from common.models.tiny_models import VISION_TOKEN_FIELDS

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for key, token in VISION_TOKEN_FIELDS.items():
        if hasattr(config, key):
            setattr(config, key, tokenizer.convert_tokens_to_ids(token))


#: The public Qwen2.5-VL processor's pixel budgets (its ``preprocessor_config.json``;
#: transformers' Qwen2-VL video processor defaults), given to the borrowed tiny processor,
#: whose budget (224 x 224 px) is sized for tests: with it a 448 px picture shrank to 224.
PIXEL_BUDGETS = {
    "image_processor": {"shortest_edge": 3136, "longest_edge": 12845056},
    "video_processor": {"shortest_edge": 100352, "longest_edge": 602112},
}


def real_pixel_budgets(model_dir: Path) -> None:
    """Give ``model_dir``'s processor (if any) the real model's pixel budgets."""
    from common.core.records import write_json_atomic

    path = model_dir / "processor_config.json"
    if not path.is_file():
        return
    doc = json.loads(path.read_text())
    for part, size in PIXEL_BUDGETS.items():
        if part in doc:
            doc[part]["size"] = size
    write_json_atomic(path, doc)


def checkpoint(model: str, build_dir: Path) -> Path:
    """The model's random checkpoint, written once (atomically) and reused, its processor
    with the real model's pixel budgets (:func:`real_pixel_budgets`, also for one written
    before)."""
    from transformers import AutoConfig

    from common.core.recipes import load_recipe
    from common.core.records import atomic_path
    from common.export.random_checkpoint import write_random_checkpoint
    from common.steps.model_build import build_model

    out = build_dir / "bench" / "scale" / model / "checkpoint"
    if (out / "config.json").is_file():
        real_pixel_budgets(out)
        return out
    tiny, _ = MODELS[model]
    tokenizer_dir = build_model(load_recipe(tiny), build_dir, None)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        shutil.copy(CONFIGS / f"{model}.json", tmp / "config.json")
        remote = model == "qwen-7b"
        if remote:
            for name in ("configuration_qwen.py", "modeling_qwen.py"):
                shutil.copy(QWEN1_CODE / name, tmp / name)
        config = AutoConfig.from_pretrained(tmp, trust_remote_code=remote, local_files_only=True)
        borrow_vision_token_ids(config, tokenizer_dir)
        print(f"[bench-scale] writing the random {model} checkpoint", file=sys.stderr)
        write_random_checkpoint(config, tmp, tokenizer_dir=tokenizer_dir, trust_remote_code=remote)
        real_pixel_budgets(tmp)
    return out


def _report(build_dir: Path, model: str, step: str) -> dict[str, Any]:
    """The step's own report.json (empty when it wrote none)."""
    folders = {"cpu": "cpu-fp32-rotated", "sophgo": "sophgo-bm1684x", "axera": "axera-ax650"}
    folder = folders.get(TARGETS.get(step, step), step)
    for report in sorted((build_dir / model).glob(f"{folder}*/**/report.json")):
        return json.loads(report.read_text())
    return {}


def failed_gates(report: dict[str, Any]) -> list[str]:
    """The report's numerical gates that did not pass, ``name value (needs op limit)``: on
    random weights they say nothing about the build (logits are near ties), so a step that
    wrote its report and failed only these completed."""
    return [
        f"{gate['name']} {gate['value']:.4g} (needs {gate['op']} {gate['limit']})"
        for gate in report.get("gates", [])
        if not gate["passed"]
    ]


def run_step(model: str, step: str, build_dir: Path, quick: bool, timeout: float) -> dict:
    ckpt = checkpoint(model, build_dir)
    step_dir = build_dir / "bench" / "scale" / model / "runs" / step
    shutil.rmtree(step_dir, ignore_errors=True)
    step_dir.mkdir(parents=True)
    _, target_gib = MODELS[model]
    variables = dict(STEPS[step][1 if quick else 0])
    variables.update(OVERRIDES.get((model, step), {}))
    variables.update(MODEL=model, MODEL_PATH=str(ckpt), BUILD_DIR=str(step_dir),
                     MAX_MEMORY=f"{target_gib}GB")  # fmt: skip
    profiled = step_dir.parent / "profile" / model / "profile-hadamard" / "profile.json"
    if step == "qnn" and profiled.is_file():  # else make qnn profiles first, at full size
        variables["PROFILE"] = str(profiled)
    target = TARGETS.get(step, step)
    command = ["make", "--no-print-directory", target, *(f"{k}={v}" for k, v in variables.items())]
    print(f"[bench-scale] {' '.join(command)}", file=sys.stderr, flush=True)
    result = _run(command, step_dir / "log.txt", timeout)
    result.update(
        command=" ".join(command[2:]),
        max_memory_gib=target_gib,
        within_target=result["tree_peak_rss_bytes"] <= target_gib * GIB,
    )
    report = _report(step_dir, model, step)
    result.update(resources=report.get("resources"), failed_gates=failed_gates(report))
    if result["exit_code"] == 0 or result["failed_gates"]:  # keep logs and reports only
        for big in step_dir.rglob("*"):
            if big.is_file() and big.suffix in (".safetensors", ".mllm", ".onnx", ".data", ".bin"):
                big.unlink()
    # A failed step keeps its piece caches: the same command continues from its last
    # complete piece once the cause is fixed (the next bench run of the step starts over).
    return result


def _shown(step: str) -> str:
    """How a user types ``step``: its make target and the variables that make it this
    step (``axera-video``: ``axera MODE=video``)."""
    if step not in TARGETS:
        return step
    return " ".join([TARGETS[step], *(f"{k}={v}" for k, v in STEPS[step][0].items())])


def table(results: dict) -> str:
    """The README table: one row per model and step."""
    rows = [
        "| model | step | run | outcome | peak RSS (tree) | within target | time | MAX_MEMORY |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(results):
        r = results[key]
        model, step = key.split("/")
        within = "—"
        gates = r.get("failed_gates")
        if r["exit_code"] == 0 or gates:
            outcome = "completed"
            if gates:
                outcome += f" (failed on random weights: {'; '.join(gates)})"
            within = "yes" if r["within_target"] else "**no**"
        elif r["error"] and "needs about" in r["error"]:
            outcome = "stopped by preflight: " + r["error"].split(" needs about ")[1].split(" (")[0]
        else:
            outcome = f"exit {r['exit_code']}: {(r['error'] or 'see log')[:80]}"
        rows.append(
            f"| {model} | `make {_shown(step)}` | {'QUICK=1' if r.get('quick') else 'full'} "
            f"| {outcome} "
            f"| {r['tree_peak_rss_bytes'] / GIB:.2f} GiB "
            f"| {within} | {r['seconds'] / 60:.1f} min "
            f"| {r['max_memory_gib']} GiB |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", type=Path, default=REPO_ROOT / "build")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--quick", action="store_true", help="fewer samples and windows")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per step")
    parser.add_argument("--table", action="store_true", help="print the table and stop")
    args = parser.parse_args()
    from common.core.errors import EdgeforgeError
    from common.core.records import write_json_atomic

    out = args.build_dir / "bench" / "scale.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    if args.table:
        print(table(results))
        return 0
    for name in args.models.split(","):
        for step in args.steps.split(","):
            if name not in MODELS or step not in STEPS:
                raise EdgeforgeError(f"bench-scale: unknown model or step {name!r}/{step!r}")
            results[f"{name}/{step}"] = run_step(
                name, step, args.build_dir, args.quick, args.timeout
            ) | {"quick": args.quick}
            write_json_atomic(out, results)
    print(table(results))
    return 0


if __name__ == "__main__":
    from common.core.errors import run_cli

    run_cli(main)

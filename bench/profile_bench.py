"""``make bench``: cost of profiling against plain inference, and sequential-mode memory.

Not a test: it measures. Every measurement runs in its own child process so its peak RSS
(``ru_maxrss``) is its own. Writes ``build/bench/profile.json``:

* on ``smollm2-135m``, for the same calibration tokens: plain inference and whole-model
  profiling *interleaved window by window* in one process (the order alternates every
  window), so both see the same machine load — on a shared machine a sequence of separate
  runs measures the neighbours more than the profiler. Reported: summed wall and CPU
  seconds of each, the ratio of the sums, and the median of the per-window ratios, which
  the 1.3 × gate reads (a load spike during one window cannot move it); then sequential
  profiling of the same windows (ratio to the plain sum). Peak RSS of each child against
  the fp32 weight size (RSS ≤ 1.5 × weights + 1 GiB), the statistics' digest of both modes
  (sequential must equal whole-model), and the load average around each child;
* on a random-weight qwen2 of ≥ 2 GiB fp32 weights written shard per layer: sequential
  profiling's peak RSS against half the weight size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common.core.paths import REPO_ROOT

#: The random model: 16 layers of width 2048 / 5632, untied 32k vocab ≈ 3.55 GiB fp32. Deeper
#: than the issue's 2 GB floor on purpose: a profiling process holds ~0.6 GiB of imports
#: before any weight (torch, transformers, numba; ``import_rss_bytes``), so at 10 layers
#: (2.4 GiB) "below half" measured that fixed cost against a margin of 0.1 GiB or less, not
#: how the peak scales (one layer at a time).
BIG_DIMS = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
}
TIME_GATE = 1.3


def _digest(stats: dict) -> str:
    return hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()


def _interleaved(model_dir: str, windows) -> dict:
    """Plain and profiled forward of every window, alternating which goes first."""
    import torch

    from common.analysis.profiling import ActivationProfiler
    from common.models import get_adapter
    from common.models.loading import load_model

    model = load_model(Path(model_dir))
    profiler = ActivationProfiler(get_adapter(model))
    seconds = {"plain": [], "profile": []}
    cpu = {"plain": 0.0, "profile": 0.0}
    with torch.inference_mode():
        for i, window in enumerate(windows):
            for mode in ("plain", "profile") if i % 2 == 0 else ("profile", "plain"):
                wall, used = time.perf_counter(), time.process_time()
                if mode == "profile":
                    with profiler.attached():
                        model(input_ids=window[None], use_cache=False)
                else:
                    model(input_ids=window[None], use_cache=False)
                seconds[mode].append(time.perf_counter() - wall)
                cpu[mode] += time.process_time() - used
            print(f"[bench] window {i + 1}/{len(windows)}", file=sys.stderr, flush=True)
    wall, used = time.perf_counter(), time.process_time()
    digest = _digest(profiler.results())  # summarising is part of the profiling cost
    seconds["profile"][-1] += time.perf_counter() - wall
    cpu["profile"] += time.process_time() - used
    tokens = windows.numel()
    out = {
        mode: {
            "seconds": sum(seconds[mode]),
            "cpu_seconds": cpu[mode],
            "tokens_per_s": tokens / sum(seconds[mode]),
        }
        for mode in seconds
    }
    ratios = [p / q for p, q in zip(seconds["profile"], seconds["plain"], strict=True)]
    out["profile"] |= {
        "time_ratio_to_plain": out["profile"]["seconds"] / out["plain"]["seconds"],
        "cpu_ratio_to_plain": cpu["profile"] / cpu["plain"],
        "median_window_ratio": statistics.median(ratios),
        "stats_sha256": digest,
    }
    return out


def _rss_bytes() -> int:
    """This process's resident set now (``VmRSS``), in bytes."""
    from common.core.resources import kib_field

    return kib_field(Path("/proc/self/status"), "VmRSS") or 0


def _child(mode: str, model_dir: str, num_samples: int, seq_len: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401  (counted below)

    from common.analysis.profiling import profile_sequential
    from common.models.streaming import StreamedModel

    import_rss = _rss_bytes()  # the fixed cost every profiling process pays before weights
    load_before = os.getloadavg()
    if mode == "sequential-random":
        gen = torch.Generator().manual_seed(0)
        windows = torch.randint(0, BIG_DIMS["vocab_size"], (num_samples, seq_len), generator=gen)
    else:
        from common.inputs.data import CALIB_CORPUS, sample_windows
        from common.models.loading import load_tokenizer

        windows = sample_windows([CALIB_CORPUS], load_tokenizer(model_dir), num_samples, seq_len, 0)
    if mode == "whole":
        result = _interleaved(model_dir, windows)
    else:
        wall, used = time.perf_counter(), time.process_time()
        digest = _digest(profile_sequential(StreamedModel(Path(model_dir)), windows).results())
        seconds = time.perf_counter() - wall
        result = {
            "seconds": seconds,
            "cpu_seconds": time.process_time() - used,
            "tokens_per_s": windows.numel() / seconds,
            "stats_sha256": digest,
        }
    return {
        "mode": mode,
        "tokens": windows.numel(),
        **result,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "import_rss_bytes": import_rss,
        "loadavg_1_5_15_before": load_before,
        "loadavg_1_5_15_after": os.getloadavg(),
    }


def _measure(mode: str, model_dir: Path, num_samples: int, seq_len: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--model-dir", str(model_dir),
         "--num-samples", str(num_samples), "--seq-len", str(seq_len)],
        stdout=subprocess.PIPE, text=True, check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"bench child {mode} failed (exit {proc.returncode}); see its stderr")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"[bench] {mode}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def weight_bytes(model_dir: Path) -> int:
    from common.models.loading import check_model_dir

    return sum(f.stat().st_size for f in check_model_dir(model_dir).weight_files)


def write_random_model(out: Path) -> Path:
    """A random-weight qwen2 checkpoint in float32, sharded (written a tensor at a time)."""
    import torch
    from transformers import Qwen2Config

    from common.export.random_checkpoint import write_random_checkpoint

    if (out / "model.safetensors.index.json").is_file():
        return out
    config = Qwen2Config(**BIG_DIMS, tie_word_embeddings=False, max_position_embeddings=4096)
    return write_random_checkpoint(config, out, dtype=torch.float32)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--build-dir", type=Path, default=REPO_ROOT / "build")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--big-samples", type=int, default=4)
    parser.add_argument("--big-seq-len", type=int, default=128)
    parser.add_argument("--child", default=None)
    parser.add_argument("--model-dir", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.model_dir, args.num_samples, args.seq_len)))
        return
    from common.core.recipes import load_recipe
    from common.core.records import write_json_atomic
    from common.steps.model_build import build_model

    small = build_model(load_recipe("smollm2-135m"), args.build_dir, None)
    small_bytes = weight_bytes(small)
    whole = _measure("whole", small, args.num_samples, args.seq_len)
    sequential = _measure("sequential", small, args.num_samples, args.seq_len)
    plain_seconds = whole["plain"]["seconds"]
    sequential["time_ratio_to_plain"] = sequential["seconds"] / plain_seconds
    budget = int(1.5 * small_bytes + 2**30)
    for run in (whole, sequential):
        run["rss_budget_bytes"] = budget
        run["rss_within_budget"] = run["peak_rss_bytes"] <= budget
    whole["time_within_1_3x"] = whole["profile"]["median_window_ratio"] <= TIME_GATE
    big = write_random_model(args.build_dir / "bench" / "random-qwen2-3.5g")
    big_bytes = weight_bytes(big)
    big_run = _measure("sequential-random", big, args.big_samples, args.big_seq_len)
    big_run["weights_bytes"] = big_bytes
    big_run["rss_below_half_weights"] = big_run["peak_rss_bytes"] < big_bytes / 2
    report = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": _torch_threads()},
        "smollm2-135m": {
            "weights_bytes": small_bytes,
            "num_samples": args.num_samples,
            "seq_len": args.seq_len,
            "whole": whole,
            "sequential": sequential,
            "sequential_stats_identical": sequential["stats_sha256"]
            == whole["profile"]["stats_sha256"],
        },
        "random_qwen2": big_run,
    }
    write_json_atomic(args.build_dir / "bench" / "profile.json", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""``make bench``: cost of profiling against plain inference, and sequential-mode memory.

Not a test: it measures. Every measurement runs in its own child process so its peak RSS
(``ru_maxrss``) is its own. Writes ``build/bench/profile.json``:

* on ``smollm2-135m``, for the same calibration tokens: wall time of plain inference,
  of whole-model profiling and of sequential profiling, their ratio to plain, tokens/s,
  and each one's peak RSS next to the fp32 weight size (the issue's targets: time ≤ 1.3 ×
  plain, RSS ≤ 1.5 × weights + 1 GiB);
* on a random-weight qwen2 of ≥ 2 GiB fp32 weights written shard per layer: sequential
  profiling's peak RSS against half the weight size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

#: The random model: 10 layers of width 2048 / 5632, untied 32k vocab ≈ 2.5 GiB fp32.
BIG_DIMS = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 10,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
}


def _child(mode: str, model_dir: str, num_samples: int, seq_len: int) -> dict:
    import torch

    from common.profiling import profile_model, profile_sequential

    if mode == "sequential-random":
        gen = torch.Generator().manual_seed(0)
        windows = torch.randint(0, BIG_DIMS["vocab_size"], (num_samples, seq_len), generator=gen)
    else:
        from common.data import CALIB_CORPUS, sample_windows
        from common.models.loading import load_tokenizer

        windows = sample_windows([CALIB_CORPUS], load_tokenizer(model_dir), num_samples, seq_len, 0)
    start = time.perf_counter()
    if mode == "plain":
        from common.models.loading import load_model

        model = load_model(Path(model_dir))
        start = time.perf_counter()
        with torch.inference_mode():
            for window in windows:
                model(input_ids=window[None], use_cache=False)
    elif mode == "whole":
        from common.models.loading import load_model

        model = load_model(Path(model_dir))
        start = time.perf_counter()
        profile_model(model, windows).results()
    else:
        profile_sequential(Path(model_dir), windows).results()
    seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "seconds": seconds,
        "tokens": windows.numel(),
        "tokens_per_s": windows.numel() / seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _measure(mode: str, model_dir: Path, num_samples: int, seq_len: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--model-dir", str(model_dir),
         "--num-samples", str(num_samples), "--seq-len", str(seq_len)],
        capture_output=True, text=True, check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"bench child {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def weight_bytes(model_dir: Path) -> int:
    from common.models.loading import check_model_dir

    return sum(f.stat().st_size for f in check_model_dir(model_dir).weight_files)


def write_random_model(out: Path) -> Path:
    """A random-weight qwen2 checkpoint, one safetensors shard per part (fp32)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (out / "model.safetensors.index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = Qwen2Config(**BIG_DIMS, tie_word_embeddings=False, max_position_embeddings=4096)
    with torch.device("meta"):
        skeleton = Qwen2ForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, param in skeleton.named_parameters():
        part = name.split(".")[2] if ".layers." in name else name.split(".")[-2]
        groups.setdefault(part, []).append((name, param.shape))
    for part, params in groups.items():
        shard = f"part-{part}.safetensors"
        tensors = {}
        for name, shape in params:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape)
            else:
                tensors[name] = torch.randn(shape, generator=gen) * 0.02
            weight_map[name] = shard
        save_file(tensors, str(out / shard))
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(out)
    return out


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
    from common.model_build import build_model
    from common.recipes import load_recipe
    from common.records import write_json_atomic

    small = build_model(load_recipe("smollm2-135m"), args.build_dir, None)
    small_bytes = weight_bytes(small)
    runs = {
        m: _measure(m, small, args.num_samples, args.seq_len)
        for m in ("plain", "whole", "sequential")
    }
    for mode in ("whole", "sequential"):
        runs[mode]["time_ratio_to_plain"] = runs[mode]["seconds"] / runs["plain"]["seconds"]
        runs[mode]["rss_budget_bytes"] = int(1.5 * small_bytes + 2**30)
        runs[mode]["rss_within_budget"] = (
            runs[mode]["peak_rss_bytes"] <= runs[mode]["rss_budget_bytes"]
        )
        runs[mode]["time_within_1_3x"] = runs[mode]["time_ratio_to_plain"] <= 1.3
    big = write_random_model(args.build_dir / "bench" / "random-qwen2-2.5g")
    big_bytes = weight_bytes(big)
    big_run = _measure("sequential-random", big, args.big_samples, args.big_seq_len)
    big_run["weights_bytes"] = big_bytes
    big_run["rss_below_half_weights"] = big_run["peak_rss_bytes"] < big_bytes / 2
    report = {
        "smollm2-135m": {"weights_bytes": small_bytes, "num_samples": args.num_samples,
                         "seq_len": args.seq_len, **runs},
        "random_qwen2": big_run,
    }  # fmt: skip
    write_json_atomic(args.build_dir / "bench" / "profile.json", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

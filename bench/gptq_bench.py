"""GPTQ of one decoder layer at Qwen1.5-1.8B's shape: where the time goes, against a baseline.

Not a test: it measures. One random-weight qwen2 layer (hidden 2048, 16 heads and 16 KV
heads of 128, intermediate 5504, q/k/v biases) goes through the steps of
:func:`common.backends.sequential_gptq`'s per-layer work on ``--windows`` × ``--seq-len``
random hidden states (32 × 256 = 8192 tokens, what ``make qnn`` calibrates on):

* pass 1, forward with the Hessian hooks: the working tree's shared, early-stopping hooks
  against the plain way (one :class:`HessianObserver` per linear over whole passes, on a
  copy of the layer so the two sets of hooks never see each other's passes), *interleaved
  window by window* (the order alternates), with a hook-free forward as a third column;
* ``gptq_levels`` of every linear: the working tree's against ``common/quant/gptq.py`` at
  git ``--baseline``, interleaved linear by linear, on the same Hessian;
* pass 2, the forward with the rounded weights (the same code on both sides: timed once).

On a shared machine a run of one side and then the other measures the neighbours more than
the code; interleaving the small steps gives both the same load. Reported: per-part sums
for each side, the ratio of the totals, the load average, and whether the two sides gave
the same Hessians and levels bit for bit. Writes ``build/bench/gptq.json``.

    .venv/bin/python bench/gptq_bench.py --baseline cfbff2c  # the commit before the speed-up
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from common.core.paths import REPO_ROOT

#: Qwen1.5-1.8B's decoder layer (its config; ``vocab_size`` kept small: no layer reads it).
DIMS = {
    "hidden_size": 2048,
    "intermediate_size": 5504,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "num_hidden_layers": 1,
    "vocab_size": 1024,
    "max_position_embeddings": 32768,
}

Run = Callable[[torch.Tensor], torch.Tensor]


def _module_at(rev: str, path: str, name: str, folder: Path) -> ModuleType:
    """The file ``path`` as of git ``rev``, imported as module ``name`` from ``folder`` (a
    real file, so numba can cache beside it)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=REPO_ROOT, check=True, capture_output=True, text=True
    ).stdout
    file = folder / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _layer(seq_len: int) -> tuple[nn.Module, dict[str, nn.Linear], torch.Tensor, torch.Tensor]:
    """One random qwen2 layer as its prefill piece, its named linears, positions and mask."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from common.export import piece_export as pe
    from common.models import get_adapter
    from common.models.static_decoder import BlockPiece, piece_dims, rotary_table

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**DIMS)).float().eval()
    adapter = get_adapter(model)
    layer = adapter.layers()[0]
    block = BlockPiece(layer, piece_dims(adapter, seq_len), *rotary_table(adapter, seq_len))
    fixed = pe.prefill_inputs(list(range(seq_len)), seq_len)
    positions = torch.from_numpy(fixed["position_ids"]).long()
    mask = torch.from_numpy(fixed["attention_mask"])
    linears = {layer.linear_names[r]: m for r, m in layer.linears.items()}
    return block, linears, positions, mask


def _seconds(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--baseline", default="HEAD", help="git revision of gptq.py to time against"
    )
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "bench" / "gptq.json")
    args = parser.parse_args()

    from common.backends.sequential_gptq import _InputHessians
    from common.quant import gptq as current
    from common.quant.int8 import dequantize

    load = [os.getloadavg()[0]]
    block, linears, positions, mask = _layer(args.seq_len)
    # Copies (taken before any hook): the baseline's hooks, and a forward without hooks.
    plain_block, plain_linears = copy.deepcopy((block, linears))
    bare_block = copy.deepcopy(block)

    def piece(b: nn.Module) -> Run:
        return lambda h: b(h, positions, mask)[0]

    run, plain_run, bare_run = piece(block), piece(plain_block), piece(bare_block)
    gen = torch.Generator().manual_seed(1)
    hidden = [
        torch.randn(1, args.seq_len, DIMS["hidden_size"], generator=gen)
        for _ in range(args.windows)
    ]
    with tempfile.TemporaryDirectory() as folder:
        baseline = _module_at(args.baseline, "common/quant/gptq.py", "gptq_baseline", Path(folder))
        for module in (current, baseline):  # compile (or load) any kernel before timing
            module.gptq_levels(torch.randn(4, 8), torch.eye(8), 8)

        shared = _InputHessians(linears)
        plain = {n: baseline.HessianObserver(m.in_features) for n, m in plain_linears.items()}
        for name, linear in plain_linears.items():
            linear.register_forward_pre_hook(lambda _m, a, o=plain[name]: o.observe(a[0]))
        pass1 = {"current": 0.0, "baseline": 0.0, "no_hooks": 0.0}
        steps: dict[str, Callable[[torch.Tensor], object]] = {
            "current": lambda h: shared.forward(run, h),
            "baseline": plain_run,
            "no_hooks": bare_run,
        }
        with torch.no_grad():
            for i, h in enumerate(hidden):
                for side in list(steps) if i % 2 == 0 else list(reversed(steps)):
                    pass1[side] += _seconds(lambda s=side, h=h: steps[s](h))
        shared.remove()
        hessians = shared.hessians()
        plain_hessians = {n: o.hessian() for n, o in plain.items()}
        load.append(os.getloadavg()[0])

        gptq = {"current": {}, "baseline": {}}
        same_levels = True
        for i, (name, linear) in enumerate(linears.items()):
            got = {}
            sides = {
                "current": lambda n=name, w=linear.weight: current.gptq_levels(w, hessians[n], 8),
                "baseline": lambda n=name, w=linear.weight: baseline.gptq_levels(
                    w, plain_hessians[n], 8
                ),
            }
            for side in list(sides) if i % 2 == 0 else list(reversed(sides)):
                start = time.perf_counter()
                got[side] = sides[side]()
                gptq[side][name] = time.perf_counter() - start
            same_levels &= all(map(torch.equal, got["current"], got["baseline"]))
            linear.weight.data = dequantize(*got["current"])
        load.append(os.getloadavg()[0])

        with torch.no_grad():
            pass2 = _seconds(lambda: [run(h) for h in hidden])
        load.append(os.getloadavg()[0])

    parts = {
        side: {
            "pass1_forward_and_hessians": pass1[side],
            "gptq_levels": sum(gptq[side].values()),
            "pass2_forward": pass2,
            "gptq_levels_per_linear": gptq[side],
        }
        for side in ("current", "baseline")
    }
    totals = {
        side: p["pass1_forward_and_hessians"] + p["gptq_levels"] + p["pass2_forward"]
        for side, p in parts.items()
    }
    report = {
        "dims": DIMS,
        "tokens": args.windows * args.seq_len,
        "threads": torch.get_num_threads(),
        "baseline": args.baseline,
        "parts": parts,
        "pass1_forward_without_hooks": pass1["no_hooks"],
        "totals": totals,
        "ratio_baseline_over_current": totals["baseline"] / totals["current"],
        "same_hessians": all(torch.equal(hessians[n], plain_hessians[n]) for n in linears),
        "same_levels": same_levels,
        "load_average_1m": load,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

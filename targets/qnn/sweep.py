"""``make qnn-sweep``: the presets built side by side, one table to choose from.

Runs ``make qnn``'s build (``build.py``) once per preset with the same model, profile and
options, each into the usual ``build/<MODEL>/qnn/`` (so the piece cache and the profile
are shared), and moves each package to ``build/<MODEL>/qnn-sweep/<preset>/``. Then
writes ``sweep.json`` and ``sweep.md`` there: per preset the accuracy block of its report
(held-out perplexity ratio to float, top-1 agreement with its 95 % interval, from the
binaries on the emulator), the bytes of its context binaries, its build time and its
gates. A preset whose gates fail still has its row (its report is written before the
gate fails); one that stops with an error has its ``error:`` line instead.
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

from common.core.errors import EdgeforgeError, reported_error, run_cli
from common.core.paths import REPO_ROOT
from common.core.recipes import load_recipe, model_build_dir
from common.core.records import atomic_path, write_bytes_atomic, write_json_atomic
from common.quant.schemes import schemes_for

BUILD = Path(__file__).with_name("build.py")
#: make qnn's presets, in registry order (the schemes naming the qnn backend).
PRESETS = schemes_for("qnn")


def sweep_row(preset: str, package: Path, seconds: float, error: str | None) -> dict[str, Any]:
    """One preset's row from its package (``report.json``, ``<SOC>/*.bin``)."""
    if error is not None:
        return {"preset": preset, "error": error, "seconds": round(seconds, 1)}
    report = json.loads((package / "report.json").read_text())
    accuracy = report["end_to_end"]["accuracy"]
    binaries = sorted(package.glob("*/*_qnn.bin"))
    return {
        "preset": preset,
        "ppl_ratio": accuracy["ppl_ratio"],
        "top1_agreement": accuracy["top1_agreement"],
        "top1_interval_95": accuracy["top1_interval_95"],
        "rows": accuracy["rows"],
        "graph": accuracy["graph"],
        "worst_piece_cos": min(
            row["cos_vs_float"] for row in report["layers"] if row["cos_vs_float"] is not None
        ),
        "binary_bytes": sum(path.stat().st_size for path in binaries),
        "binaries": len(binaries),
        "socs": sorted(report["socs"]),
        "seconds": round(seconds, 1),
        "failed_gates": [g["name"] for g in report["gates"] if not g["passed"]],
    }


def sweep_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of :func:`sweep_row` rows."""
    lines = [
        "| preset | ppl ratio | top-1 (95 % interval) | worst piece cos | binaries | build "
        "| gates |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| `{row['preset']}` | — | — | — | — | {row['seconds'] / 60:.1f} min "
                         f"| error: {row['error']} |")  # fmt: skip
            continue
        low, high = row["top1_interval_95"]
        gates = "pass" if not row["failed_gates"] else "fail: " + ", ".join(row["failed_gates"])
        lines.append(
            f"| `{row['preset']}` | {row['ppl_ratio']:.4f} | {row['top1_agreement']:.4f} "
            f"({low:.3f}-{high:.3f}) | {row['worst_piece_cos']:.5f} "
            f"| {row['binary_bytes'] / 2**20:.1f} MiB ({row['binaries']}) "
            f"| {row['seconds'] / 60:.1f} min | {gates} |"
        )
    return "\n".join(lines)


def _run_shown(command: list[str]) -> tuple[int, str]:
    """Run ``command`` with its stderr (progress bars, log lines) passed through as it
    comes, and kept: its exit code and the last 64 KB of what it wrote."""
    kept = bytearray()
    with subprocess.Popen(command, stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):  # type: ignore[union-attr]
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            kept = (kept + chunk)[-65536:]
    return proc.returncode, kept.decode(errors="replace")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--build-dir", type=Path, default=REPO_ROOT / "build")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma list")
    args, passed = parser.parse_known_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown or not presets:
        raise EdgeforgeError(
            f"PRESETS={args.presets}: expected a comma list of {', '.join(PRESETS)}"
        )
    if any(arg.startswith("--preset") and arg != "--presets" for arg in passed):
        raise EdgeforgeError("qnn-sweep sets each build's PRESET itself; give PRESETS=")
    model_dir = model_build_dir(load_recipe(args.model), args.build_dir)
    built, out = model_dir / "qnn", model_dir / "qnn-sweep"
    rows = []
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for preset in presets:
            command = [sys.executable, str(BUILD), "--model", args.model, "--build-dir",
                       str(args.build_dir), "--preset", preset, *passed]  # fmt: skip
            print(f"[qnn-sweep] {preset}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
            start = time.monotonic()
            code, stderr = _run_shown(command)
            written = code in (0, 1) and (built / "report.json").is_file()
            error = None if written else reported_error(stderr) or stderr.strip()[-300:]
            if written:
                shutil.move(str(built), str(tmp / preset))
            rows.append(sweep_row(preset, tmp / preset, time.monotonic() - start, error))
        write_json_atomic(tmp / "sweep.json", {"model": args.model, "rows": rows})
        table = sweep_table(rows)
        write_bytes_atomic(
            tmp / "sweep.md", f"# make qnn-sweep: {args.model}\n\n{table}\n".encode()
        )
    print(table)
    return 0


if __name__ == "__main__":
    run_cli(main)

"""mllm's ``export_rotate_model.py --config_file``: the FP32 rotated model for the mllm
CPU runtime, which is the ``cpu-fp32-rotated`` target (``make qnn-rotated-fp32``)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

CPU_BUILD = Path(__file__).resolve().parent.parent / "cpu-fp32-rotated" / "build.py"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config_file", type=Path, required=True)
    p.add_argument("--model", required=True, help="edgeforge recipe (models/<name>.json)")
    p.add_argument("--build-dir", default=None)
    args = p.parse_args()
    cmd = [sys.executable, str(CPU_BUILD), "--model", args.model, "--config", str(args.config_file)]
    if args.build_dir:
        cmd += ["--build-dir", args.build_dir]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())

"""mllm's ``export_qnn_model.py --config_file``: ``make qnn`` driven by the config's
``export_config`` (``scale_file`` = our profile JSON, ``t01m_clip_threshold`` unless
``clip_all``, ``quant_bias``); ``model.int8.mllm`` is then copied to ``output_model``.

The rotation is the one the profile was made with (its ``transforms``): profile with
``get_distribution.py`` and the same config first.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from common.backends.qnn_config import load_qnn_config
from common.core.errors import EdgeforgeError, run_cli
from common.core.recipes import load_recipe, model_build_dir

HERE = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config_file", type=Path, required=True)
    p.add_argument("--model", required=True, help="edgeforge recipe (models/<name>.json)")
    p.add_argument("--build-dir", type=Path, default=None)
    args = p.parse_args()
    section = load_qnn_config(args.config_file)["export_config"]
    base = args.config_file.resolve().parent
    cmd = [
        sys.executable,
        str(HERE / "build.py"),
        "--model",
        args.model,
        "--profile",
        str(base / section["scale_file"]),
    ]
    if args.build_dir:
        cmd += ["--build-dir", str(args.build_dir)]
    if not section.get("clip_all") and section.get("t01m_clip_threshold") is not None:
        cmd += ["--t", str(section["t01m_clip_threshold"])]
    if section.get("quant_bias"):
        cmd += ["--quant-bias"]
    code = subprocess.call(cmd)
    if code:
        return code
    built = model_build_dir(load_recipe(args.model), args.build_dir) / "qnn" / "model.int8.mllm"
    if not built.is_file():
        raise EdgeforgeError(f"{built}: make qnn did not write the int8 model")
    dest = base / section["output_model"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(built, dest)
    print(f"[qnn] wrote {dest}")
    return 0


if __name__ == "__main__":
    run_cli(main)

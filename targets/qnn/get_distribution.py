"""mllm's ``get_distribution.py --config_file``: profile activations as the config's
``profile_config`` says (thin wrapper over ``common.steps.profile_cli profile --config-file``).

``--model`` names the edgeforge recipe (architecture, tokenizer, model build); the
config's ``model_name`` is the checkpoint directory, resolved against the config file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.steps import profile_cli


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config_file", type=Path, required=True)
    p.add_argument("--model", required=True, help="edgeforge recipe (models/<name>.json)")
    p.add_argument("--build-dir", default=None)
    args = p.parse_args()
    sys.argv = [
        sys.argv[0],
        "profile",
        "--model",
        args.model,
        "--config-file",
        str(args.config_file),
    ]
    if args.build_dir:
        sys.argv += ["--build-dir", args.build_dir]
    from common.core.errors import run_cli

    run_cli(profile_cli.main)


if __name__ == "__main__":
    main()

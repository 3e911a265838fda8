"""Command-line entry point behind the Makefile: ``python -m common.steps.cli <step> ...``.

Each subcommand is one build step; library code raises ``EdgeforgeError`` for bad input
and :func:`common.core.errors.run_cli` turns it into one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.core.errors import run_cli
from common.steps.profile_cli import add_sequential


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="recipe name (models/<name>.json)")
    parser.add_argument("--build-dir", type=Path, default=None, help="default: build/")
    parser.add_argument(
        "--model-path",
        type=Path,
        default=None,
        help="Hugging Face directory of a hub checkpoint (MODEL_PATH=)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeforge", description=__doc__)
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("list", help="list the known model recipes")
    _add_model_args(sub.add_parser("model", help="build or resolve the model directory"))
    ev = sub.add_parser("eval", help="held-out perplexity and canary prompt")
    _add_model_args(ev)
    ev.add_argument("--corpus", type=Path, default=None, help="default: the shipped eval split")
    ev.add_argument("--seq-len", type=int, default=None)
    ev.add_argument("--num-windows", type=int, default=None)
    ev.add_argument("--max-memory", default=None, help="memory cap checked up front, e.g. 16GB")
    add_sequential(ev)
    return parser


def main() -> int:
    args = _parser().parse_args()
    from common.core.recipes import RECIPE_DIR, known_recipes, load_recipe, load_recipe_file

    if args.step == "list":
        for name in known_recipes():
            recipe = load_recipe_file(RECIPE_DIR / f"{name}.json")
            print(f"{name:<22} {recipe.model_type:<11} {recipe.source['kind']}")
        return 0

    from common.steps.model_build import build_model

    recipe = load_recipe(args.model)
    model_dir = build_model(recipe, args.build_dir, args.model_path)
    if args.step == "eval":
        from common.core.memory import parse_size
        from common.inputs.data import EVAL_CORPUS
        from common.steps.eval_step import run_eval

        run_eval(
            recipe,
            model_dir,
            corpus=args.corpus or EVAL_CORPUS,
            build_dir=args.build_dir,
            seq_len=args.seq_len,
            num_windows=args.num_windows,
            max_memory=parse_size(args.max_memory) if args.max_memory else None,
            sequential=args.sequential,
        )
    return 0


if __name__ == "__main__":
    run_cli(main)

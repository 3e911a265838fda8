"""The ``make profile`` variables of the profile ``make qnn`` makes when none exists.

Prints ``IMAGES=<folder> IMAGE_SIZE=<px>`` for a vision-language recipe and nothing for a
text one: the language model's ranges must cover picture tokens, seen at the size the
build's picture prompts use. Both resolve as ``make qnn`` resolves them (command line,
then the recipe's ``targets.qnn``, then the defaults), so the profile and the build agree.

Usage (from ``targets/qnn/target.mk``): ``profile_vars.py MODEL [IMAGES] [IMAGE_SIZE]``.
"""

from __future__ import annotations

import sys

from build import TARGET, Options, parse_args  # this folder (first on sys.path)

from common.core.errors import run_cli
from common.core.options import resolve_target
from common.core.recipes import load_recipe
from common.models import adapter_class


def main(argv: list[str] | None = None) -> int:
    model, *given = sys.argv[1:] if argv is None else argv
    flags = [f for flag, value in zip(("--images", "--image-size"), given, strict=False)
             if value for f in (flag, value)]  # fmt: skip
    recipe = load_recipe(model)
    source = f"models/{model}.json: model_type"
    if adapter_class(recipe.model_type, source=source).is_vision_language:
        options = resolve_target(Options, parse_args(["--model", model, *flags]), recipe, TARGET)
        print(f"IMAGES={options.images} IMAGE_SIZE={options.image_size}")
    return 0


if __name__ == "__main__":
    run_cli(main)

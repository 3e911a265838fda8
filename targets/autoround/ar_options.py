"""Options of the AutoRound step: declared once, merged, and checked before any work.

Precedence: command line (make variables) > the recipe's ``targets.autoround`` object >
the defaults here. Everything a user can get wrong is checked in :func:`resolve` or
:func:`check_against_model`, so minutes of tuning never end in an option error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.core.errors import EdgeforgeError
from common.core.options import (
    Boolean,
    Choice,
    ChoiceList,
    FilePath,
    Integer,
    Kind,
    Number,
    describe,
    given_options,
    option,
)
from common.core.options import resolve as resolve_options
from common.quant.rtn import SUPPORTED_BITS, check_group_size
from common.quant.schemes import SCHEMES, QuantScheme
from common.steps.preflight import max_memory_option

#: Export formats this step produces and reloads, with the bit widths each can store.
#: AWQ's GEMM layout packs 4-bit codes only; GPTQ and AutoRound's own layout take 2/3/4/8;
#: the GGUF types named here are 4-bit llama.cpp block types.
FORMAT_BITS: dict[str, tuple[int, ...]] = {
    "auto_round": SUPPORTED_BITS,
    "auto_gptq": SUPPORTED_BITS,
    "auto_awq": (4,),
    "gguf:q4_0": (4,),
    "gguf:q4_k_m": (4,),
}

#: The grid each GGUF type fixes (AutoRound derives its scheme from the type, so GROUP_SIZE
#: and SYM cannot choose): Q4_0 is blocks of 32 weights sharing one fp16 scale, codes
#: -8..7 (symmetric); Q4_K is 256-weight super-blocks of eight 32-weight sub-blocks, each with
#: a 6-bit scale and min (asymmetric). "_M" mixes in Q6_K for attn_v / half of ffn_down.
GGUF_GRID: dict[str, tuple[int, bool]] = {"gguf:q4_0": (32, True), "gguf:q4_k_m": (32, False)}

#: Defaults (the Options fields below) are sized for a CPU run (AutoRound's own are iters 200,
#: nsamples 128, seqlen 2048, tuned for GPUs): with these SmolLM2-135M W4 g32 reaches ppl
#: ratio 1.095 (RTN: 1.261) in 22 CPU-minutes; W4 group 32 is the accuracy-first int4 scheme.
#:
#: GGUF runs default to auto-round's own advice for its current GGUF export: no sign-round
#: steps (``iters=0``), i.e. its optimized RTN, which searches each block's scale (and min)
#: weighted by an importance matrix taken from the calibration data. Sign-round steps do not
#: pay off there without its ``enable_alg_ext`` extension (auto-round's warning); on
#: SmolLM2 Q4_K_M, 5 steps kept every block at its initial rounding.
GGUF_DEFAULT_ITERS = 0

#: The registry entry (common/quant/schemes.py) whose grid the options below default to.
DEFAULT_SCHEME = "w4g32"
_DEFAULT = SCHEMES[DEFAULT_SCHEME].weights

#: How "beats RTN" is judged: lower held-out perplexity, higher logits cosine to the float
#: model, or both. Perplexity is meaningless for random-weight test models (it sits near the
#: vocabulary size and moves by noise), so their recipes judge fidelity (cosine) only.
RTN_GATES = ("both", "ppl", "cosine")

#: Keys a custom chat-template JSON must have (AutoRound's template format, seed 004).
TEMPLATE_KEYS = ("model_type", "format_user", "format_assistant")


@dataclass(frozen=True)
class GroupSize(Kind):
    """-1 (one group per row) or a positive group size."""

    @property
    def schema(self) -> dict[str, Any]:
        return {"type": "integer", "anyOf": [{"const": -1}, {"minimum": 1}]}

    def parse(self, value: Any) -> int:
        number = Integer().parse(value)
        if number == 0 or number < -1:
            raise ValueError("must be -1 (per row) or a positive integer")
        return number


@dataclass(frozen=True)
class Options:
    """Options of ``make autoround`` (command line > recipe ``targets.autoround`` > these)."""

    bits: int = option(_DEFAULT.bits, Choice(SUPPORTED_BITS), "weight bits", make="BITS")
    group_size: int = option(
        _DEFAULT.group_size, GroupSize(), "-1 or a divisor of every layer", make="GROUP_SIZE"
    )
    sym: bool = option(_DEFAULT.symmetric, Boolean(), "1 symmetric, 0 asymmetric", make="SYM")
    iters: int = option(
        20, Integer(0), f"AutoRound tuning steps per block (0 = its RTN; GGUF: "
        f"{GGUF_DEFAULT_ITERS})", make="ITERS",
    )  # fmt: skip
    nsamples: int = option(16, Integer(1), "calibration samples", make="NSAMPLES")
    seqlen: int = option(128, Integer(8), "calibration tokens per sample", make="SEQLEN")
    formats: tuple[str, ...] = option(
        ("auto_round",),
        ChoiceList(tuple(FORMAT_BITS), text_in_recipe=False),
        "comma list of auto_round,auto_gptq,auto_awq; or gguf:q4_0|gguf:q4_k_m alone",
        make="FORMAT",
        recipe="formats",
    )
    quant_nontext_module: bool = option(
        False, Boolean(), "1: quantize the vision tower too", make="QUANT_NONTEXT"
    )
    max_ppl_ratio: float = option(
        1.10, Number(above=0), "gate: held-out perplexity ratio to float", flag="--max-ppl-ratio"
    )
    rtn_gate: str = option("both", Choice(RTN_GATES), "beat RTN on", flag="--rtn-gate")
    seed: int = option(42, Integer(0), "calibration sampling seed", flag="--seed")
    data: Path | None = option(
        None,
        FilePath(),
        "local calibration .json/.jsonl (default: corpus)",
        make="DATA",
        recipe=False,
    )
    images: Path | None = option(
        None, FilePath(), "image folder of a LLaVA-style DATA file", make="IMAGES", recipe=False
    )
    template: Path | None = option(
        None,
        FilePath(),
        "custom chat-template JSON (AutoRound format)",
        make="TEMPLATE",
        recipe=False,
    )
    eval_windows: int | None = option(
        None,
        Integer(1),
        "held-out windows (default: recipe eval)",
        make="EVAL_WINDOWS",
        recipe=False,
    )
    sequential: bool | None = option(
        None,
        Boolean(),
        "1: block by block, 0: whole model (default: block by block where the model and "
        "formats allow)",
        make="SEQUENTIAL",
        recipe=False,
    )
    max_memory: int | None = max_memory_option()

    def as_record(self) -> dict[str, Any]:
        """JSON-friendly form for the manifest and report."""
        return describe(self)


def scheme_of(options: Options) -> QuantScheme:
    """The named scheme (``w4g32``, the default) with this run's weight grid: what the
    exported checkpoint holds. ``ITERS=0`` is AutoRound's RTN (scales searched, levels
    rounded to nearest), otherwise its signed-gradient rounding."""
    grouped = options.group_size != -1
    return dataclasses.replace(
        SCHEMES[DEFAULT_SCHEME].with_weights(
            dtype=f"int{options.bits}",
            granularity="group" if grouped else "per_channel",
            group_size=options.group_size if grouped else None,
            symmetric=options.sym,
            rounding="autoround" if options.iters else "nearest",
        ),
        name=f"w{options.bits}g{options.group_size if grouped else 'row'}"
        + ("" if options.sym else "-asym"),
    )


def folder_name(fmt: str) -> str:
    """The output folder of ``fmt`` (``gguf:q4_0`` → ``gguf-q4_0``: no colon in paths)."""
    return fmt.replace(":", "-")


def is_gguf(options: Options) -> bool:
    """Whether this run exports a GGUF file (one format, reloaded through transformers)."""
    return options.formats[0] in GGUF_GRID


def resolve(
    cli: argparse.Namespace | dict[str, Any],
    recipe_defaults: dict[str, Any],
    where: str = "recipe targets.autoround",
) -> Options:
    """Merge command line over recipe over defaults and validate every value, then the
    combinations: formats with bits, a GGUF type's fixed grid, the paths."""
    options = resolve_options(Options, cli, recipe_defaults, where=where)
    given = given_options(Options, cli)
    gguf = [fmt for fmt in options.formats if fmt in GGUF_GRID]
    if gguf and len(options.formats) > 1:
        raise EdgeforgeError(
            f"FORMAT {gguf[0]} must be the only format of a run: the GGUF type fixes the "
            f"quantization grid, so it cannot share tuned weights with "
            f"{', '.join(options.formats)}; run once per format"
        )
    for fmt in options.formats:
        if options.bits not in FORMAT_BITS[fmt]:
            raise EdgeforgeError(
                f"BITS={options.bits} is not supported by FORMAT {fmt} (it stores "
                f"{'/'.join(map(str, FORMAT_BITS[fmt]))}-bit weights)"
            )
    if gguf:
        group_size, sym = GGUF_GRID[gguf[0]]
        if "group_size" in given and options.group_size != group_size:
            raise EdgeforgeError(
                f"GROUP_SIZE={given['group_size']} conflicts with FORMAT {gguf[0]}, whose "
                f"blocks are {group_size} weights; leave GROUP_SIZE unset"
            )
        if "sym" in given and options.sym != sym:
            raise EdgeforgeError(
                f"SYM={given['sym']} conflicts with FORMAT {gguf[0]}, which is "
                f"{'symmetric' if sym else 'asymmetric (scale and min)'}; leave SYM unset"
            )
        iters_set = "iters" in given or "iters" in recipe_defaults
        iters = options.iters if iters_set else GGUF_DEFAULT_ITERS
        options = dataclasses.replace(options, group_size=group_size, sym=sym, iters=iters)
    _check_paths(options)
    return options


def _check_paths(options: Options) -> None:
    if options.images is not None and options.data is None:
        raise EdgeforgeError(
            "IMAGES names the image folder of a LLaVA-style conversation file; pass that file "
            "as DATA=<file.json> too"
        )
    if options.images is not None and not options.images.is_dir():
        raise EdgeforgeError(f"IMAGES={options.images}: folder not found")
    if options.template is not None:
        read_template(options.template)


def read_template(path: Path) -> dict[str, Any]:
    """A custom chat template in AutoRound's JSON format, checked for the keys it needs."""
    if not path.is_file():
        raise EdgeforgeError(f"TEMPLATE={path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgeforgeError(f"TEMPLATE={path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise EdgeforgeError(f"TEMPLATE={path}: expected a JSON object")
    missing = [key for key in TEMPLATE_KEYS if not isinstance(data.get(key), str)]
    if missing:
        raise EdgeforgeError(
            f"TEMPLATE={path}: missing string key(s) {', '.join(missing)}; a template needs "
            f"{', '.join(TEMPLATE_KEYS)} (see targets/autoround/README.md)"
        )
    tokens = data.get("replace_tokens")
    if tokens is not None and (
        not isinstance(tokens, list)
        or len(tokens) % 2
        or not all(isinstance(t, str) for t in tokens)
    ):
        raise EdgeforgeError(
            f"TEMPLATE={path}: replace_tokens must be a list of strings in pairs "
            '[old1, new1, old2, new2, ...], e.g. ["<image>", "<|vision_start|>..."]'
        )
    if "processor" in data:
        from auto_round.compressors.mllm.processor import PROCESSORS

        if data["processor"] not in PROCESSORS:
            raise EdgeforgeError(
                f"TEMPLATE={path}: processor {data['processor']!r} is unknown to auto-round; "
                f"known: {', '.join(sorted(PROCESSORS))}"
            )
    return data


def check_against_model(
    options: Options, *, is_vision_language: bool, linears: list[tuple[str, int]]
) -> None:
    """Checks that need the model: VL-only options, and group_size against every layer."""
    if is_vision_language and is_gguf(options):
        raise EdgeforgeError(
            f"FORMAT {options.formats[0]} is for text-only LLMs here (Llama/Qwen2): a "
            "vision-language GGUF is a text file plus an mmproj file that transformers cannot "
            "reload to check; use auto_round, auto_gptq or auto_awq"
        )
    if not is_vision_language:
        for flag, name in (
            (options.quant_nontext_module, "QUANT_NONTEXT=1"),
            (options.template is not None, "TEMPLATE"),
            (options.images is not None, "IMAGES"),
        ):
            if flag:
                raise EdgeforgeError(f"{name} applies to vision-language models only")
    for name, in_features in linears:
        check_group_size(in_features, options.group_size, name)

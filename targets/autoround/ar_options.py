"""Options of the AutoRound step: defaults, recipe overrides, and checks made before any work.

Precedence: command line (make variables) > the recipe's ``targets.autoround`` object >
the defaults here. Everything a user can get wrong is checked in :func:`resolve` or
:func:`check_against_model`, so minutes of tuning never end in an option error.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.core.errors import EdgeforgeError
from common.quant.rtn import SUPPORTED_BITS, check_group_size

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

#: Defaults sized for a CPU run (AutoRound's own are iters 200, nsamples 128, seqlen 2048,
#: tuned for GPUs): with these SmolLM2-135M W4 g32 reaches ppl ratio 1.095 (RTN: 1.261) in
#: 22 CPU-minutes; W4 group 32 is the accuracy-first int4 scheme.
DEFAULTS: dict[str, Any] = {
    "bits": 4,
    "group_size": 32,
    "sym": True,
    "iters": 20,
    "nsamples": 16,
    "seqlen": 128,
    "formats": ["auto_round"],
    "quant_nontext_module": False,
    "max_ppl_ratio": 1.10,
    "rtn_gate": "both",
    "seed": 42,
}

#: GGUF runs default to auto-round's own advice for its current GGUF export: no sign-round
#: steps (``iters=0``), i.e. its optimized RTN, which searches each block's scale (and min)
#: weighted by an importance matrix taken from the calibration data. Sign-round steps do not
#: pay off there without its ``enable_alg_ext`` extension (auto-round's warning); on
#: SmolLM2 Q4_K_M, 5 steps kept every block at its initial rounding.
GGUF_DEFAULT_ITERS = 0

#: Keys a recipe's ``targets.autoround`` object may set (tell the schema).
RECIPE_KEYS = tuple(DEFAULTS)

#: How "beats RTN" is judged: lower held-out perplexity, higher logits cosine to the float
#: model, or both. Perplexity is meaningless for random-weight test models (it sits near the
#: vocabulary size and moves by noise), so their recipes judge fidelity (cosine) only.
RTN_GATES = ("both", "ppl", "cosine")

#: Keys a custom chat-template JSON must have (AutoRound's template format, seed 004).
TEMPLATE_KEYS = ("model_type", "format_user", "format_assistant")


@dataclass(frozen=True)
class Options:
    """Resolved options of one run."""

    bits: int
    group_size: int
    sym: bool
    iters: int
    nsamples: int
    seqlen: int
    formats: tuple[str, ...]
    quant_nontext_module: bool
    max_ppl_ratio: float
    rtn_gate: str
    seed: int
    data: Path | None = None
    images: Path | None = None
    template: Path | None = None

    def as_record(self) -> dict[str, Any]:
        """JSON-friendly form for the manifest and report."""
        record = asdict(self)
        record["formats"] = list(self.formats)
        for key in ("data", "images", "template"):
            record[key] = None if record[key] is None else str(record[key])
        return record


def parse_bool(value: Any, option: str) -> bool:
    """``1/0/true/false/yes/no`` (make variables are strings) or a JSON bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise EdgeforgeError(f"{option} must be 1 or 0 (true/false), got {value!r}")


def _int(value: Any, option: str, low: int) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise EdgeforgeError(f"{option} must be an integer, got {value!r}") from None
    if number < low:
        raise EdgeforgeError(f"{option} must be >= {low}, got {number}")
    return number


def parse_formats(value: Any) -> tuple[str, ...]:
    """A comma-separated list (or JSON list) of known formats, duplicates removed, order kept."""
    items = value if isinstance(value, list) else str(value).split(",")
    formats = tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
    if not formats:
        raise EdgeforgeError("FORMAT is empty; name one or more of " + ", ".join(FORMAT_BITS))
    for fmt in formats:
        if fmt not in FORMAT_BITS:
            raise EdgeforgeError(
                f"FORMAT {fmt!r} is not supported; choose from {', '.join(FORMAT_BITS)}"
            )
    gguf = [fmt for fmt in formats if fmt in GGUF_GRID]
    if gguf and len(formats) > 1:
        raise EdgeforgeError(
            f"FORMAT {gguf[0]} must be the only format of a run: the GGUF type fixes the "
            f"quantization grid, so it cannot share tuned weights with {', '.join(formats)}; "
            "run once per format"
        )
    return formats


def folder_name(fmt: str) -> str:
    """The output folder of ``fmt`` (``gguf:q4_0`` → ``gguf-q4_0``: no colon in paths)."""
    return fmt.replace(":", "-")


def is_gguf(options: Options) -> bool:
    """Whether this run exports a GGUF file (one format, reloaded through transformers)."""
    return options.formats[0] in GGUF_GRID


def _gguf_grid(fmt: str, cli: dict[str, Any]) -> dict[str, Any]:
    """group_size/sym of a GGUF type; a conflicting GROUP_SIZE/SYM on the command line fails."""
    group_size, sym = GGUF_GRID[fmt]
    asked = cli.get("group_size")
    if asked is not None and _int(asked, "GROUP_SIZE", -1) != group_size:
        raise EdgeforgeError(
            f"GROUP_SIZE={cli['group_size']} conflicts with FORMAT {fmt}, whose blocks are "
            f"{group_size} weights; leave GROUP_SIZE unset"
        )
    if cli.get("sym") is not None and parse_bool(cli["sym"], "SYM") != sym:
        raise EdgeforgeError(
            f"SYM={cli['sym']} conflicts with FORMAT {fmt}, which is "
            f"{'symmetric' if sym else 'asymmetric (scale and min)'}; leave SYM unset"
        )
    return {"group_size": group_size, "sym": sym}


def resolve(cli: dict[str, Any], recipe_defaults: dict[str, Any]) -> Options:
    """Merge command line over recipe over defaults and validate every value."""
    unknown = sorted(set(recipe_defaults) - set(RECIPE_KEYS))
    if unknown:
        raise EdgeforgeError(
            f"recipe targets.autoround: unknown key(s) {', '.join(unknown)}; "
            f"known: {', '.join(RECIPE_KEYS)}"
        )
    given = {**recipe_defaults, **{k: v for k, v in cli.items() if v is not None}}
    merged = {**DEFAULTS, **given}
    if parse_formats(merged["formats"])[0] in GGUF_GRID and "iters" not in given:
        merged["iters"] = GGUF_DEFAULT_ITERS
    bits = _int(merged["bits"], "BITS", 1)
    if bits not in SUPPORTED_BITS:
        raise EdgeforgeError(f"BITS must be one of {SUPPORTED_BITS}, got {bits}")
    formats = parse_formats(merged["formats"])
    for fmt in formats:
        if bits not in FORMAT_BITS[fmt]:
            raise EdgeforgeError(
                f"BITS={bits} is not supported by FORMAT {fmt} (it stores "
                f"{'/'.join(map(str, FORMAT_BITS[fmt]))}-bit weights)"
            )
    if formats[0] in GGUF_GRID:
        merged.update(_gguf_grid(formats[0], cli))
    group_size = _int(merged["group_size"], "GROUP_SIZE", -1)
    if group_size == 0:
        raise EdgeforgeError("GROUP_SIZE must be -1 (per row) or a positive integer, got 0")
    try:
        max_ppl_ratio = float(merged["max_ppl_ratio"])
    except (TypeError, ValueError):
        raise EdgeforgeError(
            f"max_ppl_ratio must be a number, got {merged['max_ppl_ratio']!r}"
        ) from None
    paths = {
        key: Path(cli[key]) if cli.get(key) else None for key in ("data", "images", "template")
    }
    options = Options(
        bits=bits,
        group_size=group_size,
        sym=parse_bool(merged["sym"], "SYM"),
        iters=_int(merged["iters"], "ITERS", 0),
        nsamples=_int(merged["nsamples"], "NSAMPLES", 1),
        seqlen=_int(merged["seqlen"], "SEQLEN", 8),
        formats=formats,
        quant_nontext_module=parse_bool(merged["quant_nontext_module"], "QUANT_NONTEXT"),
        max_ppl_ratio=max_ppl_ratio,
        rtn_gate=_rtn_gate(merged["rtn_gate"]),
        seed=_int(merged["seed"], "seed", 0),
        **paths,
    )
    _check_paths(options)
    return options


def _rtn_gate(value: Any) -> str:
    if value not in RTN_GATES:
        raise EdgeforgeError(f"RTN_GATE must be one of {', '.join(RTN_GATES)}, got {value!r}")
    return str(value)


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

"""``make autoround``: AutoRound weight-only quantization, exported and verified offline.

Intel AutoRound (PyPI ``auto-round``, seed 004) tunes the rounding of each weight by signed
gradient descent on block outputs; it is called through its Python API, never
re-implemented. Calibration is the project corpus by default, or a local JSON/JSONL text
file, or (vision-language models) a LLaVA-style conversation JSON with its image folder.
Every requested format is reloaded from disk with auto-round's CPU loader (a GGUF file:
transformers' GGUF reader), its quantized layer set is checked against the plan, and it is
compared with the float model on the held-out corpus (perplexity ratio, logits cosine, top-1
agreement, per-layer cosine; VL: an image prompt), next to plain round-to-nearest at the same
bits/group (``common.quant.rtn``; for GGUF, auto-round's own RTN into the same GGUF type), the
baseline AutoRound must beat. Output: ``build/<MODEL>/autoround/`` with one folder per
format (a loadable checkpoint plus its own report/manifest) and the overall report.

A text model exported as ``auto_round``/``auto_gptq`` is never whole in float32
(:mod:`ar_streamed`): AutoRound tunes and writes one block at a time, the reference and RTN
run one layer at a time; the same bytes and numbers as a whole-model run (``SEQUENTIAL=0``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ar_options
import ar_quantize
import ar_report
import ar_streamed
import ar_verify
from ar_options import Options

from common.core.errors import CheckFailed, EdgeforgeError, run_cli
from common.core.options import target_parser
from common.core.paths import REPO_ROOT
from common.core.records import (
    atomic_path,
    build_manifest,
    write_bytes_atomic,
    write_json_atomic,
)
from common.core.resources import resources_line
from common.models.tokenizer_fidelity import copy_tokenizer_files
from common.steps.phases import Run
from common.steps.preflight import whole_model_preflight

TARGET = "autoround"
#: Where progress lines go (the run's phase logger).
Log = Callable[[str], None]
#: The phases of a run (common/steps/phases.py), in order.
PHASES = ("resolve", "reference", "quantize", "verify", "package")
IMAGE_PROMPT = "Describe this image."
MAX_NEW_TOKENS = 12
#: Held-out windows whose full logits are compared (cosine, top-1, per layer): every window
#: costs two forward passes, and 4 x 512 tokens already give thousands of positions.
COMPARE_WINDOWS = 4
DEFAULT_IMAGES = REPO_ROOT / "data" / "images"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return target_parser("make autoround", __doc__.splitlines()[0], Options).parse_args(argv)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _require_autoround() -> dict[str, str]:
    """auto-round's versions, or one line saying how to install it."""
    versions = {name: _version(name) for name in ("auto-round", "auto-round-lib")}
    missing = [name for name, version in versions.items() if version is None]
    if missing:
        raise EdgeforgeError(
            f"{', '.join(missing)} not installed; run `make autoround-venv` (pins in "
            "targets/autoround/requirements.txt)"
        )
    return {name: str(version) for name, version in versions.items()}


def planned_layers(adapter: Any, quant_nontext: bool) -> list[tuple[str, Any]]:
    """The Linears AutoRound quantizes: decoder blocks, plus vision blocks with nontext.

    Its block-wise tuner works on repeated blocks, so lm_head and the vision merger (not in
    a block) stay float; this list is what every reload is checked against.
    """
    from common.models.base import iter_linears

    return [
        (name, linear)
        for name, role, linear in iter_linears(
            adapter, include_lm_head=False, include_vision=quant_nontext
        )
        if not role.startswith("merger")
    ]


def quant_plan(
    options: Options, adapter: Any, planned: list[str], name: str, fmt: str
) -> dict[str, Any]:
    """What an export folder holds, per quantized linear (common.quant.schemes' plan
    format); every other linear keeps the checkpoint's float weights."""
    from common.models.base import iter_linears
    from common.quant.schemes import float_activation_plan

    roles = {n: role for n, role, _ in iter_linears(adapter, include_vision=True)}
    quantized = set(planned)
    return float_activation_plan(
        ar_options.scheme_of(options),
        [(n, roles.get(n, "linear")) for n in planned],
        name=name,
        artifact=fmt,
        extra={
            "autoround": {"iters": options.iters, "nsamples": options.nsamples,
                          "seqlen": options.seqlen},
            "unquantized": sorted(
                n for n, _, _ in iter_linears(adapter, include_vision=True) if n not in quantized
            ),
        },
    )  # fmt: skip


def _block_names(adapter: Any, quant_nontext: bool) -> list[str]:
    blocks = [layer.name for layer in adapter.layers()]
    if quant_nontext:
        blocks += [block.name for block in adapter.vision_blocks()]
    return blocks


def calibration(
    options: Options, tokenizer: Any, is_vl: bool, scratch: Path
) -> tuple[Any, dict[str, Any], dict[str, Path]]:
    """(AutoRound ``dataset``, VL-only extra kwargs, manifest inputs) for the run."""
    from common.inputs.calib_data import read_calibration_file
    from common.inputs.data import CALIB_CORPUS, sample_windows

    extra: dict[str, Any] = {}
    if options.template is not None:
        extra["template"] = str(options.template)
    if options.data is None:
        if options.quant_nontext_module:
            raise EdgeforgeError(
                "QUANT_NONTEXT=1 tunes the vision tower, which needs images: pass a LLaVA-style "
                "DATA=<conversations.json> and IMAGES=<its image folder>"
            )
        windows = sample_windows(
            [CALIB_CORPUS], tokenizer, options.nsamples, options.seqlen, options.seed
        )
        return (
            ar_quantize.window_loader(windows, min(8, options.nsamples)),
            extra,
            {"calibration": CALIB_CORPUS},
        )
    parsed = read_calibration_file(options.data, options.images)
    inputs = {"calibration": options.data}
    if parsed.layout == "llava":
        if not is_vl:
            raise EdgeforgeError(
                f"DATA={options.data}: LLaVA image conversations need a vision-language model"
            )
        if options.nsamples > len(parsed):
            raise EdgeforgeError(
                f"NSAMPLES={options.nsamples} is larger than DATA={options.data} "
                f"({len(parsed)} conversations); lower NSAMPLES or add conversations"
            )
        extra["extra_data_dir"] = str(options.images)
        inputs["images"] = Path(options.images)
        return ar_quantize.register_llava_file(options.data), extra, inputs
    if options.quant_nontext_module:
        raise EdgeforgeError(
            f"DATA={options.data} holds text only, but QUANT_NONTEXT=1 needs image "
            "conversations (LLaVA-style DATA plus IMAGES)"
        )
    corpus = scratch / "calibration.jsonl"  # the texts in the corpus reader's own format
    write_bytes_atomic(
        corpus, "".join(ar_report.jsonl_line(text) for text in parsed.texts).encode()
    )
    windows = sample_windows([corpus], tokenizer, options.nsamples, options.seqlen, options.seed)
    return ar_quantize.window_loader(windows, min(8, options.nsamples)), extra, inputs


#: What the report takes from ``compare_logits``: the logit similarity over the compare
#: windows. Its by-product perplexities cover only those windows, so they are left out;
#: the report's ``ppl`` is measured on every held-out window.
SIMILARITY_KEYS = ("cosine_mean", "cosine_min", "top1_agreement", "max_abs_diff", "tokens")


def _logit_similarity(model: Any, reference: Any, windows: Any) -> dict[str, Any]:
    from common.analysis.eval import compare_logits

    result = compare_logits(model, reference, windows)
    return {key: result[key] for key in SIMILARITY_KEYS}


def _release(*objects: Any) -> None:
    del objects
    gc.collect()


#: What "RTN" means in the report, per kind of format.
RTN_BASELINE = {
    False: "common.quant.rtn: plain round-to-nearest on the same layers and the same integer grid "
    "AutoRound stores (signed-extreme symmetric / min-max asymmetric, fp16 scales)",
    True: "auto-round with iters=0 and disable_opt_rtn (no calibration, no importance "
    "matrix) exported to the same GGUF type with the same per-tensor types and reloaded the "
    "same way: for Q4_0 plain round-to-nearest (llama.cpp's reference quantizer); for the "
    "k-quants llama.cpp's own scale/min search, i.e. what llama-quantize does without "
    "--imatrix",
}


def _rtn_baseline(
    options: Options, model_dir: Path, planned: list[str], quantize: Any, log: Log
) -> Any:
    """The RTN model at the run's setting (see :data:`RTN_BASELINE`)."""
    from common.models.loading import load_model
    from common.quant.rtn import apply_rtn

    if ar_options.is_gguf(options):
        rtn_options = dataclasses.replace(options, iters=0)
        exports, _ = quantize(rtn_options, {"disable_opt_rtn": True}, "rtn-export")
        model, _ = ar_verify.load_gguf(ar_verify.gguf_file(exports[options.formats[0]]))
        return model
    model = load_model(model_dir)
    apply_rtn(
        [(n, model.get_submodule(n)) for n in planned], options.bits, options.group_size,
        options.sym,
    )  # fmt: skip
    return model


@dataclasses.dataclass(frozen=True)
class TokenizerSource:
    """Where an export's tokenizer comes from and what it is checked against."""

    model_dir: Path  #: the recipe's model directory: its files are copied into each export
    source_dir: Path  #: the directory of the tokenizer the model was trained with
    out_root: Path  #: the final output folder, naming exports in the check record


def _reload(
    fmt: str,
    fmt_dir: Path,
    is_vl: bool,
    planned: list[str],
    prefixes: list[str],
    tokenizers: TokenizerSource,
    log: Log,
) -> tuple[Any, dict[str, Any]]:
    """(reloaded model, structural and tokenizer findings) of one export folder."""
    final = tokenizers.out_root / fmt_dir.name
    if fmt in ar_options.GGUF_GRID:
        path = ar_verify.gguf_file(fmt_dir)
        log(f"{fmt}: reloading {path.name} with transformers' GGUF reader")
        model, info = ar_verify.load_gguf(path)
        per_layer, types = ar_verify.gguf_tensor_types(path, planned)
        record, tokenizer_problems = ar_verify.tokenizer_check(
            tokenizers.source_dir, fmt_dir, str(final / path.name), gguf=path
        )
        quantized = {n: t for n, t in per_layer.items() if ar_verify.is_quantized_gguf_type(t)}
        return model, {
            "problems": ar_verify.gguf_problems(info, per_layer) + tokenizer_problems,
            "kernels": sorted(set(quantized.values())),
            "quantized_layers": len(quantized),
            "quantization_config": {"gguf_file": path.name, "tensor_types": types},
            "tokenizer": record,
        }
    quant_config = ar_quantize.fix_export_config(fmt_dir, fmt, prefixes)
    # auto-round re-saves the tokenizer through its loaded class, which can drop what made
    # the source load faithfully; the export ships the source's files byte for byte. Its
    # generation config too: built on meta from config.json (block by block), auto-round's
    # model never read the source's generation_config.json.
    copy_tokenizer_files(tokenizers.model_dir, fmt_dir)
    generation = tokenizers.model_dir / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, fmt_dir / generation.name)
    record, tokenizer_problems = ar_verify.tokenizer_check(
        tokenizers.source_dir, fmt_dir, str(final)
    )
    log(f"{fmt}: reloading {fmt_dir.name}/ with auto-round's CPU loader")
    model, info = ar_verify.load_export(fmt_dir, is_vl)
    return model, {
        "problems": ar_verify.structure_problems(model, info, planned, quant_config)
        + tokenizer_problems,
        "kernels": sorted(set(ar_verify.quantized_modules(model).values())),
        "quantized_layers": len(ar_verify.quantized_modules(model)),
        "quantization_config": quant_config,
        "tokenizer": record,
    }


#: ``measure(reloaded export) -> its numbers`` (ppl, logit similarity, per-layer cosines).
Measure = Callable[[Any], dict[str, Any]]


def _streamed_baselines(
    streamed: Any,
    plan: list[tuple[str, Any]],
    options: Options,
    windows: Any,
    decoder_names: list[str],
    rtn_log: str,
    log: Log,
) -> tuple[dict[str, Any], dict[str, Any], Measure]:
    """(float perplexity, RTN's numbers, how an export is measured), one layer in memory
    at a time: the float model's hidden states are kept, every candidate is compared
    with them through the float head."""
    log(f"float model, one layer at a time: {windows.shape[0]}x{windows.shape[1]} held-out tokens")
    reference = ar_streamed.run_streamed(streamed, windows, "float")
    log(rtn_log + ", one layer at a time")
    rounded = ar_streamed.run_streamed(
        streamed, windows, "rtn", ar_streamed.rtn_step(plan, options)
    )

    def compare(logits: Any, layers: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return ar_streamed.score(
            logits, layers, reference, streamed, windows, COMPARE_WINDOWS, SIMILARITY_KEYS
        )

    rtn, fp = compare(rounded.hidden, rounded.layers)

    def measure(model: Any) -> dict[str, Any]:
        return compare(*ar_streamed.model_logits(model, decoder_names, windows))[0]

    return fp, rtn, measure


def _whole_baselines(
    model_dir: Path,
    planned: list[str],
    options: Options,
    windows: Any,
    decoder_names: list[str],
    rtn_log: str,
    log: Log,
    quantize: Any,
    processor: Any,
    image: Path | None,
) -> tuple[dict[str, Any], dict[str, Any], Measure]:
    """(float perplexity, RTN's numbers, how an export is measured) with the float model
    loaded whole (kept for the exports' comparisons and image prompt)."""
    from common.analysis.eval import perplexity
    from common.models.loading import load_model

    reference = load_model(model_dir)
    log(f"float model: perplexity on {windows.shape[0]}x{windows.shape[1]} held-out tokens")
    fp = perplexity(reference, windows)
    image_inputs = (
        ar_verify.image_inputs(processor, image, IMAGE_PROMPT) if image is not None else None
    )
    log(rtn_log)
    rtn_model = _rtn_baseline(options, model_dir, planned, quantize, log)
    rtn = {
        "ppl": perplexity(rtn_model, windows)["ppl"],
        **_logit_similarity(rtn_model, reference, windows[:COMPARE_WINDOWS]),
        "layers": ar_verify.layer_cosines(rtn_model, reference, decoder_names, windows[0]),
    }
    _release(rtn_model)

    def measure(model: Any) -> dict[str, Any]:
        result = {
            "ppl": perplexity(model, windows)["ppl"],
            **_logit_similarity(model, reference, windows[:COMPARE_WINDOWS]),
            "layers": ar_verify.layer_cosines(model, reference, decoder_names, windows[0]),
        }
        if image_inputs is not None:
            result["image_prompt"] = ar_verify.image_prompt_check(
                model, reference, processor, image_inputs, MAX_NEW_TOKENS
            )
        return result

    return fp, rtn, measure


def run(args: argparse.Namespace) -> dict[str, Any]:
    from common.core.memory import MemoryCap
    from common.core.recipes import load_recipe, model_build_dir
    from common.inputs.data import EVAL_CORPUS, eval_windows
    from common.models.loading import (
        load_model,
        load_processor,
        load_tokenizer,
        refuse_remote_code,
    )
    from common.models.streaming import StreamedModel
    from common.steps.eval_step import DEFAULT_NUM_WINDOWS, DEFAULT_SEQ_LEN
    from common.steps.model_build import build_model, tokenizer_source_dir

    phases = Run(TARGET, PHASES)
    phases.phase("resolve")
    toolchains = _require_autoround()
    recipe = load_recipe(args.model)
    options = ar_options.resolve(
        args, recipe.target_section(TARGET), f"{recipe.path}: targets.{TARGET}"
    )
    model_dir = build_model(recipe, args.build_dir, args.model_path)
    refuse_remote_code(model_dir)  # "not supported" is the answer, not "too big"
    streamed = StreamedModel(model_dir)  # the module tree on meta: names, shapes, the mode
    adapter = streamed.adapter
    is_vl = adapter.is_vision_language
    plan = planned_layers(adapter, options.quant_nontext_module)
    ar_options.check_against_model(
        options, is_vision_language=is_vl, linears=[(n, lin.in_features) for n, lin in plan]
    )
    planned = [name for name, _ in plan]
    sequential = ar_streamed.check_mode(
        ar_streamed.whole_model_reason(streamed, options.formats), options.sequential, model_dir
    )
    tokenizer = load_tokenizer(model_dir)
    eval_cfg = recipe.eval_defaults
    num_windows = (
        eval_cfg.get("num_windows", DEFAULT_NUM_WINDOWS)
        if options.eval_windows is None
        else options.eval_windows
    )
    if num_windows < 1:
        raise EdgeforgeError(f"EVAL_WINDOWS must be >= 1, got {num_windows}")
    windows = eval_windows(
        [EVAL_CORPUS], tokenizer, num_windows, eval_cfg.get("seq_len", DEFAULT_SEQ_LEN)
    )
    if sequential:
        phases.preflight(
            ar_streamed.estimate(streamed, options, tuple(windows.shape), planned),
            MemoryCap.resolve(options.max_memory),
            ar_streamed.lower_hint(options, num_windows),
        )
    else:
        whole_model_preflight(
            phases,
            model_dir,
            "make autoround",
            options.max_memory,
            {"reference model": 1, "round-to-nearest copy": 1, "AutoRound's own copy": 1},
        )
    out_root = model_build_dir(recipe, args.build_dir) / TARGET
    tokenizers = TokenizerSource(
        model_dir, tokenizer_source_dir(recipe, args.build_dir, args.model_path), out_root
    )
    if ar_options.is_gguf(options):
        ar_quantize.check_gguf_support(model_dir, options.formats[0])
    decoder_names = [layer.name for layer in adapter.layers()]
    prefixes = ar_quantize.block_prefixes(_block_names(adapter, options.quant_nontext_module))
    processor = load_processor(model_dir) if is_vl else None
    image = None
    if is_vl:
        from common.inputs.vl_preprocess import list_frames

        image = list_frames(options.images or DEFAULT_IMAGES, "image prompt folder")[0]

    out_root.parent.mkdir(parents=True, exist_ok=True)  # absent when MODEL_PATH gave the model
    with tempfile.TemporaryDirectory(prefix=".autoround-", dir=out_root.parent) as scratch:
        dataset, extra, calib_inputs = calibration(options, tokenizer, is_vl, Path(scratch))
        phases.phase("reference")

        def quantize(run_options: Options, more: dict[str, Any], name: str) -> Any:
            return ar_quantize.run_autoround(
                model_dir if sequential else load_model(model_dir),
                tokenizer=tokenizer,
                processor=processor,
                dataset=dataset,
                out_dir=Path(scratch) / name,
                options=run_options,
                extra={**extra, **more},
            )

        baseline = options.formats[0] if ar_options.is_gguf(options) else "common.quant.rtn"
        rtn_log = (
            f"RTN baseline ({baseline}): W{options.bits} g{options.group_size} on "
            f"{len(planned)} layers"
        )
        if sequential:
            fp, rtn, measure = _streamed_baselines(
                streamed, plan, options, windows, decoder_names, rtn_log, phases.log
            )
        else:
            fp, rtn, measure = _whole_baselines(
                model_dir, planned, options, windows, decoder_names, rtn_log, phases.log,
                quantize, processor, image,
            )  # fmt: skip

        with atomic_path(out_root) as tmp:
            tmp.mkdir()
            phases.phase("quantize")
            phases.log(
                f"AutoRound{' block by block' if sequential else ''}: iters {options.iters}, "
                f"{options.nsamples} samples x {options.seqlen} tokens -> "
                f"{', '.join(options.formats)}"
            )
            exports, seconds = quantize(options, {}, "export")
            gc.collect()
            phases.phase("verify")
            per_format: dict[str, Any] = {}
            for fmt, exported in exports.items():
                fmt_dir = tmp / ar_options.folder_name(fmt)
                shutil.move(str(exported), fmt_dir)
                model, result = _reload(
                    fmt, fmt_dir, is_vl, planned, prefixes, tokenizers, phases.log
                )
                if not result["problems"]:
                    result.update(measure(model))
                _release(model)
                per_format[fmt] = result
            phases.phase("package")
            report = ar_report.build_report(
                recipe=recipe.name,
                model_type=recipe.model_type,
                options=options,
                planned=planned,
                fp=fp,
                rtn={**rtn, "baseline": RTN_BASELINE[ar_options.is_gguf(options)]},
                per_format=per_format,
                quantize_seconds=seconds,
                eval_shape=list(windows.shape),
                image=None if image is None else str(image),
                image_prompt=IMAGE_PROMPT if image is not None else None,
            )
            report["resources"] = phases.resources()  # the package phase up to this point
            inputs = {"model_config": model_dir / "config.json", **calib_inputs}
            if options.template is not None:
                inputs["template"] = options.template
            for fmt in per_format:
                fmt_report = ar_report.format_report(report, fmt)
                fmt_dir = tmp / ar_options.folder_name(fmt)
                if not ar_options.is_gguf(options):  # a GGUF file types each tensor itself
                    write_json_atomic(
                        fmt_dir / "quant_plan.json",
                        quant_plan(options, adapter, planned, f"{recipe.name}-{fmt}", fmt),
                    )
                write_json_atomic(fmt_dir / "report.json", fmt_report)
                markdown = ar_report.render_markdown(fmt_report) + resources_line(
                    fmt_report["resources"]
                )
                write_bytes_atomic(fmt_dir / "report.md", markdown.encode())
                write_json_atomic(
                    fmt_dir / "manifest.json",
                    build_manifest(
                        step=f"{TARGET}:{fmt}",
                        inputs=inputs,
                        outputs=fmt_dir,
                        recipe=recipe.data,
                        options=options.as_record(),
                        toolchains=toolchains,
                    ),
                )
            write_json_atomic(tmp / "report.json", report)
            markdown = ar_report.render_markdown(report) + resources_line(report["resources"])
            write_bytes_atomic(tmp / "report.md", markdown.encode())
            write_json_atomic(
                tmp / "manifest.json",
                build_manifest(
                    step=TARGET,
                    inputs=inputs,
                    outputs=tmp,
                    recipe=recipe.data,
                    options=options.as_record(),
                    toolchains=toolchains,
                ),
            )
    phases.finish()
    print(ar_report.console_table(report), flush=True)
    phases.log(f"wrote {out_root}")
    if report["failures"]:
        raise CheckFailed(
            f"{recipe.name}: " + "; ".join(report["failures"]) + f" ({out_root / 'report.json'})"
        )
    return report


def main() -> int:
    run(parse_args())
    return 0


if __name__ == "__main__":
    run_cli(main)

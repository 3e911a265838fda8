"""``make axera``: a Qwen-family checkpoint → everything Pulsar2 needs for an AXERA AX650.

Vision-language models (qwen2_vl, qwen2_5_vl; ``--mode image|video``): the vision encoder
as a static one-temporal-step ONNX with a uint8-picture calibration tar and the
``pulsar2 build`` config; the language model goes to ``pulsar2 llm_build`` straight from
the HF directory. Text models (``--mode llm``, the default for them) get only the latter.
Every model gets bf16 token embeddings, the HF json files and a ``build.sh`` with the exact
Pulsar2 command lines. Before the slow vendor compile, the ONNX is checked against the
PyTorch vision tower (cosine, max abs, per block) and end to end: the language model fed
by the ONNX features must produce the all-PyTorch greedy tokens. ``build.sh`` runs here
only when ``pulsar2`` is on PATH (the Docker image); otherwise the one command to run it
is printed. Output: ``build/<MODEL>/axera-ax650/``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulsar2

from common.core.errors import CheckFailed, EdgeforgeError, run_cli
from common.core.gates import failures, gate, markdown_table, records
from common.core.options import (
    Boolean,
    Choice,
    FilePath,
    Integer,
    Text,
    option,
    resolve_target,
    target_parser,
)
from common.core.options import describe as describe_options
from common.core.paths import IMAGES_DIR
from common.core.records import atomic_path, build_manifest, dumps_json
from common.core.resources import resources_line
from common.models.tokenizer_fidelity import describe
from common.steps.phases import Run
from common.steps.preflight import layerwise_preflight, max_memory_option

TARGET = "axera-ax650"
#: The phases of a run (common/steps/phases.py), in order; compile runs only with pulsar2.
PHASES = ("resolve", "export", "verify", "compile", "package")
MODES = ("image", "video", "llm")
DEFAULT_SIZES = {"image": 448, "video": 308}
DEFAULT_PROMPTS = {"image": "Describe this image.", "video": "Describe this video.",
                   "llm": "What is the capital of France?"}  # fmt: skip
COSINE_GATE = 0.9999
EMBED_FILE = "model.embed_tokens.weight.bfloat16.bin"
#: HF files the board runtime needs next to the axmodels (weights and our manifest excluded).
COPY_SUFFIXES = (".json", ".jinja", ".txt", ".model")
COPY_EXCLUDE = ("manifest.json",)
#: Vision features a prompt's placeholders take, by kind (``{"image": [n, H]}``; ``{}``: text).
Features = dict[str, Any]
#: What the vision tower's export and checks hold, in multiples of its float32 weights
#: (TorchScript export: about 2.5x).
VISION_FACTOR = 2.5


@dataclass(frozen=True)
class Options:
    """Options of ``make axera`` (command line > recipe ``targets.axera-ax650`` > these)."""

    mode: str | None = option(
        None,
        Choice(MODES),
        "image (default for VL models), video, llm (default for text models)",
        make="MODE",
        recipe=False,
    )
    image_size: int | None = option(None, Integer(28), "square side, px (448)", flag="--image-size")
    video_size: int | None = option(None, Integer(28), "square side, px (308)", flag="--video-size")
    calib_dir: Path = option(
        IMAGES_DIR,
        FilePath(),
        "images (image mode) or the frames of one clip (video mode)",
        flag="--calib-dir",
        recipe=False,
    )
    calib_format: str = option(
        "image",
        Choice(("image", "npy")),
        "calibration tar format",
        flag="--calib-format",
        recipe=False,
    )
    prompt: str | None = option(
        None, Text(), "text of the end-to-end check prompt", flag="--prompt", recipe=False
    )
    max_new_tokens: int = option(
        8, Integer(1), "greedy tokens checked end to end", flag="--max-new-tokens", recipe=False
    )
    prefill_len: int | None = option(
        None,
        Integer(1),
        "llm_build prefill length (default: fits the prompt)",
        flag="--prefill-len",
    )
    kv_cache_len: int | None = option(
        None,
        Integer(1),
        f"llm_build KV cache ({pulsar2.DEFAULT_KV_CACHE_LEN})",
        flag="--kv-cache-len",
    )
    parallel: int | None = option(
        None,
        Integer(1),
        f"llm_build parallel jobs ({pulsar2.DEFAULT_PARALLEL})",
        flag="--parallel",
    )
    hidden_state_type: str = option(
        pulsar2.DEFAULT_HIDDEN_STATE_TYPE,
        Choice(("bf16", "fp16", "fp32")),
        "llm_build hidden state type",
        flag="--hidden-state-type",
        recipe=False,
    )
    bf16_truncate: bool = option(
        False,
        Boolean(),
        "truncate embeddings to bf16 like AXERA's fp32_to_bf16 (default: RNE)",
        flag="--bf16-truncate",
        recipe=False,
    )
    out: Path | None = option(
        None, FilePath(), "default build/<MODEL>/axera-ax650", flag="--out", recipe=False
    )
    max_memory: int | None = max_memory_option()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return target_parser("make axera", __doc__.split("\n\n")[0], Options).parse_args(argv)


def choose_size(
    requested: int | None, option: str, default: int, processor: Any, notes: list[str]
) -> int:
    """The square side for this mode, rounded like HF and inside the processor's budget.

    An explicit size outside ``[min_pixels, max_pixels]`` is an error (the board-side
    processor would resize to a different grid); the built-in default is lowered to the
    largest fitting multiple of 28 instead, and the note says so.
    """
    from common.inputs.vl_preprocess import grid_factor, round_size

    factor = grid_factor(processor)
    budget = processor.image_processor.size
    low, high = int(budget["shortest_edge"]), int(budget["longest_edge"])
    size, note = round_size(requested if requested is not None else default, factor, option)
    if note:
        notes.append(note)
    if low <= size * size <= high:
        return size
    if requested is not None:
        raise EdgeforgeError(
            f"{option}: {size}×{size} px is outside the model processor's pixel budget "
            f"[{low}, {high}] (size.shortest_edge/longest_edge); pick a size inside it"
        )
    fitted = max(factor, int(high**0.5) // factor * factor)
    notes.append(f"{option}: default {size} exceeds the processor's max_pixels {high}; "
                 f"using {fitted}")  # fmt: skip
    return fitted


def copy_model_files(model_dir: Path, dest: Path) -> list[str]:
    """Copy the tokenizer/config/processor files (not weights) the runtime reads."""
    copied = []
    for path in sorted(model_dir.iterdir()):
        if (path.is_file() and path.suffix in COPY_SUFFIXES and path.name not in COPY_EXCLUDE
                and not path.name.endswith(".index.json")):  # fmt: skip
            shutil.copyfile(path, dest / path.name)
            copied.append(path.name)
    return copied


@contextlib.contextmanager
def bf16_embeddings(adapter: Any, truncate: bool) -> Iterator[None]:
    """Within the block, token embeddings are what the board looks up: the bf16 words."""
    import numpy as np
    import torch

    from common.quant.bf16 import bf16_to_fp32, fp32_to_bf16_rne, fp32_to_bf16_truncate

    convert = fp32_to_bf16_truncate if truncate else fp32_to_bf16_rne

    def to_bf16(_m: Any, _i: Any, out: torch.Tensor) -> torch.Tensor:
        words = convert(np.ascontiguousarray(out.detach().float().numpy()))
        return torch.from_numpy(bf16_to_fp32(words)).to(out.dtype)

    hook = adapter.embed_tokens().register_forward_hook(to_bf16)
    try:
        yield
    finally:
        hook.remove()


def write_embeddings(adapter: Any, dest: Path, truncate: bool) -> dict[str, Any]:
    from common.quant.bf16 import write_bf16_table

    table = adapter.embed_tokens().weight.detach().float().numpy()
    stats = write_bf16_table(table, dest / EMBED_FILE, truncate=truncate)
    bound = 2.0**-7 if truncate else 2.0**-8
    return {"file": EMBED_FILE, "shape": list(table.shape), "dtype": "bf16 (raw, row-major, LE)",
            "rounding": "truncate" if truncate else "nearest-even", **stats,
            "max_rel_bound": bound, "passed": stats["max_rel"] <= bound}  # fmt: skip


def greedy(
    model: Any, parts: Any, inputs: dict[str, Any], features: Features, new_tokens: int
) -> list[int]:
    """Exactly ``new_tokens`` greedy tokens after the prompt, its picture's placeholders
    fed ``features`` (``{}`` for a text prompt): generated by the whole ``model``, or,
    without one, read one part at a time (the same tokens, see
    :mod:`common.analysis.layerwise_decode`)."""
    from common.analysis import layerwise_decode
    from common.export.vision_export import greedy_tokens

    if model is None:
        return layerwise_decode.reference_greedy(parts, _prompt(inputs, features), new_tokens)
    with _fed(parts.adapter, features):
        return greedy_tokens(model, inputs, new_tokens)


def prompt_logits(model: Any, parts: Any, inputs: dict[str, Any], features: Features) -> Any:
    """The logits over the whole prompt ``[L, V]``, its placeholders fed ``features``."""
    import torch

    from common.analysis import layerwise_decode
    from common.export.vision_export import prompt_logits as whole_model_logits

    if model is None:
        prompt = _prompt(inputs, features)
        return torch.from_numpy(layerwise_decode.reference_logits(parts, prompt, []))
    with _fed(parts.adapter, features):
        return whole_model_logits(model, inputs)


def _prompt(inputs: dict[str, Any], features: Features) -> Any:
    from common.analysis.layerwise_decode import VisualPrompt

    return VisualPrompt(inputs, features) if features else inputs["input_ids"]


@contextlib.contextmanager
def _fed(adapter: Any, features: Features) -> Iterator[None]:
    """Within the block, a whole model's vision tower returns ``features`` (one kind)."""
    from common.export.vision_export import vision_features_replaced

    if not features:
        yield
        return
    (only,) = features.values()
    with vision_features_replaced(adapter, only):
        yield


def text_inputs(tokenizer: Any, prompt: str) -> dict[str, Any]:
    from common.analysis.eval import prompt_ids

    ids = prompt_ids(tokenizer, prompt)
    return {"input_ids": ids, "attention_mask": ids.new_ones(ids.shape)}


def check_lengths(prompt_tokens: int, visual: int, prefill: int, kv: int, source: str) -> None:
    if prompt_tokens > prefill:
        raise EdgeforgeError(
            f"{source}: prefill_len {prefill} < prompt length {prompt_tokens} "
            f"({visual} visual + {prompt_tokens - visual} text tokens); raise --prefill-len "
            "or shorten the prompt / image size"
        )
    if kv < prefill:
        raise EdgeforgeError(f"--kv-cache-len {kv} is smaller than prefill_len {prefill}")


def build_vision(
    run: Run, opts: Options, model_name: str, mode: str, model: Any, parts: Any,
    processor: Any, dest: Path, notes: list[str],
) -> tuple[dict[str, Any], dict[str, Any], Features, list[str]]:  # fmt: skip
    """Vision ONNX + calibration + config + checks; returns (report part, prompt inputs,
    the prompt's PyTorch vision features, command). The vision tower is read once, for
    everything it runs; the language model after it."""
    from common.analysis.layerwise_decode import vision_features
    from common.export import vision_export as ve
    from common.export.calibration_pack import FORMATS, write_calibration_tar
    from common.inputs import vl_preprocess as vp

    option = f"--{mode}-size"
    size = choose_size(getattr(opts, f"{mode}_size"), option,
                       DEFAULT_SIZES[mode], processor, notes)  # fmt: skip
    geo = vp.geometry(processor, size)
    paths = vp.list_frames(opts.calib_dir, "--calib-dir")
    frames = vp.prepare_frames(paths, geo, processor)
    layout, grid_thw = vp.uint8_layout(processor, frames, geo, mode)
    nchw = vp.to_nchw(vp.normalize_layout(layout, processor, mode))
    vision = dest / pulsar2.VISION_DIR
    vision.mkdir()
    stems = [p.stem for p in paths] if mode == "image" else [f"h{i}" for i in range(len(layout))]
    tar_name = "hidden_states.tar"
    members = write_calibration_tar(
        [(s, pic.numpy()) for s, pic in zip(stems, layout, strict=True)],
        vision / tar_name,
        opts.calib_format,
    )
    run.log(f"{mode} {size}×{size}: {len(members)} calibration samples of "
         f"{geo.patches}×{geo.width}×3 uint8 → {pulsar2.VISION_DIR}/{tar_name}")  # fmt: skip

    prompt_frames = frames[:1] if mode == "image" else frames
    inputs = ve.vl_prompt_inputs(processor, opts.prompt or DEFAULT_PROMPTS[mode], prompt_frames,
                                 geo, mode)  # fmt: skip
    adapter = parts.adapter
    onnx_name = f"{model_name}_vision.onnx"
    flat, _ = vp.hf_patches(processor, frames, geo, mode, normalize=True)
    first = slice(0, geo.patches)
    with parts.vision_tower() as tower:
        wrapper = ve.VisionEncoderExport(adapter, geo).eval()
        onnx_info = ve.export_onnx(wrapper, vision / onnx_name)
        run.log(f"exported {onnx_name} (opset {onnx_info['opset']}); checking with onnxruntime")
        onnx_out = ve.run_onnx_steps(ve.onnx_session(vision / onnx_name), nchw)
        torch_out = ve.torch_vision_features(adapter, flat, grid_thw)
        end_to_end = ve.similarity(onnx_out, torch_out)
        per_layer = ve.per_block_similarity(
            adapter, wrapper, flat[first], grid_thw.new_tensor([[1, geo.grid, geo.grid]]),
            nchw[:1],
        )  # fmt: skip
        torch_features = vision_features(tower, inputs)
        del wrapper, onnx_out, torch_out

    mean, std = vp.normalization(processor, mode)
    config = pulsar2.vision_config(
        calibration_tar=tar_name, calibration_size=len(members),
        calibration_format=FORMATS[opts.calib_format][1], mean=mean, std=std,
    )  # fmt: skip
    (vision / "config.json").write_text(dumps_json(config))

    prompt_onnx = ve.run_onnx_steps(ve.onnx_session(vision / onnx_name), nchw[: 1 if mode ==
                                    "image" else len(nchw)])  # fmt: skip
    onnx_features = {mode: prompt_onnx}
    reference = greedy(model, parts, inputs, torch_features, opts.max_new_tokens)
    ref_logits = prompt_logits(model, parts, inputs, torch_features)
    fed = greedy(model, parts, inputs, onnx_features, opts.max_new_tokens)
    fed_logits = prompt_logits(model, parts, inputs, onnx_features)
    visual = prompt_onnx.shape[0]
    axmodel = f"{model_name}_vision_{mode}.axmodel"
    part = {
        "size": size, "grid": [geo.grid, geo.grid], "steps": len(layout),
        "tokens_per_step": geo.tokens, "visual_tokens": visual,
        "onnx": onnx_info, "onnx_cos_vs_torch": end_to_end["cosine"],
        "onnx_max_abs": end_to_end["max_abs"], "per_layer": per_layer,
        "prompt_logits": ve.similarity(fed_logits, ref_logits),
        "greedy_tokens": {"torch": reference, "onnx_fed": fed},
        "greedy_match": reference == fed,
        "calibration": {"file": f"{pulsar2.VISION_DIR}/{tar_name}", "format": opts.calib_format,
                        "samples": members, "source": str(opts.calib_dir)},
        "vision_axmodel": axmodel,
    }  # fmt: skip
    return part, inputs, torch_features, pulsar2.vision_build_command(onnx_name, axmodel)


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the gates first, then the per-layer table."""
    lines = [
        f"# AXERA AX650 build: {report['model']} ({report['mode']})",
        "",
        f"**Result: {'PASS' if report['passed'] else 'FAIL'}**",
        "",
        *markdown_table(report["gates"]),
        "",
        "| | |",
        "|---|---|",
    ]
    keys = ("mode", "size", "visual_tokens", "prompt_tokens", "prefill_len", "kv_cache_len",
            "onnx_cos_vs_torch", "onnx_max_abs", "greedy_match", "npu_compile")  # fmt: skip
    lines += [f"| {k} | {report[k]} |" for k in keys if k in report]
    emb = report["embeddings"]
    lines += [
        f"| embeddings | {emb['file']} {emb['shape']} {emb['rounding']}, max rel "
        f"{emb['max_rel']:.3g}, cosine {emb['cosine']:.8f} |",
        f"| greedy match with bf16 embeddings | {report['bf16_embeddings_greedy_match']} |",
        f"| tokenizer | {describe(report['tokenizer'])} |",
    ]
    if "per_layer" in report:
        lines += [
            "",
            "## Vision encoder: export wrapper vs PyTorch, per block (step 0)",
            "",
            "| layer | cosine | max abs |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r['layer']} | {r['cosine']:.8f} | {r['max_abs']:.3g} |"
            for r in report["per_layer"]
        ]
        lines += [
            "",
            f"End to end (ONNX Runtime vs PyTorch tower, all steps): cosine "
            f"{report['onnx_cos_vs_torch']:.8f}, max abs {report['onnx_max_abs']:.3g}; "
            f"prompt logits cosine {report['prompt_logits']['cosine']:.8f}.",
        ]
    if report["notes"]:
        lines += ["", "## Notes", "", *[f"- {n}" for n in report["notes"]]]
    lines += ["", "## NPU compile", "", "```", report["build_command"], "```"]
    return "\n".join(lines) + "\n"  # fmt: skip


def run_pulsar2(dest: Path, model_dir: Path) -> str:
    """Run build.sh inside ``dest`` (pulsar2 on PATH); return the toolchain version line."""
    logs = dest / "logs"
    logs.mkdir(exist_ok=True)
    log = logs / "pulsar2.log"
    with open(log, "w") as fh:
        proc = subprocess.run(
            ["bash", "build.sh"],
            cwd=dest,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MODEL_DIR": str(model_dir)},
            check=False,
        )
    if proc.returncode:
        kept = dest.parent.parent / f"{TARGET}.pulsar2-failed.log"
        shutil.copyfile(log, kept)
        raise EdgeforgeError(f"pulsar2 failed (exit {proc.returncode}); log: {kept}")
    version = subprocess.run(["pulsar2", "version"], capture_output=True, text=True, check=False)
    return (version.stdout.strip().splitlines() or ["unknown"])[0]


def main(argv: list[str] | None = None) -> int:
    from common.analysis.layerwise import Parts
    from common.core.recipes import load_recipe, model_build_dir
    from common.models import get_adapter
    from common.models.loading import (
        check_model_dir,
        load_model,
        load_processor,
        load_tokenizer,
    )
    from common.steps.model_build import build_model, check_packaged_tokenizer

    args = parse_args(argv)
    run = Run("axera", PHASES)
    run.phase("resolve")
    recipe = load_recipe(args.model)
    opts = resolve_target(Options, args, recipe, TARGET)
    model_dir = build_model(recipe, args.build_dir, args.model_path)
    vision_language = check_model_dir(model_dir).is_vision_language
    # A model is read one part at a time: the vision tower whole (its export and checks),
    # then the embedding table and each language layer per greedy token.
    streamed = layerwise_preflight(
        run, model_dir, "make axera", opts.max_memory,
        held=lambda adapter: {"bf16 embedding table and its check": adapter.vocab_size
                              * adapter.hidden_size * 4},
        # whole-model fallback (attention the layer-by-layer runs refuse): the tower's
        # export beside the model is about a fifth of a VL model
        copies={"float32 model": 1, "vision export": 0.5 if vision_language else 0.0},
        vision=VISION_FACTOR,
        lower="no option lowers it: free memory, or set MAX_MEMORY to go ahead anyway",
    )  # fmt: skip
    model = None if streamed is not None else load_model(model_dir)
    adapter = streamed.adapter if model is None else get_adapter(model)
    parts = Parts(adapter, streamed)
    mode = opts.mode or ("image" if adapter.is_vision_language else "llm")
    if adapter.is_vision_language == (mode == "llm"):
        kind = "vision-language" if adapter.is_vision_language else "text-only"
        raise EdgeforgeError(
            f"--mode {mode}: {args.model} is a {kind} {adapter.model_type} model; use "
            + ("--mode image or video" if adapter.is_vision_language else
               "--mode llm (or leave MODE unset): text models go straight to llm_build")
        )  # fmt: skip
    dest = opts.out or model_build_dir(recipe, args.build_dir) / TARGET
    notes: list[str] = []
    kv = opts.kv_cache_len or pulsar2.DEFAULT_KV_CACHE_LEN
    run.phase("export")
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        report: dict[str, Any] = {"model": recipe.name, "model_type": adapter.model_type,
                                  "mode": mode, "notes": notes}  # fmt: skip
        vision_command = None
        features: Features = {}
        if mode == "llm":
            tokenizer = load_tokenizer(model_dir)
            inputs = text_inputs(tokenizer, opts.prompt or recipe.eval_defaults.get(
                "prompt", DEFAULT_PROMPTS["llm"]))  # fmt: skip
            report.update(visual_tokens=0, onnx_cos_vs_torch=None, onnx_max_abs=None,
                          greedy_match=None)  # fmt: skip
        else:
            processor = load_processor(model_dir)
            part, inputs, features, command = build_vision(
                run, opts, args.model, mode, model, parts, processor, tmp, notes
            )
            report.update(part)
            vision_command = (command, part["vision_axmodel"])
        prompt_tokens = int(inputs["input_ids"].shape[1])
        explicit = opts.prefill_len
        prefill = explicit or pulsar2.default_prefill_len(prompt_tokens, mode == "llm")
        source = (
            "--prefill-len"
            if args.prefill_len
            else (f"{recipe.path}: targets.{TARGET}.prefill_len" if explicit else "prefill_len")
        )
        check_lengths(prompt_tokens, report["visual_tokens"], prefill, kv, source)
        report.update(prompt_tokens=prompt_tokens, prefill_len=prefill, kv_cache_len=kv)

        with parts.embedding():
            report["embeddings"] = write_embeddings(adapter, tmp, opts.bf16_truncate)
        run.phase("verify")
        plain = (  # a vision prompt's float decode is the vision check's reference
            report["greedy_tokens"]["torch"]
            if features
            else greedy(model, parts, inputs, features, opts.max_new_tokens)
        )
        with bf16_embeddings(adapter, opts.bf16_truncate):  # a hook: stays while parts load
            rounded = greedy(model, parts, inputs, features, opts.max_new_tokens)
        report["bf16_embeddings_greedy_match"] = plain == rounded
        report["bf16_embeddings_greedy_tokens"] = {"float": plain, "bf16": rounded}
        report["model_files"] = copy_model_files(model_dir, tmp)
        report["tokenizer"] = check_packaged_tokenizer(recipe, tmp, dest, args.build_dir,
                                                       args.model_path)  # fmt: skip

        parallel = opts.parallel or pulsar2.DEFAULT_PARALLEL
        llm_command = pulsar2.llm_build_command(
            input_path="$MODEL_DIR", output_path="axmodel", kv_cache_len=kv, prefill_len=prefill,
            hidden_state_type=opts.hidden_state_type, parallel=parallel,
        )  # fmt: skip
        script = pulsar2.build_script(model_dir_default=os.path.relpath(model_dir, dest),
                                      llm_command=llm_command, vision=vision_command)  # fmt: skip
        (tmp / "build.sh").write_text(script)
        (tmp / "build.sh").chmod(0o755)
        # Pulsar2 ships only as the vendor's image; USE_DOCKER=1 runs this step without it.
        report["build_command"] = f"bash {dest / 'build.sh'}"

        emb = report["embeddings"]
        checks = [gate("embeddings_bf16_max_rel", emb["max_rel"], "<=", emb["max_rel_bound"])]
        if mode != "llm":
            checks += [
                gate("onnx_cos_vs_torch", report["onnx_cos_vs_torch"], ">=", COSINE_GATE),
                gate("greedy_match", report["greedy_match"], "==", True),
            ]
        report["gates"] = records(checks)
        report["passed"] = all(g.passed for g in checks)
        toolchains = {}
        if shutil.which("pulsar2") and report["passed"]:
            run.phase("compile")
            run.log("pulsar2 found: running build.sh (log: logs/pulsar2.log)")
            toolchains["pulsar2"] = run_pulsar2(tmp, model_dir)
            report["npu_compile"] = "run"
        else:
            report["npu_compile"] = "not run (pulsar2 not on PATH)"
        run.phase("package")
        report["resources"] = run.resources()  # the package phase up to this point
        (tmp / "report.json").write_text(dumps_json(report))
        markdown = render_markdown(report) + resources_line(report["resources"])
        (tmp / "report.md").write_text(markdown)
        options = {"model": args.model, "build_dir": args.build_dir and str(args.build_dir),
                   "model_path": args.model_path and str(args.model_path),
                   **describe_options(opts)}  # fmt: skip
        manifest = build_manifest(step=f"axera-{mode}", inputs={"model": model_dir},
                                  outputs=tmp, recipe=recipe.data, options=options,
                                  toolchains=toolchains)  # fmt: skip
        if mode != "llm":
            manifest["inputs"]["calibration"] = {
                "path": str(opts.calib_dir),
                "files": report["calibration"]["samples"],
            }
        (tmp / "manifest.json").write_text(dumps_json(manifest))
    run.finish()
    for note in notes:
        run.log(f"note: {note}")
    summary = (
        f"{mode}: prompt {prompt_tokens} tokens ({report['visual_tokens']} visual) ≤ "
        f"prefill_len {prefill}; embeddings bf16 max rel "
        f"{report['embeddings']['max_rel']:.3g}"
    )
    if mode != "llm":
        summary += (
            f"; ONNX vs torch cosine {report['onnx_cos_vs_torch']:.8f}, max abs "
            f"{report['onnx_max_abs']:.3g}; greedy match {report['greedy_match']}"
        )
    run.log(summary)
    run.log(f"wrote {dest}")
    if not report["passed"]:
        raise CheckFailed(f"{dest}/report.json: gate(s) failed: {'; '.join(failures(checks))}")
    if report["npu_compile"] != "run":
        # stdout: what is left for the user to do, not progress
        print("NPU compile step NOT run (pulsar2 is not installed here). To run it where "
              "pulsar2 is (the Pulsar2 image, targets/axera-ax650/README.md): "
              + report["build_command"])  # fmt: skip
    return 0


if __name__ == "__main__":
    run_cli(main)

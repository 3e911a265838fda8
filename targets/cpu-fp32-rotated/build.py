"""``make cpu``: a rotated FP32 model for the mllm CPU runtime, checked against the original.

Steps: resolve the model (``make model``), choose the rotation (seeded random Hadamard or
orthogonal, a rotation file ``R_PATH``, or a mllm QNN convertor ``CONFIG``), rotate the
language model through the adapters (common/quant/rotation.py), save it as a Hugging Face
directory, read that directory back, and compare it with the original on the held-out
corpus (perplexity, logits, per-layer residual stream; VL models also on an image prompt).
A model is handled one part at a time throughout (read, rotated, written, verified: see
the README; a VL model's vision tower is one part). ``model.mllm`` (FP32, mllm v1) is written from
the written weights and read back bit-exact. Output: ``build/<MODEL>/cpu-fp32-rotated/``
with ``model/``, ``model.mllm``, ``rotation.safetensors``, ``report.{json,md}``,
``outliers.png``, ``manifest.json``. A failed gate raises ``CheckFailed`` after the outputs
are written.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import report as rep

from common.analysis.accuracy import accuracy_block
from common.core.errors import CheckFailed, EdgeforgeError, run_cli
from common.core.gates import failures, gate, records
from common.core.options import Choice, FilePath, Integer, option, resolve_target, target_parser
from common.core.paths import REPO_ROOT
from common.core.progress import progress
from common.core.records import (
    atomic_path,
    build_manifest,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
)
from common.core.resources import resources_line
from common.quant.hadamard import ROTATE_MODES
from common.steps.phases import Run
from common.steps.preflight import max_memory_option, whole_model_preflight

TARGET = "cpu-fp32-rotated"
#: The phases of a run (common/steps/phases.py), in order.
PHASES = ("resolve", "reference", "export", "verify", "package")
#: Gates: the rotated model must score the held-out corpus like the original.
PPL_RATIO_TOL = 1e-3
TOP1_MIN = 0.999
#: Eval windows when neither the command line nor the recipe's ``eval`` object sets them.
DEFAULT_SEQ_LEN = 512
DEFAULT_NUM_WINDOWS = 16
#: Files of the source checkpoint copied next to the rotated weights (tokenizer, processor,
#: chat template); config.json / generation_config.json are written by save_pretrained.
COPY_EXCLUDE = {"config.json", "generation_config.json", "manifest.json"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
IMAGE = REPO_ROOT / "data" / "images" / "astronaut.jpg"
IMAGE_PROMPT = "Describe this image."


@dataclass(frozen=True)
class Options:
    """Options of ``make cpu`` (command line > recipe ``targets.cpu-fp32-rotated`` > these)."""

    rotate_mode: str = option(
        "hadamard", Choice(ROTATE_MODES), "rotation of a fresh rotation", make="ROTATE_MODE"
    )
    seed: int = option(0, Integer(0), "seed of a fresh rotation", make="SEED")
    r_path: Path | None = option(
        None,
        FilePath(),
        "rotation file: edgeforge safetensors or mllm torch pickle",
        make="R_PATH",
        recipe=False,
    )
    config: Path | None = option(
        None,
        FilePath(),
        "mllm QNN convertor config (its export_config.model_config)",
        make="CONFIG",
        recipe=False,
    )
    eval_windows: int | None = option(
        None,
        Integer(1),
        f"eval windows (default: the recipe's eval.num_windows, else {DEFAULT_NUM_WINDOWS})",
        make="EVAL_WINDOWS",
        recipe=False,
    )
    seq_len: int | None = option(
        None,
        Integer(1),
        f"eval window length (default: the recipe's eval.seq_len, else {DEFAULT_SEQ_LEN})",
        make="SEQ_LEN",
        recipe=False,
    )
    stats_windows: int = option(
        2,
        Integer(1),
        "windows traced for the outlier statistics",
        make="STATS_WINDOWS",
        recipe=False,
    )
    max_memory: int | None = max_memory_option()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return target_parser("make cpu", __doc__.split("\n\n")[0], Options).parse_args(argv)


def rotation_options(opts: Options) -> dict[str, Any]:
    """Mode, seed, rotation file and save path from the options and a QNN config, checked
    before any slow work."""
    from common.backends.qnn_config import load_qnn_config, rotation_settings

    options: dict[str, Any] = {"rotate_mode": opts.rotate_mode, "seed": opts.seed,
                               "r_path": opts.r_path, "save_rotation": None,
                               "config": None}  # fmt: skip
    if opts.config is not None:
        settings = rotation_settings(load_qnn_config(opts.config), opts.config)
        where = f"CONFIG={opts.config}: $.export_config.model_config"
        if not settings.online_rotation:
            raise EdgeforgeError(
                f"{where}.online_rotation: is false (the model is already rotated); "
                f"{TARGET} rotates the model, so set online_rotation: true"
            )
        if settings.r_path is not None and opts.r_path is not None:
            raise EdgeforgeError(
                f"R_PATH={opts.r_path} and {where}.R_path both name a rotation file; give one"
            )
        if settings.random_rotate and opts.r_path is not None:
            raise EdgeforgeError(
                f"R_PATH={opts.r_path} contradicts {where}.random_rotate: true; give one"
            )
        for key in settings.unknown_keys:
            print(
                f"[cpu] warning: {where}.{key} is not a key the mllm convertor reads",
                file=sys.stderr,
            )
        options.update(config=opts.config, save_rotation=settings.save_rotation)
        if settings.r_path is not None:
            options["r_path"] = settings.r_path
    return options


def _copy_tokenizer_files(src: Path, dest: Path) -> None:
    for path in sorted(src.iterdir()):
        if (
            path.is_file()
            and path.name not in COPY_EXCLUDE
            and not path.name.endswith((*WEIGHT_SUFFIXES, ".index.json"))
        ):
            shutil.copy2(path, dest / path.name)


def _image_check(reference: Any, rotated: Any, model_dir: Path) -> dict[str, Any]:
    """Logits of an image prompt (the merger feeds the rotated stream) vs the original:
    each model's vision tower read for its features, then its language layers one at a
    time, or the whole models when ``reference``/``rotated`` are loaded models."""
    import numpy as np
    import torch
    from PIL import Image

    from common.analysis import layerwise_decode
    from common.analysis.layerwise import Parts
    from common.models.loading import load_processor
    from common.models.streaming import StreamedModel

    processor = load_processor(model_dir)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": IMAGE_PROMPT}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    with Image.open(IMAGE) as image:
        inputs = processor(text=[text], images=[image.convert("RGB")], return_tensors="pt")

    def prompt_logits(model: Any) -> torch.Tensor:
        if not isinstance(model, StreamedModel):
            with torch.inference_mode():
                return model(**inputs).logits[0].double()
        parts = Parts(model.adapter, model)
        with parts.vision_tower() as tower:
            features = layerwise_decode.vision_features(tower, inputs)
        prompt = layerwise_decode.VisualPrompt(inputs, features)
        logits = layerwise_decode.reference_logits(parts, prompt, [])
        return torch.from_numpy(logits.astype(np.float64))

    want, got = prompt_logits(reference), prompt_logits(rotated)
    return {
        "image": str(IMAGE.relative_to(REPO_ROOT)),
        "prompt": IMAGE_PROMPT,
        "tokens": int(want.shape[0]),
        "top1_agreement": (got.argmax(-1) == want.argmax(-1)).double().mean().item(),
        "max_abs_diff": (got - want).abs().max().item(),
    }


def _verify_layerwise(
    reference: Any, rotated: Any, windows: Any, stats_windows: int, run: Run
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Compare the written model with the original one part at a time: every eval window
    through each layer of the original, then of the rotated model read back from its
    files, then both heads window by window. Returns the logit comparison and both
    traces, the numbers a whole-model comparison gives, bit for bit."""
    from common.analysis.eval import LogitComparison
    from common.analysis.layerwise import Cursor, Parts, head, run_layers

    cursor = Cursor()
    traces, finals = [], []
    for name, streamed in (("original", reference), ("rotated", rotated)):
        run.log(f"running the {name} model layer by layer")
        tracer = rep.Tracer(streamed.adapter, stats_windows, cursor)
        bar = progress(total=windows.numel() * streamed.adapter.num_layers, desc=name,
                       unit="tok", unit_scale=True)  # fmt: skip
        with tracer.attached():
            finals.append(
                run_layers(Parts(streamed.adapter, streamed), windows, cursor=cursor, bar=bar)
            )
        bar.close()
        traces.append(tracer.result())
    comparison = LogitComparison()
    with (
        head(Parts(rotated.adapter, rotated)) as got,
        head(Parts(reference.adapter, reference)) as want,
    ):
        for i, window in enumerate(windows):
            comparison.add(got(finals[1][i : i + 1])[0], want(finals[0][i : i + 1])[0], window)
    return comparison.result(), traces[0], traces[1]


def _layerwise_estimate(streamed: Any, windows: int, seq_len: int) -> Any:
    """Peak of a layer-by-layer build: one part of each model (the two heads together at
    the end; a VL model's vision tower), both models' hidden states of every window, the
    rotation's float64 work, and one window's two rows of float64 logits."""
    from common.core.memory import Estimate
    from common.quant.rotation import rotation_bytes

    adapter = streamed.adapter
    head = streamed.part_bytes(adapter.name_of("embed_tokens"))
    tower = streamed.vision_tower_bytes()
    return Estimate(
        "make cpu (one layer at a time)",
        {
            "largest part (float32)": max(streamed.largest_part_bytes(), 2 * head, tower),
            "hidden states": 3 * windows * seq_len * adapter.hidden_size * 4,
            "rotation (float64)": rotation_bytes(adapter),
            "one window's logits (float64)": 2 * seq_len * adapter.vocab_size * 8,
            "pickled .bin pages (mapped)": streamed.weights.mapped_bytes,
        },
    )


def _mllm_from_files(rotated: Any, dest: Path) -> tuple[list[str], int]:
    """``model.mllm`` from the written checkpoint, one tensor in memory at a time, then
    read back against those files: the names that differ, and the tensor count."""
    import torch

    from common.export.mllm_format import mllm_mismatches, mllm_parameters, write_mllm_lazily

    keys = {id(p): n for n, p in rotated.model.named_parameters()}
    named = mllm_parameters(rotated.adapter)  # names and (meta) shapes, in order
    where = {m: keys[id(p)] for m, p in named}

    def read(name: str) -> Any:
        return rotated.weights.tensor(where[name])

    write_mllm_lazily(dest, [(m, torch.float32, p.numel()) for m, p in named], read)
    return mllm_mismatches(dest, list(where), read), len(named)


def build(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import GenerationConfig

    from common.analysis.eval import compare_logits
    from common.core.memory import MemoryCap
    from common.core.recipes import load_recipe, model_build_dir
    from common.export.checkpoint_writer import write_transformed
    from common.export.mllm_format import mllm_named_tensors, mllm_tensors_equal, write_mllm
    from common.inputs.data import EVAL_CORPUS, eval_windows
    from common.models import get_adapter
    from common.models.loading import load_model, load_tokenizer, refuse_remote_code
    from common.models.streaming import StreamedModel
    from common.quant.rotation import rotate_model, rotation_for, rotation_summary, save_rotation
    from common.quant.transforms import Transforms
    from common.steps.model_build import build_model, check_packaged_tokenizer

    run = Run("cpu", PHASES)
    run.phase("resolve")
    recipe = load_recipe(args.model)
    opts = resolve_target(Options, args, recipe, TARGET)
    options = rotation_options(opts)
    model_dir = build_model(recipe, args.build_dir, args.model_path)
    seq_len = opts.seq_len or recipe.eval_defaults.get("seq_len", DEFAULT_SEQ_LEN)
    num_windows = opts.eval_windows or recipe.eval_defaults.get("num_windows", DEFAULT_NUM_WINDOWS)
    refuse_remote_code(model_dir)
    streamed = StreamedModel(model_dir)
    adapter = streamed.adapter
    # One part at a time (a VL model's vision tower whole, as one part) unless its
    # attention is not the plain causal one the layer-by-layer runs build.
    layerwise = not adapter.attention_departures()
    if layerwise:
        run.preflight(
            _layerwise_estimate(streamed, num_windows, seq_len),
            MemoryCap.resolve(opts.max_memory),
            f"lower EVAL_WINDOWS (now {num_windows}) or SEQ_LEN (now {seq_len})",
        )
    else:
        whole_model_preflight(
            run, model_dir, "make cpu", opts.max_memory, {"reference model": 1, "rotated model": 1}
        )
    rotation = rotation_for(adapter, mode=options["rotate_mode"], seed=options["seed"],
                            r_path=options["r_path"])  # fmt: skip
    windows = eval_windows([EVAL_CORPUS], load_tokenizer(model_dir), num_windows, seq_len)
    stats_windows = windows[: opts.stats_windows]

    if not layerwise:  # a layer-by-layer build reads the original only while verifying
        run.phase("reference")
        reference = load_model(model_dir)
        model = load_model(model_dir)
        run.log(f"{recipe.name}: tracing the original")
        before = rep.trace(reference, get_adapter(reference), stats_windows)
    run.phase("export")
    out_dir = model_build_dir(recipe, args.build_dir) / TARGET
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        run.log(f"writing the rotated model to {out_dir / 'model'}")
        if layerwise:
            write_transformed(streamed, Transforms(rotation), tmp / "model", desc="rotate")
            merger = adapter.vision_merger()
            rotated_info = rotation_summary(
                adapter,
                untied=streamed.tied,
                merger=None if merger is None else merger.linear_names["merger_fc2"],
            )
            generation = model_dir / "generation_config.json"
            if generation.is_file():
                GenerationConfig.from_pretrained(model_dir).save_pretrained(tmp / "model")
        else:
            rotated_info = rotate_model(get_adapter(model), rotation)
            model.save_pretrained(tmp / "model")
            del model
        _copy_tokenizer_files(model_dir, tmp / "model")
        tokenizer_check = check_packaged_tokenizer(
            recipe, tmp / "model", out_dir / "model", args.build_dir, args.model_path
        )
        save_rotation(tmp / "rotation.safetensors", rotation)
        if layerwise:  # what a user gets, read back from its files one tensor at a time
            rotated = StreamedModel(tmp / "model")
            rotated_adapter = rotated.adapter
            mllm_problems, mllm_count = _mllm_from_files(rotated, tmp / "model.mllm")
        else:
            rotated = load_model(tmp / "model")  # what a user gets, loaded as-is
            rotated_adapter = get_adapter(rotated)
            named = mllm_named_tensors(rotated_adapter)
            write_mllm(tmp / "model.mllm", named)
            mllm_problems = mllm_tensors_equal(tmp / "model.mllm", dict(named))
            mllm_count = len(named)
        if mllm_problems:
            raise CheckFailed(f"model.mllm does not read back bit-exact: {mllm_problems[:5]}")

        run.phase("verify")
        run.log("perplexity and logits: original vs rotated")
        if layerwise:
            logits, before, after = _verify_layerwise(
                streamed, rotated, windows, int(stats_windows.shape[0]), run
            )
            image = (_image_check(streamed, rotated, model_dir)
                     if rotated_adapter.is_vision_language else None)  # fmt: skip
        else:
            logits = compare_logits(rotated, reference, windows, progress=True)
            after = rep.trace(rotated, rotated_adapter, stats_windows)
            image = (_image_check(reference, rotated, model_dir)
                     if rotated_adapter.is_vision_language else None)  # fmt: skip
        similarity = rep.per_layer_similarity(before["outputs"], after["outputs"], rotation.R)
        ppl_ratio = logits["ppl"] / logits["ppl_reference"]
        checks = [
            gate("ppl_ratio", ppl_ratio, "within", (1 - PPL_RATIO_TOL, 1 + PPL_RATIO_TOL)),
            gate("top1_agreement", logits["top1_agreement"], ">=", TOP1_MIN),
        ]
        if image is not None:
            checks.append(gate("image_top1_agreement", image["top1_agreement"], ">=", TOP1_MIN))
        passed = all(g.passed for g in checks)
        per_layer = [
            {
                "layer": i,
                "q_input_ratio_original": before["ratios"]["q_input"][i],
                "q_input_ratio_rotated": after["ratios"]["q_input"][i],
                "down_input_ratio_original": before["ratios"]["down_input"][i],
                "down_input_ratio_rotated": after["ratios"]["down_input"][i],
                **similarity[i],
            }
            for i in range(rotated_adapter.num_layers)
        ]
        report: dict[str, Any] = {
            "model": recipe.name,
            "model_type": recipe.model_type,
            "corpus": str(EVAL_CORPUS.relative_to(REPO_ROOT)),
            "seq_len": seq_len,
            "num_windows": num_windows,
            "stats_windows": int(stats_windows.shape[0]),
            "tokens": logits["ppl_tokens"],
            "ppl_fp32": logits["ppl_reference"],
            "ppl_rotated": logits["ppl"],
            "ppl_ratio": ppl_ratio,
            "max_abs_logit_diff": logits["max_abs_diff"],
            "top1_agreement": logits["top1_agreement"],
            "cosine_mean": logits["cosine_mean"],
            "cosine_min": logits["cosine_min"],
            "accuracy": accuracy_block(logits, "the rotated model as written, float32", seq_len),
            "image_prompt": image,
            "tokenizer": tokenizer_check,
            "rotation": {**dict(rotation.info), **rotated_info,
                         "mode": options["rotate_mode"], "seed": options["seed"]},
            "mllm": {"file": "model.mllm", "tensors": mllm_count,
                     "bytes": (tmp / "model.mllm").stat().st_size,
                     "sha256": sha256_file(tmp / "model.mllm"), "verified": True},
            "per_layer": per_layer,
            "gates": records(checks),
            "passed": passed,
        }  # fmt: skip
        run.phase("package")
        rep.plot_outliers(
            tmp / "outliers.png",
            before["ratios"],
            after["ratios"],
            f"{recipe.name}: activation outliers before/after rotation",
        )
        report["resources"] = run.resources()  # the package phase up to this point
        write_json_atomic(tmp / "report.json", report)
        markdown = rep.render_markdown(report, "outliers.png") + resources_line(report["resources"])
        write_bytes_atomic(tmp / "report.md", markdown.encode())
        inputs = {"model_config": model_dir / "config.json", "corpus": EVAL_CORPUS}
        inputs.update({f"weights:{p.name}": p for p in sorted(model_dir.glob("*.safetensors"))})
        if options["r_path"] is not None:
            inputs["R_path"] = Path(options["r_path"])
        if options["config"] is not None:
            inputs["config"] = Path(options["config"])
        manifest_options = {
            "rotate_mode": options["rotate_mode"], "seed": options["seed"],
            "r_path": None if options["r_path"] is None else str(options["r_path"]),
            "config": None if options["config"] is None else str(options["config"]),
            "seq_len": seq_len, "num_windows": num_windows,
            "stats_windows": int(stats_windows.shape[0]),
        }  # fmt: skip
        manifest = build_manifest(step="cpu", inputs=inputs, outputs=tmp, recipe=recipe.data,
                                  options=manifest_options)  # fmt: skip
        write_json_atomic(tmp / "manifest.json", manifest)
        del rotated, rotated_adapter
    if options["save_rotation"] is not None:
        save_rotation(options["save_rotation"], rotation)
        run.log(f"rotation also saved to {options['save_rotation']}")
    run.finish()
    run.log(f"wrote {out_dir}: ppl {report['ppl_fp32']:.4f} -> {report['ppl_rotated']:.4f} "
          f"(ratio {ppl_ratio:.6f}), top-1 {report['top1_agreement']:.5f}, max |Δlogit| "
          f"{report['max_abs_logit_diff']:.3g}")  # fmt: skip
    if not passed:
        raise CheckFailed(
            f"{recipe.name}: rotated model fails its gates: {'; '.join(failures(checks))}; "
            f"see {out_dir / 'report.md'}"
        )
    return report


def main(argv: list[str] | None = None) -> int:
    build(parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)

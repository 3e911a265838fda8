"""Model recipes (``models/<name>.json``): loading, validation, weight resolution.

A recipe names the architecture and where the weights come from. Validation happens up
front against ``models/schema.json`` so a typo fails with the file and JSON path named,
before any slow step starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from common.core.errors import EdgeforgeError
from common.core.paths import REPO_ROOT

RECIPE_DIR = REPO_ROOT / "models"
SCHEMA_PATH = RECIPE_DIR / "schema.json"

#: Recipe source kinds whose Hugging Face directory ``make model`` writes under build/.
BUILT_KINDS = ("gguf-pip", "tiny", "derived")


@dataclass(frozen=True)
class Recipe:
    """A validated recipe; ``data`` is the JSON document as written."""

    path: Path
    data: dict[str, Any]

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def model_type(self) -> str:
        return self.data["model_type"]

    @property
    def source(self) -> dict[str, Any]:
        return self.data["source"]

    @property
    def eval_defaults(self) -> dict[str, Any]:
        return self.data.get("eval", {})

    def target_section(self, target: str) -> dict[str, Any]:
        """The recipe's defaults for ``target`` (its ``targets.<target>`` object, or empty)."""
        return dict((self.data.get("targets") or {}).get(target) or {})

    @property
    def trust_remote_code(self) -> bool:
        return bool(self.source.get("trust_remote_code", False))


@cache
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def known_recipes(recipe_dir: Path = RECIPE_DIR) -> list[str]:
    """Names of all recipes in ``recipe_dir`` (the schema file excluded), sorted."""
    return sorted(p.stem for p in recipe_dir.glob("*.json") if p.name != SCHEMA_PATH.name)


def _json_path(error: jsonschema.ValidationError) -> str:
    parts = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return "$" + parts


def validate_recipe(path: Path, data: Any) -> None:
    """Check ``data`` against the schema; raise naming ``path`` and the JSON path."""
    validator = jsonschema.Draft202012Validator(_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        raise EdgeforgeError(f"{path}: {_json_path(error)}: {error.message}")
    if data["name"] != path.stem:
        raise EdgeforgeError(
            f"{path}: $.name: {data['name']!r} must equal the file name {path.stem!r}"
        )


def load_recipe_file(path: Path) -> Recipe:
    """Read and validate one recipe file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgeforgeError(f"{path}: recipe file not found") from None
    except json.JSONDecodeError as exc:
        raise EdgeforgeError(f"{path}: not valid JSON: {exc}") from None
    validate_recipe(path, data)
    return Recipe(path=path, data=data)


def load_recipe(name: str, recipe_dir: Path = RECIPE_DIR) -> Recipe:
    """The recipe called ``name``, or the recipe file ``name`` when it is a path to a .json.

    An unknown name lists the known ones.
    """
    if name.endswith(".json") and Path(name).is_file():
        return load_recipe_file(Path(name))
    path = recipe_dir / f"{name}.json"
    if not name or not path.is_file() or path == SCHEMA_PATH:
        known = ", ".join(known_recipes(recipe_dir))
        raise EdgeforgeError(f"unknown MODEL {name!r}; known models: {known}")
    return load_recipe_file(path)


def build_root(build_dir: Path | None = None) -> Path:
    """Where outputs go: ``BUILD_DIR`` (env or argument) or ``<repo>/build``."""
    if build_dir is not None:
        return Path(build_dir)
    return Path(os.environ.get("BUILD_DIR") or REPO_ROOT / "build")


def model_build_dir(recipe: Recipe, build_dir: Path | None = None) -> Path:
    """``build/<MODEL>/``: every output for this model lives below it."""
    return build_root(build_dir) / recipe.name


def hf_cache_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local Hugging Face cache snapshot of ``repo_id``, without touching the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # Read the cache location now, not at huggingface_hub's import, so HF_HUB_CACHE set by
    # the caller (or a test) is honoured.
    cache_dir = os.environ.get("HF_HUB_CACHE")
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True
            )
        )
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def resolve_model_dir(
    recipe: Recipe, build_dir: Path | None = None, model_path: Path | None = None
) -> Path:
    """The Hugging Face directory holding this recipe's weights.

    Built kinds live in ``build/<MODEL>/model``. Hub checkpoints come from ``model_path``
    (``MODEL_PATH=``) or the local Hugging Face cache; nothing is ever downloaded, and a
    miss says exactly what to download and where to point ``MODEL_PATH``.
    """
    source = recipe.source
    if source["kind"] in BUILT_KINDS:
        return model_build_dir(recipe, build_dir) / "model"
    if model_path is not None:
        model_path = Path(model_path)
        if not (model_path / "config.json").is_file():
            raise EdgeforgeError(
                f"MODEL_PATH={model_path}: no config.json there; point MODEL_PATH at the "
                f"directory holding the {source['repo_id']} checkpoint"
            )
        return model_path
    snapshot = hf_cache_snapshot(source["repo_id"], source.get("revision"))
    if snapshot is None:
        raise EdgeforgeError(
            f"model {recipe.name}: weights of {source['repo_id']} not found in MODEL_PATH or "
            f"the local Hugging Face cache; download them where there is network "
            f"(`hf download {source['repo_id']} --local-dir DIR`) and run again with "
            f"MODEL_PATH=DIR"
        )
    return snapshot

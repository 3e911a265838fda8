"""``make model`` on the tiny recipes: same recipe, same bytes, in any build directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.core.records import hash_tree
from tests.conftest import run_cli


@pytest.mark.parametrize("name", ["tiny-qwen2.5-vl"])
def test_tiny_model_builds_are_byte_identical(
    name: str, tmp_path: Path, tiny_qwen2_5_vl_dir: Path
) -> None:
    result = run_cli("model", "--model", name, "--build-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    first = hash_tree(tiny_qwen2_5_vl_dir)
    second = hash_tree(tmp_path / name / "model")
    first.pop("manifest.json")
    second.pop("manifest.json")
    assert "model.safetensors" in first
    assert first == second


def test_model_manifest_records_recipe_and_outputs(tiny_qwen2_dir: Path) -> None:
    manifest = json.loads((tiny_qwen2_dir / "manifest.json").read_text())
    assert manifest["step"] == "model"
    assert manifest["recipe"]["name"] == "tiny-qwen2"
    assert manifest["outputs"] == {
        k: v for k, v in hash_tree(tiny_qwen2_dir).items() if k != "manifest.json"
    }
    assert manifest["inputs"]["tokenizer_corpus"]["sha256"]


def test_model_path_of_a_built_recipe_is_named_as_not_read(
    session_build: Path, tiny_qwen2_dir: Path, tmp_path: Path
) -> None:
    """A built recipe (tiny, GGUF, derived) reads no checkpoint: a MODEL_PATH given with
    it is said to be unread, not silently dropped; its own folder is not mentioned."""
    result = run_cli(
        "model", "--model", "tiny-qwen2", "--build-dir", str(session_build), "--model-path",
        str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"MODEL_PATH={tmp_path} is not read: tiny-qwen2 is built here (tiny)" in result.stderr
    same = run_cli(
        "model", "--model", "tiny-qwen2", "--build-dir", str(session_build), "--model-path",
        str(tiny_qwen2_dir),
    )  # fmt: skip
    assert same.returncode == 0 and "is not read" not in same.stderr, same.stderr


def test_packaged_processor_is_checked_against_the_model(
    tiny_qwen2_vl_dir: Path, tmp_path: Path
) -> None:
    """A VL package's processor (configs beside the tokenizer, no weights) loads with
    AutoProcessor and prepares pictures as the model's does; an edited one is refused,
    the tensor named."""
    from common.core.errors import CheckFailed
    from common.models.loading import copy_processor_files
    from common.models.tokenizer_fidelity import write_tokenizer_dir
    from common.steps.model_build import check_packaged_processor

    images = sorted((Path(__file__).resolve().parent.parent / "data" / "images").glob("*.jpg"))
    package = write_tokenizer_dir(tiny_qwen2_vl_dir, tmp_path / "tokenizer")
    assert copy_processor_files(tiny_qwen2_vl_dir, package) == ["processor_config.json"]
    record = check_packaged_processor(tiny_qwen2_vl_dir, package, package, images[:2], 56)
    assert record == {
        "files": ["processor_config.json"], "pictures": 2, "image_size": 56, "equal": True
    }  # fmt: skip
    config = json.loads((package / "processor_config.json").read_text())
    config["image_processor"]["image_mean"] = [0.5, 0.5, 0.5]
    (package / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckFailed, match=r"prepares astronaut\.jpg differently.*pixel_values"):
        check_packaged_processor(tiny_qwen2_vl_dir, package, package, images[:2], 56)

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

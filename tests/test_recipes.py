"""Recipes: every shipped recipe validates; malformed ones fail naming file and JSON path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.core.errors import EdgeforgeError
from common.core.recipes import (
    RECIPE_DIR,
    known_recipes,
    load_recipe,
    load_recipe_file,
    resolve_model_dir,
)

EXPECTED = {
    "smollm2-135m": "llama",
    "smollm2-135m-qwen2": "qwen2",
    "tiny-qwen2": "qwen2",
    "tiny-qwen2-vl": "qwen2_vl",
    "tiny-qwen2.5-vl": "qwen2_5_vl",
    "qwen1.5-1.8b": "qwen2",
    "qwen2.5-1.5b": "qwen2",
    "showui-2b": "qwen2_vl",
    "qwen2-vl-2b": "qwen2_vl",
    "qwen2.5-vl-3b": "qwen2_5_vl",
    "qwen-7b": "qwen",
}


def test_every_shipped_recipe_validates() -> None:
    assert set(known_recipes()) == set(EXPECTED)
    for name, model_type in EXPECTED.items():
        assert load_recipe(name).model_type == model_type


def _write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def _tiny_recipe() -> dict:
    return json.loads((RECIPE_DIR / "tiny-qwen2.json").read_text())


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(EdgeforgeError, match=r"unknown MODEL 'nope'.*smollm2-135m"):
        load_recipe("nope")


def test_extra_field_names_file_and_path(tmp_path: Path) -> None:
    data = _tiny_recipe()
    data["name"] = "x"
    data["source"]["colour"] = "blue"
    path = _write(tmp_path, "x", data)
    with pytest.raises(EdgeforgeError) as err:
        load_recipe_file(path)
    assert str(path) in str(err.value)
    assert "$.source" in str(err.value) and "colour" in str(err.value)


def test_missing_field_names_file_and_path(tmp_path: Path) -> None:
    data = _tiny_recipe()
    data["name"] = "x"
    del data["source"]["seed"]
    path = _write(tmp_path, "x", data)
    with pytest.raises(EdgeforgeError, match=r"x\.json: \$\.source: 'seed' is a required"):
        load_recipe_file(path)


def test_wrong_type_in_eval_block(tmp_path: Path) -> None:
    data = _tiny_recipe()
    data["name"] = "x"
    data["eval"]["seq_len"] = "long"
    path = _write(tmp_path, "x", data)
    with pytest.raises(EdgeforgeError, match=r"\$\.eval\.seq_len: 'long' is not of type"):
        load_recipe_file(path)


def test_name_must_match_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "other", _tiny_recipe())
    with pytest.raises(EdgeforgeError, match=r"\$\.name: 'tiny-qwen2' must equal"):
        load_recipe_file(path)


def test_invalid_json_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{ not json")
    with pytest.raises(EdgeforgeError, match=r"bad\.json: not valid JSON"):
        load_recipe_file(path)


def test_recipe_path_is_accepted_as_model(tmp_path: Path) -> None:
    data = _tiny_recipe()
    data["name"] = "mine"
    path = _write(tmp_path, "mine", data)
    assert load_recipe(str(path)).name == "mine"


def test_hub_model_absent_says_what_to_download(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(EdgeforgeError) as err:
        resolve_model_dir(load_recipe("qwen1.5-1.8b"))
    message = str(err.value)
    assert "Qwen/Qwen1.5-1.8B-Chat" in message and "MODEL_PATH" in message


def test_model_path_without_config(tmp_path: Path) -> None:
    with pytest.raises(EdgeforgeError, match=r"no config\.json"):
        resolve_model_dir(load_recipe("qwen2.5-1.5b"), model_path=tmp_path)


def test_hub_model_found_in_cache(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "hub"
    snapshot = cache / "models--Qwen--Qwen2.5-1.5B-Instruct" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    refs = cache / "models--Qwen--Qwen2.5-1.5B-Instruct" / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model_dir(load_recipe("qwen2.5-1.5b")) == snapshot

"""The mllm QNN convertor config schema (seed 000) and its cross-field rules."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from common.backends.qnn_config import load_qnn_config, rotation_settings, validate_qnn_config
from common.core.errors import EdgeforgeError

#: mllm's config/qwen1.5-1.8b.json as the spec describes it.
QWEN15_EXAMPLE: dict[str, Any] = {
    "profile_config": {
        "dataset_path": "path/to/pile-val-backup/",
        "output_path": "qwen1.5-1.8b-scale.json",
        "num_samples": 2,
        "no_bias": True,
        "model_config": {
            "model_type": "qwen2",
            "tokenizer_name": "Qwen/Qwen1.5-1.8B-Chat",
            "model_name": "Qwen/Qwen1.5-1.8B-Chat",
            "online_rotation": True,
            "random_rotate": True,
            "save_rotation": "./R/qwen1.5-1.8b-rotation-matrix.bin",
        },
    },
    "export_config": {
        "scale_file": "qwen1.5-1.8b-scale.json",
        "output_model": "qwen1.5-1.8b-int8.pth",
        "t01m_clip_threshold": 64,
        "quant_bias": False,
        "model_config": {
            "model_type": "qwen2",
            "tokenizer_name": "Qwen/Qwen1.5-1.8B-Chat",
            "model_name": "Qwen/Qwen1.5-1.8B-Chat",
            "online_rotation": True,
            "R_path": "./R/qwen1.5-1.8b-rotation-matrix.bin",
            "rotate_vit": False,
        },
    },
}


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(data))
    return path


def _edit(path: str, value: Any, delete: bool = False) -> dict[str, Any]:
    data = copy.deepcopy(QWEN15_EXAMPLE)
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[part]
    if delete:
        del node[last]
    else:
        node[last] = value
    return data


def test_example_is_valid_and_settings_resolve(tmp_path: Path) -> None:
    path = _write(tmp_path, QWEN15_EXAMPLE)
    data = load_qnn_config(path)
    export = rotation_settings(data, path)
    assert export.online_rotation and not export.random_rotate
    assert export.r_path == tmp_path / "R" / "qwen1.5-1.8b-rotation-matrix.bin"
    assert export.unknown_keys == ()
    profile = rotation_settings(data, path, "profile_config")
    assert profile.random_rotate and profile.r_path is None
    assert profile.save_rotation == tmp_path / "R" / "qwen1.5-1.8b-rotation-matrix.bin"


def test_unknown_model_config_keys_are_allowed_but_reported(tmp_path: Path) -> None:
    data = _edit("export_config.model_config.rotate_vitt", True)
    path = _write(tmp_path, data)
    assert rotation_settings(load_qnn_config(path), path).unknown_keys == ("rotate_vitt",)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (
            _edit("export_config.model_config.random_rotate", True),
            "$.export_config.model_config.R_path: random_rotate and R_path are mutually exclusive",
        ),
        (
            _edit("export_config.model_config.R_path", None, delete=True),
            "$.export_config.model_config.online_rotation: true needs a rotation",
        ),
        (
            _edit("profile_config.model_config.random_rotate", False),
            "$.profile_config.model_config.online_rotation: true needs a rotation",
        ),
        (_edit("profile_config.num_samples", 1), "$.profile_config.num_samples: 1 is less than"),
        (_edit("profile_config.extra", 1), "$.profile_config: Additional properties"),
        (
            _edit("export_config.model_config.model_name", None, delete=True),
            "$.export_config.model_config: 'model_name' is a required property",
        ),
        (
            _edit("export_config.model_config.online_rotation", "yes"),
            "$.export_config.model_config.online_rotation: 'yes' is not of type 'boolean'",
        ),
        (_edit("surprise", {}), "$: Additional properties are not allowed"),
        (_edit("profile_config.no_bias", False), "$.profile_config.no_bias: must be true"),
        (_edit("export_config.quant_bias", True), "$.export_config.quant_bias: must be false"),
        (
            _edit("export_config.model_config.model_type", "qwen2-vl"),
            "$.export_config.model_config.model_type: 'qwen2-vl' differs",
        ),
    ],
)
def test_bad_configs_name_the_field(tmp_path: Path, data: Any, fragment: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(EdgeforgeError) as exc:
        load_qnn_config(path)
    message = str(exc.value)
    assert message.startswith(f"CONFIG={path}: ")
    assert fragment in message


def test_online_rotation_off_needs_nothing() -> None:
    data = copy.deepcopy(QWEN15_EXAMPLE)
    for section in ("profile_config", "export_config"):
        mc = data[section]["model_config"]
        mc["online_rotation"] = False
        mc.pop("R_path", None)
        mc.pop("random_rotate", None)
    validate_qnn_config(data, "x")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(EdgeforgeError, match="does not exist"):
        load_qnn_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EdgeforgeError, match="not valid JSON"):
        load_qnn_config(tmp_path / "bad.json")

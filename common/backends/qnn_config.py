"""The mllm QNN convertor's JSON config file, accepted as-is (research seed 000).

Users of mllm already have these files (``config/qwen1.5-1.8b.json`` and the like), so
edgeforge reads them unchanged: ``common/schemas/qnn_convertor.schema.json`` is the
original schema, validated with ``jsonschema``, plus the two rules the original checks in
code, each reported with the JSON path of the offending field:

* ``random_rotate: true`` together with ``R_path`` is contradictory;
* ``online_rotation: true`` needs a rotation: ``random_rotate: true`` or ``R_path``.

The original ``validate_config`` also requires, with ``online_rotation``,
``profile_config.no_bias == true`` and ``export_config.quant_bias == false``, and the same
``model_type`` / ``tokenizer_name`` / ``model_name`` in both sections; those are checked
here too, so a file this module accepts is one the original tools accept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from common.core.errors import EdgeforgeError

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "qnn_convertor.schema.json"
SECTIONS = ("profile_config", "export_config")

#: ``model_config`` keys the original code reads although its schema does not list them
#: (accepted through ``additionalProperties``; a missing key reads as None there).
EXTRA_MODEL_CONFIG_KEYS: dict[str, str] = {
    "rotate_vit": "rotate the vision tower too (R_vit, R_vs_vit)",
    "no_quantize": "profile/export without quantizing (ShowUI example)",
    "vision_mlp_rotate": "runtime Hadamard around vision MLPs (ShowUI only)",
    "vision_layers_to_rotate": "which vision layers get vision_mlp_rotate",
    "rot_fc1": "vision_mlp_rotate: rotate fc1",
    "rot_fc2": "vision_mlp_rotate: rotate fc2",
    "lm_mlp_rotate": "runtime Hadamard around language-model MLPs (ShowUI only)",
    "lm_layers_to_rotate": "which layers get lm_mlp_rotate",
    "rot_up": "lm_mlp_rotate: rotate up_proj",
    "rot_gate": "lm_mlp_rotate: rotate gate_proj",
    "rot_down": "lm_mlp_rotate: rotate down_proj",
    "scale_file": "activation scale file (read as an open file's .name)",
    "clip_all": "clip every layer regardless of the threshold",
    "save_clip_info": "write which layers were clipped",
    "quantize_vit": "quantize the vision tower",
    "special_quantization_rules": "{skip_layers, head_layers}: sets, not JSON lists, in code",
    "skip_layers": "{skip_export, no_clip_input, no_clip_output}: sets, not JSON lists, in code",
}

_SHARED_MODEL_KEYS = ("model_type", "tokenizer_name", "model_name")


@dataclass(frozen=True)
class RotationSettings:
    """What one section's ``model_config`` asks of the rotation step.

    Paths are resolved against the config file's directory, so a config works from any
    working directory.
    """

    online_rotation: bool
    random_rotate: bool
    r_path: Path | None
    save_rotation: Path | None
    model_config: dict[str, Any]
    unknown_keys: tuple[str, ...]


@cache
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def _json_path(parts: Any) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def validate_qnn_config(data: Any, source: str) -> None:
    """Raise one line naming ``source`` and the field unless ``data`` is a valid config."""
    validator = jsonschema.Draft202012Validator(_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        raise EdgeforgeError(f"{source}: {_json_path(error.absolute_path)}: {error.message}")
    for section in SECTIONS:
        model_config = data[section]["model_config"]
        where = f"{source}: $.{section}.model_config"
        if model_config.get("random_rotate") and "R_path" in model_config:
            raise EdgeforgeError(
                f"{where}.R_path: random_rotate and R_path are mutually exclusive; keep one"
            )
        if model_config.get("online_rotation") and not (
            model_config.get("random_rotate") or "R_path" in model_config
        ):
            raise EdgeforgeError(
                f"{where}.online_rotation: true needs a rotation: set random_rotate: true or R_path"
            )
    if any(data[s]["model_config"].get("online_rotation") for s in SECTIONS):
        if data["profile_config"]["no_bias"] is not True:
            raise EdgeforgeError(
                f"{source}: $.profile_config.no_bias: must be true with online_rotation"
            )
        if data["export_config"].get("quant_bias") is True:
            raise EdgeforgeError(
                f"{source}: $.export_config.quant_bias: must be false with online_rotation"
            )
    for key in _SHARED_MODEL_KEYS:
        values = [data[s]["model_config"][key] for s in SECTIONS]
        if values[0] != values[1]:
            raise EdgeforgeError(
                f"{source}: $.export_config.model_config.{key}: {values[1]!r} differs from "
                f"profile_config's {values[0]!r}; both sections must describe the same model"
            )


def load_qnn_config(path: Path) -> dict[str, Any]:
    """Read and validate a QNN convertor config file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeforgeError(f"CONFIG={path}: file does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeforgeError(f"CONFIG={path}: not valid JSON ({exc})") from None
    validate_qnn_config(data, f"CONFIG={path}")
    return data


def rotation_settings(
    data: dict[str, Any], config_path: Path, section: str = "export_config"
) -> RotationSettings:
    """The rotation options of ``section``'s ``model_config`` (export_rotate_model.py reads
    ``export_config``), with paths resolved against ``config_path``'s directory."""
    if section not in SECTIONS:
        raise EdgeforgeError(f"section: {section!r} is not one of {', '.join(SECTIONS)}")
    model_config = dict(data[section]["model_config"])
    base = Path(config_path).resolve().parent

    def resolve(key: str) -> Path | None:
        value = model_config.get(key)
        return None if value is None else base / value

    known = {*_schema()["$defs"]["model_config"]["properties"], *EXTRA_MODEL_CONFIG_KEYS}
    return RotationSettings(
        online_rotation=bool(model_config.get("online_rotation", False)),
        random_rotate=bool(model_config.get("random_rotate", False)),
        r_path=resolve("R_path"),
        save_rotation=resolve("save_rotation"),
        model_config=model_config,
        unknown_keys=tuple(sorted(set(model_config) - known)),
    )

"""A user's local calibration file: plain texts, or LLaVA-style conversations with images.

Quantizers calibrate on the project corpus by default (:mod:`common.inputs.data`); a user may
bring their own data instead, always as a local file (never a hub name):

* text — ``.jsonl`` with one ``{"text": "..."}`` object (or one JSON string) per line, or a
  ``.json`` list of such objects / strings;
* LLaVA — a ``.json`` list of ``{"image": "<file>", "conversations": [{"from": "human",
  "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}`` records, plus the
  folder holding the images (LLaVA's own layout, e.g. ``llava_conv_58k``); like AutoRound's
  reader, an image is looked up by its file name in that folder.

The layout is recognised from the records themselves; anything else is rejected with the
keys that were expected, before any model work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.core.errors import EdgeforgeError

TEXT_LAYOUT = 'text: .jsonl lines or a .json list of {"text": str} objects or strings'
LLAVA_LAYOUT = (
    'llava: a .json list of {"image": str, "conversations": [{"from": "human"|"gpt", '
    '"value": str}, ...]}'
)
_ROLES = ("human", "gpt")


@dataclass(frozen=True)
class LlavaRecord:
    """One image and its conversation turns, with the image resolved to a checked file."""

    image: Path
    conversations: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class CalibrationFile:
    """A parsed calibration file: exactly one of ``texts`` / ``llava`` is non-empty."""

    path: Path
    layout: str  # "text" or "llava"
    texts: tuple[str, ...] = ()
    llava: tuple[LlavaRecord, ...] = ()

    def __len__(self) -> int:
        return len(self.texts) if self.layout == "text" else len(self.llava)


def _unknown(path: Path, where: str, got: str) -> EdgeforgeError:
    return EdgeforgeError(
        f"{path}: unknown calibration layout ({where}: {got}); expected one of "
        f"[{TEXT_LAYOUT}] or [{LLAVA_LAYOUT}]"
    )


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "an object with keys " + (", ".join(sorted(map(str, value))) or "(none)")
    return f"a {type(value).__name__}"


def _text_of(path: Path, where: str, record: Any) -> str:
    """The text of one record: a string, or an object whose only needed key is "text"."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    raise _unknown(path, where, _describe(record))


def _read_jsonl(path: Path) -> list[Any]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise EdgeforgeError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
    return records


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise EdgeforgeError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except UnicodeDecodeError:
        raise EdgeforgeError(f"{path}: not UTF-8 text") from None


def _is_llava(record: Any) -> bool:
    return isinstance(record, dict) and "conversations" in record


def _llava_record(path: Path, index: int, record: dict[str, Any], image_dir: Path) -> LlavaRecord:
    where = f"record {index}"
    image, turns = record.get("image"), record.get("conversations")
    if not isinstance(image, str) or not image:
        raise EdgeforgeError(f'{path}: {where} has no string "image"; {LLAVA_LAYOUT}')
    if not isinstance(turns, list) or not turns:
        raise EdgeforgeError(f'{path}: {where} has no non-empty "conversations" list')
    parsed = []
    for turn_index, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or turn.get("from") not in _ROLES
            or not isinstance(turn.get("value"), str)
        ):
            raise EdgeforgeError(
                f'{path}: {where} conversations[{turn_index}] must be {{"from": '
                f'"human"|"gpt", "value": str}}, got {_describe(turn)}'
            )
        parsed.append((turn["from"], turn["value"]))
    file = image_dir / Path(image).name  # LLaVA names are looked up by file name, as upstream
    if not file.is_file():
        raise EdgeforgeError(f"{path}: {where} names image {image!r}, not found in {image_dir}")
    return LlavaRecord(file, tuple(parsed))


def read_calibration_file(path: Path, image_dir: Path | None = None) -> CalibrationFile:
    """Parse and validate ``path``; LLaVA records need ``image_dir`` and every image in it."""
    path = Path(path)
    if not path.is_file():
        raise EdgeforgeError(f"{path}: calibration file not found")
    name = path.name.lower()
    if name.endswith(".jsonl"):
        records = _read_jsonl(path)
    elif name.endswith(".json"):
        records = _read_json(path)
        if not isinstance(records, list):
            raise _unknown(path, "top level", _describe(records))
    else:
        raise EdgeforgeError(
            f"{path}: unknown calibration file type; expected .json or .jsonl "
            "(the project corpus is used when no file is given)"
        )
    if not records:
        raise EdgeforgeError(f"{path}: calibration file holds no records")
    if _is_llava(records[0]):
        if image_dir is None:
            raise EdgeforgeError(
                f"{path}: LLaVA-style conversations need the image folder too (IMAGES=<dir>)"
            )
        if not Path(image_dir).is_dir():
            raise EdgeforgeError(f"{image_dir}: image folder not found")
        llava = []
        for index, record in enumerate(records):
            if not _is_llava(record):
                raise _unknown(path, f"record {index}", _describe(record))
            llava.append(_llava_record(path, index, record, Path(image_dir)))
        return CalibrationFile(path, "llava", llava=tuple(llava))
    texts = tuple(_text_of(path, f"record {i}", r) for i, r in enumerate(records))
    return CalibrationFile(path, "text", texts=texts)

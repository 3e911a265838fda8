"""Load a local Hugging Face checkpoint, checking it first so mistakes read as one line.

transformers reports a wrong directory, a half-copied shard or an unknown architecture with
a deep traceback (or, for missing tensors, silently random weights). Everything here runs
offline (``local_files_only``) and validates up front: the directory, ``config.json`` and
its ``model_type`` (against the adapter registry), and every weight file's size against
its own header, so a truncated download fails before any slow step starts.

Every ``from_pretrained`` here passes ``trust_remote_code`` explicitly. Left unset,
transformers meets a checkpoint that ships its own modeling code (Qwen1's ``auto_map``) with
an interactive "Do you wish to run the custom code? [y/N]" prompt, or, with stdin closed,
an ``EOFError`` traceback. Such a checkpoint (:data:`REMOTE_CODE`) runs only in the steps
built for it, and only when its recipe says ``source.trust_remote_code``
(:func:`check_remote_code_trust`); every other step refuses it with one line naming the
steps that support it (:func:`refuse_remote_code`).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.core.errors import EdgeforgeError
from common.models import adapter_class, get_adapter

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

#: Tokenizer files transformers can build a tokenizer from (any one is enough).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

#: Processor configs: transformers 5 writes one ``processor_config.json`` holding the image
#: processor; released Hub checkpoints carry ``preprocessor_config.json``.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
#: Everything a processor is loaded from besides the tokenizer (the video side as well).
PROCESSOR_CONFIGS = (*PROCESSOR_FILES, "video_preprocessor_config.json")

#: Bytes per element of each safetensors dtype (to check every tensor's byte range).
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip

#: A header bigger than this is garbage, not metadata (safetensors itself caps it at 100 MB).
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class RemoteCode:
    """A family whose modeling code ships in the checkpoint, and the steps that run it."""

    family: str
    steps: tuple[str, ...]

    @property
    def supported_by(self) -> str:
        return " and ".join(self.steps)


#: Adapter model types whose modeling code ships in the checkpoint (``trust_remote_code``).
#: Only the steps named run it; every other one refuses such a checkpoint up front.
REMOTE_CODE: dict[str, RemoteCode] = {
    "qwen": RemoteCode("Qwen1", ("make sophgo", "make profile")),
}


@dataclass(frozen=True)
class ModelDir:
    """A checked checkpoint directory: its parsed config and the weight files to load."""

    path: Path
    config: dict[str, Any]
    model_type: str
    weight_files: tuple[Path, ...]

    @property
    def is_vision_language(self) -> bool:
        return adapter_class(self.model_type).is_vision_language

    @property
    def remote_code(self) -> RemoteCode | None:
        """Set when the model runs the checkpoint's own code (see :data:`REMOTE_CODE`)."""
        return REMOTE_CODE.get(self.model_type)


def check_safetensors(path: Path) -> None:
    """Fail with one line if ``path`` is not a complete safetensors file.

    Reads only the header: a u64 length, a JSON table of ``dtype/shape/data_offsets``, then
    the data, whose size must be exactly the largest end offset.
    """
    size = path.stat().st_size
    if size < 8:
        raise EdgeforgeError(f"{path} is truncated ({size} bytes; not even a header)")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > _MAX_HEADER_BYTES:
            raise EdgeforgeError(
                f"{path} is not a safetensors file (header length {header_len}); re-export it"
            )
        if 8 + header_len > size:
            raise EdgeforgeError(
                f"{path} is truncated ({size} bytes, its header alone is {8 + header_len}); "
                "copy or download it again"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EdgeforgeError(
            f"{path} has a corrupt header (not JSON); copy or download it again"
        ) from None
    if not isinstance(header, dict):
        raise EdgeforgeError(f"{path} has a corrupt header (not a JSON object)")
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            numel = math.prod(int(d) for d in entry["shape"])
            dtype = entry["dtype"]
        except (TypeError, KeyError, ValueError):
            raise EdgeforgeError(
                f"{path}: header entry {name!r} is malformed; the file is corrupt"
            ) from None
        itemsize = _SAFETENSORS_ITEMSIZE.get(dtype)
        if end < begin or (itemsize is not None and end - begin != numel * itemsize):
            raise EdgeforgeError(
                f"{path}: tensor {name!r} ({dtype} {entry['shape']}) has byte range "
                f"[{begin}, {end}) of the wrong size; the file is corrupt"
            )
        data_end = max(data_end, end)
    expected = 8 + header_len + data_end
    if size < expected:
        raise EdgeforgeError(
            f"{path} is truncated ({size} bytes, header says {expected}); copy or download it again"
        )
    if size > expected:
        raise EdgeforgeError(
            f"{path} has {size - expected} bytes after its data ({size} bytes, header says "
            f"{expected}); the file is corrupt"
        )


def check_torch_bin(path: Path) -> None:
    """Fail if a ``.bin`` is not a complete PyTorch zip checkpoint.

    A truncated zip loses its central directory (at the end), so this catches partial
    copies without unpickling anything.
    """
    if not zipfile.is_zipfile(path):
        raise EdgeforgeError(
            f"{path} is not a readable PyTorch checkpoint (truncated, or a pre-1.6 format); "
            "copy it again or convert it to safetensors"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeforgeError(f"{path}: not valid JSON ({exc}); fix or re-download it") from None
    if not isinstance(data, dict):
        raise EdgeforgeError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _shards(index_path: Path) -> tuple[Path, ...]:
    """The shard files a ``*.index.json`` names, each required to exist."""
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise EdgeforgeError(f"{index_path}: no 'weight_map'; the index is corrupt")
    shards = tuple(index_path.parent / name for name in sorted(set(weight_map.values())))
    for shard in shards:
        if not shard.is_file():
            raise EdgeforgeError(
                f"{index_path}: shard {shard.name} is missing; copy the whole checkpoint"
            )
    return shards


def _weight_files(model_dir: Path) -> tuple[Path, ...]:
    """The files transformers will read, in its order of preference, each checked."""
    if (model_dir / SAFE_WEIGHTS_INDEX_NAME).is_file():
        files = _shards(model_dir / SAFE_WEIGHTS_INDEX_NAME)
    elif (model_dir / SAFE_WEIGHTS_NAME).is_file():
        files = (model_dir / SAFE_WEIGHTS_NAME,)
    elif (model_dir / TORCH_WEIGHTS_INDEX_NAME).is_file():
        files = _shards(model_dir / TORCH_WEIGHTS_INDEX_NAME)
    elif (model_dir / TORCH_WEIGHTS_NAME).is_file():
        files = (model_dir / TORCH_WEIGHTS_NAME,)
    else:
        others = sorted(p.name for p in model_dir.glob("*") if p.suffix in (".safetensors", ".bin"))
        if others:
            raise EdgeforgeError(
                f"{model_dir}: weights are named {', '.join(others)}, but transformers reads "
                f"{SAFE_WEIGHTS_NAME} (or a {SAFE_WEIGHTS_INDEX_NAME} shard index); rename them"
            )
        raise EdgeforgeError(
            f"{model_dir}: no weights ({SAFE_WEIGHTS_NAME}, *.safetensors shards or "
            f"{TORCH_WEIGHTS_NAME}); build the model first (make model) or fix the path"
        )
    for file in files:
        if file.suffix == ".safetensors":
            check_safetensors(file)
        else:
            check_torch_bin(file)
    return files


def _existing_dir(model_dir: Path) -> Path:
    """``model_dir`` as a Path, or one line saying it is missing or not a directory."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise EdgeforgeError(
            f"{model_dir}: model directory does not exist; build it (make model) or fix the path"
        )
    if not model_dir.is_dir():
        raise EdgeforgeError(f"{model_dir}: not a directory; pass the checkpoint's directory")
    return model_dir


def check_model_dir(model_dir: Path, *, weights: bool = True) -> ModelDir:
    """Check a checkpoint directory without loading it; raise one line on the first problem.
    ``weights=False`` checks a packaged directory of configs only (a tokenizer/processor
    folder): no weight files are looked for."""
    model_dir = _existing_dir(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise EdgeforgeError(
            f"{config_path}: missing; {model_dir} is not a Hugging Face model directory"
        )
    config = _read_json(config_path)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise EdgeforgeError(f"{config_path}: no 'model_type' field; the config is incomplete")
    adapter_class(model_type, source=f"{config_path}: model_type")
    return ModelDir(model_dir, config, model_type, _weight_files(model_dir) if weights else ())


def _remote_code_of(model_dir: Path) -> tuple[str, RemoteCode] | None:
    """``(model_type, family)`` when ``model_dir/config.json`` names a :data:`REMOTE_CODE`
    type. Reads only config.json, so tokenizer-only loads stay as cheap as before."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    model_type = _read_json(config).get("model_type")
    remote = REMOTE_CODE.get(model_type) if isinstance(model_type, str) else None
    return None if remote is None else (model_type, remote)


def refuse_remote_code(model_dir: Path, step: str = "this step") -> None:
    """One line when ``model_dir`` holds a model that runs its own code, which ``step``
    (e.g. ``"make eval"``) does not support: the line names the steps that do.

    The loaders call it for every step (``step`` unnamed); a step calls it itself, naming
    itself, to refuse before any slow work.
    """
    found = _remote_code_of(model_dir)
    if found is not None:
        model_type, remote = found
        raise EdgeforgeError(
            f"{model_dir}: model_type {model_type!r} ({remote.family}) runs the checkpoint's "
            f"own modeling code, which {step} does not support; {remote.family} is supported "
            f"by {remote.supported_by}"
        )


def check_remote_code_trust(model_dir: Path, trust_remote_code: bool, recipe_path: Path) -> None:
    """One line when ``model_dir`` needs its own code run but the recipe at ``recipe_path``
    does not allow it (``source.trust_remote_code``): that code runs with the user's rights,
    so only a recipe says yes, never a prompt."""
    found = _remote_code_of(model_dir)
    if found is not None and not trust_remote_code:
        model_type, remote = found
        raise EdgeforgeError(
            f"{recipe_path}: $.source.trust_remote_code is not true, but {model_dir} is "
            f"model_type {model_type!r} ({remote.family}), whose modeling code ships in the "
            "checkpoint; set it to true to run that code (only for a checkpoint you trust)"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_loading_info(path: Path, info: dict[str, Any]) -> None:
    """One line naming a tensor the model needs that the checkpoint lacks or shapes wrongly
    (``from_pretrained(..., output_loading_info=True)``'s report): otherwise transformers
    would leave it randomly initialised without a word."""
    for kind, what in (("missing_keys", "lacks"), ("mismatched_keys", "has wrongly shaped")):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            raise EdgeforgeError(
                f"{path}: the checkpoint {what} {len(keys)} tensor(s) the model needs "
                f"(e.g. {keys[0]}); its weights do not match config.json"
            )


def load_model(
    model_dir: Path, dtype: torch.dtype = torch.float32, *, attn_implementation: str | None = None
) -> Any:
    """Load a checked checkpoint in eval mode: ``AutoModelForCausalLM`` for text models,
    ``AutoModelForImageTextToText`` for vision-language ones (chosen by ``model_type``).

    Tensors missing from (or mis-shaped in) the checkpoint are an error: transformers would
    otherwise initialise them randomly and every later number would be meaningless. A model
    that runs its own code is refused (:func:`refuse_remote_code`): Qwen1 needs the repairs
    of :func:`common.models.qwen.load_qwen_model`, which only its steps use.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise EdgeforgeError(f"load_model: dtype must be a floating torch.dtype, got {dtype!r}")
    checked = check_model_dir(model_dir)
    refuse_remote_code(checked.path)
    auto = AutoModelForImageTextToText if checked.is_vision_language else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "trust_remote_code": False}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model, info = auto.from_pretrained(checked.path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise EdgeforgeError(
            f"{checked.path}: transformers could not load it: {_first_line(exc)}"
        ) from None
    check_loading_info(checked.path, info)
    model.eval()
    get_adapter(model)  # the structure the stages rely on is there, or one line says why
    return model


def load_tokenizer(model_dir: Path, *, trust_remote_code: bool = False) -> Any:
    """The checkpoint's tokenizer (for a VL model, its text tokenizer), offline.

    ``trust_remote_code`` (the recipe's, from a step that supports the model) lets a model
    that runs its own code load its tokenizer (Qwen1's is ``tokenization_qwen.py``); without
    it such a model is refused. Other checkpoints never get the flag: it changes how
    transformers reads ``tokenizer.json``.
    """
    from transformers import AutoTokenizer

    model_dir = _existing_dir(model_dir)
    remote = _remote_code_of(model_dir) is not None
    if remote and not trust_remote_code:
        refuse_remote_code(model_dir)
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise EdgeforgeError(
            f"{model_dir}: no tokenizer ({' / '.join(TOKENIZER_FILES)}); copy the tokenizer "
            "files next to config.json"
        )
    try:
        return AutoTokenizer.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=remote
        )
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:
        raise EdgeforgeError(
            f"{model_dir}: transformers could not load the tokenizer: {_first_line(exc)}"
        ) from None


def copy_processor_files(src_dir: Path, dest_dir: Path) -> list[str]:
    """Copy a vision-language checkpoint's processor configs (:data:`PROCESSOR_CONFIGS`
    present in ``src_dir``) into ``dest_dir``, byte for byte; return their names."""
    names = [name for name in PROCESSOR_CONFIGS if (Path(src_dir) / name).is_file()]
    if not names:
        raise EdgeforgeError(f"{src_dir}: no processor config ({' / '.join(PROCESSOR_FILES)})")
    for name in names:
        shutil.copyfile(Path(src_dir) / name, Path(dest_dir) / name)
    return names


def load_processor(model_dir: Path) -> Any:
    """The image+text processor of a vision-language checkpoint (or of a package holding
    its configs and tokenizer, no weights), offline."""
    from transformers import AutoProcessor

    checked = check_model_dir(model_dir, weights=False)
    if not checked.is_vision_language:
        raise EdgeforgeError(
            f"{checked.path}: {checked.model_type} is a text model with no processor; "
            "use load_tokenizer()"
        )
    if not any((checked.path / name).is_file() for name in PROCESSOR_FILES):
        raise EdgeforgeError(
            f"{checked.path}: no processor config ({' / '.join(PROCESSOR_FILES)}); a "
            "vision-language checkpoint needs its image processor files"
        )
    try:
        return AutoProcessor.from_pretrained(
            checked.path, local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise EdgeforgeError(
            f"{checked.path}: transformers could not load the processor: {_first_line(exc)}"
        ) from None

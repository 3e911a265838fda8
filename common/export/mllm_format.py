"""The mllm ``.mllm`` model file, version 1 (what mllm's ``converter.py`` writes).

Layout (little-endian, packed)::

    int32  magic = 20012
    uint64 index_size                       # bytes of the index region that follows
    index: per tensor, back to back
        int32  name_len; byte[name_len] name (ASCII, no terminator)
        uint64 data_len; uint64 data_offset  # absolute; int32 dtype code
    payloads: raw C-order little-endian bytes

No shapes are stored: the C++ model code knows them. Readers follow ``data_offset`` only,
so this writer pads each payload to a multiple of its element size (mllm v1's mmap path
needs aligned offsets, else it falls back to a copy); ``alignment="none"`` reproduces
``converter.py``'s packed layout byte for byte.

Unlike ``converter.py`` nothing is cast silently (its ``or`` bug once wrote int8 weights as
float, mllm issue #267): int8 stays I8, bool is stored as I8 0/1, and a dtype with no
unambiguous v1 code (float64, bfloat16, int64, uint8) is an error asking for a cast.
Non-ASCII names are rejected: ``converter.py`` wrote ``len(str)`` as the byte length.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from common.core.errors import EdgeforgeError
from common.core.records import atomic_path
from common.models import ModelAdapter

MAGIC = 20012
HEADER_SIZE = 12  # int32 magic + uint64 index_size

#: mllm v1 ``DataType`` codes for the dtypes this writer stores natively.
DTYPE_CODES: dict[str, int] = {"float32": 0, "float16": 1, "int8": 16, "int16": 17, "int32": 18}
CODE_DTYPES: dict[int, np.dtype] = {code: np.dtype(name) for name, code in DTYPE_CODES.items()}

Alignment = Literal["element", "none"]
#: Bytes of a stored tensor compared at a time (a 151936-token head is 1.2 GiB or more).
_COMPARE_CHUNK = 64 * 2**20


@dataclass(frozen=True)
class MllmEntry:
    """One index entry as read back: the tensor's name, dtype code, offset and size."""

    name: str
    dtype_code: int
    offset: int
    length: int


def _as_array(name: str, tensor: torch.Tensor | np.ndarray) -> np.ndarray:
    """C-order little-endian numpy array of ``tensor`` in a storable dtype (bool → int8)."""
    if isinstance(tensor, torch.Tensor):
        if tensor.dtype == torch.bfloat16:
            raise EdgeforgeError(
                f".mllm tensor {name!r}: bfloat16 has no v1 code; cast it to float32 first"
            )
        tensor = tensor.detach().cpu().numpy()
    array = np.asarray(tensor)
    if array.dtype == np.bool_:
        array = array.astype(np.int8)
    if array.dtype.name not in DTYPE_CODES:
        raise EdgeforgeError(
            f".mllm tensor {name!r}: dtype {array.dtype} has no unambiguous mllm v1 code; "
            f"cast it to one of {', '.join(DTYPE_CODES)} (or bool) first"
        )
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def _encode_name(name: str, seen: set[str]) -> bytes:
    if not isinstance(name, str) or not name:
        raise EdgeforgeError(f".mllm tensor name {name!r}: must be a non-empty string")
    if not name.isascii():
        raise EdgeforgeError(
            f".mllm tensor name {name!r}: non-ASCII names are not supported (mllm readers "
            "take the name length in characters); rename the tensor"
        )
    if name in seen:
        raise EdgeforgeError(
            f".mllm tensor name {name!r} appears twice; readers would keep only the last one"
        )
    seen.add(name)
    return name.encode("ascii")


def _index(
    entries: Sequence[tuple[bytes, np.dtype, int]], alignment: Alignment
) -> tuple[bytes, list[int]]:
    """Header and index of tensors ``(encoded name, dtype, nbytes)`` in order, and the
    padding before each payload: all a writer needs before the first payload byte."""
    if alignment not in ("element", "none"):
        raise EdgeforgeError(f".mllm alignment: {alignment!r} is not 'element' or 'none'")
    index_size = sum(24 + len(name) for name, _, _ in entries)
    offset = HEADER_SIZE + index_size
    index, pads = [], []
    for name, dtype, nbytes in entries:
        pad = (-offset) % dtype.itemsize if alignment == "element" else 0
        offset += pad
        code = DTYPE_CODES[dtype.name]
        index.append(
            struct.pack("<i", len(name)) + name + struct.pack("<QQi", nbytes, offset, code)
        )
        pads.append(pad)
        offset += nbytes
    return struct.pack("<iQ", MAGIC, index_size) + b"".join(index), pads


def encode_mllm(
    tensors: Iterable[tuple[str, torch.Tensor | np.ndarray]], alignment: Alignment = "element"
) -> Iterable[bytes]:
    """The file's bytes, in chunks (header + index, then padding and payloads in order)."""
    seen: set[str] = set()
    items = [(_encode_name(name, seen), _as_array(name, t)) for name, t in tensors]
    header, pads = _index([(name, a.dtype, a.nbytes) for name, a in items], alignment)
    yield header
    for pad, (_, array) in zip(pads, items, strict=True):
        yield b"\0" * pad + array.tobytes()


def write_mllm(
    dest: Path,
    tensors: Iterable[tuple[str, torch.Tensor | np.ndarray]],
    alignment: Alignment = "element",
) -> None:
    """Write a v1 ``.mllm`` file atomically from ``(name, tensor)`` pairs, in that order."""
    with atomic_path(Path(dest)) as tmp, tmp.open("wb") as fh:
        for chunk in encode_mllm(tensors, alignment):
            fh.write(chunk)


def write_mllm_lazily(
    dest: Path,
    specs: Sequence[tuple[str, torch.dtype, int]],
    read: Callable[[str], torch.Tensor],
    alignment: Alignment = "element",
) -> None:
    """Write a v1 ``.mllm`` file atomically with one tensor in memory at a time: ``specs``
    declares ``(name, dtype, numel)`` of every tensor in order (enough for the index), and
    ``read(name)`` gives each tensor when its payload is written. The bytes equal
    :func:`write_mllm`'s for the same tensors."""
    seen: set[str] = set()
    declared = [
        (_encode_name(name, seen), np.dtype(str(dtype).removeprefix("torch.")), numel)
        for name, dtype, numel in specs
    ]
    header, pads = _index([(n, dt, numel * dt.itemsize) for n, dt, numel in declared], alignment)
    with atomic_path(Path(dest)) as tmp, tmp.open("wb") as fh:
        fh.write(header)
        for (name, _, _), (_, dtype, numel), pad in zip(specs, declared, pads, strict=True):
            array = _as_array(name, read(name))
            if array.dtype != dtype or array.size != numel:
                raise EdgeforgeError(
                    f".mllm tensor {name!r}: declared {dtype} × {numel}, got "
                    f"{array.dtype} × {array.size}"
                )
            fh.write(b"\0" * pad)
            fh.write(array.data)  # the array's own buffer: no copy of a vocab-sized matrix


def mllm_mismatches(
    path: Path, names: Sequence[str], read: Callable[[str], torch.Tensor]
) -> list[str]:
    """Names whose stored bytes differ from ``read(name)`` or that are missing or extra
    against ``names``: the lazy counterpart of :func:`mllm_tensors_equal`. One tensor is
    in memory at a time, read with plain file reads (the pages of a mapping would stay
    resident while it is open, growing to the whole file)."""
    entries = read_mllm_index(path)
    problems = sorted({e.name for e in entries} ^ set(names))
    with Path(path).open("rb") as fh:
        for entry in entries:
            if entry.name not in names:
                continue
            want = _as_array(entry.name, read(entry.name))
            fh.seek(entry.offset)
            raw = want.reshape(-1).view(np.uint8)
            same = raw.size == entry.length
            for start in range(0, entry.length if same else 0, _COMPARE_CHUNK):
                stored = np.fromfile(
                    fh, dtype=np.uint8, count=min(_COMPARE_CHUNK, raw.size - start)
                )
                if not np.array_equal(stored, raw[start : start + stored.size]):
                    same = False
                    break
            if entry.dtype_code != DTYPE_CODES[want.dtype.name] or not same:
                problems.append(entry.name)
    return problems


def read_mllm_index(path: Path) -> list[MllmEntry]:
    """The index of a v1 ``.mllm`` file, each entry checked to lie inside the file."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        header = fh.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE:
            raise EdgeforgeError(f"{path}: too short for a .mllm header ({size} bytes)")
        magic, index_size = struct.unpack("<iQ", header)
        if magic != MAGIC:
            raise EdgeforgeError(f"{path}: magic {magic} is not {MAGIC}; not a v1 .mllm file")
        if HEADER_SIZE + index_size > size:
            raise EdgeforgeError(f"{path}: index of {index_size} bytes runs past the file end")
        raw = fh.read(index_size)
    entries, pos = [], 0
    while pos < index_size:
        if pos + 4 > index_size:
            raise EdgeforgeError(f"{path}: index entry at byte {HEADER_SIZE + pos} is truncated")
        (name_len,) = struct.unpack_from("<i", raw, pos)
        end = pos + 4 + name_len + 20
        if name_len <= 0 or end > index_size:
            raise EdgeforgeError(f"{path}: index entry at byte {HEADER_SIZE + pos} is corrupt")
        name = raw[pos + 4 : pos + 4 + name_len].decode("ascii", errors="replace")
        length, offset, code = struct.unpack_from("<QQi", raw, pos + 4 + name_len)
        if offset < HEADER_SIZE + index_size or offset + length > size:
            raise EdgeforgeError(
                f"{path}: tensor {name!r} bytes [{offset}, {offset + length}) lie outside the "
                f"payload region [{HEADER_SIZE + index_size}, {size})"
            )
        entries.append(MllmEntry(name, code, offset, length))
        pos = end
    return entries


def _decoded(path: Path, entry: MllmEntry, raw: np.ndarray) -> np.ndarray:
    """``raw`` bytes of ``entry`` as its numpy dtype (raw ``uint8`` for codes this module
    does not write: quantized block formats)."""
    dtype = CODE_DTYPES.get(entry.dtype_code)
    if dtype is None:
        return raw
    if entry.length % dtype.itemsize:
        raise EdgeforgeError(
            f"{path}: tensor {entry.name!r} has {entry.length} bytes, not a multiple "
            f"of its {dtype} element size"
        )
    return raw.view(dtype.newbyteorder("<"))


def read_mllm(path: Path) -> dict[str, tuple[int, np.ndarray]]:
    """Every tensor of a v1 ``.mllm`` file as ``name → (dtype code, 1-D array)``.

    Codes this module writes decode to their numpy dtype; any other code (quantized block
    formats) comes back as raw ``uint8`` bytes.
    """
    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return {
        entry.name: (
            entry.dtype_code,
            _decoded(path, entry, np.array(data[entry.offset : entry.offset + entry.length])),
        )
        for entry in read_mllm_index(path)
    }


class MllmReader:
    """One tensor of a v1 ``.mllm`` file at a time, by name, with plain file reads: a
    7B model's file is larger than the memory a step may use, and the pages of a mapping
    would stay resident while it is open. Use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries = {entry.name: entry for entry in read_mllm_index(self.path)}
        self._fh = self.path.open("rb")

    def __enter__(self) -> MllmReader:
        return self

    def __exit__(self, *_: object) -> None:
        self._fh.close()

    def array(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a 1-D array of its stored dtype (see :func:`read_mllm`)."""
        entry = self.entries.get(name)
        if entry is None:
            raise EdgeforgeError(f"{self.path}: tensor {name!r} is missing")
        self._fh.seek(entry.offset)
        raw = np.fromfile(self._fh, dtype=np.uint8, count=entry.length)
        return _decoded(self.path, entry, raw)


def mllm_tensors_equal(path: Path, expected: Mapping[str, torch.Tensor | np.ndarray]) -> list[str]:
    """Names whose stored bytes differ from ``expected`` (or are missing/extra): empty when
    the file holds exactly these tensors, bit for bit."""
    stored = read_mllm(path)
    problems = sorted(set(stored) ^ set(expected))
    for name in sorted(set(stored) & set(expected)):
        want = _as_array(name, expected[name])
        code, got = stored[name]
        if code != DTYPE_CODES[want.dtype.name] or got.tobytes() != want.tobytes():
            problems.append(name)
    return problems


def _named_roots(adapter: ModelAdapter) -> list[tuple[str, nn.Module]]:
    """The modules whose parameters mllm names, with the name prefix mllm gives them."""
    roots: list[tuple[str, nn.Module]] = [("model", adapter.language_model())]
    vision = adapter.vision_tower()
    if vision is not None:
        roots.append(("visual", vision))
    return [*roots, ("lm_head", adapter.lm_head())]


def mllm_parameters(adapter: ModelAdapter) -> list[tuple[str, nn.Parameter]]:
    """Every parameter of the model under the name mllm's C++ loaders look up.

    mllm's model code uses the released checkpoints' state-dict names: the language model
    under ``model.`` (``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``,
    ``model.norm.weight``), ``lm_head.weight``, and a VL vision tower under ``visual.``.
    transformers 5 nests those differently (``model.language_model.*``, ``model.visual.*``),
    so names are rebuilt from the adapter's parts. Layout is HF's ``[out, in]``, as
    ``converter.py`` writes a state dict. Fails if any parameter would be left out.
    """
    roots = _named_roots(adapter)
    named = [
        (f"{prefix}.{name}", p) for prefix, module in roots for name, p in module.named_parameters()
    ]
    covered = {id(p) for _, m in roots for p in m.parameters()}
    missing = [n for n, p in adapter.model.named_parameters() if id(p) not in covered]
    if missing:
        raise EdgeforgeError(
            f"{type(adapter.model).__name__}: parameters outside the language model, vision "
            f"tower and LM head have no mllm name: {', '.join(missing[:5])}"
        )
    return named


def mllm_module_names(adapter: ModelAdapter) -> dict[nn.Module, str]:
    """Every module under the roots :func:`mllm_parameters` names, with the prefix of its
    parameters' mllm names (``model.layers.3``, ``lm_head``): how a part of a streamed
    model, materialized alone, finds its tensors in a file."""
    names: dict[nn.Module, str] = {}
    for prefix, root in _named_roots(adapter):
        for name, module in root.named_modules():
            names.setdefault(module, f"{prefix}.{name}" if name else prefix)
    return names


def mllm_named_tensors(adapter: ModelAdapter) -> list[tuple[str, torch.Tensor]]:
    """:func:`mllm_parameters`' tensors, detached, ready to write."""
    return [(name, p.detach()) for name, p in mllm_parameters(adapter)]

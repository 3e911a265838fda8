"""A Hugging Face safetensors checkpoint written one tensor at a time.

``save_pretrained`` needs the whole model in memory; a rotated 7B model in float32 is
29 GiB. A safetensors file is a JSON header (each tensor's dtype, shape and byte range)
followed by the raw bytes, so once every tensor's name, dtype and shape is known (from a
model built on the meta device) the header can be written first and the tensors appended
as each part of the model is transformed, then dropped. :class:`CheckpointWriter` does
that across shards of at most :data:`MAX_SHARD_BYTES`, named as transformers names them
(``model.safetensors``, or ``model-00001-of-0000N.safetensors`` with
``model.safetensors.index.json``), so ``from_pretrained`` and every tool that reads hub
checkpoints read the result. Tensors must arrive in the declared order; a missing, extra
or misshapen tensor is an error, and the caller's atomic folder keeps a half-written
checkpoint from ever being seen.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from common.analysis.layerwise import Parts
from common.core.errors import EdgeforgeError
from common.core.progress import progress
from common.models.streaming import StreamedModel
from common.quant.transforms import Transforms

#: Largest shard written (the hub's checkpoints use 2–5 GB shards; a file stays movable).
MAX_SHARD_BYTES = 2 * 2**30

#: safetensors dtype names of the dtypes written.
_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint, declared before any data is written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _shard_plan(specs: Sequence[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive runs of ``specs``, each at most ``max_bytes`` (a larger tensor alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: Sequence[TensorSpec]) -> bytes:
    """The safetensors header of ``specs`` in order, padded to 8 bytes as safetensors does."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        entries[spec.name] = {
            "dtype": _ST_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class CheckpointWriter:
    """Write the declared tensors into ``folder`` as a (sharded) safetensors checkpoint.

    Use it as a context manager: :meth:`add` once per tensor in the order of ``specs``;
    leaving the block without an error runs :meth:`close`, which checks that every tensor
    came and writes the shard index (after an error only the open file is closed).
    """

    def __init__(
        self, folder: Path, specs: Sequence[TensorSpec], max_shard_bytes: int = MAX_SHARD_BYTES
    ) -> None:
        unsupported = [s.name for s in specs if s.dtype not in _ST_NAMES]
        if unsupported:
            raise EdgeforgeError(f"checkpoint writer: unsupported dtype of {unsupported[0]}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shards = _shard_plan(specs, max_shard_bytes)
        count = len(self.shards)
        self.files = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._order = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._next = 0
        self._shard = -1
        self._out: BinaryIO | None = None

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        elif self._out is not None:
            self._out.close()
            self._out = None

    def _open(self, shard: int) -> BinaryIO:
        if self._out is not None:
            self._out.close()
        self._shard = shard
        self._out = (self.folder / self.files[shard]).open("wb")
        self._out.write(_header(self.shards[shard]))
        return self._out

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` under ``name``, which must be the next declared tensor."""
        if self._next >= len(self._order):
            raise EdgeforgeError(f"checkpoint writer: {name!r} is more than was declared")
        shard, spec = self._order[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise EdgeforgeError(
                f"checkpoint writer: got {name!r} {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {spec.name!r} {spec.shape} {spec.dtype}"
            )
        out = self._out if shard == self._shard else self._open(shard)
        assert out is not None
        data = tensor.detach().contiguous()
        out.write(memoryview(data.view(torch.uint8).numpy()) if data.numel() else b"")
        self._next += 1

    def close(self) -> list[str]:
        """Finish the last shard and write the index (several shards); the files written."""
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise EdgeforgeError(f"checkpoint writer: {missing!r} and later were never written")
        if self._out is not None:
            self._out.close()
            self._out = None
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for _, s in self._order)},
                "weight_map": {s.name: self.files[i] for i, s in self._order},
            }
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            (self.folder / "model.safetensors.index.json").write_text(text)
        return list(self.files)


def _part_modules(streamed: StreamedModel) -> list[tuple[str, nn.Module]]:
    """``(checkpoint prefix, module)`` of every part, in state-dict order: a vision tower,
    the embedding, each decoder layer, the final norm, the LM head."""
    adapter = streamed.adapter
    tower = adapter.vision_tower()
    parts = [] if tower is None else [(adapter.name_of("vision_tower"), tower)]
    parts += [(adapter.name_of("embed_tokens"), adapter.embed_tokens())]
    parts += [(layer.name, layer.module) for layer in adapter.layers()]
    return [
        *parts,
        (adapter.name_of("final_norm"), adapter.final_norm()),
        (adapter.lm_head_path, adapter.lm_head()),
    ]


def write_transformed(
    streamed: StreamedModel, transforms: Transforms, dest: Path, *, desc: str = "write"
) -> list[str]:
    """Write ``streamed``'s model with ``transforms`` applied into the folder ``dest`` as a
    float32 Hugging Face checkpoint (weights and ``config.json``), one part in memory at
    a time; returns the weight files.

    A vision-language model's vision tower is written first, whole (its merger rotated
    with the stream). A tied LM head is written as a head of its own
    (``tie_word_embeddings`` false): the rotation folds the final norm into it, so it no
    longer equals the embedding. The online Hadamard is a run-time op no checkpoint can
    hold, so it is refused.
    """
    if transforms.online_down:
        raise EdgeforgeError(
            "the online Hadamard on down_proj inputs is an op at run time; a checkpoint "
            "cannot hold it — write the model without it"
        )
    adapter = streamed.adapter
    parts = _part_modules(streamed)
    specs = [
        TensorSpec(f"{prefix}.{name}", torch.float32, tuple(p.shape))
        for prefix, module in parts
        for name, p in module.named_parameters()
    ]
    covered = {id(p) for _, module in parts for p in module.parameters()}
    outside = [n for n, p in streamed.model.named_parameters() if id(p) not in covered]
    if outside:
        raise EdgeforgeError(
            f"{type(streamed.model).__name__}: parameters outside the embedding, layers, "
            f"norm and LM head cannot be written part by part: {', '.join(outside[:5])}"
        )
    read = Parts(adapter, streamed, transforms)
    with CheckpointWriter(dest, specs) as writer, torch.no_grad():

        def write(prefix: str, module: nn.Module) -> None:
            for name, p in module.named_parameters():
                writer.add(f"{prefix}.{name}", p.detach())

        if adapter.is_vision_language:
            with read.vision_tower() as tower:
                write(adapter.name_of("vision_tower"), tower)
        with read.embedding() as embed:
            write(adapter.name_of("embed_tokens"), embed)
        for layer in progress(adapter.layers(), desc=desc, unit="layer"):
            with read.layer(layer):
                write(layer.name, layer.module)
        with read.head() as (norm, head):
            write(adapter.name_of("final_norm"), norm)
            write(adapter.lm_head_path, head)
    config = copy.deepcopy(streamed.model.config)
    config.tie_word_embeddings = False
    config.dtype = torch.float32
    config.save_pretrained(dest)
    return writer.files

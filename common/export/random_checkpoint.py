"""Random-weight checkpoints in a real model's shapes, written one tensor at a time.

There is no hub here, yet memory and time at real size (1.8B–7B) must be measured and
tested. A model's ``config.json`` fixes every tensor's shape, so a checkpoint with random
weights in those shapes, stored like the hub's (bf16, sharded, with an index, under the
hub's tensor names), exercises every byte a real one would. The module tree is built on
the meta device and each tensor is generated and written before the next
(:class:`~common.export.checkpoint_writer.CheckpointWriter`), so writing a 7B checkpoint
needs one tensor of memory. Values are seeded per tensor name, so the same config and
seed give the same bytes.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from common.export.checkpoint_writer import MAX_SHARD_BYTES, CheckpointWriter, TensorSpec
from common.models.streaming import stored_names

#: Files of the tokenizer's folder that describe that folder's own model, not the tokenizer.
_NOT_COPIED = {"config.json", "generation_config.json", "manifest.json"}


def _seeded(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Biases 0, other vectors (norm gains) 1, matrices N(0, 1/fan_in) (so activations keep
    their scale through many layers), seeded by ``seed`` and the tensor's name."""
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(shape, generator=generator) / math.sqrt(shape[-1])


def write_random_checkpoint(
    config: Any,
    out: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    tokenizer_dir: Path | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    trust_remote_code: bool = False,
) -> Path:
    """Write a random checkpoint of ``config`` (a transformers config) into ``out``: the
    weights in ``dtype`` (shards of at most ``max_shard_bytes``), ``config.json``, and
    every other file of ``tokenizer_dir`` (tokenizer, processor, chat template; its
    vocabulary must fit the config's)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    vision = getattr(config, "vision_config", None) is not None
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    with init_empty_weights():
        skeleton = auto.from_config(config, trust_remote_code=trust_remote_code)
    skeleton.tie_weights()  # not done on meta for every class (Qwen-VL); from_pretrained does
    named = list(skeleton.named_parameters())  # a tied head is listed once, as the embedding
    # Stored under the hub's names (Qwen-VL: ``model.layers.N``, ``visual.*``), seeded by
    # the model's own, so a renamed layout gives the same values.
    stored = stored_names(skeleton)
    specs = [TensorSpec(stored[name], dtype, tuple(p.shape)) for name, p in named]
    out.mkdir(parents=True, exist_ok=True)
    with CheckpointWriter(out, specs, max_shard_bytes) as writer:
        for (name, _), spec in zip(named, specs, strict=True):
            writer.add(spec.name, _seeded(name, spec.shape, seed).to(dtype))
    config.save_pretrained(out)
    for path in sorted(Path(tokenizer_dir).iterdir()) if tokenizer_dir is not None else ():
        weights = path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json")
        if path.is_file() and not weights and path.name not in _NOT_COPIED:
            shutil.copy2(path, out / path.name)
    return out

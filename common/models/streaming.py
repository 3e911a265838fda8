"""A model that is never whole in memory: the module tree on meta, each part read when it works.

A 7B checkpoint is 14 GiB in bf16 and 29 GiB in float32, so no step may load it whole on a
16 GiB machine. :class:`StreamedModel` builds the model's module tree with every parameter
on the ``meta`` device (no storage) and buffers real, as the model's own constructor
computes them (rotary tables, Qwen1's logn table and causal mask: not in the checkpoint).
A step then materializes one part (the embedding, one decoder layer, the final norm and
LM head) in float32 from the safetensors shards, runs or transforms it, and releases it
back to meta before the next. Peak memory is one part plus the step's own activations.

The weights are read with plain file reads, not memory-mapped: pages of a mapping stay
resident (and count in RSS) for as long as the file is open, which would grow to the whole
checkpoint; a read copies just one tensor, freed when its module is released. A float32
tensor is read straight into its parameter's memory (no second copy of the largest
tensors); a bf16/f16 one is converted from a buffer of its stored size.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.core.errors import EdgeforgeError
from common.models import ModelAdapter, QwenAdapter, get_adapter

#: safetensors dtype names → torch dtypes this reader accepts.
_ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


class LazyWeights:
    """Tensors of a checkpoint, read one at a time (see the module docstring).

    A pickled ``pytorch_model*.bin`` has no header to read tensors from; it is opened with
    ``torch.load(mmap=True)``, whose pages, once read, stay resident until the step ends:
    such a checkpoint costs its stored size in RSS (:attr:`mapped_bytes`, which the
    estimates count). Convert it to safetensors to avoid that.
    """

    def __init__(self, model_dir: Path) -> None:
        from common.models.loading import check_model_dir

        checked = check_model_dir(model_dir)
        #: The checked checkpoint directory (config, model type, weight files).
        self.checked = checked
        self.model_dir = Path(model_dir)
        self.where: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        #: Tensors of pickled shards, memory-mapped (empty for a safetensors checkpoint).
        self.mapped: dict[str, torch.Tensor] = {}
        self.mapped_bytes = 0
        for file in checked.weight_files:  # headers were checked by check_model_dir
            if file.suffix != ".safetensors":
                state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
                for key, tensor in state.items():
                    self.mapped[key] = tensor
                    self.where[key] = (file, 0, {"shape": list(tensor.shape), "dtype": "mapped"})
                self.mapped_bytes += file.stat().st_size
                continue
            with file.open("rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
            header.pop("__metadata__", None)
            for key, entry in header.items():
                self.where[key] = (file, 8 + length, entry)

    def rename(self, model_key: Callable[[str], str]) -> None:
        """Key every tensor by the model's own parameter name, ``model_key(stored name)``.

        A checkpoint keeps the names of the transformers version that saved it: the hub's
        Qwen2-VL/Qwen2.5-VL files say ``model.layers.N`` and ``visual.blocks.N`` where
        transformers 5 builds ``model.language_model.layers.N`` and ``model.visual``.
        """
        self.where = {model_key(key): place for key, place in self.where.items()}
        self.mapped = {model_key(key): tensor for key, tensor in self.mapped.items()}

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Fill the float32 ``out`` from ``key``: straight into its memory when the stored
        tensor is float32 too (no second copy of the largest tensors), else from one
        buffer of the stored size, converted as it is copied (a bf16 151936 × 4096
        embedding needs 1.2 GiB beside ``out``, not 3.5)."""
        if key not in self.where:
            raise EdgeforgeError(f"{self.model_dir}: the checkpoint lacks tensor {key!r}")
        file, data_start, entry = self.where[key]
        if list(out.shape) != entry["shape"]:
            raise EdgeforgeError(
                f"{file}: tensor {key!r} has shape {entry['shape']} but config.json makes it "
                f"{list(out.shape)}; the checkpoint does not match its config"
            )
        if entry["dtype"] != "F32":  # converted (or copied from a mapped .bin) as it is copied
            out.copy_(self._stored(key))
            return
        begin, end = entry["data_offsets"]
        with file.open("rb") as fh:
            fh.seek(data_start + begin)
            got = fh.readinto(memoryview(out.numpy()).cast("B"))
        if got != end - begin:
            raise EdgeforgeError(f"{file}: tensor {key!r} is truncated; copy the checkpoint again")

    def _stored(self, key: str) -> torch.Tensor:
        """``key`` in its stored dtype, read into a buffer of its own."""
        if key not in self.where:
            raise EdgeforgeError(f"{self.model_dir}: the checkpoint lacks tensor {key!r}")
        if key in self.mapped:
            return self.mapped[key]
        file, data_start, entry = self.where[key]
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise EdgeforgeError(
                f"{file}: tensor {key!r} is {entry['dtype']}; layer-by-layer steps read float "
                "checkpoints (F32/F16/BF16/F64)"
            )
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with file.open("rb") as fh:
            fh.seek(data_start + begin)
            fh.readinto(buffer)
        flat = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        return flat.reshape(entry["shape"])

    def tensor(self, key: str) -> torch.Tensor:
        """``key`` as a float32 tensor (one stored-size buffer while converting)."""
        return self._stored(key).float()

    def nbytes(self, prefix: str) -> int:
        """float32 bytes of every tensor under ``prefix`` (what materializing it costs)."""
        return sum(
            4 * math.prod(int(d) for d in entry["shape"])
            for key, (_, _, entry) in self.where.items()
            if key.startswith(prefix)
        )


def checkpoint_renamer(model: nn.Module, source: Path) -> Callable[[str], str]:
    """The stored name → parameter name map ``from_pretrained`` applies for ``model``:
    transformers' own renamings for its class (legacy prefixes, ``LayerNorm.gamma``, the
    base-model prefix). A tensor that would need a conversion beyond a rename (split,
    merged, permuted on load) cannot be read one tensor at a time: it is refused, naming
    the tensor and ``source``."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    names = dict.fromkeys(model.state_dict())  # meta tensors: names only

    def model_key(key: str) -> str:
        renamed, converter = rename_source_key(
            key, renamings, converters, model.base_model_prefix, names
        )
        if converter is not None:
            raise EdgeforgeError(
                f"{source}: tensor {key!r} is converted on load ({converter}), which "
                "layer-by-layer steps cannot do one tensor at a time; save the model with "
                "this transformers version first (save_pretrained) and use that directory"
            )
        return renamed

    return model_key


def stored_names(model: nn.Module) -> dict[str, str]:
    """Each parameter's name → the name ``save_pretrained`` stores it under (the hub's
    layout, :func:`checkpoint_renamer` read backwards), for a model built on meta."""
    from transformers.core_model_loading import revert_weight_conversion

    params = dict(model.named_parameters())
    name_of = {id(tensor): name for name, tensor in params.items()}
    stored = revert_weight_conversion(model, params)
    if not all(id(tensor) in name_of for tensor in stored.values()):
        raise EdgeforgeError(
            f"{type(model).__name__}: transformers converts some of its tensors on save; "
            "only renamed tensors can be written one at a time"
        )
    return {name_of[id(tensor)]: key for key, tensor in stored.items()}


def float32_bytes(model_dir: Path) -> int:
    """What ``model_dir``'s weights take in float32: from the safetensors headers, or the
    shapes of a pickled ``.bin`` (memory-mapped, not read)."""
    return LazyWeights(model_dir).nbytes("")


def stored_bytes(model_dir: Path) -> int:
    """The size of ``model_dir``'s weight files as stored."""
    from common.models.loading import check_model_dir

    return sum(f.stat().st_size for f in check_model_dir(model_dir).weight_files)


def release(module: nn.Module) -> None:
    """Send ``module``'s parameters back to meta and return their memory to the OS.

    Buffers stay: they are not in the checkpoint but computed by the model's constructor
    (a vision tower's rotary table), so a part read again must find them as they were."""
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            if not param.is_meta:
                sub.register_parameter(name, nn.Parameter(param.to("meta"), param.requires_grad))
    return_freed_memory()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on other C libraries."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Give the released part's buffers back to the OS.

    glibc serves allocations below its mmap threshold from the heap, and raises that
    threshold (up to 32 MiB) each time a large mapped buffer is freed; weight matrices
    of a few MiB then land in the heap, where freed ones stay resident and, fragmented by
    the small allocations made while a layer runs, are not reused: measured +65 MiB of RSS
    per released layer of a 2.5 GB model. ``malloc_trim`` returns those pages at once.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class StreamedModel:
    """A checkpoint's model with parameters on meta, materialized part by part.

    ``trust_remote_code`` (the recipe's) lets a model that runs its own code (Qwen1) build
    its module tree from that code; without it such a checkpoint is refused, naming the
    recipe key. Parts are named by their parameter prefix in the checkpoint
    (``adapter.name_of("embed_tokens")``, ``layer.name``); a tied LM head reads the
    embedding's tensor.
    """

    def __init__(self, model_dir: Path, *, trust_remote_code: bool = False) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

        self.path = Path(model_dir)
        self.weights = LazyWeights(model_dir)
        checked = self.weights.checked
        self.remote = checked.remote_code
        if self.remote is not None and not trust_remote_code:
            raise EdgeforgeError(
                f"{model_dir}: {self.remote.family} runs the checkpoint's own modeling code; "
                "use a recipe that sets source.trust_remote_code (e.g. MODEL=qwen-7b)"
            )
        config = AutoConfig.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=trust_remote_code
        )
        if self.remote is None:  # remote code brings its own attention
            config._attn_implementation = "sdpa"
        # Parameters on meta; buffers real, as the model's own constructor computes them.
        auto = AutoModelForImageTextToText if checked.is_vision_language else AutoModelForCausalLM
        with init_empty_weights(include_buffers=False):
            self.model = auto.from_config(
                config, dtype=torch.float32, trust_remote_code=trust_remote_code
            )
        self.model.eval()
        self.weights.rename(checkpoint_renamer(self.model, self.path))
        self.adapter: ModelAdapter = get_adapter(self.model)
        head_key = f"{self.adapter.lm_head_path}.weight"
        embed_key = f"{self.adapter.name_of('embed_tokens')}.weight"
        #: Whether the LM head is the embedding (stored once, read for both). As
        #: ``from_pretrained`` decides it: a head stored in the checkpoint is used even when
        #: the config ties it (transformers then does not tie tensors that differ), a head
        #: missing from it is the embedding. Not the adapter's identity check: modules
        #: built on meta are not tied, and materializing a part gives new objects anyway.
        self.tied = head_key not in self.weights.where
        self.alias = {head_key: embed_key} if self.tied else {}

    def load(self, module: nn.Module, prefix: str) -> nn.Module:
        """Allocate ``module`` on the CPU and fill it from the checkpoint (float32).

        Buffers the model's constructor computed are kept (:func:`release` leaves them),
        not left as uninitialised memory, however often the part was read before.
        """
        computed = {name: b for name, b in module.named_buffers() if not b.is_meta}
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, buffer in computed.items():
                module.get_buffer(name).copy_(buffer)
            for name, param in module.named_parameters():
                key = f"{prefix}.{name}" if prefix else name
                self.weights.read_into(self.alias.get(key, key), param.data)
        return module

    @contextmanager
    def loaded(self, module: nn.Module, prefix: str) -> Iterator[nn.Module]:
        """``module`` materialized for the block, released after it (also on error)."""
        try:
            yield self.load(module, prefix)
        finally:
            release(module)

    def part_bytes(self, prefix: str) -> int:
        """float32 bytes of the checkpoint's tensors under ``prefix``."""
        return self.weights.nbytes(prefix + ".")

    def largest_layer_bytes(self) -> int:
        """float32 bytes of the largest decoder layer."""
        return max(self.part_bytes(layer.name) for layer in self.adapter.layers())

    def vision_tower_bytes(self) -> int:
        """float32 bytes of a vision-language model's vision tower (read as one part);
        0 for a text model."""
        if not self.adapter.is_vision_language:
            return 0
        return self.part_bytes(self.adapter.name_of("vision_tower"))

    def largest_part_bytes(self) -> int:
        """float32 bytes of the largest part a step holds at once: a decoder layer, or the
        embedding (the LM head, read at the other end, is as large or, tied, the same)."""
        embedding = self.part_bytes(self.adapter.name_of("embed_tokens"))
        return max(self.largest_layer_bytes(), embedding)

    def check_layerwise(self, remedy: str, *, text_windows: bool = False) -> None:
        """Refuse what :func:`layer_kwargs` cannot feed a layer: a vision-language model
        (image tokens and their M-RoPE positions come from the vision tower) unless the
        caller runs ``text_windows`` only (its language model on text, as the whole model
        runs text without pictures), and layers that are not plain causal attention over
        the whole window (the one mask built). ``remedy`` tells the user what to run
        instead."""
        if self.adapter.is_vision_language and not text_windows:
            raise EdgeforgeError(
                f"{self.path}: layer-by-layer runs support text models; "
                f"{self.adapter.model_type} is vision-language — {remedy}"
            )
        departures = self.adapter.attention_departures()
        if departures:
            raise EdgeforgeError(
                f"{self.path / 'config.json'}: {'; '.join(departures)}; layer-by-layer runs "
                f"build one full causal mask for every layer — {remedy}"
            )


def layer_kwargs(
    adapter: ModelAdapter, hidden: torch.Tensor, mrope_positions: torch.Tensor | None = None
) -> dict[str, Any]:
    """What the model's own decoder stack hands every layer for whole windows of
    ``hidden``'s length, without a cache (causal mask, rotary tables). Only the adapter's
    config and buffers are read, so a model on meta will do. ``mrope_positions``
    ``[3, 1, L]``: a vision-language prompt's M-RoPE rows (``get_rope_index``), where
    text alone counts the tokens in all three."""
    if isinstance(adapter, QwenAdapter):
        return qwen1_layer_kwargs(adapter, hidden.shape[1])
    return transformers_layer_kwargs(adapter, hidden, mrope_positions)


def transformers_layer_kwargs(
    adapter: ModelAdapter,
    hidden: torch.Tensor,
    mrope_positions: torch.Tensor | None = None,
    *,
    cache: Any = None,
    mrope_offset: torch.Tensor | int = 0,
) -> dict[str, Any]:
    """What a transformers decoder stack hands each layer for ``hidden`` ``[n, L, H]``
    after the tokens in ``cache`` (a ``DynamicCache`` the layers append to; None: no
    earlier tokens and none kept): positions after the cached ones, the causal mask built
    against them, the rotary tables. A vision-language stack takes ``mrope_positions``
    (a picture's prompt) or else counts the tokens in all three M-RoPE rows, ``mrope_offset``
    ahead (the prompt's delta, for tokens after it), and gets no 1-D positions (its forward
    passes them for packed rows only). Only config and buffers are read, so a model on
    meta will do."""
    from transformers.masking_utils import create_causal_mask

    past = 0 if cache is None else cache.get_seq_length()
    position_ids = (torch.arange(hidden.shape[1]) + past)[None]
    vision_language = adapter.mrope_section is not None
    rotary_positions = position_ids
    if vision_language:
        rotary_positions = mrope_positions
        if rotary_positions is None:
            rotary_positions = position_ids[None].expand(3, 1, -1) + mrope_offset
    rotary = adapter.rotary_embedding()  # real: only parameters were built on meta
    return {
        "attention_mask": create_causal_mask(
            config=adapter.text_config,
            inputs_embeds=hidden[:1],
            attention_mask=None,
            past_key_values=cache,
            position_ids=None if vision_language else position_ids,
        ),
        "position_embeddings": rotary(hidden[:1], position_ids=rotary_positions),
        "position_ids": None if vision_language else position_ids,
        "past_key_values": cache,
        "use_cache": cache is not None,
    }


def qwen1_layer_kwargs(
    adapter: ModelAdapter, length: int, past_length: int = 0, use_cache: bool = False
) -> dict[str, Any]:
    """What Qwen1's ``QWenModel.forward`` hands each block for ``length`` new tokens after
    ``past_length`` cached ones, computed by the checkpoint's own code: rotary tables over
    all ``length + past_length`` positions (the block slices the last ``length`` rows) at
    its dynamic-NTK alpha, and (revisions that have one) its registered causal mask. A
    caller with a cache passes each block its own ``layer_past``.

    The alpha follows the forward's own rule, state included: a step without a cache picks
    it from the window's length and stores it on the rotary module; a cached step reuses
    the stored one, so a decode keeps the prompt's alpha as Hugging Face's does."""
    stack = adapter.language_model()
    rotary = stack.rotary_emb
    total = length + past_length
    if not stack.use_dynamic_ntk:
        alphas = [1.0]
    elif past_length:
        alphas = rotary._ntk_alpha_cached_list
    else:
        alphas = [stack.get_ntk_alpha(total)]
    rotary._ntk_alpha_cached_list = alphas
    kwargs: dict[str, Any] = {
        "rotary_pos_emb_list": [rotary(total, ntk_alpha=alpha) for alpha in alphas],
        "layer_past": None,
        "attention_mask": None,
        "head_mask": None,
        "use_cache": use_cache,
    }
    if hasattr(stack, "registered_causal_mask"):
        kwargs["registered_causal_mask"] = stack.registered_causal_mask
    return kwargs

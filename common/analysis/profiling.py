"""Streaming activation profiling of every linear, whole-model or one layer at a time.

Each linear's input and output feed a :class:`~common.analysis.observers.TensorObserver` from a
forward hook, so memory is the observers' fixed state, whatever the number of tokens (the
mllm profiler stored every activation). Linears that read the same tensor (q/k/v,
gate/up) share one computation of the input statistics.

*Sequential* mode never builds the whole model: the module tree is created with its
parameters on the meta device and each part's weights are read lazily from the safetensors
shards just before it runs all calibration samples, then dropped. Peak memory is one
decoder layer plus the hidden states of the calibration set (plus embedding / LM head at
the ends), so a model larger than RAM can be profiled. Both modes run the same modules on
the same inputs with the same causal-mask construction, so their statistics are identical
(Qwen1's blocks get what its own remote code hands them: rotary tables, causal mask).

The profile JSON keeps mllm's keys (``ori`` = signed max, ``top_0_1`` = signed 99.9th
percentile, ``all_stat`` = mean/std, per linear name and ``input``/``output``) so mllm's
exporters can read it; everything else sits under the ``edgeforge`` key.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import re
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from common.analysis.observers import TensorObserver
from common.core.errors import EdgeforgeError
from common.models import ModelAdapter, QwenAdapter, get_adapter, iter_linears

PROFILE_FORMAT = "edgeforge-profile-v1"
SIDES = ("input", "output")
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 2**10,
    "KB": 2**10,
    "M": 2**20,
    "MB": 2**20,
    "G": 2**30,
    "GB": 2**30,
}


def parse_memory(text: str) -> int:
    """Bytes from ``4GB`` / ``512MB`` / ``1000000`` (binary units), for ``--max-memory``."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMG]?B?)\s*", str(text).upper())
    if not match or float(match.group(1)) <= 0:
        raise EdgeforgeError(f"--max-memory: expected a size such as 4GB or 512MB, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


@dataclass
class LinearObservers:
    """The two observers of one linear, plus what the report needs to know about it."""

    role: str
    has_bias: bool
    input: TensorObserver
    output: TensorObserver


class ActivationProfiler:
    """Observers on every linear of a model (decoder, LM head; vision linears with
    ``include_vision``, which needs image calibration inputs to reach them).

    ``no_bias`` observes ``y − b`` for linears with a bias (mllm's default): the bias is
    added in float after dequantization, so only ``Wx`` is quantized. ``exact`` counts
    every value into the percentile histograms instead of only their tails (slower; see
    :mod:`common.analysis.observers`).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        *,
        no_bias: bool = True,
        include_vision: bool = False,
        exact: bool = False,
    ) -> None:
        self.no_bias = no_bias
        self.linears = list(
            iter_linears(adapter, include_lm_head=True, include_vision=include_vision)
        )
        self.observers = {
            name: LinearObservers(
                role=role,
                has_bias=lin.bias is not None,
                input=TensorObserver(exact=exact),
                output=TensorObserver(exact=exact),
            )
            for name, role, lin in self.linears
        }
        self._last_input: torch.Tensor | None = None
        self._last_observer: TensorObserver | None = None

    def _hook(self, name: str):
        obs = self.observers[name]

        def hook(module: nn.Linear, args: tuple[Any, ...], output: torch.Tensor) -> None:
            x = args[0]
            if x is not self._last_input:
                obs.input.update(x)
                self._last_input, self._last_observer = x, obs.input
            elif obs.input is not self._last_observer:
                # q/k/v and gate/up read one tensor: from the first call on, they share the
                # observer of the first of them, so the tensor is observed once.
                if obs.input.count:
                    raise EdgeforgeError(
                        f"profiling: {name} read another linear's input after having its "
                        "own; the model's call order changed between forward passes"
                    )
                obs.input = self._last_observer
            y = output[0] if isinstance(output, tuple) else output
            obs.output.update(y, subtract=module.bias if self.no_bias else None)

        return hook

    @contextmanager
    def attached(self) -> Iterator[ActivationProfiler]:
        """Hooks on every linear for the duration of the block."""
        handles = [lin.register_forward_hook(self._hook(name)) for name, _, lin in self.linears]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._last_input = self._last_observer = None

    def results(self) -> dict[str, dict[str, Any]]:
        """``{name: {"role", "input": stats, "output": stats}}`` in forward order."""
        out: dict[str, dict[str, Any]] = {}
        for name, obs in self.observers.items():
            if obs.input.count == 0:
                raise EdgeforgeError(
                    f"profiling: {name} never ran; the calibration inputs do not reach it"
                )
            try:
                sides = {side: getattr(obs, side).result() for side in SIDES}
            except EdgeforgeError as exc:
                raise EdgeforgeError(f"profiling: {name}: {exc}") from None
            out[name] = {"role": obs.role, "has_bias": obs.has_bias, **sides}
        return out

    def channel_absmax(self) -> dict[str, torch.Tensor]:
        """Per-channel abs-max of every tensor, keyed ``<linear>.<side>`` (a fresh tensor
        each: linears reading one input share its observer, and safetensors stores no
        shared memory)."""
        return {
            f"{name}.{side}": getattr(obs, side).channel_absmax
            for name, obs in self.observers.items()
            for side in SIDES
        }


def _progress(total_tokens: int, desc: str) -> tqdm:
    return tqdm(total=total_tokens, desc=desc, unit="tok", unit_scale=True, disable=None)


def profile_model(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    no_bias: bool = True,
    vision_inputs: Sequence[Mapping[str, Any]] = (),
    exact: bool = False,
) -> ActivationProfiler:
    """Run every window (batch 1) through the whole model with the observers attached.

    ``vision_inputs`` (processor outputs of image prompts, for a vision-language model)
    run after the text windows and make the vision linears observed too: text alone
    never reaches them.
    """
    profiler = ActivationProfiler(
        get_adapter(model), no_bias=no_bias, include_vision=bool(vision_inputs), exact=exact
    )
    vision_tokens = sum(int(inputs["input_ids"].numel()) for inputs in vision_inputs)
    with profiler.attached(), torch.inference_mode():
        bar = _progress(windows.numel() + vision_tokens, "profile")
        for window in windows:
            model(input_ids=window[None], use_cache=False)
            bar.update(window.numel())
        for inputs in vision_inputs:
            model(**inputs, use_cache=False)
            bar.update(int(inputs["input_ids"].numel()))
        bar.close()
    return profiler


# --------------------------------------------------------------------------------------
# Sequential mode


#: safetensors dtype names → torch dtypes this reader accepts.
_ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


class LazyWeights:
    """Tensors of a safetensors checkpoint read one at a time with plain file reads.

    Not memory-mapped on purpose: pages of a mapping stay resident (and count in RSS) for
    as long as the file is open, which would grow to the whole checkpoint; a read copies
    just one tensor, freed when its module is released.
    """

    def __init__(self, model_dir: Path) -> None:
        from common.models.loading import check_model_dir

        checked = check_model_dir(model_dir)
        if any(f.suffix != ".safetensors" for f in checked.weight_files):
            raise EdgeforgeError(
                f"{model_dir}: sequential profiling reads safetensors lazily; this checkpoint "
                "is a pytorch .bin — convert it to safetensors or drop --sequential"
            )
        self.model_dir = Path(model_dir)
        self.where: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for file in checked.weight_files:  # headers were checked by check_model_dir
            with file.open("rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
            header.pop("__metadata__", None)
            for key, entry in header.items():
                self.where[key] = (file, 8 + length, entry)

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Fill the float32 ``out`` from ``key``: straight into its memory when the stored
        tensor is float32 too (no second copy of the largest tensors)."""
        file, data_start, entry = self.where.get(key, (None, 0, {}))
        if file is None or entry["dtype"] != "F32" or list(out.shape) != entry["shape"]:
            out.copy_(self.tensor(key))  # names the missing key / converts / shape-checks
            return
        begin, end = entry["data_offsets"]
        with file.open("rb") as fh:
            fh.seek(data_start + begin)
            got = fh.readinto(memoryview(out.numpy()).cast("B"))
        if got != end - begin:
            raise EdgeforgeError(f"{file}: tensor {key!r} is truncated; copy the checkpoint again")

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise EdgeforgeError(f"{self.model_dir}: the checkpoint lacks tensor {key!r}")
        file, data_start, entry = self.where[key]
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise EdgeforgeError(
                f"{file}: tensor {key!r} is {entry['dtype']}; sequential profiling reads float "
                "checkpoints (F32/F16/BF16/F64)"
            )
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with file.open("rb") as fh:
            fh.seek(data_start + begin)
            fh.readinto(buffer)
        flat = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        return flat.reshape(entry["shape"]).float()

    def nbytes(self, prefix: str) -> int:
        """fp32 bytes of every tensor under ``prefix`` (what materializing it costs)."""
        return sum(
            4 * math.prod(int(d) for d in entry["shape"])
            for key, (_, _, entry) in self.where.items()
            if key.startswith(prefix)
        )


def _materialize(
    module: nn.Module, prefix: str, weights: LazyWeights, alias: dict[str, str]
) -> None:
    """Allocate ``module`` (parameters built on meta) on the CPU and fill it from the
    checkpoint. Buffers the model's own constructor computed (Qwen1's logn table and causal
    mask: not in the checkpoint) are kept, not left as uninitialised memory."""
    computed = {name: b for name, b in module.named_buffers() if not b.is_meta}
    module.to_empty(device="cpu")
    with torch.no_grad():
        for name, buffer in computed.items():
            module.get_buffer(name).copy_(buffer)
        for name, param in module.named_parameters():
            key = f"{prefix}.{name}" if prefix else name
            weights.read_into(alias.get(key, key), param.data)


def _release(module: nn.Module) -> None:
    module.to("meta")
    _return_freed_memory()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on other C libraries."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _return_freed_memory() -> None:
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


def sequential_plan_bytes(
    weights: LazyWeights, adapter: ModelAdapter, windows: torch.Tensor
) -> int:
    """Peak bytes sequential mode needs: hidden states (×2 while a layer runs) plus the
    largest single part (a decoder layer, or embedding + LM head at the ends)."""
    hidden = windows.numel() * adapter.hidden_size * 4
    layers = max(weights.nbytes(layer.name + ".") for layer in adapter.layers())
    ends = weights.nbytes(adapter.name_of("embed_tokens") + ".") * (
        1 if adapter.tie_word_embeddings else 2
    )
    return 2 * hidden + max(layers, ends)


def _transformers_layer_kwargs(adapter: ModelAdapter, hidden: torch.Tensor) -> dict[str, Any]:
    """What a transformers decoder stack hands each layer for whole windows without a
    cache: its rotary embedding and the causal mask, built as the stack builds them."""
    from transformers.masking_utils import create_causal_mask

    rotary = adapter.rotary_embedding()  # real: only parameters were built on meta
    position_ids = torch.arange(hidden.shape[1])[None]
    return {
        "attention_mask": create_causal_mask(
            config=adapter.text_config,
            inputs_embeds=hidden[:1],
            attention_mask=None,
            past_key_values=None,
            position_ids=position_ids,
        ),
        "position_embeddings": rotary(hidden[:1], position_ids=position_ids),
        "position_ids": position_ids,
        "past_key_values": None,
        "use_cache": False,
    }


def _qwen1_layer_kwargs(adapter: ModelAdapter, seq_len: int) -> dict[str, Any]:
    """What Qwen1's ``QWenModel.forward`` hands each block for whole windows without a
    cache, computed by the checkpoint's own code: rotary tables at its dynamic-NTK alpha,
    and (revisions that have one) its registered causal mask."""
    stack = adapter.language_model()
    ntk_alpha = stack.get_ntk_alpha(seq_len) if stack.use_dynamic_ntk else 1.0
    kwargs: dict[str, Any] = {
        "rotary_pos_emb_list": [stack.rotary_emb(seq_len, ntk_alpha=ntk_alpha)],
        "layer_past": None,
        "attention_mask": None,
        "head_mask": None,
        "use_cache": False,
    }
    if hasattr(stack, "registered_causal_mask"):
        kwargs["registered_causal_mask"] = stack.registered_causal_mask
    return kwargs


def profile_sequential(
    model_dir: Path,
    windows: torch.Tensor,
    *,
    no_bias: bool = True,
    max_memory: int | None = None,
    exact: bool = False,
    trust_remote_code: bool = False,
) -> ActivationProfiler:
    """Profile one part at a time from a safetensors checkpoint (see the module docstring).

    ``trust_remote_code`` (the recipe's) lets a model that runs its own code (Qwen1) build
    its module tree from that code; each block then gets what the checkpoint's own stack
    would hand it.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from common.models.loading import check_model_dir

    weights = LazyWeights(model_dir)
    remote = check_model_dir(model_dir).remote_code
    if remote is not None and not trust_remote_code:
        raise EdgeforgeError(
            f"{model_dir}: {remote.family} runs the checkpoint's own modeling code; profile it "
            "from a recipe that sets source.trust_remote_code (e.g. MODEL=qwen-7b)"
        )
    config = AutoConfig.from_pretrained(
        model_dir, local_files_only=True, trust_remote_code=trust_remote_code
    )
    if remote is None:  # remote code brings its own attention
        config._attn_implementation = "sdpa"
    # Parameters on meta; buffers real, as the model's own constructor computes them.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    model.eval()
    adapter = get_adapter(model)
    if adapter.is_vision_language:
        raise EdgeforgeError(
            f"{model_dir}: sequential profiling supports text models; {adapter.model_type} "
            "is vision-language — drop --sequential"
        )
    departures = adapter.attention_departures()
    if departures:
        raise EdgeforgeError(
            f"{model_dir / 'config.json'}: {'; '.join(departures)}; sequential profiling "
            "builds one full causal mask for every layer — drop --sequential (SEQUENTIAL=1)"
        )
    need = sequential_plan_bytes(weights, adapter, windows)
    if max_memory is not None and need > max_memory:
        raise EdgeforgeError(
            f"--max-memory: sequential profiling needs about {need / 2**30:.2f} GiB "
            f"(one layer + hidden states of {windows.shape[0]} samples), over the cap of "
            f"{max_memory / 2**30:.2f} GiB; lower num_samples or raise the cap"
        )
    embed_name = adapter.name_of("embed_tokens")
    # A tied LM head is stored once, as the embedding.
    head_key = f"{adapter.lm_head_path}.weight"
    alias = {} if head_key in weights.where else {head_key: f"{embed_name}.weight"}
    profiler = ActivationProfiler(adapter, no_bias=no_bias, exact=exact)
    total = windows.numel()
    with profiler.attached(), torch.inference_mode():
        embed = adapter.embed_tokens()
        _materialize(embed, embed_name, weights, alias)
        hidden = embed(windows)  # [n, seq, hidden]
        _release(embed)
        if isinstance(adapter, QwenAdapter):
            layer_kwargs = _qwen1_layer_kwargs(adapter, windows.shape[1])
        else:
            layer_kwargs = _transformers_layer_kwargs(adapter, hidden)
        layers = adapter.layers()
        bar = _progress(total * (len(layers) + 1), "profile (sequential)")
        for layer in layers:
            _materialize(layer.module, layer.name, weights, alias)
            out = torch.empty_like(hidden)
            for i in range(hidden.shape[0]):
                out[i] = layer.module(hidden[i : i + 1], **layer_kwargs)[0]
                bar.update(windows.shape[1])
            hidden = out
            _release(layer.module)
        norm, head = adapter.final_norm(), adapter.lm_head()
        _materialize(norm, adapter.name_of("final_norm"), weights, alias)
        _materialize(head, adapter.lm_head_path, weights, alias)
        for i in range(hidden.shape[0]):
            head(norm(hidden[i : i + 1]))
            bar.update(windows.shape[1])
        bar.close()
    return profiler


# --------------------------------------------------------------------------------------
# The profile document


def profile_document(stats: dict[str, dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """The seed-compatible JSON (``ori``, ``top_0_1``, ``all_stat``) plus ``edgeforge``."""
    return {
        "ori": {n: {s: st[s]["max"] for s in SIDES} for n, st in stats.items()},
        "top_0_1": {n: {s: st[s]["p999"] for s in SIDES} for n, st in stats.items()},
        "all_stat": {
            n: {s: {"mean": st[s]["mean"], "std": st[s]["std"]} for s in SIDES}
            for n, st in stats.items()
        },
        "edgeforge": {"format": PROFILE_FORMAT, **meta, "stats": stats},
    }


def load_profile(path: Path, adapter: ModelAdapter | None = None) -> dict[str, Any]:
    """Read a profile JSON; with ``adapter``, check it covers every linear of that model."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EdgeforgeError(f"{path}: profile not found; run make profile first") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeforgeError(f"{path}: not a profile JSON ({exc})") from None
    ext = doc.get("edgeforge") if isinstance(doc, dict) else None
    if not isinstance(ext, dict) or ext.get("format") != PROFILE_FORMAT or "stats" not in ext:
        raise EdgeforgeError(
            f"{path}: not an edgeforge profile (no 'edgeforge.format' = {PROFILE_FORMAT!r})"
        )
    if adapter is not None:
        wanted = [name for name, _, _ in iter_linears(adapter)]
        missing = [name for name in wanted if name not in ext["stats"]]
        if missing:
            raise EdgeforgeError(
                f"{path}: profile lacks {len(missing)} linear(s) of this model (e.g. "
                f"{missing[0]}); it was made for another model — profile again"
            )
    return doc

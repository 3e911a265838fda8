"""The mllm NPU runtime's int8 ``.mllm`` (mllm's QNN convertor's layout), and the
fake-quant model rebuilt from that file alone.

Per quantized linear ``L`` of the plan: ``L.weight`` int8 ``[in, out]`` (transposed, as
``QNNLinearINT8`` reads it), ``L.weight.scale`` F32[1], ``L.input_scale`` /
``L.output_scale`` F32[1] (the raw calibrated range, not divided by 127: the runtime
divides), ``L.clip_input`` / ``L.clip_output`` I8[1], and the bias as F32 ``[out]``
(``quant_bias=false``, mandatory with rotation) or I8 ``[out]`` + ``L.bias.scale``.
Embeddings, norms and ``lm_head.weight`` stay F32, with lm_head's (unused, harmless)
scale and flag entries; a vision-language model's tower is written F32 under ``visual.``
(its pictures' tokens are computed on the host). The runtime reads a per-tensor weight
scale, so the plan must use ``per_tensor`` weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from common.analysis.layerwise import Parts, head, run_layers
from common.analysis.quant_plan import bits_of
from common.analysis.simulate import activation_hooks, plan_weights
from common.core.errors import EdgeforgeError
from common.core.progress import progress
from common.export.mllm_format import (
    MllmReader,
    mllm_module_names,
    mllm_parameters,
    write_mllm_lazily,
)
from common.models import ModelAdapter, iter_linears
from common.quant.int8 import fake_quantize, qmax, quantize_bias, quantize_weight

Tensor = np.ndarray | torch.Tensor
#: Which part of the model holds a tensor: "embedding", a decoder layer's index, "head",
#: "vision" (a vision-language model's tower).
PartKey = str | int


def _scalar(value: float) -> np.ndarray:
    return np.array([value], dtype=np.float32)


def _flag(value: bool) -> np.ndarray:
    return np.array([1 if value else 0], dtype=np.int8)


@dataclass(frozen=True)
class _Group:
    """Tensors of the file written together, from one part of the model: ``specs`` are
    their ``(name, dtype, numel)`` (known on meta, for the index); ``make`` computes them
    while the part is in memory."""

    part: PartKey
    specs: list[tuple[str, torch.dtype, int]]
    make: Callable[[], list[Tensor]]


def _part_modules(adapter: ModelAdapter) -> list[tuple[PartKey, list[nn.Module]]]:
    """The modules each part hands out, as :class:`~common.analysis.layerwise.Parts`
    materializes them."""
    layers: list[tuple[PartKey, list[nn.Module]]] = [
        (layer.index, [layer.module]) for layer in adapter.layers()
    ]
    vision = adapter.vision_tower()
    return [
        ("embedding", [adapter.embed_tokens()]),
        *layers,
        ("head", [adapter.final_norm(), adapter.lm_head()]),
        *([("vision", [vision])] if vision is not None else []),
    ]


def _open(parts: Parts, key: PartKey) -> AbstractContextManager[Any]:
    if key == "embedding":
        return parts.embedding()
    if key == "head":
        return parts.head()
    if key == "vision":
        return parts.vision_tower()
    return parts.layer(parts.adapter.layers()[int(key)])


def _linear_group(
    name: str, file_name: str, part: PartKey, linear: nn.Linear, entry: dict[str, Any],
    stats: dict[str, Any], plan_name: object,
) -> _Group:  # fmt: skip
    """A linear's tensors, in the order the runtime's convertor writes them."""
    weight_name, bias_name = f"{file_name}.weight", f"{file_name}.bias"
    int8_weight = entry["weight"]["dtype"] == "int8"
    if int8_weight and entry["weight"]["granularity"] != "per_tensor":
        raise EdgeforgeError(
            f"quant plan {plan_name!r}: {name} has per-channel weights; the mllm "
            "runtime reads one weight scale per linear (plan per_tensor weights)"
        )
    int8_bias = linear.bias is not None and entry["bias"] == "int32"
    specs: list[tuple[str, torch.dtype, int]] = [
        (weight_name, torch.int8 if int8_weight else torch.float32, linear.weight.numel())
    ]
    if int8_weight:
        specs.append((f"{weight_name}.scale", torch.float32, 1))
    for side in ("input", "output"):
        specs += [(f"{file_name}.{side}_scale", torch.float32, 1)]
        specs += [(f"{file_name}.clip_{side}", torch.int8, 1)]
    if linear.bias is not None:
        specs.append((bias_name, torch.int8 if int8_bias else torch.float32, linear.bias.numel()))
        if int8_bias:
            specs.append((f"{bias_name}.scale", torch.float32, 1))

    def make() -> list[Tensor]:
        out: list[Tensor] = []
        if int8_weight:
            levels, scale = quantize_weight(linear.weight, "per_tensor")
            out += [levels.T.contiguous(), _scalar(float(scale))]
        else:
            out.append(linear.weight.detach().float())
        for side in ("input", "output"):
            planned = entry[side]
            out += [_scalar(planned.get("range", stats[name][side]["absmax"]))]
            out += [_flag(planned.get("clip", True))]
        if linear.bias is not None:
            if int8_bias:
                levels, scale = quantize_bias(linear.bias)
                out += [levels.to(torch.int8), _scalar(float(scale))]
            else:
                out.append(linear.bias.detach().float())
        return out

    return _Group(part, specs, make)


def _groups(
    adapter: ModelAdapter, plan: dict[str, Any], profile_stats: dict[str, Any]
) -> list[_Group]:
    """Every tensor of the int8 file, grouped, in file order: each planned linear's (in
    :func:`~common.models.iter_linears` order), then every other parameter in the
    model's parameter order. Shapes come from the modules, so a model on meta will do."""
    part_of: dict[nn.Module, PartKey] = {}
    for key, modules in _part_modules(adapter):
        part_of |= {m: key for top in modules for m in top.modules()}
    names = mllm_module_names(adapter)
    tensors = plan["tensors"]
    groups: list[_Group] = []
    done: set[str] = set()
    for name, _role, linear in iter_linears(adapter):
        if name not in tensors:
            raise EdgeforgeError(f"quant plan has no entry for {name}; made for another model")
        if linear not in part_of:
            raise EdgeforgeError(f"{name}: outside the model's parts (embedding, layers, …)")
        groups.append(
            _linear_group(
                name, names[linear], part_of[linear], linear, tensors[name], profile_stats,
                plan.get("name"),
            )
        )  # fmt: skip
        done.update(spec[0] for spec in groups[-1].specs)
    owner_of = {
        f"{names[module]}.{local}": (module, local)
        for _key, modules in _part_modules(adapter)
        for module in modules
        for local, _ in module.named_parameters()
    }
    for file_name, param in mllm_parameters(adapter):
        if file_name in done:
            continue
        if file_name not in owner_of:
            raise EdgeforgeError(f"{file_name}: outside the model's parts (embedding, layers, …)")
        module, local = owner_of[file_name]
        groups.append(
            _Group(
                part_of[module],
                [(file_name, torch.float32, param.numel())],
                lambda m=module, n=local: [m.get_parameter(n).detach().float()],
            )
        )
    return groups


def _tensors(parts: Parts, groups: list[_Group]) -> Iterator[tuple[str, Tensor]]:
    """Every group's tensors in order, each part read once: a part is materialized when
    its first group is due and released when a group of another part is; its groups
    still to come (norm weights, after every linear) are made before it goes."""
    later: dict[int, list[Tensor]] = {}
    held: tuple[PartKey, ExitStack] | None = None
    try:
        for i, group in enumerate(progress(groups, desc="int8 .mllm", unit="group")):
            made = later.pop(i, None)
            if made is None:
                if held is not None and held[0] != group.part:
                    key, stack = held
                    later |= {j: g.make() for j, g in enumerate(groups) if j > i and g.part == key}
                    stack.close()
                    held = None
                if held is None:
                    stack = ExitStack()
                    stack.enter_context(_open(parts, group.part))
                    held = (group.part, stack)
                made = group.make()
            yield from zip((spec[0] for spec in group.specs), made, strict=True)
    finally:
        if held is not None:
            held[1].close()


def write_int8_mllm(
    dest: Path, parts: Parts, plan: dict[str, Any], profile_stats: dict[str, Any]
) -> None:
    """Write ``model.int8.mllm`` atomically (see the module docstring), one part of the
    model in memory at a time. ``parts`` must give the model as the plan assumes it
    (rotated if the plan says so); ``profile_stats`` supplies the ranges of linears the
    plan keeps in float (lm_head)."""
    groups = _groups(parts.adapter, plan, profile_stats)
    stream = _tensors(parts, groups)

    def read(name: str) -> Tensor:
        got, tensor = next(stream)
        if got != name:  # the groups declare and make their tensors in one order
            raise EdgeforgeError(f".mllm tensor {name!r} expected, {got!r} made")
        return tensor

    try:
        write_mllm_lazily(dest, [spec for g in groups for spec in g.specs], read)
    finally:
        stream.close()  # releases the part still held, also when the write fails


def _file_weights(reader: MllmReader, adapter: ModelAdapter) -> Callable[[nn.Module], None]:
    """A :meth:`Parts.then` step giving each parameter of a part the value ``reader``'s
    file stores: int8 levels times their scale for quantized linears, float otherwise."""
    names = mllm_module_names(adapter)
    linears = {linear for _name, _role, linear in iter_linears(adapter)}

    def step(module: nn.Module) -> None:
        with torch.no_grad():
            for local, param in module.named_parameters():
                owner = module.get_submodule(local.rpartition(".")[0])
                name = f"{names[module]}.{local}"
                stored = reader.array(name)
                if owner in linears and reader.entries[name].dtype_code == 16:
                    values = torch.from_numpy(stored.astype(np.float32))
                    if local.endswith("weight"):
                        values = values.reshape(param.shape[1], param.shape[0]).T
                    param.copy_(values * float(reader.array(f"{name}.scale")[0]))
                else:
                    param.copy_(torch.from_numpy(stored.copy()).reshape(param.shape))

    return step


def _file_activation_hooks(
    reader: MllmReader, adapter: ModelAdapter, plan: dict[str, Any]
) -> list[RemovableHandle]:
    """The activation rounding the file's scales and clip flags say; the plan gives only
    the bit widths, which the file does not record (the runtime's C++ decides them)."""
    names = mllm_module_names(adapter)
    handles: list[RemovableHandle] = []
    for name, _role, linear in iter_linears(adapter):
        stored = {
            side: (
                float(reader.array(f"{names[linear]}.{side}_scale")[0]),
                bool(reader.array(f"{names[linear]}.clip_{side}")[0]),
            )
            for side in ("input", "output")
        }
        handles += _activation_hooks(linear, plan["tensors"][name], stored)
    return handles


def _logits(parts: Parts, batch: torch.Tensor, hooks: list[RemovableHandle]) -> torch.Tensor:
    """Logits of ``batch`` ``[1, seq]`` through ``parts``, then ``hooks`` removed."""
    try:
        hidden = run_layers(parts, batch)
        with head(parts) as logits_of:
            return logits_of(hidden).float()
    finally:
        for handle in hooks:
            handle.remove()


def fake_quant_logits(parts: Parts, plan: dict[str, Any], batch: torch.Tensor) -> torch.Tensor:
    """Logits of ``batch`` ``[1, seq]`` through the fake-quant model ``plan`` makes of
    ``parts`` (:mod:`common.analysis.simulate`'s rounding), one part at a time."""
    adapter = parts.adapter
    return _logits(parts.then(plan_weights(adapter, plan)), batch, activation_hooks(adapter, plan))


def file_logits(
    parts: Parts, plan: dict[str, Any], path: Path, batch: torch.Tensor
) -> torch.Tensor:
    """Logits of ``batch`` through the model rebuilt from the int8 file ``path`` alone:
    every parameter, int8 weight, scale, bias and clip flag comes from the file, which
    overwrites each part as it is read; the plan gives only the activation bit widths."""
    adapter = parts.adapter
    with MllmReader(path) as reader:
        hooks = _file_activation_hooks(reader, adapter, plan)
        return _logits(parts.then(_file_weights(reader, adapter)), batch, hooks)


def check_int8_mllm(
    parts: Parts, plan: dict[str, Any], path: Path, ids: list[int]
) -> dict[str, Any]:
    """How far the file's model is from the fake-quant model it stores, on ``ids``."""
    batch = torch.tensor([ids])
    want = fake_quant_logits(parts, plan, batch)
    got = file_logits(parts, plan, path, batch)
    return {"max_abs_diff": float((got - want).abs().max()), "tokens": len(ids)}


def _activation_hooks(
    module: nn.Linear, entry: dict[str, Any], stored: dict[str, tuple[float, bool]]
) -> list[RemovableHandle]:
    handles: list[RemovableHandle] = []
    if entry["input"]["dtype"] != "float32":
        bits = bits_of(entry["input"])
        rng, clip = stored["input"]
        scale = max(rng, 1e-5) / qmax(bits)
        handles.append(
            module.register_forward_pre_hook(
                lambda _m, args, s=scale, b=bits, c=clip: (fake_quantize(args[0], s, b, clip=c),)
            )
        )
    if entry["output"]["dtype"] != "float32":
        bits = bits_of(entry["output"])
        rng, clip = stored["output"]
        scale = max(rng, 1e-5) / qmax(bits)

        def out_hook(mod: nn.Linear, _a: Any, y: torch.Tensor, s=scale, b=bits, c=clip) -> Any:
            if mod.bias is None:
                return fake_quantize(y, s, b, clip=c)
            return fake_quantize(y - mod.bias, s, b, clip=c) + mod.bias

        handles.append(module.register_forward_hook(out_hook))
    return handles

"""The mllm NPU runtime's int8 ``.mllm`` (mllm's QNN convertor's layout), and the
fake-quant model rebuilt from that file alone.

Per quantized linear ``L`` of the plan: ``L.weight`` int8 ``[in, out]`` (transposed, as
``QNNLinearINT8`` reads it), ``L.weight.scale`` F32[1], ``L.input_scale`` /
``L.output_scale`` F32[1] (the raw calibrated range, not divided by 127: the runtime
divides), ``L.clip_input`` / ``L.clip_output`` I8[1], and the bias as F32 ``[out]``
(``quant_bias=false``, mandatory with rotation) or I8 ``[out]`` + ``L.bias.scale``.
Embeddings, norms and ``lm_head.weight`` stay F32, with lm_head's (unused, harmless)
scale and flag entries. The runtime reads a per-tensor weight scale, so the plan must use
``per_tensor`` weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from common.analysis.quant_plan import bits_of
from common.core.errors import EdgeforgeError
from common.export.mllm_format import mllm_named_tensors, read_mllm, write_mllm
from common.models import ModelAdapter, iter_linears
from common.quant.int8 import fake_quantize, qmax, quantize_bias, quantize_weight


def _scalar(value: float) -> np.ndarray:
    return np.array([value], dtype=np.float32)


def _flag(value: bool) -> np.ndarray:
    return np.array([1 if value else 0], dtype=np.int8)


def int8_tensors(
    adapter: ModelAdapter, plan: dict[str, Any], profile_stats: dict[str, Any]
) -> list[tuple[str, np.ndarray | torch.Tensor]]:
    """Every tensor of the int8 file, in the model's parameter order.

    ``adapter`` must hold the model as the plan assumes it (rotated if the plan says so);
    ``profile_stats`` supplies the ranges of linears the plan keeps in float (lm_head).
    """
    linears = {name: (role, module) for name, role, module in iter_linears(adapter)}
    tensors = plan["tensors"]
    missing = sorted(set(linears) - set(tensors))
    if missing:
        raise EdgeforgeError(f"quant plan has no entry for {missing[0]}; made for another model")
    params = dict(mllm_named_tensors(adapter))
    out: list[tuple[str, np.ndarray | torch.Tensor]] = []
    done: set[str] = set()
    for name, (_role, module) in linears.items():
        entry = tensors[name]
        weight_name, bias_name = f"{name}.weight", f"{name}.bias"
        if weight_name not in params:
            raise EdgeforgeError(f"{name}: no mllm tensor name for its weight")
        if entry["weight"]["dtype"] == "int8":
            if entry["weight"]["granularity"] != "per_tensor":
                raise EdgeforgeError(
                    f"quant plan {plan.get('name')!r}: {name} has per-channel weights; the mllm "
                    "runtime reads one weight scale per linear (plan per_tensor weights)"
                )
            levels, scale = quantize_weight(module.weight, "per_tensor")
            out += [
                (weight_name, levels.T.contiguous()),
                (f"{weight_name}.scale", _scalar(float(scale))),
            ]
        else:
            out.append((weight_name, module.weight.detach().float()))
        stats = profile_stats[name]
        for side in ("input", "output"):
            planned = entry[side]
            value_range = planned.get("range", stats[side]["absmax"])
            out.append((f"{name}.{side}_scale", _scalar(value_range)))
            out.append((f"{name}.clip_{side}", _flag(planned.get("clip", True))))
        if module.bias is not None:
            if entry["bias"] == "int32":
                levels, scale = quantize_bias(module.bias)
                out += [
                    (bias_name, levels.to(torch.int8)),
                    (f"{bias_name}.scale", _scalar(float(scale))),
                ]
            else:
                out.append((bias_name, module.bias.detach().float()))
        done.update({weight_name, bias_name})
    out += [(n, t.float()) for n, t in params.items() if n not in done]
    return out


def write_int8_mllm(
    dest: Path, adapter: ModelAdapter, plan: dict[str, Any], profile_stats: dict[str, Any]
) -> None:
    """Write ``model.int8.mllm`` atomically (see the module docstring)."""
    write_mllm(dest, int8_tensors(adapter, plan, profile_stats))


def load_int8_mllm(
    path: Path, adapter: ModelAdapter, plan: dict[str, Any]
) -> list[RemovableHandle]:
    """Turn ``adapter``'s model (any weights of the same architecture) into the fake-quant
    model stored in ``path``: every parameter, int8 weight, scale, bias and clip flag comes
    from the file; the plan contributes only the activation bit widths, which the file
    does not record (the runtime's C++ decides them). Returns the activation hooks."""
    stored = read_mllm(path)
    params = dict(mllm_named_tensors(adapter))

    def array(name: str) -> np.ndarray:
        if name not in stored:
            raise EdgeforgeError(f"{path}: tensor {name!r} is missing")
        return stored[name][1]

    handles: list[RemovableHandle] = []
    linears = {name: module for name, _role, module in iter_linears(adapter)}
    with torch.no_grad():
        for name, param in params.items():
            owner = name.rsplit(".", 1)[0]
            if owner in linears and name.endswith(".weight") and stored[name][0] == 16:
                levels = torch.from_numpy(array(name).astype(np.float32))
                levels = levels.reshape(param.shape[1], param.shape[0]).T
                param.copy_(levels * float(array(f"{name}.scale")[0]))
            elif owner in linears and name.endswith(".bias") and stored[name][0] == 16:
                param.copy_(
                    torch.from_numpy(array(name).astype(np.float32))
                    * float(array(f"{name}.scale")[0])
                )
            else:
                param.copy_(torch.from_numpy(array(name).copy()).reshape(param.shape))
    for name, module in linears.items():
        entry = plan["tensors"][name]
        handles += _activation_hooks(
            module,
            entry,
            {
                side: (
                    float(array(f"{name}.{side}_scale")[0]),
                    bool(array(f"{name}.clip_{side}")[0]),
                )
                for side in ("input", "output")
            },
        )
    return handles


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

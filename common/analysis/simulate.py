"""Fake-quant simulation of a quant plan, scored by the foundation's evaluation.

The model is first transformed as the plan's ``transforms`` say (residual rotation through
:mod:`common.quant.rotation`, online Hadamard on down_proj inputs), then every planned weight is
rounded to its int8 grid in place and every planned activation is rounded (and saturated
when ``clip``) by hooks, with :mod:`common.quant.int8`'s functions — the same ones exporters
use. A no-clip (shadow) tensor keeps its out-of-range values on the grid, which is exactly
what device int8 plus the CPU shadow correction computes
(:func:`common.quant.int8.shadow_input_correction`, tested there).

Scores: held-out perplexity (:func:`common.analysis.eval.perplexity`), top-1 agreement of every
position's argmax with the FP32 model's, and last-token accuracy (the argmax at position
−2 predicts the window's last token, mllm's LAMBADA-style metric) — all from one pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from common.analysis.layerwise import Parts, window_logits
from common.analysis.quant_plan import bits_of
from common.core.errors import EdgeforgeError
from common.models import ModelAdapter, get_adapter, iter_linears
from common.models.streaming import StreamedModel
from common.quant.int8 import fake_quantize, quantize_bias, weight_scale


@contextmanager
def transformed_model(
    model_dir: Path, transforms: dict[str, Any]
) -> Iterator[tuple[nn.Module, Any]]:
    """A freshly loaded model with the plan's transforms applied (function unchanged), and
    the :class:`~common.quant.rotation.Rotation` used (None without rotation), to be saved."""
    from common.models.loading import load_model
    from common.quant.transforms import Transforms

    model = load_model(model_dir)
    adapter = get_adapter(model)
    resolved = Transforms.of(adapter, transforms)
    handles = resolved.whole(adapter)
    try:
        yield model, resolved.rotation
    finally:
        for handle in handles:
            handle.remove()


def _activation_hook(entry: dict[str, Any]):
    bits, scale, clip = bits_of(entry), entry["scale"], entry["clip"]
    return lambda x: fake_quantize(x, scale, bits, clip=clip)


def _planned_linears(adapter: ModelAdapter, plan: dict[str, Any]) -> list[tuple[str, nn.Linear]]:
    """``(name, linear)`` of every linear, each checked to have an entry in ``plan``."""
    linears = [(name, linear) for name, _role, linear in iter_linears(adapter)]
    for name, _ in linears:
        if name not in plan["tensors"]:
            raise EdgeforgeError(
                f"quant plan {plan.get('name')!r} has no entry for {name}; it was made for "
                "another model"
            )
    return linears


def quantize_weights(linears: Iterable[tuple[str, nn.Linear]], plan: dict[str, Any]) -> None:
    """Round the weights (and int32 biases) of ``linears`` to their grids in place, as
    ``plan`` says: the weight half of :func:`apply_plan`, for the linears of one part
    of a streamed model as it is read."""
    tensors = plan["tensors"]
    with torch.no_grad():
        for name, linear in linears:
            entry = tensors[name]
            if entry["weight"]["dtype"] == "int8":
                scale = weight_scale(linear.weight, entry["weight"]["granularity"])
                linear.weight.copy_(fake_quantize(linear.weight, scale))
            if entry["bias"] == "int32" and linear.bias is not None:
                q, s = quantize_bias(linear.bias)
                linear.bias.copy_(q.float() * s)


def activation_hooks(adapter: ModelAdapter, plan: dict[str, Any]) -> list[RemovableHandle]:
    """Hooks rounding every planned linear input and output (the activation half of
    :func:`apply_plan`). They live on the modules, so they stay across a streamed part's
    loads and releases."""
    handles: list[RemovableHandle] = []
    for name, linear in _planned_linears(adapter, plan):
        entry = plan["tensors"][name]
        if entry["input"]["dtype"] != "float32":
            quant_in = _activation_hook(entry["input"])
            handles.append(
                linear.register_forward_pre_hook(lambda _m, args, f=quant_in: (f(args[0]),))
            )
        if entry["output"]["dtype"] != "float32":
            quant_out = _activation_hook(entry["output"])

            def out_hook(module: nn.Linear, _args: Any, y: torch.Tensor, f=quant_out) -> Any:
                if module.bias is None:
                    return f(y)
                return f(y - module.bias) + module.bias  # bias added in float after dequant

            handles.append(linear.register_forward_hook(out_hook))
    return handles


def plan_weights(adapter: ModelAdapter, plan: dict[str, Any]) -> Callable[[nn.Module], None]:
    """A :meth:`~common.analysis.layerwise.Parts.then` step rounding the weights of the
    planned linears inside each module it is given (the linears are found once, by
    identity: a streamed part keeps its modules and gets new parameters)."""
    planned = _planned_linears(adapter, plan)

    def step(module: nn.Module) -> None:
        inside = set(module.modules())
        quantize_weights([(n, linear) for n, linear in planned if linear in inside], plan)

    return step


def apply_plan(adapter: ModelAdapter, plan: dict[str, Any]) -> list[RemovableHandle]:
    """Fake-quantize ``adapter``'s model in place as ``plan`` says; returns the hooks.

    Raises when the plan and the model disagree (a linear missing from the plan).
    """
    handles = activation_hooks(adapter, plan)
    quantize_weights(_planned_linears(adapter, plan), plan)
    return handles


def score_logits(
    logits: Iterable[torch.Tensor], windows: torch.Tensor, reference_argmax: torch.Tensor | None
) -> dict[str, Any]:
    """Perplexity, top-1 agreement with ``reference_argmax`` and last-token accuracy of
    each window's logits ``[seq, vocab]`` (one per window of ``windows``, in order), as
    :func:`common.analysis.eval.perplexity` computes them. Returns the argmax too (the
    FP32 run's becomes the reference)."""
    from common.analysis.eval import window_nll_sum

    total, argmaxes = 0.0, []
    with torch.inference_mode():
        for window, window_logits in zip(windows, logits, strict=True):
            total += window_nll_sum(window_logits, window)
            argmaxes.append(window_logits.argmax(-1))
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    nll = total / tokens
    argmax = torch.stack(argmaxes)
    result: dict[str, Any] = {
        "ppl": math.exp(nll),
        "nll": nll,
        "tokens": tokens,
        "last_token_accuracy": float((argmax[:, -2] == windows[:, -1]).double().mean()),
    }
    if reference_argmax is not None:
        result["top1_agreement"] = float((argmax == reference_argmax).double().mean())
    return result | {"argmax": argmax}


def evaluate(
    model: nn.Module, windows: torch.Tensor, reference_argmax: torch.Tensor | None = None
) -> dict[str, Any]:
    """:func:`score_logits` of ``model`` run whole on every window."""
    from common.analysis.eval import check_windows, model_logits

    windows = check_windows(windows, model, min_len=2)
    with torch.inference_mode():
        return score_logits((model_logits(model, w) for w in windows), windows, reference_argmax)


def score_model(
    model_dir: Path,
    windows: torch.Tensor,
    *,
    streamed: StreamedModel | None,
    plan: dict[str, Any] | None = None,
    reference_argmax: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Score the model of ``model_dir`` (transformed and fake-quantized as ``plan`` says;
    float without one) on ``windows``: one part at a time from ``streamed``, else loaded
    whole. Both give the same numbers (the layers run the same windows, batch 1)."""
    transforms = (plan or {}).get("transforms", {})
    if streamed is None:
        with transformed_model(model_dir, transforms) as (model, _):
            handles = apply_plan(get_adapter(model), plan) if plan else []
            try:
                return evaluate(model, windows, reference_argmax)
            finally:
                for handle in handles:
                    handle.remove()
    from common.analysis.eval import check_windows
    from common.quant.transforms import Transforms

    adapter = streamed.adapter
    windows = check_windows(windows, streamed.model, min_len=2)
    parts = Parts(adapter, streamed, Transforms.of(adapter, transforms))
    handles = []
    if plan:
        handles = activation_hooks(adapter, plan)
        parts = parts.then(plan_weights(adapter, plan))
    try:
        return score_logits(window_logits(parts, windows), windows, reference_argmax)
    finally:
        for handle in handles:
            handle.remove()


def simulate_plan(
    model_dir: Path,
    plan: dict[str, Any],
    windows: torch.Tensor,
    reference_argmax: torch.Tensor | None,
    streamed: StreamedModel | None = None,
) -> dict[str, Any]:
    """Build the plan's fake-quant model and score it (one part at a time from
    ``streamed`` when given)."""
    return score_model(
        model_dir, windows, streamed=streamed, plan=plan, reference_argmax=reference_argmax
    )

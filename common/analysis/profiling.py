"""Streaming activation profiling of every linear, whole-model or one layer at a time.

Each linear's input and output feed a :class:`~common.analysis.observers.TensorObserver` from a
forward hook, so memory is the observers' fixed state, whatever the number of tokens (the
mllm profiler stored every activation). Linears that read the same tensor (q/k/v,
gate/up) share one computation of the input statistics.

*Sequential* mode never builds the whole model: each part of a
:class:`~common.models.streaming.StreamedModel` is read from the safetensors shards (and
rotated / given its online Hadamard, :class:`~common.quant.transforms.Transforms`) just
before it runs all calibration samples, then dropped. Peak memory is one decoder layer plus
the hidden states of the calibration set (plus embedding / LM head at the ends), so a model
larger than RAM can be profiled. Both modes run the same modules on the same inputs with
the same causal-mask construction, so their statistics are identical (Qwen1's blocks get
what its own remote code hands them: rotary tables, causal mask).

The profile JSON keeps mllm's keys (``ori`` = signed max, ``top_0_1`` = signed 99.9th
percentile, ``all_stat`` = mean/std, per linear name and ``input``/``output``) so mllm's
exporters can read it; everything else sits under the ``edgeforge`` key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.analysis.layerwise import Group, Parts, head, run_groups, text_group
from common.analysis.layerwise_decode import VisualPrompt, prompt_group, vision_features
from common.analysis.observers import TensorObserver
from common.core.errors import EdgeforgeError
from common.core.progress import progress
from common.models import ModelAdapter, get_adapter, iter_linears
from common.models.streaming import StreamedModel
from common.quant.transforms import Transforms

PROFILE_FORMAT = "edgeforge-profile-v1"
SIDES = ("input", "output")


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
    :mod:`common.analysis.observers`). ``linears`` (``(name, role, linear)``) observes
    those instead of the adapter's, e.g. the linears of a target's own export wrappers.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        *,
        no_bias: bool = True,
        include_vision: bool = False,
        exact: bool = False,
        linears: Sequence[tuple[str, str, nn.Linear]] | None = None,
    ) -> None:
        self.no_bias = no_bias
        if linears is None:
            linears = list(
                iter_linears(adapter, include_lm_head=True, include_vision=include_vision)
            )
        self.linears = list(linears)
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


def _progress(total_tokens: int, desc: str) -> Any:
    return progress(total=total_tokens, desc=desc, unit="tok", unit_scale=True)


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


def profile_sequential(
    streamed: StreamedModel,
    windows: torch.Tensor,
    *,
    transforms: Transforms | None = None,
    no_bias: bool = True,
    vision_inputs: Sequence[Mapping[str, Any]] = (),
    exact: bool = False,
) -> ActivationProfiler:
    """Profile one part at a time (see the module docstring), each part transformed by
    ``transforms`` (rotation, online Hadamard) as it is read.

    ``vision_inputs`` (image prompts of a vision-language model, as for
    :func:`profile_model`): the vision tower is read first and turns every prompt's
    pictures into tokens, its linears observed; then each language layer runs the text
    windows and, after them, the prompts. Every linear sees its inputs in the whole
    model's order, so the statistics are the same. A model that runs its own code (Qwen1)
    has its blocks run with what the checkpoint's own stack would hand them.
    """
    adapter = streamed.adapter
    streamed.check_layerwise("profile it with SEQUENTIAL=0", text_windows=True)
    profiler = ActivationProfiler(
        adapter, no_bias=no_bias, include_vision=bool(vision_inputs), exact=exact
    )
    vision_tokens = sum(int(inputs["input_ids"].numel()) for inputs in vision_inputs)
    tokens = windows.numel() + vision_tokens
    bar = _progress(tokens * (adapter.num_layers + 1), "profile (sequential)")
    with profiler.attached():
        parts = Parts(adapter, streamed, transforms)
        prompts = []
        if vision_inputs:
            with parts.vision_tower() as tower:
                prompts = [VisualPrompt(i, vision_features(tower, i)) for i in vision_inputs]

        def groups(embed: nn.Module) -> list[Group]:
            text = text_group(adapter, embed, windows)
            return [text, *(prompt_group(adapter, embed, prompt) for prompt in prompts)]

        hidden = run_groups(parts, groups, bar=bar)
        with head(parts) as logits:
            for group in hidden:
                for i in range(group.shape[0]):
                    logits(group[i : i + 1])
                    bar.update(group.shape[1])
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

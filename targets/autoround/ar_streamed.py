"""``make autoround`` block by block: the mode, its memory estimate, and its measurements.

A text model whose formats auto-round packs and writes block by block (``auto_round``,
``auto_gptq``) never has to be whole in float32. AutoRound runs on its own disk-stream
path (:func:`ar_quantize.streamed`); the float reference and the round-to-nearest
baseline run one decoder layer at a time over :class:`~common.models.streaming.StreamedModel`
(:mod:`common.analysis.layerwise`: the same modules, inputs and mask as a whole-model
forward, so the same numbers bit for bit); the export is loaded as its users load it
(auto-round's loader), which holds its packed integer weights, not a float32 copy.

``auto_awq`` (its exporter moves the whole model) and GGUF (auto-round packs it after
tuning every block), vision-language models (the image prompt needs the whole model),
layers that are not plain causal attention and pickled ``.bin`` checkpoints (the
disk-stream reader reads safetensors) run whole, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ar_verify
import torch
import torch.nn.functional as F
from torch import nn

from common.core.errors import EdgeforgeError
from common.core.memory import Estimate
from common.models.streaming import StreamedModel

#: Formats auto-round packs and writes block by block while it tunes ("immediate saving").
STREAMED_FORMATS = ("auto_round", "auto_gptq")
#: What auto-round holds of the block it tunes, in multiples of its float32 weights: the
#: weights, the rounding state and gradients of its wrapped linears, the best rounding.
TUNED_BLOCK_COPIES = 4
#: What a tuning run holds beyond the runtime, whatever the block: auto-round's own
#: modules, its calibration cache and autograd's buffers. Fitted (with
#: :data:`TUNED_BLOCK_COPIES`) to the measured peaks of 64 MiB and 190 MiB blocks.
AUTOROUND_WORKING_BYTES = 900 * 2**20
#: What the verification holds beyond the runtime, the export and the comparison: auto-round's
#: modules (still loaded), the export loader's kernels and the heap the tuning left.
#: Measured at Qwen1.5-1.8B: 7.33 GiB peak in the verify phase.
VERIFY_WORKING_BYTES = 1280 * 2**20


def whole_model_reason(streamed: StreamedModel, formats: tuple[str, ...]) -> str | None:
    """Why this run must hold the whole model (None: it can run block by block)."""
    adapter = streamed.adapter
    if adapter.is_vision_language:
        return f"{adapter.model_type} is vision-language (the image prompt runs the whole model)"
    departures = adapter.attention_departures()
    if departures:
        return "; ".join(departures)
    if streamed.weights.mapped_bytes:
        return "the checkpoint is pickled .bin (auto-round streams safetensors)"
    whole = [fmt for fmt in formats if fmt not in STREAMED_FORMATS]
    if whole:
        return f"FORMAT {', '.join(whole)} is exported from the whole tuned model"
    return None


def estimate(
    streamed: StreamedModel, options: Any, eval_shape: tuple[int, int], planned: list[str]
) -> Estimate:
    """Peak of a block-by-block run: the larger of tuning (AutoRound's embedding and LM
    head, the block it tunes, the calibration activations, the shard being written) and
    verifying (the export as loaded, the reference's head and the hidden states of every
    held-out window). Loading the export costs no more than the export: 2.9 GiB peak for
    Qwen1.5-1.8B's 3.0 GiB ``auto_round`` folder, runtime included."""
    adapter = streamed.adapter
    hidden, ffn = adapter.hidden_size, adapter.intermediate_size
    embed = streamed.part_bytes(adapter.name_of("embed_tokens"))
    ends = embed if streamed.tied else 2 * embed
    batch = min(8, options.nsamples)
    weights = sum(streamed.part_bytes(name) for name in planned)  # float32, quantized
    groups = 1 if options.group_size == -1 else options.group_size
    packed = int(weights / 4 * (options.bits / 8 + 4 / groups))  # codes, fp16 scale + zero
    export = packed + streamed.weights.nbytes("") - weights  # the rest stays float32
    tuning = {
        "AutoRound's working memory": AUTOROUND_WORKING_BYTES,
        "AutoRound's embedding and LM head (float32)": ends,
        "the block being tuned": TUNED_BLOCK_COPIES * streamed.largest_layer_bytes(),
        "calibration activations": 4 * options.nsamples * options.seqlen * hidden * 4
        + batch * options.seqlen * (4 * ffn + 10 * hidden) * 4,
        "export shard being written": min(packed, 2**30),
    }
    windows, seq_len = eval_shape
    scoring = {
        "auto-round's modules and the loader's kernels": VERIFY_WORKING_BYTES,
        "export as loaded (float32 besides packed weights)": export,
        "reference LM head (float32)": embed,
        "hidden states of the held-out windows": 3 * windows * seq_len * hidden * 4,
        "one window's logits (float64)": 2 * seq_len * adapter.vocab_size * 8,
    }
    parts = max((tuning, scoring), key=lambda p: sum(p.values()))
    return Estimate("make autoround (one block at a time)", parts)


def lower_hint(options: Any, eval_windows: int) -> str:
    """What lowers a block-by-block run's peak."""
    return (
        f"lower NSAMPLES (now {options.nsamples}) or SEQLEN (now {options.seqlen}) for "
        f"tuning, EVAL_WINDOWS (now {eval_windows}) for verifying; the embedding, the LM "
        "head and the export as loaded are the floor"
    )


@dataclass
class Reference:
    """The float model's final hidden states of every held-out window (before the final
    norm) and each decoder layer's output on the first window."""

    hidden: torch.Tensor
    layers: dict[str, torch.Tensor]


def run_streamed(
    streamed: StreamedModel, windows: torch.Tensor, desc: str, after: Any = None
) -> Reference:
    """Every window through the layers, one layer read at a time (``after`` changes each
    layer's weights as it is read, e.g. round-to-nearest); ``desc`` names the bar."""
    from common.analysis.layerwise import Cursor, Parts, run_layers
    from common.core.progress import progress

    parts = Parts(streamed.adapter, streamed)
    if after is not None:
        parts = parts.then(after)
    cursor = Cursor()
    layers = {layer.name: layer.module for layer in streamed.adapter.layers()}
    total = windows.numel() * len(layers)
    bar = progress(total=total, desc=desc, unit="tok", unit_scale=True)
    with ar_verify.outputs_caught(layers, lambda: cursor.window == 0) as caught:
        hidden = run_layers(parts, windows, cursor=cursor, bar=bar)
    bar.close()
    return Reference(hidden, dict(caught))


def rtn_step(plan: list[tuple[str, nn.Module]], options: Any) -> Callable[[nn.Module], None]:
    """Round-to-nearest of the planned linears inside a part, applied as it is read (a
    streamed part keeps its module objects, so the planned ones are known by identity)."""
    from common.quant.rtn import apply_rtn

    by_id = {id(linear): name for name, linear in plan}

    def step(module: nn.Module) -> None:
        chosen = [(by_id[id(m)], m) for m in module.modules() if id(m) in by_id]
        if chosen:
            apply_rtn(chosen, options.bits, options.group_size, options.sym)

    return step


def score(
    candidate: torch.Tensor | Iterator[torch.Tensor],
    layers: dict[str, torch.Tensor],
    reference: Reference,
    streamed: StreamedModel,
    windows: torch.Tensor,
    compare_windows: int,
    similarity_keys: tuple[str, ...],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(candidate's numbers, float model's perplexity): perplexity over every window,
    logit similarity over the first ``compare_windows`` (as ``compare_logits`` gives
    them), per-layer output cosine on the first window. ``candidate`` is its logits per
    window, or its final hidden states when its head is the float one (RTN: the LM head
    is not planned). The float head is read once and serves both."""
    from common.analysis.eval import LogitComparison
    from common.analysis.layerwise import Parts, head

    every, first = LogitComparison(), LogitComparison()
    with head(Parts(streamed.adapter, streamed)) as logits_of:
        if isinstance(candidate, torch.Tensor):
            hidden = candidate
            candidate = (logits_of(hidden[i : i + 1])[0].float() for i in range(len(hidden)))
        for i, got in enumerate(candidate):
            want = logits_of(reference.hidden[i : i + 1])[0].float()
            every.add(got, want, windows[i])
            if i < compare_windows:
                first.add(got, want, windows[i])
    overall, similar = every.result(), first.result()
    result = {
        "ppl": overall["ppl"],
        **{key: similar[key] for key in similarity_keys},
        "layers": {
            name: F.cosine_similarity(layers[name], want, dim=-1).mean().item()
            for name, want in reference.layers.items()
        },
    }
    fp = {"ppl": overall["ppl_reference"], "nll": overall["nll_reference"],
          "tokens": overall["ppl_tokens"]}  # fmt: skip
    return result, fp


def model_logits(
    model: nn.Module, names: list[str], windows: torch.Tensor
) -> tuple[Iterator[torch.Tensor], dict[str, torch.Tensor]]:
    """A loaded model's logits per window (a generator) and, filled as it runs, its
    layers' outputs on the first window."""
    from common.analysis.eval import model_logits as one_window
    from common.core.progress import progress

    layers: dict[str, torch.Tensor] = {}

    def run() -> Iterator[torch.Tensor]:
        modules = {name: model.get_submodule(name) for name in names}
        window = -1

        bar = progress(windows, desc="export", unit="window")
        with ar_verify.outputs_caught(modules, lambda: window == 0) as caught:
            for window, ids in enumerate(bar):  # noqa: B007 (the hook reads it)
                with torch.inference_mode():
                    yield one_window(model, ids)
                layers.update(caught)

    return run(), layers


def check_mode(reason: str | None, sequential: bool | None, model_dir: Path) -> bool:
    """Whether to run block by block: where possible unless ``SEQUENTIAL=0``;
    ``SEQUENTIAL=1`` where it is not is one error line."""
    if sequential and reason is not None:
        raise EdgeforgeError(
            f"{model_dir}: SEQUENTIAL=1 (block by block) is not possible: {reason}; run it "
            "with SEQUENTIAL=0"
        )
    return reason is None if sequential is None else sequential

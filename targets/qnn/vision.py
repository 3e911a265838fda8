"""The vision tower on the HTP: its pieces quantized, compiled and checked like the
language pieces, and chained picture by picture into the embeddings the language chain
splices in.

The tower is cut into :mod:`common.export.vision_pieces` (``vision_embed``,
``vision_block_i``, ``vision_merger``) for the build's ``IMAGE_SIZE``. The float pieces run
in torch over every picture of ``IMAGES``, piece-major: the first picture's inputs and
outputs are each piece's golden pair, every picture's inputs its calibration, and an
observer on every linear (the patch embedding's included) gives the statistics their
encodings come from (:func:`common.backends.qdq.calibrated_plan`: the ``.mllm`` keeps the
tower float, so no profile plan covers it). Weights are rounded to nearest per channel.
Each piece then goes through :func:`pipeline.cached_piece` — QDQ, a binary per SoC, the
emulator against float and against CPU QDQ — and the pictures run through the binaries
one piece after another, so what reaches the language model is what the HTP computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pipeline  # this folder
import torch
from torch import nn

from common.analysis.profiling import ActivationProfiler
from common.backends import qdq
from common.core.progress import progress
from common.export import piece_export as pe
from common.export import vision_pieces as vp
from common.export.vision_export import similarity
from common.inputs.vl_preprocess import VisionGeometry
from common.models import ModelAdapter

Linears = list[tuple[str, str, nn.Linear]]


def piece_linears(adapter: ModelAdapter, name: str, module: nn.Module) -> Linears:
    """``(qualified name, role, linear)`` of every linear inside vision piece ``name``
    (``module``, its wrapper over the live tower)."""
    if name == vp.EMBED:
        return [(vp.patch_linear_name(adapter), vp.PATCH_ROLE, module.proj)]
    owner = adapter.vision_merger() if name == vp.MERGER else _block(adapter, name)
    return [(owner.linear_names[role], role, lin) for role, lin in owner.linears.items()]


def _block(adapter: ModelAdapter, name: str) -> Any:
    return adapter.vision_blocks()[int(name.rsplit("_", 1)[1])]


@dataclass(frozen=True)
class VisionReference:
    """The float side of the vision pieces for one build: golden pairs and calibration
    inputs per piece, and the linears' statistics on the calibration pictures."""

    names: list[str]
    golden: pipeline.Golden
    stats: dict[str, dict[str, Any]]


def reference(
    adapter: ModelAdapter, geo: VisionGeometry, pictures: Sequence[torch.Tensor], float_dir: Path
) -> VisionReference:
    """Export every vision piece into ``float_dir`` and run the float pieces over
    ``pictures`` (each the processor's flat ``pixel_values`` of one picture), piece-major,
    with every linear observed. The tower must be in memory."""
    golden = pipeline.Golden({}, {}, {})
    states = [p.to(torch.float32)[None] for p in pictures]  # batch 1, as the graphs
    pieces = list(vp.iter_vision_pieces(adapter, geo))
    linears = [entry for name, module in pieces for entry in piece_linears(adapter, name, module)]
    profiler = ActivationProfiler(adapter, linears=linears)
    width = int(adapter.vision_hidden_size)
    for name, module in pieces:
        vp.export_vision_piece(
            module, name, vp.piece_input(name, geo, width), float_dir / f"{name}.onnx"
        )
        first, _ = vp.io_names(name)
        feeds = [{first: x.numpy()} for x in states]
        with torch.no_grad(), profiler.attached():
            states = [module(x) for x in states]
        golden.inputs[name] = feeds[0]
        golden.outputs[name] = [states[0].numpy()]
        golden.calibration[name] = feeds
    return VisionReference([name for name, _ in pieces], golden, profiler.results())


def plan(ref: VisionReference, preset: str, model: str) -> qdq.QdqPlan:
    """The vision pieces' plan: ``preset``'s widths, weights rounded to nearest."""
    scheme = qdq.preset_by_name(preset).with_weights(rounding="nearest")
    return qdq.calibrated_plan(ref.stats, scheme, name=f"{model}-qnn-vision-{scheme.name}")


def build(
    setup: pipeline.PieceSetup,
    geo: VisionGeometry,
    ref: VisionReference,
    vision_plan: qdq.QdqPlan,
    levels_key: str,
    pictures: Sequence[torch.Tensor],
) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Every vision piece's report row (in call order), and each picture's merged tokens
    ``(1, n, H)`` as the binaries chain them. The tower must be in memory."""
    modules = dict(vp.iter_vision_pieces(setup.adapter, geo))
    rows: list[dict[str, Any]] = []
    states = [p.to(torch.float32)[None].numpy() for p in pictures]
    for name in progress(ref.names, desc="qnn vision", unit="piece"):
        linears = piece_linears(setup.adapter, name, modules[name])
        weights = {qualified: lin.weight.detach() for qualified, _, lin in linears}
        bits = vision_plan.scheme.weights.bits
        first, _ = vp.io_names(name)
        row, states = pipeline.cached_piece(
            setup, name, [{first: x} for x in states], nullcontext, lambda w=weights: w,
            plan=vision_plan, levels=qdq.nearest_levels(weights, bits),
            levels_key=levels_key, golden=ref.golden,
        )  # fmt: skip
        rows.append(row)
    return rows, states


def merged_similarity(
    chained: Sequence[np.ndarray], reference: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, float]:
    """The binaries' merged tokens against Hugging Face's own tower (``reference``: each
    picture's float features ``{"image": [n, H]}``), worst over the pictures."""
    each = [
        similarity(torch.from_numpy(got[0]), ref["image"].float())
        for got, ref in zip(chained, reference, strict=True)
    ]
    return {"cos": min(e["cosine"] for e in each), "max_abs": max(e["max_abs"] for e in each)}


def chained_prompt(
    adapter: ModelAdapter, inputs: Mapping[str, Any], features: np.ndarray,
    float_prompt: pipeline.Prompt,
) -> pipeline.Prompt:  # fmt: skip
    """The picture prompt ``inputs`` with the binaries' vision embeddings spliced in,
    checked against ``float_prompt``'s float reference (the float tower's embeddings)."""
    image = pe.multimodal_prompt(adapter, inputs, {"image": torch.from_numpy(features[0])})
    return pipeline.Prompt(image.token_ids, image, float_prompt.visual)

"""The vision-language side of ``make qnn``: the picture prompts, the vision tower on the
HTP (its pieces quantized, compiled and checked like the language pieces, and chained
picture by picture into the embeddings the language chain splices in), and the image
chain's prompts.

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

from common.analysis.layerwise import Parts
from common.analysis.layerwise_decode import VisualPrompt, reference_greedy
from common.analysis.profiling import ActivationProfiler
from common.backends import qdq
from common.core.errors import EdgeforgeError
from common.core.progress import progress
from common.export import piece_export as pe
from common.export import vision_pieces as vp
from common.export.vision_export import continued_inputs, similarity
from common.inputs.vl_preprocess import VisionGeometry
from common.models import ModelAdapter
from common.steps.phases import Run

Linears = list[tuple[str, str, nn.Linear]]

#: Tokens the image chain checks after each picture prompt (fewer where PREFILL_LEN ends
#: first): the float model's greedy continuation, teacher-forced through the prefill
#: binaries and decoded one position at a time by the decode binaries.
CHAIN_NEW_TOKENS = 8


def check_picture_profile(profile: dict[str, Any], path: Path, recipe_name: str) -> None:
    """A vision-language model's profile must have seen pictures: the picture tokens'
    activations (the vision embeddings in the residual stream) set ranges that text alone
    does not reach."""
    settings = profile["edgeforge"].get("settings") or {}
    if not settings.get("images"):
        raise EdgeforgeError(
            f"{path}: made from text only, but {recipe_name} is vision-language and its "
            "ranges must cover picture tokens; run make profile MODEL="
            f"{recipe_name} IMAGES=data/images (make qnn does when no profile exists)"
        )


@dataclass(frozen=True)
class PicturePrompts:
    """A vision-language model's picture prompts as processor inputs, one per picture of
    IMAGES, in the same order (the same pixels) in both lists: ``calibration`` asks make
    profile's instruction (what the profile's picture statistics came from), ``check``
    the recipe's prompt (the end-to-end check)."""

    paths: list[Path]
    calibration: list[dict[str, Any]]
    check: list[dict[str, Any]]
    check_prompt: str
    geometry: VisionGeometry


def picture_prompts(
    model_dir: Path, images: Path, requested: int, check_prompt: str, prefill_len: int,
    run: Run,
) -> PicturePrompts:  # fmt: skip
    """The picture prompts of every picture in ``images`` at ``requested`` px (rounded to
    the patch x merge grid, with a note), after checking each fits the prefill graph (no
    weights are read)."""
    from common.export.vision_export import image_prompt_inputs
    from common.inputs.vl_preprocess import geometry, list_frames, snap_size
    from common.models.loading import load_processor
    from common.steps.profile_step import IMAGE_PROMPT

    paths = list_frames(Path(images), "IMAGES")
    prompts = [IMAGE_PROMPT, check_prompt]
    processor = load_processor(model_dir)
    size, note = snap_size(processor, requested, "IMAGE_SIZE")
    if note:
        run.log(note)
    pairs = image_prompt_inputs(processor, prompts, paths, size)
    calibration, check = [p[0] for p in pairs], [p[1] for p in pairs]
    longest = max(int(inputs["input_ids"].shape[1]) for inputs in calibration + check)
    if longest >= prefill_len:  # the image chain checks at least one generated token
        raise EdgeforgeError(
            f"PREFILL_LEN={prefill_len} is too short for the picture prompts: the longest is "
            f"{longest} tokens at IMAGE_SIZE={size}, and the image chain decodes at least one "
            f"token after it; raise PREFILL_LEN to at least {longest + 1} (and KV_LEN above "
            "it) or lower IMAGE_SIZE"
        )
    return PicturePrompts(paths, calibration, check, check_prompt, geometry(processor, size))


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
        first, _ = vp.io_names(name)
        row, chained = pipeline.cached_piece(
            setup, name, [{first: x} for x in states], nullcontext, lambda w=weights: w,
            plan=vision_plan, levels=qdq.nearest_levels(weights, vision_plan.scheme.weights),
            levels_key=levels_key, golden=ref.golden,
        )  # fmt: skip
        rows.append(row)
        states = [outs[0] for outs in chained]
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


def continuation(
    parts: Parts, inputs: Mapping[str, Any], prompt: pipeline.Prompt, prefill_len: int,
    new_tokens: int = CHAIN_NEW_TOKENS,
) -> tuple[dict[str, Any], VisualPrompt, range]:  # fmt: skip
    """The picture prompt ``inputs`` followed by the float model's greedy continuation of
    up to ``new_tokens`` tokens (as many as the prefill graph holds after it), given the
    float tower's embeddings (``prompt.visual``, read layer by layer through ``parts``):
    the continued processor inputs, the float reference of them, and the positions of the
    generated tokens."""
    if prompt.visual is None:
        raise EdgeforgeError("image chain: a text prompt has no picture to continue after")
    count = min(new_tokens, prefill_len - len(prompt.ids))
    tokens = reference_greedy(parts, prompt.visual, count)
    continued = continued_inputs(inputs, tokens)
    start = len(prompt.ids)
    return continued, VisualPrompt(continued, prompt.visual.features), range(start, start + count)


def chained_prompt(
    adapter: ModelAdapter, features: np.ndarray, inputs: Mapping[str, Any],
    reference: VisualPrompt, generated: range,
) -> pipeline.Prompt:  # fmt: skip
    """The continued picture prompt ``inputs`` (:func:`continuation`) with the vision
    binaries' merged tokens ``features`` ``(1, n, H)`` spliced in, checked against
    ``reference`` (the float tower's embeddings); the decode binaries run at the
    ``generated`` positions."""
    image = pe.multimodal_prompt(adapter, inputs, {"image": torch.from_numpy(features[0])})
    return pipeline.Prompt(image.token_ids, image, reference, tuple(generated))

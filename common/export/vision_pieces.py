"""A Qwen2-VL / Qwen2.5-VL vision tower cut into static-shape pieces, one graph each.

:mod:`common.export.vision_export` exports the tower as one graph (what AXERA's Pulsar2
compiles). An NPU flow that quantizes and verifies graph by graph (QNN's HTP: per-piece
QDQ, one context binary each, checked against float piece by piece) takes it in the
pieces a ViT is made of, for one square input size:

* ``vision_embed``: ``pixel_values`` — the processor's flat patches of one picture
  ``(1, N, C·T·p·p)``, the rows HF's own tower reads — through the patch embedding (a
  Conv3d whose kernel equals its stride, i.e. one linear per patch, exported as that
  linear), then permuted into window order (Qwen2.5-VL) → ``vision_states_out``
  ``(1, N, D)``, the next piece's ``vision_states``;
* ``vision_block_i``: one pre-norm block with its rotary table, and its full-attention or
  window-attention mask, frozen in as constants (:func:`vision_export.frozen_tables`);
* ``vision_merger``: the 2×2 patch merger, back in the processor's order →
  ``hidden_states_out`` ``(1, N/4, out_hidden)``, the rows the language model splices in.

Every linear reads a batch-1 3-D tensor, as the language pieces' do: the exporter then
writes ``MatMul`` + ``Add`` (the QDQ step finds a linear by its ``MatMul`` weight and
encodes its pre-bias output), where 2-D rows give a ``Gemm`` or a 2-D ``MatMul`` — and
on the HTP a biased 2-D ``MatMul`` with per-channel int8 weights computed garbage
(tiny Qwen2-VL qkv: cos 0.11 against the same QDQ graph on the CPU).

Masks use the finite :data:`~common.models.static_decoder.MASK_BLOCKED` the language
pieces use: a quantizer turns a constant ``finfo.min`` into a grid no value survives on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from common.core.errors import EdgeforgeError
from common.export.onnx_files import onnx_destination
from common.export.vision_export import OUTPUT_NAME, MaskedVisionBlock, frozen_tables
from common.inputs.vl_preprocess import VisionGeometry
from common.models.base import ModelAdapter, VisionMerger
from common.models.static_decoder import MASK_BLOCKED

EMBED = "vision_embed"
MERGER = "vision_merger"
#: The processor's flat patches of one picture: the embed piece's input.
PIXELS = "pixel_values"
#: Rows between pieces (window order for Qwen2.5-VL): a piece's input and its output.
STATES = "vision_states"
STATES_OUT = "vision_states_out"
#: The role of the patch embedding's linear in quant plans.
PATCH_ROLE = "patch_embed"


def block_name(index: int) -> str:
    return f"vision_block_{index}"


def piece_names(adapter: ModelAdapter) -> list[str]:
    """Every vision piece of ``adapter``, in the order a runtime calls them."""
    return [EMBED, *(block_name(i) for i in range(len(adapter.vision_blocks()))), MERGER]


def io_names(name: str) -> tuple[str, str]:
    """``(input, output)`` tensor names of piece ``name``."""
    first = PIXELS if name == EMBED else STATES
    return first, OUTPUT_NAME if name == MERGER else STATES_OUT


def patch_linear_name(adapter: ModelAdapter) -> str:
    """The qualified name the patch embedding's linear goes by in plans and reports."""
    return f"{adapter.name_of('vision_patch_embed')}.proj"


class PatchEmbedPiece(nn.Module):
    """Flat patches ``(1, N, C·T·p·p)`` → embedded rows in window order ``(1, N, D)``."""

    def __init__(self, patch_embed: nn.Module, order: torch.Tensor | None, unit: int) -> None:
        super().__init__()
        conv = getattr(patch_embed, "proj", None)
        if not isinstance(conv, nn.Conv3d) or conv.kernel_size != conv.stride:
            raise EdgeforgeError(
                "vision patch embedding: expected a Conv3d 'proj' whose kernel equals its "
                f"stride (one linear per patch), got {type(conv).__name__}"
            )
        weight = conv.weight.detach()
        self.proj = nn.Linear(weight[0].numel(), weight.shape[0], bias=conv.bias is not None)
        with torch.no_grad():
            self.proj.weight.copy_(weight.reshape(weight.shape[0], -1))
            if conv.bias is not None:
                self.proj.bias.copy_(conv.bias.detach())
        self.order = order
        self.unit = unit

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.proj(pixel_values)
        if self.order is None:
            return x
        _, rows, width = x.shape
        return x.reshape(rows // self.unit, self.unit, width)[self.order].reshape(1, rows, width)


class VisionBlockPiece(nn.Module):
    """One block over ``(1, N, D)`` rows with its rotary table and mask as constants."""

    def __init__(
        self, block: MaskedVisionBlock, cos: torch.Tensor, sin: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.block = block
        self.register_buffer("cos", cos.contiguous(), persistent=False)
        self.register_buffer("sin", sin.contiguous(), persistent=False)
        self.bias = None if bias is None else bias.clamp_min(MASK_BLOCKED)

    def forward(self, vision_states: torch.Tensor) -> torch.Tensor:
        return self.block(vision_states, self.cos, self.sin, self.bias)


class MergerPiece(nn.Module):
    """``(1, N, D)`` rows → merged tokens ``(1, N/4, out_hidden)`` in the processor's
    order: the merger's norm, each 2×2 group's rows side by side, its MLP (Hugging
    Face's ``forward`` flattens to 2-D rows, so it is not called)."""

    def __init__(self, merger: VisionMerger, unit: int, reverse: torch.Tensor | None) -> None:
        super().__init__()
        mlp = getattr(merger.module, "mlp", None)
        if not isinstance(mlp, nn.Module):
            raise EdgeforgeError(f"{merger.name}: expected the patch merger's 'mlp' module")
        self.norm = merger.norm
        self.mlp = mlp
        self.unit = unit
        self.reverse = reverse

    def forward(self, vision_states: torch.Tensor) -> torch.Tensor:
        _, rows, width = vision_states.shape
        grouped = self.norm(vision_states).reshape(1, rows // self.unit, self.unit * width)
        merged = self.mlp(grouped)
        return merged if self.reverse is None else merged[:, self.reverse]


def iter_vision_pieces(
    adapter: ModelAdapter, geo: VisionGeometry
) -> Iterator[tuple[str, nn.Module]]:
    """``(name, wrapper)`` of every vision piece, over the live modules of the tower (which
    must be in memory, e.g. inside :meth:`~common.analysis.layerwise.Parts.vision_tower`)."""
    if not adapter.is_vision_language:
        raise EdgeforgeError(f"{adapter.model_type} has no vision tower")
    tables = frozen_tables(adapter, geo)
    unit = geo.merge_size * geo.merge_size
    yield EMBED, PatchEmbedPiece(adapter.vision_patch_embed(), tables.order, unit)
    heads = int(adapter.vision_num_heads)
    for index, (block, windowed) in enumerate(
        zip(adapter.vision_blocks(), tables.windowed_blocks, strict=True)
    ):
        bias = tables.window_bias if windowed else tables.full_bias
        piece = VisionBlockPiece(MaskedVisionBlock(block, heads), tables.cos, tables.sin, bias)
        yield block_name(index), piece
    yield MERGER, MergerPiece(adapter.vision_merger(), unit, tables.reverse)


def piece_input(name: str, geo: VisionGeometry, width: int) -> torch.Tensor:
    """A zero input of piece ``name`` (``width``: the blocks' hidden size)."""
    if name == EMBED:
        return torch.zeros(1, geo.patches, geo.channels * geo.width)
    return torch.zeros(1, geo.patches, width)


#: Opset of the vision pieces: 20 exports the merger's exact GELU as one ``Gelu`` node
#: (HTP has it; at 17 it is decomposed around an ``Erf``, which HTP lacks), and keeps
#: LayerNorm one node.
OPSET = 20


def export_vision_piece(module: nn.Module, name: str, example: torch.Tensor, dest: Path) -> Path:
    """Export one piece at its fixed shape to ``dest`` (opset :data:`OPSET`), written
    atomically."""
    first, out = io_names(name)
    module = module.eval().requires_grad_(False)
    with onnx_destination(dest) as tmp, torch.no_grad():
        torch.onnx.export(
            module, (example,), str(tmp), input_names=[first], output_names=[out],
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )  # fmt: skip
    return dest

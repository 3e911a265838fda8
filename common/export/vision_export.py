"""Static-shape ONNX export of a Qwen2-VL / Qwen2.5-VL vision encoder, and its checks.

NPU compilers need one fixed graph: no ``cu_seqlens``-driven varlen attention, no
``grid_thw`` arithmetic, no Python loops over images. For one square input size all of
that depends only on the size, so it is computed once here and frozen into the graph
(as AXERA's ``modeling_qwen2_5_vl_export.py`` does): the 2-D rotary cos/sin table,
Qwen2.5-VL's window index and its inverse, and the full-attention and window-attention
masks as additive biases for an explicit ``softmax(QKᵀ/√d + bias)·V``. The graph takes one
temporal step as an NCHW float tensor ``(1, 3, gh·gw, T·p·p)`` named ``hidden_states``
(the normalised uint8 picture of :mod:`common.inputs.vl_preprocess`) and returns the merged
tokens ``(gh·gw/4, out_hidden)`` as ``hidden_states_out``. Videos run step by step: rotary
positions and windows repeat per step, so the concatenated step outputs equal the
whole-video output (checked by :func:`compare_video_steps`).

Modules are reached only through the model adapter; the wrapper reuses the live patch
embedding, norms, linears, MLPs and merger, so it computes with the checkpoint's weights.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.core.errors import EdgeforgeError
from common.export.onnx_files import data_file, onnx_destination
from common.inputs.vl_preprocess import VisionGeometry
from common.models.base import ModelAdapter

INPUT_NAME = "hidden_states"
OUTPUT_NAME = "hidden_states_out"
#: The lowest opset the exported ops need (AXERA's flow uses 16).
OPSET = 16


@dataclass(frozen=True)
class FrozenTables:
    """Everything shape-dependent of one temporal step, in the order the blocks see rows.

    ``order`` permutes merge groups into window order (None: identity), ``reverse`` undoes
    it on the merged tokens; a bias is None when it would mask nothing.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    order: torch.Tensor | None
    reverse: torch.Tensor | None
    full_bias: torch.Tensor | None
    window_bias: torch.Tensor | None
    windowed_blocks: tuple[bool, ...]


def segment_bias(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor | None:
    """Additive ``[N, N]`` bias that lets rows attend only within their segment.

    ``cu_seqlens`` are the cumulative segment ends HF's varlen attention uses; a single
    segment masks nothing (None), so no add is exported for it.
    """
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != length:
        raise EdgeforgeError(f"segment bounds {bounds} do not cover {length} rows")
    if len(bounds) == 2:
        return None
    lengths = torch.tensor([b - a for a, b in itertools.pairwise(bounds)])
    segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    same = segment[:, None] == segment[None, :]
    return torch.where(same, 0.0, torch.finfo(torch.float32).min).to(torch.float32)


def frozen_tables(adapter: ModelAdapter, geo: VisionGeometry) -> FrozenTables:
    """Rotary table, window permutation and masks for one ``geo.size`` temporal step."""
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    grid_thw = torch.tensor([[1, geo.grid, geo.grid]])
    positions = get_vision_position_ids(grid_thw, geo.merge_size)
    rotary = adapter.vision_rotary_embedding()
    with torch.no_grad():
        cos, sin = rotary(positions.float(), positions)
    unit = geo.merge_size * geo.merge_size
    blocks = len(adapter.vision_blocks())
    full_bias = segment_bias(get_vision_cu_seqlens(grid_thw), geo.patches)
    window = adapter.vision_window_attention
    if window is None:
        return FrozenTables(cos, sin, None, None, full_bias, None, (False,) * blocks)
    window_size, full_blocks = window
    order, cu_window = get_vision_window_index(
        grid_thw, spatial_merge_size=geo.merge_size, window_size=window_size,
        patch_size=geo.patch_size,
    )  # fmt: skip

    def permute(table: torch.Tensor) -> torch.Tensor:
        return table.reshape(-1, unit, table.shape[-1])[order].reshape(table.shape)

    return FrozenTables(
        cos=permute(cos),
        sin=permute(sin),
        order=order,
        reverse=torch.argsort(order),
        full_bias=full_bias,
        window_bias=segment_bias(cu_window, geo.patches),
        windowed_blocks=tuple(i not in full_blocks for i in range(blocks)),
    )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class MaskedVisionBlock(nn.Module):
    """A pre-norm ViT block with explicit masked attention in place of varlen kernels."""

    def __init__(self, block: Any, num_heads: int) -> None:
        super().__init__()
        self.norm1 = block.input_norm
        self.qkv = block.linears["qkv"]
        self.proj = block.linears["proj"]
        self.norm2 = block.post_attention_norm
        self.mlp = block.mlp
        self.num_heads = num_heads

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        rows = x.shape[-2]  # x is (rows, D), or (1, rows, D) in a per-piece graph
        qkv = self.qkv(self.norm1(x)).reshape(rows, 3, self.num_heads, -1).permute(1, 2, 0, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (heads, rows, head_dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        scores = torch.matmul(q, k.transpose(1, 2)) * (q.shape[-1] ** -0.5)
        if bias is not None:
            scores = scores + bias
        attended = torch.matmul(torch.softmax(scores, dim=-1), v)
        x = x + self.proj(attended.transpose(0, 1).reshape(*x.shape[:-1], -1))
        return x + self.mlp(self.norm2(x))


class VisionEncoderExport(nn.Module):
    """One temporal step ``(1, 3, N, W)`` → merged tokens ``(N/4, out_hidden)``."""

    def __init__(self, adapter: ModelAdapter, geo: VisionGeometry) -> None:
        super().__init__()
        if not adapter.is_vision_language:
            raise EdgeforgeError(f"{adapter.model_type} has no vision tower to export")
        self.geo = geo
        tables = frozen_tables(adapter, geo)
        self.patch_embed = adapter.vision_patch_embed()
        heads = int(adapter.vision_num_heads)
        self.blocks = nn.ModuleList(MaskedVisionBlock(b, heads) for b in adapter.vision_blocks())
        self.merger = adapter.vision_merger().module
        self.windowed = tables.windowed_blocks
        self.register_buffer("cos", tables.cos.contiguous(), persistent=False)
        self.register_buffer("sin", tables.sin.contiguous(), persistent=False)
        self.order = tables.order
        self.reverse = tables.reverse
        self.full_bias = tables.full_bias
        self.window_bias = tables.window_bias

    def block_outputs(self, hidden_states: torch.Tensor) -> Iterator[torch.Tensor]:
        """Rows after each block (window order), then the merged tokens (original order)."""
        geo = self.geo
        if tuple(hidden_states.shape) != (1, geo.channels, geo.patches, geo.width):
            raise EdgeforgeError(
                f"{INPUT_NAME}: expected (1, {geo.channels}, {geo.patches}, {geo.width}), "
                f"got {tuple(hidden_states.shape)}"
            )
        x = hidden_states[0].permute(1, 0, 2).reshape(geo.patches, geo.channels * geo.width)
        x = self.patch_embed(x)
        unit = geo.merge_size * geo.merge_size
        if self.order is not None:
            x = x.reshape(geo.patches // unit, unit, -1)[self.order].reshape(geo.patches, -1)
        for block, windowed in zip(self.blocks, self.windowed, strict=True):
            x = block(x, self.cos, self.sin, self.window_bias if windowed else self.full_bias)
            yield x
        merged = self.merger(x)
        yield merged if self.reverse is None else merged[self.reverse]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        *_, merged = self.block_outputs(hidden_states)
        return merged


def export_onnx(wrapper: VisionEncoderExport, dest: Path) -> dict[str, Any]:
    """Export ``wrapper`` to ``dest`` and describe the file.

    A tower over :data:`common.export.onnx_files.EXTERNAL_DATA_BYTES` (Qwen2-VL's and
    Qwen2.5-VL's are 2.5 GiB fp32) keeps its weights in ``<dest>.data`` beside it. Shape
    inference and the checker read the file by path, never a serialized copy of the whole
    proto, which protobuf refuses past 2 GiB. No simplifier runs: onnxsim does not support
    the pinned onnx, and the graph is already free of shape arithmetic (sizes are
    constants), so only shape inference is applied.
    """
    import onnx

    geo = wrapper.geo
    dummy = torch.zeros(1, geo.channels, geo.patches, geo.width)
    with onnx_destination(dest) as raw:
        with torch.no_grad(), warnings.catch_warnings():
            # The input-shape check is a Python branch; tracing it at the one shape is intended.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # torch's TorchScript exporter
            out_shape = list(wrapper(dummy).shape)
            torch.onnx.export(
                wrapper, (dummy,), str(raw), input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], opset_version=OPSET, dynamo=False,
                do_constant_folding=True,
            )  # fmt: skip
        onnx.shape_inference.infer_shapes_path(str(raw))  # in place; tensor files stay put
    onnx.checker.check_model(str(dest))
    data = data_file(dest)
    return {
        "file": dest.name,
        "external_data": data.name if data.is_file() else None,
        "opset": OPSET,
        "input": {INPUT_NAME: [1, geo.channels, geo.patches, geo.width]},
        "output": {OUTPUT_NAME: out_shape},
        "simplifier": "skipped: onnxsim does not support onnx>=1.18 (pinned onnx); "
        "shapes are static, shape inference applied",
    }  # fmt: skip


def onnx_session(path: Path) -> Any:
    """A CPU onnxruntime session with deterministic single-threaded kernels."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx_steps(session: Any, nchw: torch.Tensor) -> torch.Tensor:
    """Run the step graph over every temporal step of ``(steps, 3, N, W)``; concatenate."""
    outs = [
        session.run([OUTPUT_NAME], {INPUT_NAME: nchw[i : i + 1].numpy()})[0]
        for i in range(nchw.shape[0])
    ]
    return torch.from_numpy(np.concatenate(outs, axis=0))


def similarity(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Cosine of the flattened tensors and the max absolute difference (float64 math)."""
    if got.shape != ref.shape:
        raise EdgeforgeError(f"shape mismatch: {tuple(got.shape)} vs {tuple(ref.shape)}")
    a, b = got.double().flatten(), ref.double().flatten()
    cosine = float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300))
    return {"cosine": cosine, "max_abs": float((a - b).abs().max())}


def torch_vision_features(
    adapter: ModelAdapter, flat: torch.Tensor, grid_thw: torch.Tensor
) -> torch.Tensor:
    """The unmodified Hugging Face vision tower's merged tokens for HF-layout patches."""
    with torch.no_grad():
        return adapter.vision_tower()(flat, grid_thw=grid_thw).pooler_output


def per_block_similarity(
    adapter: ModelAdapter, wrapper: VisionEncoderExport, flat: torch.Tensor,
    grid_thw: torch.Tensor, nchw_step: torch.Tensor,
) -> list[dict[str, Any]]:  # fmt: skip
    """Each block's output in the export wrapper vs Hugging Face's own tower (one step)."""
    captured: list[torch.Tensor] = []
    blocks = adapter.vision_blocks()
    hooks = [
        b.module.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
        for b in blocks
    ]
    try:
        reference_merged = torch_vision_features(adapter, flat, grid_thw)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        ours = list(wrapper.block_outputs(nchw_step))
    rows = [
        {"layer": b.name, **similarity(o, r)}
        for b, o, r in zip(blocks, ours[:-1], captured, strict=True)
    ]
    merger = adapter.vision_merger()
    rows.append({"layer": merger.name, **similarity(ours[-1], reference_merged)})
    return rows


@contextlib.contextmanager
def vision_features_replaced(adapter: ModelAdapter, features: torch.Tensor) -> Iterator[None]:
    """Within the block, the vision tower's merged tokens are ``features`` (e.g. from ONNX).

    A forward hook swaps the output, so the language model, M-RoPE positions and
    placeholder scatter are Hugging Face's own: only the vision numbers change.
    """

    def swap(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if output.pooler_output.shape != features.shape:
            raise EdgeforgeError(
                f"vision features {tuple(features.shape)} do not match the prompt's "
                f"{tuple(output.pooler_output.shape)}"
            )
        output.pooler_output = features.to(output.pooler_output.dtype)
        return output

    hook = adapter.vision_tower().register_forward_hook(swap)
    try:
        yield
    finally:
        hook.remove()


def greedy_tokens(model: nn.Module, inputs: dict[str, Any], new_tokens: int) -> list[int]:
    """Exactly ``new_tokens`` greedy tokens after the prompt, each the model's own argmax:
    EOS neither stops the run nor is suppressed (as the layer-by-layer
    :func:`common.analysis.layerwise_decode.reference_greedy` decodes), so the comparison
    always covers the same length and equals what a runtime's argmax loop emits."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    saved = model.generation_config
    # generate() fills unset options (EOS among them) from the model's own config, and
    # min_new_tokens would then push EOS down; with this config there is no EOS to use.
    model.generation_config = config
    try:
        with torch.no_grad():
            out = model.generate(**inputs, generation_config=config)
    finally:
        model.generation_config = saved
    return [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]


def prompt_logits(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Logits over the whole prompt (vision tokens included), one forward pass."""
    with torch.no_grad():
        return model(**inputs).logits[0]


def continued_inputs(inputs: Mapping[str, Any], tokens: Sequence[int]) -> dict[str, Any]:
    """Processor ``inputs`` of one prompt followed by ``tokens`` (text the model went on
    to generate): what the model's own rope index, the float reference and the pieces take
    for the prompt and its continuation, teacher-forced."""
    ids = inputs["input_ids"]
    extra = torch.tensor([list(tokens)], dtype=ids.dtype)
    out = {**inputs, "input_ids": torch.cat([ids, extra], dim=1)}
    for key, fill in (("attention_mask", 1), ("mm_token_type_ids", 0)):
        if key in inputs:
            pad = torch.full(extra.shape, fill, dtype=inputs[key].dtype)
            out[key] = torch.cat([inputs[key], pad], dim=1)
    return out


def vl_prompt_inputs(
    processor: Any, prompt: str, frames: Sequence[np.ndarray], geo: VisionGeometry, mode: str
) -> dict[str, Any]:
    """Processor inputs for one user turn holding the frames (image: one per frame;
    video: one clip) and ``prompt``, with the processor's resize kept the identity."""
    from common.inputs.vl_preprocess import processor_kwargs

    item = [{"type": "image"} for _ in frames] if mode == "image" else [{"type": "video"}]
    messages = [{"role": "user", "content": [*item, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    size = processor_kwargs(geo)
    if mode == "image":
        return dict(processor(text=[text], images=list(frames), images_kwargs=size,
                              return_tensors="pt"))  # fmt: skip
    return dict(processor(
        text=[text], videos=[np.stack(frames)], return_tensors="pt",
        videos_kwargs={**size, "do_sample_frames": False, "cap_pixels_per_frame": False},
    ))  # fmt: skip


def image_prompt_inputs(
    processor: Any, prompts: Sequence[str], images: Sequence[Path], size: int
) -> list[list[dict[str, Any]]]:
    """Processor inputs of each of ``images`` (square-resized to ``size`` px, a multiple of
    patch·merge) then each of ``prompts``, in one user turn, as ``[image][prompt]``: what
    the image checks and calibrations feed both Hugging Face and the nets. Each picture
    is read and resized once, whatever the number of prompts."""
    from common.inputs.vl_preprocess import geometry, prepare_frames

    geo = geometry(processor, size)
    out = []
    for image in images:
        frames = prepare_frames([image], geo, processor)
        out.append([vl_prompt_inputs(processor, text, frames, geo, "image") for text in prompts])
    return out

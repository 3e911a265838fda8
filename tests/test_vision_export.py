"""The static vision ONNX equals the PyTorch tower, step-wise video equals whole video,
and the language model fed ONNX features decodes the same greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.export import vision_export as ve
from common.inputs import vl_preprocess as vp
from common.models import get_adapter
from common.models.loading import load_model, load_processor

IMAGES = Path(__file__).resolve().parent.parent / "data" / "images"


@pytest.fixture(scope="module", params=["tiny_qwen2_5_vl_dir", "tiny_qwen2_vl_dir"])
def loaded(request: pytest.FixtureRequest):
    model_dir = request.getfixturevalue(request.param)
    model = load_model(model_dir)
    return model, get_adapter(model), load_processor(model_dir)


@pytest.mark.parametrize("mode", ["image", "video"])
def test_onnx_matches_torch_and_greedy(loaded, tmp_path: Path, mode: str) -> None:
    model, adapter, processor = loaded
    geo = vp.geometry(processor, 112)
    frames = vp.prepare_frames(vp.list_frames(IMAGES, "images"), geo, processor)
    clip = frames[:1] if mode == "image" else frames  # video: 4 frames = 2 steps
    layout, grid_thw = vp.uint8_layout(processor, clip, geo, mode)
    nchw = vp.to_nchw(vp.normalize_layout(layout, processor, mode))
    wrapper = ve.VisionEncoderExport(adapter, geo).eval()
    info = ve.export_onnx(wrapper, tmp_path / "v.onnx")
    assert info["input"] == {"hidden_states": [1, 3, 64, 392]}
    assert info["output"]["hidden_states_out"][0] == 16
    got = ve.run_onnx_steps(ve.onnx_session(tmp_path / "v.onnx"), nchw)
    flat, _ = vp.hf_patches(processor, clip, geo, mode, normalize=True)
    # For video, `ref` is the whole clip through the tower at once; `got` is step by step.
    ref = ve.torch_vision_features(adapter, flat, grid_thw)
    sim = ve.similarity(got, ref)
    assert sim["cosine"] >= 0.9999 and sim["max_abs"] < 1e-4
    inputs = ve.vl_prompt_inputs(processor, "What is shown?", clip, geo, mode)
    reference = ve.greedy_tokens(model, inputs, 6)
    with ve.vision_features_replaced(adapter, got):
        assert ve.greedy_tokens(model, inputs, 6) == reference
    # The swap really reaches the language model: other features change the logits.
    with ve.vision_features_replaced(adapter, torch.zeros_like(got)):
        changed = ve.prompt_logits(model, inputs)
    assert ve.similarity(changed, ve.prompt_logits(model, inputs))["max_abs"] > 1e-3


def test_per_block_and_export_is_reproducible(loaded, tmp_path: Path) -> None:
    _, adapter, processor = loaded
    geo = vp.geometry(processor, 112)
    frames = vp.prepare_frames(vp.list_frames(IMAGES, "images")[:1], geo, processor)
    layout, grid_thw = vp.uint8_layout(processor, frames, geo, "image")
    flat, _ = vp.hf_patches(processor, frames, geo, "image", normalize=True)
    wrapper = ve.VisionEncoderExport(adapter, geo).eval()
    nchw = vp.to_nchw(vp.normalize_layout(layout, processor))
    rows = ve.per_block_similarity(adapter, wrapper, flat, grid_thw, nchw)
    assert len(rows) == len(adapter.vision_blocks()) + 1
    assert all(r["cosine"] > 0.99999 for r in rows)
    ve.export_onnx(wrapper, tmp_path / "a.onnx")
    ve.export_onnx(wrapper, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_window_tables_for_qwen2_5_vl(tiny_qwen2_5_vl_dir: Path) -> None:
    model = load_model(tiny_qwen2_5_vl_dir)
    adapter = get_adapter(model)
    geo = vp.geometry(load_processor(tiny_qwen2_5_vl_dir), 224)  # 8×8 merged → 4 windows
    tables = ve.frozen_tables(adapter, geo)
    assert tables.windowed_blocks == (True, False)  # block 1 is the full-attention block
    assert tables.full_bias is None  # one step attends globally: no mask exported
    assert torch.equal(tables.order[tables.reverse], torch.arange(64))
    allowed = (tables.window_bias == 0).sum(dim=1)
    assert torch.all(allowed == 64)  # 4×4 merged tokens × 4 patches per window
    assert tables.cos.shape == (256, 16)


def test_segment_bias() -> None:
    bias = ve.segment_bias(torch.tensor([0, 2, 5]), 5)
    assert (bias[:2, :2] == 0).all() and (bias[2:, 2:] == 0).all()
    assert (bias[:2, 2:] < -1e30).all()
    assert ve.segment_bias(torch.tensor([0, 5]), 5) is None


@pytest.mark.parametrize("size", [56, 224])
def test_vision_pieces_chain_to_the_tower(loaded, tmp_path: Path, size: int) -> None:
    """The per-piece cut (patch embedding, each block, merger; 3-D batch-1 graphs) chained
    piece by piece, in torch and as exported ONNX, equals Hugging Face's tower; at 224 px
    Qwen2.5-VL's first block attends within 4 windows under the finite -1e4 mask."""
    import onnx
    import onnxruntime as ort

    from common.export import vision_pieces as pieces

    _, adapter, processor = loaded
    geo = vp.geometry(processor, size)
    frames = vp.prepare_frames(vp.list_frames(IMAGES, "images")[:1], geo, processor)
    flat, grid_thw = vp.hf_patches(processor, frames, geo, "image", normalize=True)
    reference = ve.torch_vision_features(adapter, flat, grid_thw)
    wrappers = list(pieces.iter_vision_pieces(adapter, geo))
    assert [name for name, _ in wrappers] == pieces.piece_names(adapter)
    x, onnx_x = flat[None], flat[None].numpy()
    for name, module in wrappers:
        path = pieces.export_vision_piece(
            module, name, pieces.piece_input(name, geo, adapter.vision_hidden_size),
            tmp_path / f"{name}.onnx",
        )  # fmt: skip
        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert "Gemm" not in ops and "Erf" not in ops, (name, ops)
        with torch.no_grad():
            x = module(x)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (onnx_x,) = session.run(None, {pieces.io_names(name)[0]: onnx_x})
    assert x.shape == (1, geo.tokens, reference.shape[-1])
    assert ve.similarity(x[0], reference)["cosine"] > 0.99999
    assert ve.similarity(torch.from_numpy(onnx_x[0]), reference)["cosine"] > 0.99999
    windowed = any(m.bias is not None for n, m in wrappers if n.startswith("vision_block"))
    assert windowed == (size == 224 and adapter.model_type == "qwen2_5_vl")

"""The uint8 patch picture is a lossless re-layout of Hugging Face's ``pixel_values``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.core.errors import EdgeforgeError
from common.inputs import vl_preprocess as vp
from common.models.loading import load_processor

IMAGES = Path(__file__).resolve().parent.parent / "data" / "images"


@pytest.fixture(scope="module")
def processor(tiny_qwen2_5_vl_dir: Path):
    return load_processor(tiny_qwen2_5_vl_dir)


@pytest.fixture(scope="module")
def frames(processor) -> list[np.ndarray]:
    geo = vp.geometry(processor, 112)
    return vp.prepare_frames(vp.list_frames(IMAGES, "images"), geo, processor)


@pytest.mark.parametrize("mode", ["image", "video"])
def test_normalised_layout_equals_hf_pixel_values(processor, frames, mode: str) -> None:
    geo = vp.geometry(processor, 112)
    # 3 frames: the video path must pad to 4 by repeating the last frame, as HF does.
    clip = frames[:3]
    layout, grid_thw = vp.uint8_layout(processor, clip, geo, mode)
    steps = 3 if mode == "image" else 2
    assert layout.dtype == torch.uint8
    assert tuple(layout.shape) == (steps, geo.patches, geo.width, 3) == (steps, 64, 392, 3)
    reference, ref_grid = vp.hf_patches(processor, clip, geo, mode, normalize=True)
    assert torch.equal(grid_thw, ref_grid)
    rebuilt = vp.from_layout(vp.normalize_layout(layout, processor, mode))
    assert rebuilt.dtype == reference.dtype == torch.float32
    assert torch.equal(rebuilt, reference)  # bit-exact, not approximately equal
    # The NCHW tensor (the ONNX input) holds the same numbers, channel-first per step.
    nchw = vp.to_nchw(vp.normalize_layout(layout, processor, mode))
    assert tuple(nchw.shape) == (steps, 3, 64, 392)
    assert torch.equal(nchw[0, 1], vp.normalize_layout(layout, processor, mode)[0, :, :, 1])


def test_picture_rows_are_patches_in_merge_order(processor) -> None:
    """Row r of the picture is patch r in 2×2-merge order; columns are (T, 14, 14)."""
    geo = vp.geometry(processor, 56)
    ramp = (np.arange(56 * 56 * 3) % 251).astype(np.uint8).reshape(56, 56, 3)
    layout, _ = vp.uint8_layout(processor, [ramp], geo, "image")
    # Patch 1 in merge order is the top-right patch of the first 2×2 window.
    expected = ramp[0:14, 14:28, :].reshape(196, 3)
    assert torch.equal(layout[0, 1, :196], torch.from_numpy(expected))
    assert torch.equal(layout[0, 1, 196:], layout[0, 1, :196])  # image = 2 equal frames
    # Patch 2 is the bottom-left one of the same window.
    assert torch.equal(layout[0, 2, :196], torch.from_numpy(ramp[14:28, 0:14].reshape(196, 3)))


def test_normalization_constants_are_clip_times_255(processor) -> None:
    mean, std = vp.normalization(processor)
    assert mean == pytest.approx([122.7709383, 116.7460125, 104.09373615], abs=1e-6)
    assert std == pytest.approx([68.5005327, 66.6321579, 70.32316305], abs=1e-6)


def test_round_size_like_hf() -> None:
    assert vp.round_size(448, 28, "--image-size") == (448, None)
    size, note = vp.round_size(450, 28, "--image-size")
    assert size == 448 and "rounded to 448" in note
    with pytest.raises(EdgeforgeError, match="--image-size: 20 px is smaller than one merge"):
        vp.round_size(20, 28, "--image-size")


def test_bad_frames_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(EdgeforgeError, match=r"broken\.jpg: not a readable image"):
        vp.load_frame(tmp_path / "broken.jpg", 28)
    small = tmp_path / "small.png"
    from PIL import Image

    Image.new("RGB", (27, 60)).save(small)
    with pytest.raises(EdgeforgeError, match=r"small.png: 27×60 px is smaller than one merge"):
        vp.load_frame(small, 28)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EdgeforgeError, match="has no images"):
        vp.list_frames(empty, "--calib-dir")

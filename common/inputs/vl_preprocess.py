"""Qwen2-VL / Qwen2.5-VL pixels as a uint8 "picture" an NPU can normalise itself.

Hugging Face's processor turns frames into a float matrix ``(grid_t·gh·gw, C·T·p·p)``:
rescaled, CLIP-normalised and flattened in the 2×2-merge order. NPU compilers such as
AXERA's Pulsar2 want a uint8 image input instead, so normalisation can be folded into the
first layer and calibration can read ordinary image files. This module keeps everything
Hugging Face does *except* rescale/normalise (same resize kernel, same temporal padding,
same patch order, computed by the processor itself) and re-lays each temporal step out as
an HWC image of height ``gh·gw`` (patches in merge order), width ``T·p·p`` and 3 channels
(as AXERA's ``model_convert/preprocess.py`` does). The inverse functions
(normalise, re-flatten, NCHW) exist so a test can prove the layout is lossless against the
processor's own ``pixel_values``.

Deployment graphs have static shapes, so frames are first resized to an exact square
``size × size`` with the processor's kernel; the processor's own resize is then the
identity (``size`` is a multiple of ``patch·merge`` and within the pixel budget we pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.core.errors import EdgeforgeError

#: Still-image suffixes accepted in an image/frame folder (what PIL reads reliably).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass(frozen=True)
class VisionGeometry:
    """Static shapes of one square input size for a Qwen2-VL-family vision tower.

    ``patches`` rows per temporal step form the uint8 picture's height; ``width`` is
    ``temporal_patch·patch·patch`` (392 for the released models); ``tokens`` is what one
    step contributes to the language model after the 2×2 merge.
    """

    size: int
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    channels: int = 3

    @property
    def factor(self) -> int:
        """Side lengths must be multiples of this (one merge window in pixels)."""
        return self.patch_size * self.merge_size

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.size // self.patch_size

    @property
    def patches(self) -> int:
        return self.grid * self.grid

    @property
    def width(self) -> int:
        return self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def tokens(self) -> int:
        return self.patches // (self.merge_size * self.merge_size)

    def steps(self, num_frames: int) -> int:
        """Temporal steps for ``num_frames`` frames (padded by repeating the last one)."""
        return -(-num_frames // self.temporal_patch_size)


def round_size(requested: int, factor: int, option: str) -> tuple[int, str | None]:
    """``requested`` rounded to a multiple of ``factor`` the way HF's ``smart_resize`` does.

    Returns the size and a note when it changed (callers print and record it). A size below
    one merge window cannot be patched at all and is an error naming ``option``.
    """
    if not isinstance(requested, int) or isinstance(requested, bool):
        raise EdgeforgeError(f"{option}: expected an integer side length, got {requested!r}")
    if requested < factor:
        raise EdgeforgeError(
            f"{option}: {requested} px is smaller than one merge window ({factor} px = "
            f"patch × merge); use at least {factor}"
        )
    rounded = max(factor, round(requested / factor) * factor)
    if rounded == requested:
        return rounded, None
    return rounded, (
        f"{option}: {requested} is not a multiple of {factor}; rounded to {rounded} as the "
        "Hugging Face processor would"
    )


def grid_factor(processor: Any) -> int:
    """Pixels of one merge window (patch·merge) under ``processor``: sides are multiples."""
    image_processor = processor.image_processor
    return int(image_processor.patch_size) * int(image_processor.merge_size)


def snap_size(processor: Any, requested: int, option: str) -> tuple[int, str | None]:
    """``requested`` rounded to the patch·merge grid of ``processor`` (:func:`round_size`)."""
    return round_size(requested, grid_factor(processor), option)


def geometry(processor: Any, size: int) -> VisionGeometry:
    """The geometry of ``size`` under a VL processor's patch/merge/temporal settings."""
    image_processor = processor.image_processor
    geo = VisionGeometry(
        size=size,
        patch_size=int(image_processor.patch_size),
        merge_size=int(image_processor.merge_size),
        temporal_patch_size=int(image_processor.temporal_patch_size),
    )
    if size % geo.factor:
        raise EdgeforgeError(f"size {size} is not a multiple of {geo.factor}; use round_size()")
    return geo


def list_frames(folder: Path, what: str) -> list[Path]:
    """Image files in ``folder`` (sorted by name, so frame order is the file order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgeforgeError(f"{what}: {folder} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise EdgeforgeError(
            f"{what}: {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); add a few frames"
        )
    return images


def load_frame(path: Path, factor: int) -> np.ndarray:
    """One image file as an RGB uint8 ``(H, W, 3)`` array, checked to be patchable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise EdgeforgeError(
            f"{path}: not a readable image ({exc}); remove or replace it"
        ) from None
    height, width = array.shape[:2]
    if min(height, width) < factor:
        raise EdgeforgeError(
            f"{path}: {width}×{height} px is smaller than one merge window ({factor}×{factor} px)"
        )
    return array


def resize_square(frame: np.ndarray, size: int, resample: int) -> np.ndarray:
    """``frame`` resized to ``size × size`` with the processor's kernel (torchvision,
    antialiased, uint8 in and out), as Hugging Face's torchvision backend resizes."""
    from torchvision.transforms.v2 import functional as tvf
    from transformers.image_utils import pil_torch_interpolation_mapping

    chw = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)
    if tuple(chw.shape[-2:]) == (size, size):
        return np.ascontiguousarray(frame)
    out = tvf.resize(
        chw, [size, size], interpolation=pil_torch_interpolation_mapping[resample], antialias=True
    )
    return out.permute(1, 2, 0).contiguous().numpy()


def processor_kwargs(geo: VisionGeometry) -> dict[str, Any]:
    """Processor call options that make its own resize the identity for ``geo.size``."""
    pixels = geo.size * geo.size
    return {"size": {"shortest_edge": pixels, "longest_edge": pixels}}


def hf_patches(
    processor: Any, frames: Sequence[np.ndarray], geo: VisionGeometry, mode: str, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The processor's own flat patches and ``grid_thw`` for square ``size`` frames.

    ``mode="image"`` treats each frame as an image (grid_t 1 each); ``"video"`` treats the
    frames as one clip. With ``normalize=False`` rescale and normalise are skipped and the
    patches stay uint8.
    """
    for frame in frames:
        if frame.shape != (geo.size, geo.size, geo.channels) or frame.dtype != np.uint8:
            raise EdgeforgeError(
                f"frames must be uint8 ({geo.size}, {geo.size}, 3) after resize_square, "
                f"got {frame.dtype} {frame.shape}"
            )
    options = {**processor_kwargs(geo), "return_tensors": "pt"}
    if not normalize:
        options.update(do_rescale=False, do_normalize=False)
    if mode == "image":
        out = processor.image_processor(images=list(frames), **options)
        return out["pixel_values"], out["image_grid_thw"]
    if mode == "video":
        out = processor.video_processor(
            videos=[np.stack(frames)], do_sample_frames=False, cap_pixels_per_frame=False, **options
        )
        return out["pixel_values_videos"], out["video_grid_thw"]
    raise EdgeforgeError(f"mode: expected 'image' or 'video', got {mode!r}")


def to_layout(flat: torch.Tensor, geo: VisionGeometry) -> torch.Tensor:
    """HF flat patches ``(steps·gh·gw, C·T·p·p)`` → ``(steps, gh·gw, T·p·p, C)``.

    HF's columns are ordered (C, T, p, p) and its rows already follow the merge order, so
    this is one reshape and one channel-last permute.
    """
    rows = flat.shape[0]
    if rows % geo.patches or flat.shape[1] != geo.channels * geo.width:
        raise EdgeforgeError(
            f"patches {tuple(flat.shape)} do not match {geo.size}×{geo.size} "
            f"({geo.patches} rows per step, {geo.channels * geo.width} columns)"
        )
    steps = rows // geo.patches
    layout = flat.reshape(steps, geo.patches, geo.channels, geo.width)
    return layout.permute(0, 1, 3, 2).contiguous()


def from_layout(layout: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_layout`: ``(steps, N, W, C)`` → ``(steps·N, C·W)``."""
    steps, patches, width, channels = layout.shape
    return layout.permute(0, 1, 3, 2).reshape(steps * patches, channels * width)


def uint8_layout(
    processor: Any, frames: Sequence[np.ndarray], geo: VisionGeometry, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(steps, gh·gw, T·p·p, 3)`` pictures and ``grid_thw`` for resized frames."""
    flat, grid_thw = hf_patches(processor, frames, geo, mode, normalize=False)
    if flat.dtype != torch.uint8:
        raise EdgeforgeError(f"processor returned {flat.dtype} patches without normalisation")
    return to_layout(flat, geo), grid_thw


def normalization(processor: Any, mode: str = "image") -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0..255 scale (CLIP × 255 for released models).

    These are the numbers an NPU's input processor applies to the uint8 picture.
    """
    proc = processor.image_processor if mode == "image" else processor.video_processor
    scale = 1.0 / float(proc.rescale_factor)
    return [float(m) * scale for m in proc.image_mean], [float(s) * scale for s in proc.image_std]


def normalize_layout(layout: torch.Tensor, processor: Any, mode: str = "image") -> torch.Tensor:
    """Float32 normalised pictures, with the processor's exact arithmetic.

    Hugging Face fuses rescale into normalise: mean and std are float32 tensors multiplied
    by ``1/rescale_factor``, then ``(x - mean) / std`` in float32. Doing the same here makes
    the result bit-identical to its ``pixel_values``.
    """
    proc = processor.image_processor if mode == "image" else processor.video_processor
    scale = 1.0 / float(proc.rescale_factor)
    mean = torch.tensor(proc.image_mean) * scale
    std = torch.tensor(proc.image_std) * scale
    return (layout.to(torch.float32) - mean) / std


def to_nchw(normalized: torch.Tensor) -> torch.Tensor:
    """``(steps, N, W, C)`` → ``(steps, C, N, W)``: the vision ONNX input, one step per row."""
    return normalized.permute(0, 3, 1, 2).contiguous()


def prepare_frames(paths: Sequence[Path], geo: VisionGeometry, processor: Any) -> list[np.ndarray]:
    """Load and square-resize image files for ``geo`` (errors name the file)."""
    resample = int(processor.image_processor.resample)
    return [resize_square(load_frame(p, geo.factor), geo.size, resample) for p in paths]

"""Calibration archives for vendor PTQ tools: one sample per file inside a ``.tar``.

Pulsar2 (AXERA) reads a calibration set as a tar/zip of per-sample files (its build
config's ``calibration_dataset``): ``calibration_format: Image`` files are decoded with
OpenCV and normalised by the compiler with the config's mean/std; ``Numpy`` files are fed
as stored. Samples here are the uint8 pictures of :mod:`common.inputs.vl_preprocess` (one
temporal step each).

Image samples are written as PNG, not the vendor's JPEG: calibration statistics should see
the exact pixels the model will see, and PNG is lossless. OpenCV decodes files as BGR, so
the channels are reversed on write: what ``cv2.imread`` returns is then the RGB-ordered
array itself, matching the config's mean/std order (the vendor flow gets the same effect
by writing with ``cv2.imwrite``). Archives are byte-reproducible: sorted members, zero
mtimes/owners, fixed modes, deterministic encoders.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.core.errors import EdgeforgeError

#: ``--calib-format`` values → (member suffix, Pulsar2 ``calibration_format``).
FORMATS: dict[str, tuple[str, str]] = {"image": (".png", "Image"), "npy": (".npy", "Numpy")}


def encode_sample(picture: np.ndarray, fmt: str) -> bytes:
    """One uint8 ``(H, W, 3)`` RGB picture as file bytes of ``fmt``.

    ``npy`` stores ``(1, H, W, 3)`` uint8: the model input's source layout (NHWC, U8)
    before the compiler's input processor.
    """
    if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
        raise EdgeforgeError(f"calibration sample must be uint8 (H, W, 3), got {picture.dtype} "
                             f"{picture.shape}")  # fmt: skip
    buffer = io.BytesIO()
    if fmt == "image":
        from PIL import Image

        Image.fromarray(np.ascontiguousarray(picture[:, :, ::-1])).save(
            buffer, format="PNG", compress_level=6
        )
    elif fmt == "npy":
        np.save(buffer, picture[None], allow_pickle=False)
    else:
        raise EdgeforgeError(f"--calib-format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    return buffer.getvalue()


def decode_sample(data: bytes, fmt: str) -> np.ndarray:
    """Inverse of :func:`encode_sample` (what the compiler will read), for checks."""
    if fmt == "image":
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))[:, :, ::-1]
    return np.load(io.BytesIO(data), allow_pickle=False)[0]


def write_calibration_tar(
    samples: Sequence[tuple[str, np.ndarray]], dest: Path, fmt: str
) -> list[str]:
    """Write ``(stem, picture)`` samples to ``dest`` as a reproducible tar; member names."""
    if not samples:
        raise EdgeforgeError("calibration set is empty; give at least one image or frame")
    suffix = FORMATS[fmt][0] if fmt in FORMATS else None
    if suffix is None:
        raise EdgeforgeError(f"--calib-format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    names = [stem + suffix for stem, _ in samples]
    if len(set(names)) != len(names):
        raise EdgeforgeError(f"calibration sample names are not unique: {names}")
    with tarfile.open(dest, "w", format=tarfile.USTAR_FORMAT) as tar:
        ordered = sorted(zip(names, samples, strict=True), key=lambda item: item[0])
        for name, (_, picture) in ordered:
            data = encode_sample(picture, fmt)
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return sorted(names)


def read_calibration_tar(path: Path, fmt: str) -> dict[str, np.ndarray]:
    """Every sample of a calibration tar, decoded (member name → picture)."""
    with tarfile.open(path) as tar:
        return {
            m.name: decode_sample(tar.extractfile(m).read(), fmt)  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }

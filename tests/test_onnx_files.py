"""Models past protobuf's 2 GiB: a ``.onnx`` plus one ``.onnx.data``, placed together.

Writing 2 GiB per test is out of the question, so the tests lower
:data:`common.export.onnx_files.EXTERNAL_DATA_BYTES` to a few KiB: tiny-qwen2's pieces and a
tiny vision tower then take the path Qwen-7B's embedding and Qwen2.5-VL's tower take. Each
must land as exactly the ``.onnx`` and its data file (no per-tensor files, no temporaries),
pass ``onnx.checker`` by path, and compute in onnxruntime exactly what the single-file export
computes. Torch's own layout past 2 GiB (one file per tensor) is reproduced with onnx's saver.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from common.export import onnx_files
from common.export import vision_export as ve
from common.export.piece_export import Piece, example_inputs, export_pieces
from common.inputs import vl_preprocess as vp
from common.models import get_adapter
from common.models.loading import load_model, load_processor

#: The lowered threshold: every tiny block, embedding and lm_head is above it, the two
#: token-picking heads (342 and 2323 bytes) are not.
SMALL = 4096
SEQ_LEN = 16


def names(folder: Path) -> set[str]:
    """Everything in ``folder``, hidden entries (temporaries) included."""
    return {p.name for p in folder.iterdir()}


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def feeds_of(piece: Piece, vocab_size: int) -> dict[str, np.ndarray]:
    tensors = example_inputs(piece.inputs, vocab_size)
    return {spec[0]: t.numpy() for spec, t in zip(piece.inputs, tensors, strict=True)}


def assert_same_outputs(a: list[np.ndarray], b: list[np.ndarray], what: str) -> None:
    assert len(a) == len(b), what
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y), what


def assert_one_data_file(path: Path) -> None:
    """Every tensor of ``onnx_files.INLINE_TENSOR_BYTES`` or more reads from
    ``<name>.onnx.data`` at a page-aligned offset; the checker passes by path."""
    model = onnx.load(str(path), load_external_data=False)
    external = 0
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            assert len(tensor.raw_data) < onnx_files.INLINE_TENSOR_BYTES, tensor.name
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        assert info["location"] == path.name + ".data"
        assert int(info["offset"]) % 4096 == 0
        external += 1
    assert external
    onnx.checker.check_model(str(path), full_check=True)


@pytest.fixture(scope="module")
def tiny_adapter(tiny_qwen2_dir: Path):
    return get_adapter(load_model(tiny_qwen2_dir))


def test_large_pieces_keep_one_data_file(
    tiny_adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vocab = tiny_adapter.vocab_size
    single = export_pieces(tiny_adapter, SEQ_LEN, tmp_path / "single", progress=False)
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_BYTES", SMALL)
    split_dir = tmp_path / "split"
    split = export_pieces(tiny_adapter, SEQ_LEN, split_dir, progress=False)
    large = {p.name for p in single if p.path.stat().st_size > SMALL}
    assert "embedding" in large and "lm_head" in large and "greedy_head" not in large
    assert names(split_dir) == {f"{p.name}.onnx" for p in split} | {f"{n}.onnx.data" for n in large}
    for one, two in zip(single, split, strict=True):
        if one.name in large:
            assert_one_data_file(two.path)
        else:
            assert two.path.read_bytes() == one.path.read_bytes()
        feeds = feeds_of(one, vocab)
        assert_same_outputs(run_onnx(two.path, feeds), run_onnx(one.path, feeds), one.name)

    # Back under the threshold, the same pieces are single files again, byte for byte, and
    # the data files of the larger export are gone.
    monkeypatch.undo()
    again = export_pieces(tiny_adapter, SEQ_LEN, split_dir, progress=False)
    assert names(split_dir) == {f"{p.name}.onnx" for p in again}
    for one, two in zip(single, again, strict=True):
        assert two.path.read_bytes() == one.path.read_bytes(), one.name


def test_per_tensor_files_are_gathered(tiny_adapter, tmp_path: Path) -> None:
    """Past 2 GiB torch writes one file per tensor beside the model; the destination then
    holds the ``.onnx`` and one data file, whatever the threshold."""
    (piece,) = export_pieces(
        tiny_adapter, SEQ_LEN, tmp_path / "single", only=lambda n: n == "block_0", progress=False
    )
    dest = tmp_path / "out" / "block_0.onnx"
    with onnx_files.onnx_destination(dest) as written:
        onnx.save_model(
            onnx.load(str(piece.path)), str(written), save_as_external_data=True,
            all_tensors_to_one_file=False, size_threshold=0,
        )  # fmt: skip
        assert len(names(written.parent)) > 10  # the model and a file per tensor
    assert names(dest.parent) == {"block_0.onnx", "block_0.onnx.data"}
    assert_one_data_file(dest)
    feeds = feeds_of(piece, tiny_adapter.vocab_size)
    assert_same_outputs(run_onnx(dest, feeds), run_onnx(piece.path, feeds), piece.name)


def test_large_vision_tower_keeps_one_data_file(
    tiny_qwen2_5_vl_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = get_adapter(load_model(tiny_qwen2_5_vl_dir))
    geo = vp.geometry(load_processor(tiny_qwen2_5_vl_dir), 112)
    wrapper = ve.VisionEncoderExport(adapter, geo).eval()
    single = tmp_path / "single" / "v.onnx"
    info_single = ve.export_onnx(wrapper, single)
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_BYTES", SMALL)
    split = tmp_path / "split" / "v.onnx"
    info = ve.export_onnx(wrapper, split)
    assert info_single["external_data"] is None and info["external_data"] == "v.onnx.data"
    assert {k: v for k, v in info.items() if k != "external_data"} == {
        k: v for k, v in info_single.items() if k != "external_data"
    }
    assert names(single.parent) == {"v.onnx"}
    assert names(split.parent) == {"v.onnx", "v.onnx.data"}
    assert_one_data_file(split)
    graph = onnx.load(str(split), load_external_data=False).graph
    assert graph.value_info  # shape inference ran on the external-data model
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, geo.channels, geo.patches, geo.width, generator=generator)
    feeds = {ve.INPUT_NAME: pixels.numpy()}
    assert_same_outputs(run_onnx(split, feeds), run_onnx(single, feeds), "vision tower")

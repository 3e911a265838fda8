"""The .mllm v1 writer/reader: the spec's golden bytes, round trips, and refusals."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from common.core.errors import EdgeforgeError
from common.export.mllm_format import (
    encode_mllm,
    mllm_tensors_equal,
    read_mllm,
    read_mllm_index,
    write_mllm,
)

#: mllm-spec.md (e) worked example: one F32 tensor "a" with 2 elements, 45 bytes.
GOLDEN_45 = bytes.fromhex(
    "2C4E0000190000000000000001000000610800000000000000250000000000000000000000"
) + struct.pack("<2f", 1.5, -2.0)


def test_golden_45_byte_example() -> None:
    data = b"".join(encode_mllm([("a", np.array([1.5, -2.0], dtype=np.float32))], "none"))
    assert len(data) == 45
    assert data == GOLDEN_45


def test_element_alignment_pads_payloads(tmp_path: Path) -> None:
    path = tmp_path / "m.mllm"
    write_mllm(path, [("a", np.array([1.5, -2.0], dtype=np.float32))])
    data = path.read_bytes()
    assert len(data) == 48  # payload moved from offset 37 to 40
    assert data[:25] == GOLDEN_45[:25]
    assert struct.unpack_from("<Q", data, 25)[0] == 40
    assert data[33:37] == GOLDEN_45[33:37]
    assert data[37:40] == b"\0\0\0"
    assert data[40:] == GOLDEN_45[37:]


def test_round_trip_all_dtypes(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(3, 5, generator=gen),
        "w8": torch.randint(-128, 128, (7,), generator=gen, dtype=torch.int8),
        "half": torch.randn(3, generator=gen).half(),
        "i16": torch.arange(-3, 3, dtype=torch.int16),
        "i32": torch.arange(5, dtype=torch.int32),
        "clip_input": torch.tensor(True),
        "scale": torch.tensor(0.25),
    }
    path = tmp_path / "m.mllm"
    write_mllm(path, tensors.items())
    stored = read_mllm(path)
    assert list(stored) == list(tensors)
    codes = {name: code for name, (code, _) in stored.items()}
    assert codes == {
        "model.layers.0.self_attn.q_proj.weight": 0,
        "w8": 16,
        "half": 1,
        "i16": 17,
        "i32": 18,
        "clip_input": 16,
        "scale": 0,
    }
    assert stored["w8"][1].dtype == np.int8  # int8 stays int8 (mllm issue #267)
    np.testing.assert_array_equal(stored["w8"][1], tensors["w8"].numpy())
    np.testing.assert_array_equal(stored["clip_input"][1], np.array([1], dtype=np.int8))
    np.testing.assert_array_equal(
        stored["model.layers.0.self_attn.q_proj.weight"][1].reshape(3, 5),
        tensors["model.layers.0.self_attn.q_proj.weight"].numpy(),
    )
    assert stored["scale"][1].tolist() == [0.25]
    for entry in read_mllm_index(path):
        assert entry.offset % stored[entry.name][1].itemsize == 0
    assert mllm_tensors_equal(path, tensors) == []
    changed = dict(tensors, scale=torch.tensor(0.5))
    assert mllm_tensors_equal(path, changed) == ["scale"]
    assert mllm_tensors_equal(path, {"extra": torch.zeros(1), **tensors}) == ["extra"]


def test_same_input_same_bytes(tmp_path: Path) -> None:
    tensors = [("x", np.arange(10, dtype=np.float32)), ("y", np.ones(3, dtype=np.int8))]
    write_mllm(tmp_path / "a.mllm", tensors)
    write_mllm(tmp_path / "b.mllm", tensors)
    assert (tmp_path / "a.mllm").read_bytes() == (tmp_path / "b.mllm").read_bytes()


@pytest.mark.parametrize(
    ("name", "tensor", "fragment"),
    [
        ("poids_é", np.zeros(1, np.float32), "non-ASCII"),
        ("", np.zeros(1, np.float32), "non-empty"),
        ("x", np.zeros(1, np.float64), "float64 has no unambiguous"),
        ("x", np.zeros(1, np.uint8), "uint8 has no unambiguous"),
        ("x", torch.zeros(1, dtype=torch.bfloat16), "bfloat16"),
        ("x", torch.zeros(1, dtype=torch.int64), "int64 has no unambiguous"),
    ],
)
def test_refused_inputs(name: str, tensor, fragment: str) -> None:
    with pytest.raises(EdgeforgeError, match=fragment):
        b"".join(encode_mllm([(name, tensor)]))


def test_duplicate_names_refused(tmp_path: Path) -> None:
    with pytest.raises(EdgeforgeError, match="appears twice"):
        write_mllm(tmp_path / "d.mllm", [("a", np.zeros(1, np.float32))] * 2)
    assert not (tmp_path / "d.mllm").exists()  # nothing half-written


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x2c\x4e", "too short"),
        (b"\x00\x00\x00\x00" + bytes(8), "magic 0 is not 20012"),
        (GOLDEN_45[:4] + struct.pack("<Q", 999) + GOLDEN_45[12:], "runs past the file end"),
        (GOLDEN_45[:-1], "lie outside the payload region"),
    ],
)
def test_reader_rejects_corrupt_files(tmp_path: Path, data: bytes, fragment: str) -> None:
    path = tmp_path / "bad.mllm"
    path.write_bytes(data)
    with pytest.raises(EdgeforgeError, match=fragment):
        read_mllm(path)


def test_reader_decodes_golden(tmp_path: Path) -> None:
    (tmp_path / "g.mllm").write_bytes(GOLDEN_45)
    code, array = read_mllm(tmp_path / "g.mllm")["a"]
    assert code == 0
    assert array.tolist() == [1.5, -2.0]

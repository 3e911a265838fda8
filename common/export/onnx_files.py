"""ONNX files of any size: one ``.onnx``, plus ``<name>.onnx.data`` when the weights are large.

Protobuf cannot serialize a message of 2 GiB or more, so a bigger model keeps its tensors
outside the ``.onnx`` as ONNX external data. Torch's TorchScript exporter then writes one
file per tensor beside the model, named after the tensor (``layers.0.weight``,
``onnx::MatMul_123``): files no consumer knows to copy, and which an atomic write that
renames only the ``.onnx`` out of its temporary folder deletes, leaving a ``.onnx`` that
points at nothing.

:func:`onnx_destination` is the one way the export layer writes a model. The exporter
writes into a private folder; on success the model is placed at ``dest`` either

* exactly as written, one self-contained file, when it is at most
  :data:`EXTERNAL_DATA_BYTES` and the exporter left nothing beside it (every small model's
  bytes are those of a plain export), or
* with every tensor of at least :data:`INLINE_TENSOR_BYTES` gathered into one file,
  :func:`data_file` ``(dest)`` = ``<name>.onnx.data``, which the ``.onnx`` names by a
  relative path. onnxruntime, ``onnx.load`` and ``onnx.checker`` given the path find it
  there; whoever copies, moves or hashes a model carries that one file with it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from common.core.errors import EdgeforgeError
from common.core.records import atomic_path

if TYPE_CHECKING:
    import onnx

#: A model whose file would be larger than this keeps its weights in ``<name>.onnx.data``.
#: Below protobuf's 2 GiB by a margin, because tools re-serialize a model after adding to
#: it (shape inference adds a value_info per tensor, QDQ adds nodes and scales, optimizers
#: write their result): a file that just fits would no longer fit. 1.75 GiB keeps every
#: piece of today's models up to hidden size 2048 (a 151936-token embedding is 1.16 GiB
#: fp32) in one file; Qwen-7B's embedding and lm_head (2.32 GiB) and the Qwen2-VL vision
#: towers (2.5 GiB) go external. Tests lower it to exercise that path on tiny models.
EXTERNAL_DATA_BYTES: int = 2**31 - 2**28

#: Tensors smaller than this stay inside the ``.onnx`` when the rest goes external (onnx's
#: own default), so tools that read shapes and scalars need not open the data file.
INLINE_TENSOR_BYTES = 1024

#: Each tensor starts at a multiple of this in the data file, so a reader can map it
#: page-aligned instead of copying it.
_ALIGN = 4096
_CHUNK = 1 << 24


def data_file(onnx_path: Path) -> Path:
    """The external-data file of ``onnx_path``: ``<name>.onnx.data`` in the same folder.

    It exists only for a model written with external data (see :func:`onnx_destination`)."""
    return onnx_path.with_name(onnx_path.name + ".data")


def remove(onnx_path: Path) -> None:
    """Remove the model at ``onnx_path`` and its :func:`data_file`, whichever exist."""
    for path in (onnx_path, data_file(onnx_path)):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def onnx_destination(dest: Path) -> Iterator[Path]:
    """Yield the path an exporter writes ``dest``'s model to; place the model on success.

    The yielded path is in a folder of its own, so whatever the exporter writes beside the
    model (per-tensor files) is known to be the model's and is removed with the folder.
    A model larger than :data:`EXTERNAL_DATA_BYTES`, or one that came with such files, is
    rewritten with its tensors in :func:`data_file` ``(dest)``; a smaller one is placed
    unchanged (one atomic rename), after which a data file left by an earlier, larger
    export of ``dest`` is removed. With external data the old ``dest`` is removed before
    the new data file takes its place, so a killed run never leaves an old ``.onnx``
    reading a new data file; the ``.onnx`` comes last, and its presence means the model is
    complete.
    """
    dest = Path(dest)
    data = data_file(dest)
    with atomic_path(dest) as staged:
        work = staged.parent / "export"  # atomic_path's folder is private to this write
        work.mkdir()
        written = work / dest.name
        yield written
        if not written.is_file():
            raise EdgeforgeError(f"{dest}: the exporter wrote no model")
        external = written.stat().st_size > EXTERNAL_DATA_BYTES or any(
            p != written for p in work.iterdir()
        )
        if external:
            _gather(written, staged, staged.parent / data.name)
            dest.unlink(missing_ok=True)  # an old .onnx must never read the new data
            os.replace(staged.parent / data.name, data)
        else:
            os.replace(written, staged)
    if not external:
        data.unlink(missing_ok=True)  # an earlier, larger export's, now unused


def _gather(model_path: Path, dest: Path, data: Path) -> None:
    """Write ``model_path``'s model to ``dest`` with its tensor data in the one file ``data``.

    Tensors already external (torch's per-tensor files, relative to ``model_path``) are
    copied in chunks, never loaded whole; inline initializers of at least
    :data:`INLINE_TENSOR_BYTES` move out of the proto. ``dest`` names ``data`` by its bare
    name, so the two must sit in one folder.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    with open(data, "wb") as out:
        for tensor in _tensors(model.graph):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {entry.key: entry.value for entry in tensor.external_data}
            source = model_path.parent / info["location"]
            start = int(info.get("offset", 0))
            length = int(info.get("length", source.stat().st_size - start))
            offset = _pad(out)
            with open(source, "rb") as src:
                src.seek(start)
                _copy(src, out, length, source)
            _point(tensor, data.name, offset, length)
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                continue
            if len(tensor.raw_data) >= INLINE_TENSOR_BYTES:
                offset = _pad(out)
                out.write(tensor.raw_data)
                _point(tensor, data.name, offset, len(tensor.raw_data))
                tensor.ClearField("raw_data")
    onnx.save_model(model, str(dest))


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``graph`` that can hold data: initializers, tensor attributes (as on
    ``Constant``), and those of subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _pad(out: BinaryIO) -> int:
    """Zero-pad ``out`` to the next :data:`_ALIGN` boundary; the new offset."""
    gap = -out.tell() % _ALIGN
    out.write(b"\0" * gap)
    return out.tell()


def _copy(src: BinaryIO, out: BinaryIO, length: int, source: Path) -> None:
    """Copy ``length`` bytes from ``src``'s position to ``out`` in chunks."""
    left = length
    while left:
        chunk = src.read(min(left, _CHUNK))
        if not chunk:
            raise EdgeforgeError(f"{source}: external data ends {left} bytes short")
        out.write(chunk)
        left -= len(chunk)


def _point(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` read ``length`` bytes at ``offset`` of ``location``."""
    import onnx

    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)

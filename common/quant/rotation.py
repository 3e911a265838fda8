"""Rotate a model's residual stream without changing its function (QuaRot's R1 + R2).

With every RMSNorm weight folded into the linears that read it, an RMSNorm commutes with
any orthogonal ``R`` (``rms(hR) = rms(h)``), so the residual stream can be carried as
``h·R`` instead of ``h``: embeddings and every linear writing into the stream (o_proj,
down_proj, the VL merger's last linear) get ``R`` on their output side, every linear reading
it (q/k/v/gate/up/lm_head) gets ``Rᵀ`` undone on its input side. Per layer, V is further
rotated per head by ``R_v`` and un-rotated at o_proj's input. In exact arithmetic the
model's logits do not change; in float32 they change by rounding only, which the target
checks. The point is that the rotated activations have far smaller outliers, so static
int8 quantization of them (the QNN target) loses much less.

Everything here walks the model through :mod:`common.models` adapters. Each transformed
weight is computed in float64 from the original and rounded to the model's dtype once.
Matrices that read the stream (the embedding and LM head above all: vocab × hidden) are
transformed in row blocks of at most :data:`ROW_BLOCK_BYTES` of float64, written back in
place, so the float64 working set is one block rather than two copies of the matrix; a
tied LM head gets its own storage filled from the same blocks, never a clone.

Rotation files: our own format is safetensors with float64 ``R`` ``[d, d]`` and
``R_v.<layer>`` ``[hd, hd]``; the mllm QNN convertor's ``torch.save`` pickle
(``{"R": ..., "R_v": [...]}``, often saved on a CUDA device) is read too, on the CPU.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.core.errors import EdgeforgeError
from common.core.records import atomic_path
from common.models import DecoderLayer, ModelAdapter
from common.quant.hadamard import random_rotation

#: Largest ``max |R Rᵀ − I|`` accepted from a rotation file (float32-saved matrices pass).
ORTHOGONALITY_TOL = 1e-5

#: safetensors metadata key that marks a file as an edgeforge rotation file.
ROTATION_FORMAT = "edgeforge-rotation-v1"

#: Most float64 bytes one row block of a stream-reading matrix may take (at most two such
#: are alive at once: the upcast or folded rows and the rotated rows). Unblocked, the
#: embedding and LM head of a 151936-token vocabulary cost two float64 vocab × hidden
#: copies each (4.6 GiB at hidden 2048, 9.3 GiB at 4096); 64 MiB keeps the transient small
#: beside one fp32 layer while leaving blocks thousands of rows tall (see
#: :func:`_row_blocks` for the floor that keeps them bit-identical to the unblocked product).
ROW_BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Rotation:
    """``R`` (hidden × hidden) and one ``R_v`` (head_dim × head_dim) per layer, float64.

    ``info`` says where the matrices came from (mode and seed, or the file they were read
    from); it goes into the manifest and the rotation file's metadata.
    """

    R: torch.Tensor
    R_v: tuple[torch.Tensor, ...]
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.R.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.R_v[0].shape[0]) if self.R_v else 0


# --------------------------------------------------------------------------------------
# Generating, checking, saving and loading rotations


def make_rotation(
    hidden_size: int, head_dim: int, num_layers: int, mode: str, seed: int
) -> Rotation:
    """A fresh seeded rotation: ``R`` from stream 0, ``R_v[l]`` from stream ``1 + l``."""

    def draw(n: int, stream: int, what: str) -> torch.Tensor:
        try:
            return torch.from_numpy(random_rotation(n, mode, seed, stream))
        except EdgeforgeError as exc:
            raise EdgeforgeError(f"{what} {n}: {exc}") from None

    r = draw(hidden_size, 0, "hidden_size")
    r_v = tuple(draw(head_dim, 1 + layer, "head_dim") for layer in range(num_layers))
    return Rotation(r, r_v, {"mode": mode, "seed": seed})


def _check_orthogonal(matrix: torch.Tensor, what: str) -> None:
    eye = torch.eye(matrix.shape[0], dtype=torch.float64)
    err = (matrix @ matrix.T - eye).abs().max().item()
    if not err <= ORTHOGONALITY_TOL:
        raise EdgeforgeError(
            f"{what} is not orthogonal (max |R Rᵀ − I| = {err:.3g} > {ORTHOGONALITY_TOL}); "
            "it is not a rotation matrix"
        )


def check_rotation(rotation: Rotation, adapter: ModelAdapter, source: str) -> None:
    """Fail, naming ``source``, unless ``rotation`` fits this model and is orthogonal."""
    want_r = (adapter.hidden_size, adapter.hidden_size)
    if tuple(rotation.R.shape) != want_r:
        raise EdgeforgeError(
            f"{source}: R has shape {list(rotation.R.shape)} but the model's hidden_size is "
            f"{adapter.hidden_size} (expected {list(want_r)}); it was made for another model"
        )
    if len(rotation.R_v) != adapter.num_layers:
        raise EdgeforgeError(
            f"{source}: {len(rotation.R_v)} R_v matrices but the model has "
            f"{adapter.num_layers} layers; it was made for another model"
        )
    want_v = (adapter.head_dim, adapter.head_dim)
    for layer, r_v in enumerate(rotation.R_v):
        if tuple(r_v.shape) != want_v:
            raise EdgeforgeError(
                f"{source}: R_v[{layer}] has shape {list(r_v.shape)} but the model's head_dim "
                f"is {adapter.head_dim} (expected {list(want_v)}); it was made for another model"
            )
    _check_orthogonal(rotation.R, f"{source}: R")
    for layer, r_v in enumerate(rotation.R_v):
        _check_orthogonal(r_v, f"{source}: R_v[{layer}]")


def save_rotation(path: Path, rotation: Rotation) -> None:
    """Write ``R`` and ``R_v.<layer>`` as float64 safetensors (atomically, same bytes for
    the same matrices)."""
    from safetensors.torch import save_file

    tensors = {"R": rotation.R.contiguous()}
    tensors.update({f"R_v.{i}": r.contiguous() for i, r in enumerate(rotation.R_v)})
    # One metadata key only: safetensors stores metadata as a hash map, so with several keys
    # their order in the header (and the file's bytes) would vary from run to run.
    metadata = {ROTATION_FORMAT: json.dumps(dict(rotation.info), sort_keys=True)}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _as_matrix(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[0] != value.shape[1]:
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise EdgeforgeError(f"{what} must be a square matrix, got {shape}")
    if not value.dtype.is_floating_point:
        raise EdgeforgeError(f"{what} must be floating point, got {value.dtype}")
    return value.detach().to(device="cpu", dtype=torch.float64).contiguous()


def _from_safetensors(path: Path) -> Rotation:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError) as exc:
        raise EdgeforgeError(f"{path}: not a rotation file ({exc})") from None
    if "R" not in keys:
        raise EdgeforgeError(
            f"{path}: not a rotation file (no tensor 'R'; found {sorted(keys)[:5]})"
        )
    layers = sorted(int(k.split(".", 1)[1]) for k in keys if k.startswith("R_v."))
    if layers != list(range(len(layers))) or keys != {"R", *(f"R_v.{i}" for i in layers)}:
        raise EdgeforgeError(
            f"{path}: not a rotation file (expected tensors R and R_v.0 … R_v.<L-1>, "
            f"found {sorted(keys)})"
        )
    r = _as_matrix(tensors["R"], f"{path}: R")
    r_v = tuple(_as_matrix(tensors[f"R_v.{i}"], f"{path}: R_v.{i}") for i in layers)
    return Rotation(r, r_v, {"R_path": str(path), "format": "safetensors"})


def _from_torch_pickle(path: Path) -> Rotation:
    """The mllm convertor's ``torch.save({"R": R, "R_v": [..]})``, mapped to the CPU.

    ``weights_only`` keeps the unpickler to tensors and containers, so a foreign file
    cannot run code; ``R_vit`` / ``R_vs_vit`` (vision tower) are reported, not used.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a foreign or corrupt pickle
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgeforgeError(f"{path}: not a rotation file (torch.load failed: {first})") from None
    if not isinstance(data, dict) or "R" not in data or "R_v" not in data:
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise EdgeforgeError(
            f"{path}: not a rotation file (expected a dict with 'R' and 'R_v', got {keys})"
        )
    if not isinstance(data["R_v"], list | tuple) or not data["R_v"]:
        raise EdgeforgeError(f"{path}: not a rotation file ('R_v' must be a non-empty list)")
    r = _as_matrix(data["R"], f"{path}: R")
    r_v = tuple(_as_matrix(m, f"{path}: R_v[{i}]") for i, m in enumerate(data["R_v"]))
    ignored = sorted(k for k in data if k not in ("R", "R_v"))
    return Rotation(
        r, r_v, {"R_path": str(path), "format": "torch-pickle", "ignored_keys": ignored}
    )


def load_rotation(path: Path) -> Rotation:
    """Read a rotation file: edgeforge safetensors or the mllm convertor's torch pickle."""
    path = Path(path)
    if not path.is_file():
        raise EdgeforgeError(f"R_path={path}: file does not exist")
    with path.open("rb") as fh:
        head = fh.read(9)
    # safetensors: a u64 header length, then the JSON header's "{". Anything else that is
    # a zip (torch >= 1.6) or starts with a pickle PROTO opcode goes to torch.load.
    if len(head) == 9 and head[8:9] == b"{" and not zipfile.is_zipfile(path):
        return _from_safetensors(path)
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":
        return _from_torch_pickle(path)
    return _from_safetensors(path)


# --------------------------------------------------------------------------------------
# The math: pure functions on float64 tensors ([out, in] layout, as nn.Linear stores it)


def fold_input_scale(weight: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``W · diag(γ)``: a norm's elementwise scale moved into the linear that reads it."""
    return weight * gamma[None, :]


def rotate_input(weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``W · R``: the linear now reads ``x·R`` and computes what it computed on ``x``."""
    return weight @ rotation


def rotate_output(weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``Rᵀ · W``: the linear's output (and, as ``Rᵀ b``, its bias) becomes ``y·R``."""
    return rotation.T @ weight


def block_diagonal(block: torch.Tensor, count: int) -> torch.Tensor:
    """``blockdiag(block × count)``: one head_dim rotation applied to every head."""
    return torch.block_diag(*([block] * count))


# --------------------------------------------------------------------------------------
# Applying a rotation to a live model


def _update(param: torch.Tensor, value: torch.Tensor) -> None:
    """Overwrite ``param`` (a parameter or a row block of one) in place with ``value``
    rounded once to its own dtype."""
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _row_blocks(rows: int, width: int) -> list[slice]:
    """Row ranges splitting a ``rows × width`` matrix so that each block's float64 copy
    takes at most ``ROW_BLOCK_BYTES`` (or ``16 · width²`` when that is larger).

    Blocking must not change a single bit: each output row of ``A @ R`` is a dot product
    over the same ``width`` entries, but MKL picks its thread split (and, below 4 rows,
    its kernel) from ``A``'s height, and a short ``A`` gets other last bits. Measured
    (torch's MKL 2024.2, AVX-512; 2 threads at widths 64 to 4096, 4 and 8 threads at 1024
    and 2048), every ``A`` taller than about ``width / 8`` rows gives the bits of the whole
    matrix. Blocks are therefore never shorter than ``width`` (an 8× margin): the
    ``count`` blocks are split evenly, so each is over half the largest, which is at
    least ``2 · width``. A matrix that fits one block is done whole, as before.
    """
    most = max(ROW_BLOCK_BYTES // (8 * width), 2 * width)
    count = -(-rows // most)
    return [slice(i * rows // count, (i + 1) * rows // count) for i in range(count)]


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float64)


def _norm_scale(norm: nn.Module, name: str) -> torch.Tensor:
    """The RMSNorm's weight, refusing norms with a bias (LayerNorm needs mean-centring,
    which only the vision tower has and this module does not rotate)."""
    if getattr(norm, "bias", None) is not None:
        raise EdgeforgeError(
            f"{name}: {type(norm).__name__} has a bias; only RMSNorm language models can be rotated"
        )
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise EdgeforgeError(f"{name}: {type(norm).__name__} has no weight to fold")
    return _f64(weight)


def _reset_norm(norm: nn.Module) -> None:
    with torch.no_grad():
        norm.weight.fill_(1.0)


def _untie_head(adapter: ModelAdapter) -> nn.Parameter:
    """Give a tied LM head its own (uninitialised) weight and mark the config untied.

    The embedding is rotated on its output side and the LM head on its input side with
    the final norm folded in, so they can no longer share one tensor. The caller fills
    the new weight from the embedding's original rows block by block (no clone of the
    whole embedding). The config is updated so ``save_pretrained`` writes both and
    ``from_pretrained`` does not re-tie.
    """
    head = adapter.lm_head()
    head.weight = nn.Parameter(torch.empty_like(adapter.embed_tokens().weight))
    for config in {id(c): c for c in (adapter.config, adapter.text_config)}.values():
        config.tie_word_embeddings = False
    return head.weight


def _read_side(
    weight: torch.Tensor,
    r: torch.Tensor,
    gamma: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> None:
    """``W · diag(γ) · R`` of a stream-reading matrix, row block by row block, in place
    (or into ``out``, a tied head's new weight, leaving ``weight`` as it is)."""
    target = weight if out is None else out
    with torch.no_grad():
        for rows in _row_blocks(weight.shape[0], weight.shape[1]):
            block = _f64(weight[rows])
            if gamma is not None:
                block = fold_input_scale(block, gamma)
            _update(target[rows], rotate_input(block, r))


def rotate_embedding(adapter: ModelAdapter, r: torch.Tensor) -> None:
    """``E · R``: the embedding writes the rotated stream (in place, row block by block)."""
    _read_side(adapter.embed_tokens().weight, r)


def rotate_head(adapter: ModelAdapter, r: torch.Tensor, source: torch.Tensor | None = None) -> None:
    """``W · diag(γ) · R`` into the LM head's weight, γ the final norm (reset to 1).

    ``W`` is the head's own weight, or ``source`` (a tied head's embedding, read before
    that is rotated) when the head was given storage of its own (:func:`_untie_head`).
    """
    final = adapter.final_norm()
    gamma = _norm_scale(final, "final norm")
    head = adapter.lm_head().weight
    if source is None:
        _read_side(head, r, gamma)
    else:
        _read_side(source, r, gamma, out=head)
    _reset_norm(final)


def _write_side(linear: nn.Linear, r: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    """Rotate a stream-writing linear's output (``weight`` overrides its current weight)."""
    _update(linear.weight, rotate_output(_f64(linear.weight) if weight is None else weight, r))
    if linear.bias is not None:
        _update(linear.bias, r.T @ _f64(linear.bias))


def rotate_layer(adapter: ModelAdapter, layer: DecoderLayer, rotation: Rotation) -> None:
    """Fold ``layer``'s two norms into their readers and rotate its linears, in place.

    Needs only this layer's weights (and ``R``, ``R_v[layer]``), so a streamed model
    rotates each layer as it is read; the bits are those of :func:`rotate_model`'s.
    """
    r = rotation.R
    lin = layer.linears
    gamma_in = _norm_scale(layer.input_norm, f"{layer.name} input norm")
    for role in ("q", "k", "v"):
        _read_side(lin[role].weight, r, gamma_in)
    _reset_norm(layer.input_norm)
    # V per head by R_v (output rows of v_proj), undone on o_proj's input columns. The
    # dense block diagonal is (heads · head_dim)² float64, about R's size, per layer. A
    # head-wise product would save it but sums in another order: SmolLM2 with an
    # orthogonal R_v gets 9.7 % of o_proj's float64 values changed (by <= 6.1e-16).
    r_v = rotation.R_v[layer.index]
    b_kv = block_diagonal(r_v, adapter.num_kv_heads)
    b_q = block_diagonal(r_v, adapter.num_heads)
    _update(lin["v"].weight, b_kv.T @ _f64(lin["v"].weight))
    if lin["v"].bias is not None:
        _update(lin["v"].bias, b_kv.T @ _f64(lin["v"].bias))
    _write_side(lin["o"], r, weight=_f64(lin["o"].weight) @ b_q)
    gamma_post = _norm_scale(layer.post_attention_norm, f"{layer.name} post-attention norm")
    for role in ("gate", "up"):
        _read_side(lin[role].weight, r, gamma_post)
    _reset_norm(layer.post_attention_norm)
    _write_side(lin["down"], r)


def rotate_merger(adapter: ModelAdapter, r: torch.Tensor) -> str | None:
    """Rotate the VL merger's last linear, which writes image tokens into the stream;
    its name, or None for a text model. The vision tower keeps its own basis."""
    merger = adapter.vision_merger()
    if merger is None:
        return None
    _write_side(merger.linears["merger_fc2"], r)
    return merger.linear_names["merger_fc2"]


def rotation_summary(adapter: ModelAdapter, *, untied: bool, merger: str | None) -> dict[str, Any]:
    """What a rotation did, for the report."""
    return {
        "untied_embeddings": untied,
        "rotated_merger_output": merger,
        "vision_tower_rotated": False,
        "hidden_size": adapter.hidden_size,
        "head_dim": adapter.head_dim,
        "num_layers": adapter.num_layers,
    }


def rotate_model(adapter: ModelAdapter, rotation: Rotation) -> dict[str, Any]:
    """Fold every RMSNorm into its readers (norm weights become 1) and rotate, in place.

    A tied LM head gets its own weight (the one extra vocab × hidden matrix, in the
    model's dtype), filled from the embedding's rows before those are rotated; beyond
    that, the float64 work needs one row block or one layer's matrix at a time.
    Returns what was done, for the report.
    """
    check_rotation(rotation, adapter, "rotation")
    r = rotation.R
    tied = adapter.tie_word_embeddings
    if tied:
        embed = adapter.embed_tokens().weight
        _untie_head(adapter)
        rotate_head(adapter, r, source=embed)
    else:
        rotate_head(adapter, r)
    rotate_embedding(adapter, r)
    for layer in adapter.layers():
        rotate_layer(adapter, layer, rotation)
    merger = rotate_merger(adapter, r)
    return rotation_summary(adapter, untied=tied, merger=merger)


def rotation_bytes(adapter: ModelAdapter) -> int:
    """Peak float64 working set of rotating ``adapter``'s model on top of its weights:
    ``R`` and the ``R_v`` matrices, two row blocks of a stream-reading matrix, a layer's
    two dense block diagonals, and the input and product of the widest stream-writing
    linear (down_proj). For the memory preflight."""
    d, heads_dim = adapter.hidden_size, adapter.num_heads * adapter.head_dim
    widest = max(adapter.intermediate_size, heads_dim)
    return (
        8 * (d * d + adapter.num_layers * adapter.head_dim**2 + 2 * heads_dim**2 + 2 * d * widest)
        + 2 * ROW_BLOCK_BYTES
    )


#: The linears of a decoder layer :func:`rotate_layer` transforms, by role.
ROTATED_ROLES = frozenset({"q", "k", "v", "o", "gate", "up", "down"})


def check_rotatable(adapter: ModelAdapter) -> None:
    """One line unless every decoder layer has the separate projections rotation folds
    into (Qwen1 fuses q/k/v into one ``c_attn``, whose rows would need splitting)."""
    layers = adapter.layers()
    roles = set(layers[0].linears) if layers else set()
    if not roles >= ROTATED_ROLES:
        missing = ", ".join(sorted(ROTATED_ROLES - roles))
        raise EdgeforgeError(
            f"{adapter.model_type}: residual rotation needs separate {missing} projections, "
            f"which this model fuses ({', '.join(sorted(roles))}); build it without rotation "
            "(ROTATE=none)"
        )


def rotation_for(
    adapter: ModelAdapter, *, mode: str, seed: int, r_path: Path | None = None
) -> Rotation:
    """The rotation a build uses: read from ``r_path`` (checked against the model) or drawn
    fresh from ``(mode, seed)``; the model must have the projections rotation transforms."""
    check_rotatable(adapter)
    if r_path is not None:
        rotation = load_rotation(r_path)
        check_rotation(rotation, adapter, f"R_path={r_path}")
        return rotation
    return make_rotation(adapter.hidden_size, adapter.head_dim, adapter.num_layers, mode, seed)

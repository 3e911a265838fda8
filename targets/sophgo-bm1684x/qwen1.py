"""Qwen1 (``qwen-7b``) for the SOPHGO ONNX route: patch a copy of the checkpoint, export pieces.

Qwen1's remote code cannot be exported as it ships: its torch-2 SDPA path and a
``torch.full`` divisor break ONNX export, it builds its own causal mask (the pieces take an
additive mask from the host, as every other family's do), and its decode step returns the
whole grown cache instead of the new token's K/V. sophon-demo fixes this by hand-copying an
edited ``modeling_qwen.py``; here the same edits are unified diffs under ``patches/`` (one per
upstream revision: the one the guide was written for, and the later one the Hub serves now)
applied to a copy of the user's directory, with ``config.json``'s ``seq_length``/
``max_position_embeddings`` set to ``SEQ_LEN``. A file that no patch fits fails naming the
file and, per patch, the first hunk that does not match, before anything is written.

The pieces then wrap the *patched* model's own blocks (``transformer.h.N``), so the graph is
the checkpoint's code, not a re-implementation of :mod:`common.models.static_decoder`; they
keep ``common.export.piece_export``'s names, signatures and order (its ``iter_pieces`` with
Qwen1's block wrappers), so its host loop, runners and checks serve Qwen1 unchanged.
Weights are linked, not copied (a 7B checkpoint is 15 GB), and the patched copy is read
one part at a time (:class:`~common.models.streaming.StreamedModel`), as the float
reference reads the unpatched one (:mod:`common.analysis.layerwise_decode`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common.analysis.layerwise import Parts
from common.core.errors import EdgeforgeError
from common.core.records import atomic_path, dumps_json, sha256_file
from common.export.piece_export import BlockWrappers, Piece, export_modules, iter_pieces
from common.models.base import DecoderLayer
from common.models.qwen import QwenAdapter
from common.models.static_decoder import PieceDims, dims_of
from common.models.streaming import StreamedModel

PATCH_DIR = Path(__file__).resolve().parent / "patches"
#: One patch per known upstream revision of ``modeling_qwen.py``; the first that fits wins.
PATCH_FILES = (
    PATCH_DIR / "qwen1-modeling_qwen.patch",
    PATCH_DIR / "qwen1-modeling_qwen-latest.patch",
)
#: Files linked into the patched copy instead of copied: the weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: The record the patched copy carries: what it was made from and with which patch.
PATCH_RECORD = "edgeforge-patch.json"
_HUNK_HEADER = re.compile(r"^@@ -(\d+),(\d+) \+(\d+),(\d+) @@ ?(.*)$")


@dataclass(frozen=True)
class Hunk:
    """One edit: the exact lines it expects (context + removed) and what replaces them."""

    index: int
    title: str
    before: str
    after: str


def parse_patch(text: str, source: Path) -> tuple[str, list[Hunk]]:
    """The target file name and hunks of a single-file unified diff; text before ``---``
    is commentary. Each hunk's line counts must agree with its body (a hand edit that
    breaks the diff fails here, not halfway through a patch)."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("--- ")), None)
    if start is None or not lines[start + 1].startswith("+++ "):
        raise EdgeforgeError(f"{source}: not a unified diff (no ---/+++ header)")
    target = lines[start + 1][4:].split("\t")[0].strip().removeprefix("b/")
    hunks: list[Hunk] = []
    i = start + 2
    while i < len(lines):
        match = _HUNK_HEADER.match(lines[i].rstrip("\n"))
        if match is None:
            raise EdgeforgeError(f"{source}:{i + 1}: expected a hunk header, got {lines[i]!r}")
        old_n, new_n, title = int(match[2]), int(match[4]), match[5].strip()
        before, after = [], []
        i += 1
        while i < len(lines) and not lines[i].startswith("@@ "):
            tag, body = lines[i][:1], lines[i][1:]
            if tag not in " -+":
                raise EdgeforgeError(f"{source}:{i + 1}: bad diff line {lines[i]!r}")
            if tag in " -":
                before.append(body)
            if tag in " +":
                after.append(body)
            i += 1
        if (len(before), len(after)) != (old_n, new_n):
            raise EdgeforgeError(
                f"{source}: hunk {len(hunks) + 1} ({title}) says -{old_n} +{new_n} lines "
                f"but has -{len(before)} +{len(after)}"
            )
        hunks.append(Hunk(len(hunks) + 1, title, "".join(before), "".join(after)))
    if not hunks:
        raise EdgeforgeError(f"{source}: the diff has no hunks")
    return target, hunks


def _first_mismatch(text: str, before: str) -> str:
    """The first line of ``before`` (which ``text`` does not contain) that no longer follows
    its predecessors in ``text``: where the file departs from what the hunk expects."""
    lines = before.splitlines(keepends=True)
    matched = next((k for k in range(len(lines) - 1, 0, -1) if "".join(lines[:k]) in text), 0)
    return lines[matched].rstrip("\n")


class HunkMismatch(Exception):
    """A hunk that does not fit; ``already`` when the file already has its result."""

    def __init__(self, hunk: Hunk, total: int, reason: str, already: bool = False):
        super().__init__(f"hunk {hunk.index}/{total} ({hunk.title}) {reason}")
        self.already = already


def apply_hunks(text: str, hunks: list[Hunk]) -> str:
    """``text`` with every hunk applied; :class:`HunkMismatch` for the first hunk that does
    not match exactly once. Pure: nothing is written."""
    total = len(hunks)
    for hunk in hunks:
        count = text.count(hunk.before)
        if count == 1:
            text = text.replace(hunk.before, hunk.after, 1)
        elif count > 1:
            raise HunkMismatch(hunk, total, f"matches {count} places; refusing to guess")
        elif hunk.after in text and hunk.after.strip():
            raise HunkMismatch(hunk, total, "is already applied", already=True)
        else:
            expected = _first_mismatch(text, hunk.before).strip()
            raise HunkMismatch(hunk, total, f"does not match: expected `{expected}`")
    return text


def patch_modeling(
    path: Path, text: str, patches: tuple[Path, ...] = PATCH_FILES
) -> tuple[str, Path]:
    """``text`` (the contents of ``path``) patched by the first of ``patches`` that fits
    every hunk, and that patch; or one line naming ``path`` and each patch's first failing
    hunk."""
    failures: list[str] = []
    for patch in patches:
        target, hunks = parse_patch(patch.read_text(), patch)
        if target != path.name:
            raise EdgeforgeError(f"{patch}: patches {target}, not {path.name}")
        try:
            return apply_hunks(text, hunks), patch
        except HunkMismatch as exc:
            if exc.already:
                raise EdgeforgeError(
                    f"{path}: {patch.name} {exc}; point MODEL_PATH at the unmodified checkpoint"
                ) from None
            failures.append(f"{patch.name} {exc}")
    raise EdgeforgeError(
        f"{path}: not a modeling_qwen.py revision the Qwen1 patches know: {'; '.join(failures)}"
    )


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgeforgeError(f"{path}: cannot read it ({exc})") from None
    if config.get("model_type") != "qwen":
        raise EdgeforgeError(
            f"{path}: model_type is {config.get('model_type')!r}; the Qwen1 patch needs 'qwen'"
        )
    return config


def patched_config(config: dict, path: Path, seq_len: int) -> dict:
    """Edit 0 of the guide: ``seq_length`` and ``max_position_embeddings`` = ``SEQ_LEN``.

    ``SEQ_LEN`` may not exceed the trained context: past ``seq_length`` Qwen1 switches on
    dynamic NTK and logn attention, which fixed pieces cannot follow.
    """
    for field in ("seq_length", "max_position_embeddings"):
        if not isinstance(config.get(field), int):
            raise EdgeforgeError(f"{path}: field {field!r} missing or not an integer")
    limit = min(config["seq_length"], config["max_position_embeddings"])
    if not isinstance(seq_len, int) or not 2 <= seq_len <= limit:
        raise EdgeforgeError(
            f"SEQ_LEN={seq_len} is outside 2..{limit} ({path}: seq_length="
            f"{config['seq_length']}, max_position_embeddings={config['max_position_embeddings']})"
        )
    return {**config, "seq_length": seq_len, "max_position_embeddings": seq_len}


def patch_model_dir(source: Path, dest: Path, seq_len: int) -> Path:
    """Write ``dest``: ``source`` with the Qwen1 patch and ``SEQ_LEN`` config applied.

    Everything is checked in memory first; ``dest`` appears whole (atomic rename) or not at
    all. Weight files are symlinked, every other file copied.
    """
    source = Path(source).resolve()
    config = patched_config(_read_config(source), source / "config.json", seq_len)
    module = (config.get("auto_map") or {}).get("AutoModelForCausalLM", "")
    modeling = source / f"{module.split('.')[0]}.py"
    if modeling.name != "modeling_qwen.py":
        raise EdgeforgeError(
            f"{source / 'config.json'}: auto_map.AutoModelForCausalLM is {module!r}; the Qwen1 "
            "patches edit modeling_qwen.py"
        )
    if not modeling.is_file():
        raise EdgeforgeError(f"{modeling}: missing; the checkpoint's remote code is needed")
    patched, patch = patch_modeling(modeling, modeling.read_text())
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        for path in sorted(source.iterdir()):
            if path.is_dir() or path.name == PATCH_RECORD:
                continue
            if path.suffix in WEIGHT_SUFFIXES:
                (tmp / path.name).symlink_to(path.resolve())
            else:
                shutil.copy2(path, tmp / path.name)
        (tmp / modeling.name).write_text(patched)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        record = {
            "source": str(source),
            "patch": patch.name,
            "patch_sha256": sha256_file(patch),
            "seq_len": seq_len,
        }
        (tmp / PATCH_RECORD).write_text(dumps_json(record))
    return dest


# -- pieces --------------------------------------------------------------------------


def qwen1_dims(adapter: QwenAdapter, seq_len: int | None = None) -> PieceDims:
    """Piece dims of a Qwen1 model at ``seq_len`` (default: its ``seq_length``, which the
    patch sets to ``SEQ_LEN``); ``seq_len`` may not exceed the trained context."""
    limit = adapter.trained_context
    seq_len = limit if seq_len is None else seq_len
    if not isinstance(seq_len, int) or not 2 <= seq_len <= limit:
        raise EdgeforgeError(
            f"SEQ_LEN={seq_len} is outside 2..{limit} (config seq_length={limit}: past it "
            "Qwen1 switches on dynamic NTK and logn attention, which fixed pieces cannot follow)"
        )
    return dims_of(adapter, seq_len)


class QwenBlockPiece(nn.Module):
    """Prefill ``block_i`` around the patched ``QWenBlock``: positions pick rows of the
    rotary table (the block slices the last ``L`` rows, i.e. all of them), the additive
    mask goes straight into ``_attn``, and ``present`` is this call's K/V ``[1,S,H,D]``."""

    def __init__(self, block: nn.Module, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.block = block
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def rotary(self, position_ids: torch.Tensor) -> list[list[torch.Tensor]]:
        """``rotary_pos_emb_list`` for one sequence: cos/sin ``[1, L, 1, D]``."""
        return [[self.cos[position_ids].unsqueeze(2), self.sin[position_ids].unsqueeze(2)]]

    def forward(
        self, input_states: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden, (k, v) = self.block(
            input_states,
            rotary_pos_emb_list=self.rotary(position_ids),
            attention_mask=attention_mask,
            use_cache=True,
        )
        return hidden, k, v


class QwenBlockCachePiece(QwenBlockPiece):
    """Decode ``block_cache_i``: the history goes in as ``layer_past``; with edit 5 the block
    returns only the new token's K/V ``[1,1,H,D]``."""

    def forward(  # type: ignore[override]
        self,
        input_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        history_k: torch.Tensor,
        history_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden, (k, v) = self.block(
            input_states,
            rotary_pos_emb_list=self.rotary(position_ids),
            layer_past=(history_k, history_v),
            attention_mask=attention_mask,
            use_cache=True,
        )
        return hidden, k, v


def qwen1_blocks(adapter: QwenAdapter, dims: PieceDims) -> BlockWrappers:
    """The wrappers of one patched block: ``QwenBlockPiece`` and ``QwenBlockCachePiece``
    over the rotary table of the model's own code at ``S`` positions.

    logn attention is switched off in the blocks: it only scales queries once the key
    count passes ``seq_length`` (= ``S`` after the patch), which HF never reaches within
    ``S`` tokens, but the decode piece always sees ``S + 1`` keys (history buffer plus the
    new token), so leaving it on would scale every decode step that HF does not.
    """
    with torch.no_grad():  # a buffer computation: a model on meta will do
        cos, sin = adapter.rotary_embedding()(dims.seq_len)
    cos = cos.reshape(dims.seq_len, -1).float().contiguous()
    sin = sin.reshape(dims.seq_len, -1).float().contiguous()

    def wrap(layer: DecoderLayer) -> tuple[nn.Module, nn.Module]:
        layer.attention.use_logn_attn = False
        return QwenBlockPiece(layer.module, cos, sin), QwenBlockCachePiece(layer.module, cos, sin)

    return wrap


def export_qwen1_pieces(
    adapter: QwenAdapter,
    out_dir: Path,
    only: Callable[[str], bool] | None = None,
    progress: bool = True,
    parts: Parts | None = None,
) -> list[Piece]:
    """Export the patched model's pieces to ``out_dir/<name>.onnx`` (float32 model), with
    :func:`common.export.piece_export.piece_signatures`' names and shapes; ``parts`` reads
    a streamed model's parts one at a time, as ``export_pieces`` does."""
    if adapter.embed_tokens().weight.dtype != torch.float32:
        raise EdgeforgeError("qwen1 export: load the model in float32")
    dims = qwen1_dims(adapter)
    modules = iter_pieces(adapter, dims, parts, qwen1_blocks(adapter, dims))
    return export_modules(modules, dims, out_dir, only, progress)


# -- what make sophgo calls ----------------------------------------------------------------


def check_route(route: str) -> None:
    """Refuse a route that cannot build Qwen1, before anything is estimated or loaded.

    Only the ONNX route takes model patches; tpu-mlir's ``llm_convert`` reads the
    checkpoint's weights with its own model definitions, which do not include Qwen1.
    """
    if route != "onnx":
        raise EdgeforgeError(
            f"ROUTE={route}: Qwen1 builds only by ROUTE=onnx (the route that applies "
            "patches/qwen1-*.patch); tpu-mlir's llm_convert has no Qwen1 model"
        )


def export_patched(model_dir: Path, seq_len: int, work: Path) -> list[Piece]:
    """Patch a copy of ``model_dir`` into ``work/patched-model`` (weights linked) and
    export its pieces to ``work/onnx`` one part at a time: the copy is opened as a
    :class:`~common.models.streaming.StreamedModel` (its own code builds the module tree
    on meta), and each block, the embedding and the head are read, exported and released
    in turn, so a 7B model never sits whole in memory (28 GB in float32)."""
    patched = patch_model_dir(model_dir, work / "patched-model", seq_len)
    streamed = StreamedModel(patched, trust_remote_code=True)
    parts = Parts(streamed.adapter, streamed)
    return export_qwen1_pieces(streamed.adapter, work / "onnx", parts=parts)

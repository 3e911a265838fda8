"""Static-shape ONNX pieces of a decoder LM, and the host loop that chains them.

NPU compilers for LLMs (TPU-MLIR, QNN, Pulsar2) take fixed-shape graphs, so a model is cut
into pieces the runtime chains itself: ``embedding`` ``[1,S]`` and ``embedding_cache``
``[1,1]``; per layer a prefill ``block_i`` and a one-token decode ``block_cache_i`` with a
sequence-major KV cache ``[1,S,KVH,D]``; ``lm_head`` (final norm + projection, ``[1,H]``);
and the ``greedy_head`` / ``penalty_sample_head`` token pickers. What each piece computes
(the static decoder, and which models it supports) lives in
:mod:`common.models.static_decoder`; this module fixes their signatures, exports them with
the legacy TorchScript exporter, and runs them.

Positions and masks are inputs, not graph logic, so one set of graphs serves every prompt
length up to ``S``; :func:`prefill_inputs` / :func:`decode_inputs` build them the way the
vendor runtimes do, and :func:`greedy_decode` runs the whole protocol against any
:class:`PieceRunner` (onnxruntime here, a chip simulator in a target), which is what makes
"the compiled pieces generate the same tokens as the float model" a testable claim.

The Qwen2-VL family's language model exports the same pieces with M-RoPE positions
``[3,1,S]``. Blocks take embeddings, so a runtime splices the vision tower's output over the
placeholder rows; :class:`MultimodalPrompt` carries those rows and the 3-row positions HF's
rope index lays out, and decode positions then run behind the cache.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from common.analysis.layerwise import Parts
from common.core.errors import EdgeforgeError
from common.core.progress import progress as progress_bar
from common.export.onnx_files import onnx_destination
from common.models.base import DecoderLayer, ModelAdapter
from common.models.static_decoder import (
    MASK_BLOCKED,
    MROPE_ROWS,
    BlockCachePiece,
    BlockPiece,
    EmbeddingPiece,
    GreedyHead,
    LmHeadPiece,
    PenaltySampleHead,
    PieceDims,
    dims_of,
    piece_dims,
    rotary_table,
)

#: Opset of the legacy TorchScript exporter that TPU-MLIR and QNN accept (the dynamo
#: exporter forces opset 18 and external data, which TPU-MLIR rejects).
ONNX_OPSET = 17


@dataclass(frozen=True)
class Piece:
    """One exported graph: its name, kind (``block`` for ``block_3``), file, and input
    names/shapes/dtypes in call order."""

    name: str
    kind: str
    path: Path
    inputs: tuple[tuple[str, tuple[int, ...], str], ...]
    outputs: tuple[str, ...]


def _spec(name: str, shape: tuple[int, ...], dtype: str) -> tuple[str, tuple[int, ...], str]:
    return (name, shape, dtype)


def piece_signatures(dims: PieceDims) -> dict[str, tuple[tuple, tuple[str, ...]]]:
    """Input specs and output names of every piece kind (``block``/``block_cache`` per layer)."""
    s, h, kvh, d = dims.seq_len, dims.hidden_size, dims.num_kv_heads, dims.head_dim
    kv_out = ("hidden_states", "past_k", "past_v")
    rows = (1,) if dims.mrope_section is None else (MROPE_ROWS, 1)
    return {
        "embedding": ((_spec("input_ids", (1, s), "int32"),), ("input_embed",)),
        "embedding_cache": ((_spec("input_ids", (1, 1), "int32"),), ("input_embed",)),
        "block": (
            (
                _spec("input_states", (1, s, h), "float32"),
                _spec("position_ids", (*rows, s), "int32"),
                _spec("attention_mask", (1, 1, s, s), "float32"),
            ),
            kv_out,
        ),
        "block_cache": (
            (
                _spec("input_states", (1, 1, h), "float32"),
                _spec("position_ids", (*rows, 1), "int32"),
                _spec("attention_mask", (1, 1, 1, s + 1), "float32"),
                _spec("history_k", (1, s, kvh, d), "float32"),
                _spec("history_v", (1, s, kvh, d), "float32"),
            ),
            kv_out,
        ),
        "lm_head": ((_spec("hidden_states", (1, h), "float32"),), ("m_logits",)),
        "greedy_head": ((_spec("m_logits", (1, dims.vocab_size), "float32"),), ("token",)),
        "penalty_sample_head": (
            (
                _spec("m_logits", (1, dims.vocab_size), "float32"),
                _spec("input_ids", (1, s), "int32"),
                _spec("top_p", (1,), "float32"),
                _spec("temperature", (1,), "float32"),
                _spec("penalty", (1,), "float32"),
            ),
            ("probs", "token"),
        ),
    }


def example_inputs(
    specs: Sequence[tuple[str, tuple[int, ...], str]], vocab_size: int, seed: int = 0
) -> list[torch.Tensor]:
    """Deterministic in-range tensors for ``specs`` (ids below the vocab, positions below S,
    distinct per M-RoPE row, a causal mask), used to trace the export and as the compilers'
    check sample; the values never reach the artifacts."""
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    for name, shape, _ in specs:
        if name == "input_ids":
            out.append(torch.randint(0, vocab_size, shape, generator=gen, dtype=torch.int32))
        elif name == "position_ids":
            steps = torch.arange(shape[-1], dtype=torch.int32)
            rows = [steps // (r + 1) for r in range(math.prod(shape[:-1]))]
            out.append(torch.stack(rows).reshape(shape))
        elif name == "attention_mask":
            rows, cols = shape[-2], shape[-1]
            mask = torch.full((rows, cols), MASK_BLOCKED).triu(cols - rows + 1)
            out.append(mask.reshape(shape))
        elif name in ("top_p", "temperature", "penalty"):
            out.append(torch.tensor({"top_p": [0.8], "temperature": [0.7], "penalty": [1.1]}[name]))
        else:
            out.append(torch.randn(shape, generator=gen, dtype=torch.float32))
    return out


def _export(module: nn.Module, dest: Path, specs: tuple, outputs: tuple[str, ...], vocab: int):
    """Legacy TorchScript export at a fixed shape, written atomically; a piece too large for
    one protobuf file (Qwen-7B's embedding and lm_head) keeps its weights in
    ``<name>.onnx.data`` beside it (:func:`common.export.onnx_files.onnx_destination`)."""
    module = module.eval().requires_grad_(False)
    args = tuple(example_inputs(specs, vocab))
    with onnx_destination(dest) as tmp, torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(tmp),
            input_names=[name for name, _, _ in specs],
            output_names=list(outputs),
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


#: A family's prefill and decode wrappers of one decoder layer (``block_i``, ``block_cache_i``),
#: made while the layer is materialized.
BlockWrappers = Callable[[DecoderLayer], tuple[nn.Module, nn.Module]]


def iter_pieces(
    adapter: ModelAdapter,
    dims: PieceDims,
    parts: Parts | None = None,
    blocks: BlockWrappers | None = None,
) -> Iterator[tuple[str, str, nn.Module]]:
    """``(piece name, piece kind, wrapper module)`` for every piece of the model, in the
    order a runtime calls them. With ``parts`` over a streamed model, each part is read
    (and transformed) while its pieces are handed out and released before the next.
    ``blocks`` wraps each layer (default: the static decoder's ``BlockPiece`` and
    ``BlockCachePiece``); a family that exports its own code's blocks (Qwen1) passes its
    wrappers and keeps the rest of the pieces and their order."""
    parts = parts or Parts(adapter)
    if blocks is None:
        cos, sin = rotary_table(adapter, dims.seq_len)

        def blocks(layer: DecoderLayer) -> tuple[nn.Module, nn.Module]:
            return BlockPiece(layer, dims, cos, sin), BlockCachePiece(layer, dims, cos, sin)

    with parts.embedding() as module:
        embed = EmbeddingPiece(module)
        yield "embedding", "embedding", embed
        yield "embedding_cache", "embedding_cache", embed
    for layer in adapter.layers():
        with parts.layer(layer):
            prefill, decode = blocks(layer)
            yield f"block_{layer.index}", "block", prefill
            yield f"block_cache_{layer.index}", "block_cache", decode
    with parts.head() as (norm, lm_head):
        yield "lm_head", "lm_head", LmHeadPiece(norm, lm_head)
    yield "greedy_head", "greedy_head", GreedyHead()
    yield "penalty_sample_head", "penalty_sample_head", PenaltySampleHead()


def export_pieces(
    adapter: ModelAdapter,
    seq_len: int,
    out_dir: Path,
    only: Callable[[str], bool] | None = None,
    progress: bool = True,
    parts: Parts | None = None,
) -> list[Piece]:
    """Export every piece (or those ``only`` accepts) to ``out_dir/<name>.onnx`` (with
    ``<name>.onnx.data`` beside a piece over
    :data:`common.export.onnx_files.EXTERNAL_DATA_BYTES`: copy both); ``parts`` reads a
    streamed model's parts one at a time (:func:`iter_pieces`).

    The model must be float32 (the export fixes dtypes into the graph). Returns the pieces
    in call order with their signatures, which the compile step passes on as input shapes.
    """
    if adapter.embed_tokens().weight.dtype != torch.float32:
        raise EdgeforgeError("piece export: load the model in float32 (load_model default)")
    dims = piece_dims(adapter, seq_len)
    return export_modules(iter_pieces(adapter, dims, parts), dims, out_dir, only, progress)


def export_modules(
    modules: Iterable[tuple[str, str, nn.Module]],
    dims: PieceDims,
    out_dir: Path,
    only: Callable[[str], bool] | None = None,
    progress: bool = True,
) -> list[Piece]:
    """Export ``(name, kind, module)`` wrappers with :func:`piece_signatures` ``(dims)``'s
    inputs and outputs for their kind: the one export loop for every family's pieces (a
    family with its own wrappers, such as Qwen1's remote-code blocks, passes them here).
    ``modules`` is consumed one at a time, each exported before the next is asked for (a
    streamed model releases a part once its pieces are out)."""
    signatures = piece_signatures(dims)
    out_dir.mkdir(parents=True, exist_ok=True)
    pieces: list[Piece] = []
    bar = progress_bar(desc="export pieces", unit="piece", enabled=progress)
    for name, kind, module in modules:
        if only is not None and not only(name):
            continue
        specs, outputs = signatures[kind]
        path = out_dir / f"{name}.onnx"
        _export(module, path, specs, outputs, dims.vocab_size)
        pieces.append(Piece(name, kind, path, specs, outputs))
        bar.update()
    bar.close()
    return pieces


def export_narrow_head(adapter: ModelAdapter, out_dir: Path, rows: int) -> Path:
    """Export ``out_dir/lm_head.onnx``: the ``lm_head`` piece of ``adapter`` (its final norm
    and LM head in memory) with only the head's first ``rows`` output rows.

    The same graph as the whole piece, node for node and name for name, at a fraction of
    its weights: what a quantizer that only needs the graph and its calibrated encodings
    reads in place of a vocab-wide head (:func:`common.backends.qdq.quantize_narrow`)."""
    head = adapter.lm_head()
    narrow = nn.Linear(head.in_features, rows, bias=head.bias is not None)
    with torch.no_grad():
        narrow.weight.copy_(head.weight[:rows])
        if head.bias is not None:
            narrow.bias.copy_(head.bias[:rows])
    module = LmHeadPiece(adapter.final_norm(), narrow)
    dims = dims_of(adapter, 2)  # the head's signature reads the hidden size only
    return export_modules([("lm_head", "lm_head", module)], dims, out_dir, progress=False)[0].path


# -- the host protocol ------------------------------------------------------------------


class PieceRunner(Protocol):
    """Runs one named piece on numpy inputs (keyed by input name); outputs in order."""

    def __call__(self, name: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class MultimodalPrompt:
    """A vision-language prompt as the pieces take it: token ids ``[L]`` (vision tokens are
    placeholders), M-RoPE positions ``[3, L]``, and the vision tower's embeddings ``[N, H]``
    for prompt rows ``rows`` ``[N]``, which replace the embedding piece's output there."""

    token_ids: tuple[int, ...]
    positions: np.ndarray
    rows: np.ndarray
    embeds: np.ndarray

    def spliced(self, hidden: np.ndarray) -> np.ndarray:
        """The embedding of the prompt's ids ``[1, ≥L, H]`` with the vision embeddings over
        their placeholder rows (float32; ``hidden`` itself when there are none)."""
        if not len(self.rows):
            return hidden
        out = np.array(hidden, dtype=np.float32)
        out[0, self.rows] = self.embeds
        return out


def multimodal_prompt(
    adapter: ModelAdapter,
    inputs: Mapping[str, torch.Tensor],
    features: Mapping[str, torch.Tensor] | None = None,
) -> MultimodalPrompt:
    """The :class:`MultimodalPrompt` of one processor-encoded prompt (batch 1): positions
    from the model's own rope index, embeddings from its own (float) vision tower (or
    ``features``, its merged tokens per kind, ``{"image": [n, H]}``, computed already),
    images into the rows the processor typed 1 and videos into those typed 2, in order —
    what Hugging Face scatters into its input embeddings."""
    ids = inputs.get("input_ids")
    if ids is None or ids.shape[0] != 1:
        raise EdgeforgeError("multimodal prompt: expected processor inputs for one prompt")
    positions, _ = adapter.rope_index(inputs)
    types = np.asarray(inputs["mm_token_type_ids"][0])
    rows: list[np.ndarray] = []
    embeds: list[np.ndarray] = []
    for code, (kind, pixels, grid) in enumerate(
        (("image", "pixel_values", "image_grid_thw"),
         ("video", "pixel_values_videos", "video_grid_thw")), 1,
    ):  # fmt: skip
        if inputs.get(pixels) is None:
            continue
        if features is None:
            with torch.no_grad():
                tokens = adapter.vision_tower()(inputs[pixels], grid_thw=inputs[grid])
            merged = tokens.pooler_output
        else:
            merged = features[kind]
        where = np.flatnonzero(types == code)
        if len(where) != merged.shape[0]:
            raise EdgeforgeError(
                f"multimodal prompt: {len(where)} placeholder tokens for {pixels}, but the "
                f"vision tower gave {merged.shape[0]} embeddings"
            )
        rows.append(where)
        embeds.append(merged.float().numpy())
    hidden = adapter.hidden_size
    return MultimodalPrompt(
        token_ids=tuple(int(t) for t in ids[0]),
        positions=positions[:, 0].numpy().astype(np.int64),
        rows=np.concatenate(rows) if rows else np.zeros(0, np.int64),
        embeds=np.concatenate(embeds) if embeds else np.zeros((0, hidden), np.float32),
    )


def _position_ids(positions: np.ndarray, width: int, seq_len: int) -> np.ndarray:
    """``[R, n]`` positions zero-padded to ``[1, width]`` (one row) or ``[3, 1, width]``,
    checked against the rotary table the blocks carry (``S`` rows)."""
    rows, length = positions.shape
    if rows not in (1, MROPE_ROWS):
        raise EdgeforgeError(f"position ids: expected 1 or {MROPE_ROWS} rows, got {rows}")
    if length and not 0 <= positions.min() <= positions.max() < seq_len:
        raise EdgeforgeError(
            f"rotary positions {positions.min()}..{positions.max()} fall outside the "
            f"0..{seq_len - 1} the pieces were exported for; use a larger SEQ_LEN"
        )
    out = np.zeros((rows, width), dtype=np.int32)
    out[:, :length] = positions
    return out if rows == 1 else out[:, None]


def prefill_inputs(
    token_ids: Sequence[int],
    seq_len: int,
    rope_rows: int = 1,
    positions: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Padded ids, positions and causal mask for a prompt of ``L <= S`` tokens.

    ``positions`` ``[rope_rows, L]`` are the rotary positions (default ``0..L-1`` in every
    row; an M-RoPE prompt with images passes its 3-row layout). Rows past ``L`` are
    padding: position 0 and fully blocked (their output is never read).
    """
    length = len(token_ids)
    if not 1 <= length <= seq_len:
        raise EdgeforgeError(f"prompt has {length} tokens; it must fit SEQ_LEN={seq_len}")
    if positions is None:
        positions = np.broadcast_to(np.arange(length), (rope_rows, length))
    if np.shape(positions) != (rope_rows, length):
        raise EdgeforgeError(
            f"prompt positions have shape {np.shape(positions)}; expected ({rope_rows}, {length})"
        )
    ids = np.zeros((1, seq_len), dtype=np.int32)
    ids[0, :length] = token_ids
    mask = np.full((seq_len, seq_len), MASK_BLOCKED, dtype=np.float32)
    mask[:length, :length] = np.where(np.tri(length, dtype=bool), 0.0, MASK_BLOCKED)
    return {
        "input_ids": ids,
        "position_ids": _position_ids(np.asarray(positions), seq_len, seq_len),
        "attention_mask": mask[None, None],
    }


def decode_inputs(
    token_id: int,
    position: int,
    seq_len: int,
    rope_rows: int = 1,
    rope_position: int | None = None,
) -> dict[str, np.ndarray]:
    """Inputs for the token at ``position`` (its K/V go to cache row ``position``): history
    rows ``< position`` are visible, later rows are not yet written, the last column is the
    token itself. Its rotary position is ``rope_position`` (default ``position``) in every
    row: after an image, M-RoPE positions run behind the cache rows."""
    if not 0 < position < seq_len:
        raise EdgeforgeError(f"decode position {position} is outside SEQ_LEN={seq_len}")
    mask = np.full((1, 1, 1, seq_len + 1), MASK_BLOCKED, dtype=np.float32)
    mask[..., :position] = 0.0
    mask[..., seq_len] = 0.0
    rope = position if rope_position is None else rope_position
    return {
        "input_ids": np.array([[token_id]], dtype=np.int32),
        "position_ids": _position_ids(np.full((rope_rows, 1), rope), 1, seq_len),
        "attention_mask": mask,
    }


def greedy_decode(
    run: PieceRunner,
    dims: PieceDims,
    prompt: Sequence[int] | MultimodalPrompt,
    max_new_tokens: int,
    logits: list[np.ndarray] | None = None,
) -> list[int]:
    """Greedy tokens from the pieces: prefill the prompt, then one ``block_cache`` pass per
    new token with the KV cache kept on the host. Never stops early (no EOS), so the result
    is comparable token for token with a reference run of the same length. With ``logits``,
    each step's ``[V]`` logits are appended to it (a finer check than the tokens alone).

    A :class:`MultimodalPrompt` brings its M-RoPE positions and vision embeddings (spliced
    over the embedding piece's output); decode positions continue from its largest
    position + 1, as Hugging Face's ``rope_deltas`` do."""
    if isinstance(prompt, MultimodalPrompt):
        if dims.mrope_section is None:
            raise EdgeforgeError("a multimodal prompt needs an M-RoPE model's pieces")
        token_ids, positions = list(prompt.token_ids), prompt.positions
    else:
        token_ids, positions = list(prompt), None
    length = len(token_ids)
    if length + max_new_tokens > dims.seq_len:
        raise EdgeforgeError(
            f"prompt ({length}) + max_new_tokens ({max_new_tokens}) exceeds SEQ_LEN={dims.seq_len}"
        )
    pre = prefill_inputs(token_ids, dims.seq_len, dims.rope_rows, positions)
    rope_offset = 0 if positions is None else int(np.max(positions)) + 1 - length
    (hidden,) = run("embedding", {"input_ids": pre["input_ids"]})
    if isinstance(prompt, MultimodalPrompt):
        hidden = prompt.spliced(hidden)
    cache_k: list[np.ndarray] = []
    cache_v: list[np.ndarray] = []
    for i in range(dims.num_layers):
        hidden, k, v = run(
            f"block_{i}",
            {
                "input_states": hidden,
                "position_ids": pre["position_ids"],
                "attention_mask": pre["attention_mask"],
            },
        )
        cache_k.append(np.array(k, dtype=np.float32))
        cache_v.append(np.array(v, dtype=np.float32))
    token = _next_token(run, hidden[:, length - 1], logits)
    return decode_steps(
        run, dims, (cache_k, cache_v), token, length, max_new_tokens, rope_offset, logits
    )


def decode_steps(
    run: PieceRunner,
    dims: PieceDims,
    cache: tuple[list[np.ndarray], list[np.ndarray]],
    first_token: int,
    start: int,
    count: int,
    rope_offset: int = 0,
    logits: list[np.ndarray] | None = None,
) -> list[int]:
    """The runtime's decode loop: ``count`` greedy tokens starting with ``first_token`` at
    position ``start``, one ``embedding_cache`` → ``block_cache_i`` → ``lm_head`` →
    ``greedy_head`` pass per further token, each writing its own K/V row into ``cache``
    (per-layer ``[1,S,KVH,D]`` K and V lists, updated in place). M-RoPE positions run
    ``rope_offset`` ahead of the cache row, as after a multimodal prompt."""
    cache_k, cache_v = cache
    tokens = [first_token]
    for position in range(start, start + count - 1):
        step = decode_inputs(
            tokens[-1], position, dims.seq_len, dims.rope_rows, position + rope_offset
        )
        (hidden,) = run("embedding_cache", {"input_ids": step["input_ids"]})
        for i in range(dims.num_layers):
            hidden, k, v = run(
                f"block_cache_{i}",
                {
                    "input_states": hidden,
                    "position_ids": step["position_ids"],
                    "attention_mask": step["attention_mask"],
                    "history_k": cache_k[i],
                    "history_v": cache_v[i],
                },
            )
            cache_k[i][:, position] = k[:, 0]
            cache_v[i][:, position] = v[:, 0]
        tokens.append(_next_token(run, hidden[:, 0], logits))
    return tokens


def _next_token(run: PieceRunner, last_hidden: np.ndarray, keep: list[np.ndarray] | None) -> int:
    (logits,) = run("lm_head", {"hidden_states": np.asarray(last_hidden, dtype=np.float32)})
    logits = np.asarray(logits, dtype=np.float32)
    if keep is not None:
        keep.append(logits.reshape(-1))
    (token,) = run("greedy_head", {"m_logits": logits})
    return int(np.asarray(token).reshape(-1)[0])


def onnx_runner(onnx_dir: Path, max_sessions: int = 1) -> PieceRunner:
    """A :class:`PieceRunner` over ``onnx_dir/<name>.onnx`` with onnxruntime (CPU, one
    thread: deterministic and polite on shared machines).

    Sessions open on first use and at most ``max_sessions`` stay open: asking for another
    piece first closes the least recently used one. A session holds about 1.3x its piece's
    weights, so keeping every piece open cost 11.6 GiB for Qwen1.5-1.8B's 48 blocks, on top
    of the torch model. Callers that run many inputs therefore go piece-major (all inputs
    through ``block_0``, then ``block_1``, ...) so that each session opens once. A re-opened
    session computes the same outputs, bit for bit, as the one it replaces."""
    import onnxruntime as ort

    if max_sessions < 1:
        raise EdgeforgeError(f"onnx_runner: max_sessions={max_sessions}; expected >= 1")
    sessions: OrderedDict[str, ort.InferenceSession] = OrderedDict()

    def run(name: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if name in sessions:
            sessions.move_to_end(name)
        else:
            path = onnx_dir / f"{name}.onnx"
            if not path.is_file():
                raise EdgeforgeError(f"{path}: piece not exported")
            while len(sessions) >= max_sessions:  # closed before the next one opens
                sessions.popitem(last=False)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            sessions[name] = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        return sessions[name].run(None, inputs)

    return run


def reference_greedy(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Hugging Face greedy tokens for ``prompt`` ``[1, L]`` (the model's own forward with its
    KV cache, argmax each step): the reference the pieces must reproduce. Exactly
    ``max_new_tokens`` of them: EOS neither stops the run nor is suppressed, so every token is
    the model's own argmax and a prompt whose answer ends early still checks the whole run."""
    tokens: list[int] = []
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        while True:
            tokens.append(int(out.logits[0, -1].argmax()))
            if len(tokens) == max_new_tokens:
                return tokens
            step = torch.tensor([[tokens[-1]]], dtype=prompt.dtype)
            out = model(input_ids=step, past_key_values=out.past_key_values, use_cache=True)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two tensors, flattened, in float64 (1.0 for two zero tensors)."""
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return 1.0 if norm == 0.0 and not x.any() and not y.any() else float(x @ y / norm)


def compare_runners(
    candidate: PieceRunner, reference: PieceRunner, pieces: Sequence[Piece], vocab_size: int
) -> dict[str, float]:
    """Per piece, the worst output agreement of ``candidate`` with ``reference`` on the same
    deterministic inputs: cosine for float outputs, 1.0/0.0 (all equal or not) for integer
    outputs such as token ids."""
    scores: dict[str, float] = {}
    for piece in pieces:
        tensors = example_inputs(piece.inputs, vocab_size)
        inputs = {spec[0]: t.numpy() for spec, t in zip(piece.inputs, tensors, strict=True)}
        want, got = reference(piece.name, inputs), candidate(piece.name, inputs)
        worst = 1.0
        for ref_out, out in zip(want, got, strict=True):
            if np.issubdtype(np.asarray(ref_out).dtype, np.integer):
                same = np.array_equal(np.asarray(out).astype(np.int64), ref_out)
                worst = min(worst, 1.0 if same else 0.0)
            else:
                worst = min(worst, cosine(out, ref_out))
        scores[piece.name] = worst
    return scores


def reference_logits(model: nn.Module, prompt: torch.Tensor, tokens: Sequence[int]) -> np.ndarray:
    """HF logits ``[n, V]`` that predicted each of ``tokens`` after ``prompt`` (one
    teacher-forced forward pass): what :func:`greedy_decode`'s ``logits`` should equal."""
    ids = torch.cat([prompt, torch.tensor([list(tokens)], dtype=prompt.dtype)], dim=1)
    with torch.no_grad():
        out = model(ids[:, :-1]).logits[0, prompt.shape[1] - 1 :]
    return out.float().numpy()

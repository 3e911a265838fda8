"""The static decoder: what each ONNX piece of a decoder LM computes, with static shapes.

NPU compilers for LLMs (TPU-MLIR, QNN, Pulsar2) take fixed-shape graphs, so a model runs
as pieces the runtime chains itself; :mod:`common.export.piece_export` exports them and
runs that host loop, this module defines them (as executorch's Qualcomm flow keeps its
``static_llama.py``). :class:`BlockPiece` / :class:`BlockCachePiece` are one decoder layer
for prefill and for one-token decode with a sequence-major KV cache ``[1,S,KVH,D]``;
:class:`EmbeddingPiece`, :class:`LmHeadPiece` (final norm + projection) and the token
pickers :class:`GreedyHead` / :class:`PenaltySampleHead` complete the model. They are built
from the adapter's live modules (norms, linears, MLP, rotary table), with the attention
written out explicitly: HF attention keeps ``[B,H,S,D]`` and a cache object, neither of
which fixes the KV layout a runtime can bind as persistent buffers. Positions and the
additive mask (:data:`MASK_BLOCKED` where blocked) are inputs, not graph logic, so one set
of graphs serves every prompt length up to ``S``.

The Qwen2-VL family's language model uses M-RoPE: positions are ``[3,1,S]`` (temporal,
height, width rows) and each ``mrope_section`` of the rotary dims turns with its own row
(:func:`gather_rope`). Blocks take embeddings, so a runtime splices the vision tower's
output over the placeholder rows.

What the static decoder implements, in one place. A checkpoint that needs anything else
would get another function from the pieces without any error, so :func:`piece_dims` (the
entry of every export and of sequential GPTQ) refuses it first, with one line naming the
config field or module (:func:`unsupported_features`):

=============  =============================================================================
Model types    :data:`SUPPORTED_TYPES`: llama's decoder layer (pre-norm residual blocks, the
               model's own MLP module). The allowlist is the only guard for what modules
               cannot show, e.g. parallel residuals or an embedding scale applied in the
               model's forward (Gemma multiplies by ``sqrt(hidden_size)`` there).
Norms          two per block, ``input_layernorm`` before attention and
               ``post_attention_layernorm`` before the MLP, plus the final norm before the
               head. Any other weight in a layer (Gemma2's ``pre/post_feedforward_layernorm``,
               Qwen3's ``self_attn.q_norm``/``k_norm``) is refused.
Norm weights   the checkpoint's own norm modules run as Hugging Face runs them, so the pieces
               follow the module's convention. Passes that re-implement the norm (rotation
               folding, QNN's RMSNorm fusion) assume ``w * x / rms(x)``, not ``(1 + w)``.
Rope           1-D RoPE over the whole ``head_dim``, from the model's own rotary module (theta,
               scaling and attention factor as HF computes them), or 3-row M-RoPE for
               ``qwen2_vl``/``qwen2_5_vl``. Refused: a partial rotary dim.
Attention      causal GQA over every position (one mask for all layers), scores scaled by
               ``1/sqrt(head_dim)``; q/k/v/o biases as the linears carry them. Refused:
               sliding-window layers and attention/final logit soft-capping
               (:meth:`~common.models.base.ModelAdapter.attention_departures`), another
               scale (``query_pre_attn_scalar``, the attention module's ``scaling``).
Embeddings     the ``embed_tokens`` module's output, as is.
LM head        the final norm, then the projection; no soft-capping (refused above).
=============  =============================================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from common.core.errors import EdgeforgeError
from common.models.base import DecoderLayer, ModelAdapter

#: Additive mask value for blocked positions: finite and exactly representable in bf16,
#: so the same mask works for float and bf16 I/O (the vendors use -10000 too).
MASK_BLOCKED = -10000.0
#: Candidates the sampling head keeps (the LLM-TPU contract: probabilities over the top 50).
SAMPLE_TOP_K = 50
#: The sampling head never filters below this many candidates, whatever ``top_p`` says.
SAMPLE_MIN_KEEP = 5
#: Model families whose decoder layer is llama's (pre-norm, SwiGLU). The VL ones (their
#: language model) rotate with M-RoPE: 3-row position ids, one per (temporal, height, width).
SUPPORTED_TYPES = ("llama", "qwen2", "qwen2_vl", "qwen2_5_vl")
#: Position-id rows of an M-RoPE model.
MROPE_ROWS = 3


@dataclass(frozen=True)
class PieceDims:
    """The shapes every piece agrees on; ``seq_len`` is the static context ``S``.

    ``mrope_section`` is set for M-RoPE models (Qwen2-VL family): positions are then
    ``[3,1,L]`` and section ``i`` of the rotary half-dim turns with row ``i``.
    """

    seq_len: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    vocab_size: int
    mrope_section: tuple[int, ...] | None = None

    @property
    def rope_rows(self) -> int:
        """Rows of position ids the blocks take: 3 with M-RoPE, else 1."""
        return 1 if self.mrope_section is None else MROPE_ROWS


#: The attention roles whose linears the static block calls itself (the MLP module runs as a
#: whole, so its weights are all used).
ATTENTION_ROLES = ("q", "k", "v", "o")


def unsupported_features(adapter: ModelAdapter) -> list[str]:
    """Every way ``adapter``'s text model departs from what the static decoder implements
    (the table in this module's docstring), one phrase each naming the config field or the
    module; empty when the pieces compute what Hugging Face does.

    Sliding windows and soft-capping come from :meth:`ModelAdapter.attention_departures`
    (sequential profiling refuses the same ones). The rest is what only the static block
    gets wrong, because it calls the modules it knows and writes attention out itself: a
    weight in a layer outside the two norms, the MLP and the q/k/v/o linears is never
    applied, another attention scale is never used, and a partial rotary table would not
    cover the head.
    """
    problems = adapter.attention_departures()
    config, head_dim = adapter.text_config, adapter.head_dim
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and scalar != head_dim:
        problems.append(
            f"query_pre_attn_scalar is {scalar} (attention scaled by 1/sqrt({scalar}), "
            f"not 1/sqrt(head_dim={head_dim}))"
        )
    inv_freq = getattr(adapter.rotary_embedding(), "inv_freq", None)
    if isinstance(inv_freq, torch.Tensor) and 2 * inv_freq.numel() != head_dim:
        problems.append(
            f"the rotary embedding turns {2 * inv_freq.numel()} of head_dim={head_dim} "
            "dims (partial_rotary_factor)"
        )
    layers = adapter.layers()
    unused: dict[str, list[str]] = {}
    scales: dict[float, list[str]] = {}
    for layer in layers:
        applied = (layer.input_norm, layer.post_attention_norm, layer.mlp)
        applied += tuple(layer.linears[role] for role in ATTENTION_ROLES)
        known = {id(p) for module in applied for p in module.parameters()}
        for name, param in layer.module.named_parameters():
            if id(param) not in known:
                part = name.removesuffix(".weight").removesuffix(".bias")
                unused.setdefault(part, [])
                if layer.name not in unused[part]:
                    unused[part].append(layer.name)
        scaling = getattr(layer.attention, "scaling", None)
        if isinstance(scaling, float) and not math.isclose(scaling, head_dim**-0.5):
            scales.setdefault(scaling, []).append(layer.name)
    for part, names in unused.items():
        problems.append(
            f"{names[0]}.{part} (in {len(names)} of {len(layers)} layers) is a weight the "
            "static block never applies (it runs only input_layernorm, attention, "
            "post_attention_layernorm and the MLP)"
        )
    for scaling, names in scales.items():
        problems.append(
            f"{names[0]}'s attention scaling is {scaling:g} (in {len(names)} of "
            f"{len(layers)} layers), not 1/sqrt(head_dim={head_dim})"
        )
    return problems


def check_supported(adapter: ModelAdapter) -> None:
    """Refuse, with one line, a model the static decoder would compute wrongly: a
    ``model_type`` outside :data:`SUPPORTED_TYPES`, or any :func:`unsupported_features`."""
    if adapter.model_type not in SUPPORTED_TYPES:
        raise EdgeforgeError(
            f"piece export: model_type {adapter.model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_TYPES)}"
        )
    problems = unsupported_features(adapter)
    if problems:
        raise EdgeforgeError(
            f"piece export: the {adapter.model_type} model's {'; '.join(problems)}; the "
            "exported decoder implements llama's block with full causal attention without "
            "soft-capping only (common/models/static_decoder.py)"
        )


def piece_dims(adapter: ModelAdapter, seq_len: int) -> PieceDims:
    """The dims of ``adapter``'s text model at context ``seq_len``, once the model passed
    :func:`check_supported`, checked against the rotary range the checkpoint was trained
    for (positions past it are extrapolation)."""
    check_supported(adapter)
    max_positions = int(getattr(adapter.text_config, "max_position_embeddings", 0) or 0)
    if not isinstance(seq_len, int) or seq_len < 2:
        raise EdgeforgeError(f"SEQ_LEN: expected an integer >= 2, got {seq_len!r}")
    if max_positions and seq_len > max_positions:
        raise EdgeforgeError(
            f"SEQ_LEN={seq_len} exceeds the model's rotary range "
            f"(config max_position_embeddings={max_positions}); use SEQ_LEN<={max_positions}"
        )
    return dims_of(adapter, seq_len)


def dims_of(adapter: ModelAdapter, seq_len: int) -> PieceDims:
    """``adapter``'s piece dims at ``seq_len``, unchecked: the caller has validated
    ``seq_len`` against its model's own limit (:func:`piece_dims` does for HF models)."""
    return PieceDims(
        seq_len=seq_len,
        hidden_size=adapter.hidden_size,
        num_heads=adapter.num_heads,
        num_kv_heads=adapter.num_kv_heads,
        head_dim=adapter.head_dim,
        num_layers=adapter.num_layers,
        vocab_size=adapter.vocab_size,
        mrope_section=adapter.mrope_section,
    )


def rotary_table(adapter: ModelAdapter, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` ``[S, D]`` for positions ``0..S-1`` from the model's own rotary module,
    so rope variants (theta, scaling, attention factor) come out exactly as HF computes them."""
    rotary = adapter.rotary_embedding()
    probe = torch.zeros(1, seq_len, adapter.head_dim, dtype=torch.float32)
    positions = torch.arange(seq_len, dtype=torch.long)[None]
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    return cos[0].float().contiguous(), sin[0].float().contiguous()


def mrope_runs(section: Sequence[int], head_dim: int) -> list[tuple[int, int, int]]:
    """``(row, start, stop)`` column runs of an M-RoPE cos/sin row: section ``i`` of each
    rotary half takes its angles from position row ``i % 3`` (HF's
    ``recomposition_frequencies``: split the half-dim by ``mrope_section``, then repeat the
    half). Empty sections give no run."""
    runs: list[tuple[int, int, int]] = []
    for start in (0, head_dim // 2):
        for i, width in enumerate(section):
            if width:
                runs.append((i % MROPE_ROWS, start, start + width))
            start += width
    return runs


def gather_rope(
    table: torch.Tensor, position_ids: torch.Tensor, section: Sequence[int] | None
) -> torch.Tensor:
    """Rotary rows ``[1, L, D]`` for ``position_ids`` from a 1-D table ``[S, D]``.

    1-D RoPE indexes the table by ``[1, L]`` positions. M-RoPE gathers the table once per
    row of ``[3, 1, L]`` positions and takes each column run from its row: the table entry
    for position ``p`` is ``f(p · inv_freq[d])``, so this equals HF's per-row angles exactly
    (Gather, Slice and Concat only — ops every NPU compiler lowers). Each row is its own
    ``[1, L]`` Gather, as in 1-D RoPE: QNN's HTP gathered a table with the whole ``[3, 1,
    L]`` index tensor wrongly for prompts of 72 tokens (cos 0.98 against onnxruntime on
    CPU; right for one token)."""
    if section is None:
        return table[position_ids]
    rows = [table[position_ids[r]] for r in range(MROPE_ROWS)]  # each [1, L, D]
    # D from the section, not table.shape: under the ONNX tracer a shape is a tensor.
    runs = mrope_runs(section, 2 * sum(section))
    return torch.cat([rows[r][:, :, a:b] for r, a, b in runs], dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Attention(nn.Module):
    """Llama attention on sequence-major tensors ``[1, S, heads, D]`` with an additive mask.

    Returns the attention output and this call's post-rope K and V (what the cache stores).
    """

    def __init__(self, layer: DecoderLayer, dims: PieceDims, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.q_proj, self.k_proj = layer.linears["q"], layer.linears["k"]
        self.v_proj, self.o_proj = layer.linears["v"], layer.linears["o"]
        self.dims = dims
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def project(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Roped Q ``[1,L,NH,D]`` and K, plain V ``[1,L,KVH,D]`` for ``L`` new tokens."""
        d = self.dims
        length = x.shape[1]
        q = self.q_proj(x).view(1, length, d.num_heads, d.head_dim)
        k = self.k_proj(x).view(1, length, d.num_kv_heads, d.head_dim)
        v = self.v_proj(x).view(1, length, d.num_kv_heads, d.head_dim)
        cos = gather_rope(self.cos, position_ids, d.mrope_section).unsqueeze(2)  # [1, L, 1, D]
        sin = gather_rope(self.sin, position_ids, d.mrope_section).unsqueeze(2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Softmax attention of ``q`` over ``k``/``v`` (GQA groups share a KV head)."""
        d = self.dims
        group = d.num_heads // d.num_kv_heads
        q = q.transpose(1, 2)  # [1, NH, L, D]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [1, KVH, T, D]
        if group > 1:  # MHA exports no repeat: QNN HTP's compiler crashed on a 1-fold Tile
            k = k.repeat_interleave(group, dim=1)  # [1, NH, T, D]
            v = v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(d.head_dim) + mask
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(1, q.shape[2], -1)
        return self.o_proj(out)


class BlockPiece(nn.Module):
    """Prefill ``block_i``: ``[1,S,H]``, positions ``[1,S]`` (M-RoPE: ``[3,1,S]``), mask
    ``[1,1,S,S]`` → hidden ``[1,S,H]``, ``past_k``/``past_v`` ``[1,S,KVH,D]``.

    It takes embeddings, not ids, so a VL runtime splices vision-tower rows in between."""

    def __init__(self, layer: DecoderLayer, dims: PieceDims, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.input_norm, self.post_norm = layer.input_norm, layer.post_attention_norm
        self.mlp = layer.mlp
        self.attn = _Attention(layer, dims, cos, sin)

    def forward(
        self, input_states: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.attn.project(self.input_norm(input_states), position_ids)
        hidden = input_states + self.attn.attend(q, k, v, attention_mask)
        hidden = hidden + self.mlp(self.post_norm(hidden))
        return hidden, k, v


class BlockCachePiece(BlockPiece):
    """Decode ``block_cache_i``: one token ``[1,1,H]``, its position ``[1,1]`` (``[3,1,1]``), mask
    ``[1,1,1,S+1]`` and the history ``[1,S,KVH,D]`` → hidden ``[1,1,H]`` and only the new
    token's K/V ``[1,1,KVH,D]`` (the host writes them into its cache; no full-cache copy)."""

    def forward(  # type: ignore[override]
        self,
        input_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        history_k: torch.Tensor,
        history_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.attn.project(self.input_norm(input_states), position_ids)
        keys = torch.cat([history_k, k], dim=1)
        values = torch.cat([history_v, v], dim=1)
        hidden = input_states + self.attn.attend(q, keys, values, attention_mask)
        hidden = hidden + self.mlp(self.post_norm(hidden))
        return hidden, k, v


class EmbeddingPiece(nn.Module):
    """Token ids (int32) → embeddings; the same module serves ``[1,S]`` and ``[1,1]``."""

    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class LmHeadPiece(nn.Module):
    """Last hidden row ``[1,H]`` → final norm → logits ``[1,V]`` (float)."""

    def __init__(self, norm: nn.Module, head: nn.Linear):
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden_states))


class GreedyHead(nn.Module):
    """Logits ``[1,V]`` → argmax token ``[1,1]`` (TopK 1: what the NPUs lower well)."""

    def forward(self, m_logits: torch.Tensor) -> torch.Tensor:
        _, token = torch.topk(m_logits.float(), 1)
        return token


class PenaltySampleHead(nn.Module):
    """Repetition penalty, top-k 50, temperature and top-p over logits ``[1,V]``.

    Inputs: ``m_logits [1,V]``, ``input_ids [1,S]`` (the tokens to penalise), ``top_p``,
    ``temperature``, ``penalty`` (each ``[1]``). Outputs ``probs [1,50]`` and ``token [1,50]``;
    the host draws from ``probs``. At least :data:`SAMPLE_MIN_KEEP` candidates survive top-p.
    """

    def __init__(self) -> None:
        super().__init__()
        # Float 0/1, not bool: TPU-MLIR's converter cannot take a constant operand of Or.
        keep = torch.zeros(1, SAMPLE_TOP_K)
        keep[0, :SAMPLE_MIN_KEEP] = 1.0
        self.register_buffer("keep", keep, persistent=False)

    def forward(
        self,
        m_logits: torch.Tensor,
        input_ids: torch.Tensor,
        top_p: torch.Tensor,
        temperature: torch.Tensor,
        penalty: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = input_ids.long()
        seen = torch.gather(m_logits, 1, ids)
        seen = torch.where(seen < 0, seen * penalty, seen / penalty)
        logits = m_logits.scatter(1, ids, seen)
        logits, token = torch.topk(logits.float(), SAMPLE_TOP_K)
        logits = logits / temperature
        cumulative = logits.softmax(dim=1).cumsum(dim=1)
        keep = torch.maximum((cumulative < top_p).float(), self.keep)
        filtered = logits * keep - 1000.0 * (1.0 - keep)  # exact: keep is 0 or 1
        return filtered.softmax(dim=1), token

"""The end-to-end checks ``make sophgo`` runs on simulated nets, kept cheap enough for a
CPU model of the chip (seconds per net call): a teacher-forced prefill that proves the greedy
tokens, a KV-cache decode loop that starts from that prefill's cache, and per-net scoring on
the very inputs the run produced. Everything takes any :class:`PieceRunner`, so it is tested
against onnxruntime without the simulator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.analysis.layerwise import Parts
from common.analysis.layerwise_decode import (
    VisualPrompt,
    reference_greedy,
    reference_logits,
    vision_features,
)
from common.export.piece_export import (
    MultimodalPrompt,
    PieceRunner,
    cosine,
    decode_steps,
    greedy_decode,
    multimodal_prompt,
    prefill_inputs,
)
from common.models.static_decoder import MASK_BLOCKED, PieceDims
from common.steps.verify_sampling import block_index, decide, sampled


def prefill_greedy(
    run: PieceRunner, dims: PieceDims, prompt: list[int], continuation: list[int]
) -> tuple[list[int], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Greedy tokens, logits and the K/V cache of the prefill nets under teacher forcing:
    one ``block_i`` pass over ``prompt + continuation[:-1]``, then ``lm_head`` on every row
    that predicts a continuation token.

    If every argmax equals ``continuation`` (HF's greedy tokens), greedy generation through
    these nets yields exactly those tokens — each step sees the same prefix as HF — at the
    cost of one simulated prefill instead of one simulated decode pass per token.
    """
    ids = [*prompt, *continuation[:-1]]
    pre = prefill_inputs(ids, dims.seq_len, dims.rope_rows)
    (hidden,) = run("embedding", {"input_ids": pre["input_ids"]})
    cache_k: list[np.ndarray] = []
    cache_v: list[np.ndarray] = []
    for i in range(dims.num_layers):
        hidden, k, v = run(
            f"block_{i}",
            {k: pre[k] for k in ("position_ids", "attention_mask")} | {"input_states": hidden},
        )
        cache_k.append(np.array(k, np.float32))
        cache_v.append(np.array(v, np.float32))
    logits = [
        np.asarray(
            run("lm_head", {"hidden_states": np.asarray(hidden[:, row], np.float32)})[0],
            np.float32,
        ).reshape(-1)
        for row in range(len(prompt) - 1, len(ids))
    ]
    return [int(np.argmax(row)) for row in logits], logits, cache_k, cache_v


def kv_decode(
    run: PieceRunner,
    dims: PieceDims,
    prompt_length: int,
    first_token: int,
    cache: tuple[list[np.ndarray], list[np.ndarray]],
    count: int,
) -> list[int]:
    """``count`` greedy tokens through the decode nets (``embedding_cache`` →
    ``block_cache_i`` → ``lm_head`` → ``greedy_head``), each step feeding back its own token
    and writing its own K/V into the cache — the runtime's loop. It starts from the prompt's
    K/V rows of a prefill that already ran (rows ``>= prompt_length`` are cleared), instead
    of simulating the same prompt prefill a second time."""
    cache_k = [k.copy() for k in cache[0]]
    cache_v = [v.copy() for v in cache[1]]
    for layer in (*cache_k, *cache_v):
        layer[:, prompt_length:] = 0.0
    return decode_steps(run, dims, (cache_k, cache_v), first_token, prompt_length, count)


#: ``VERIFY=`` (:mod:`common.steps.verify_sampling`): ``full`` simulates every net of every
#: check; ``sample`` simulates the embedding, the head nets and the sampled blocks, the
#: other blocks running on onnxruntime (float) in the same chain, over
#: :data:`SAMPLE_DECODE_TOKENS` decode steps; ``auto`` picks ``full`` when its estimate is
#: within :data:`FULL_BUDGET_SECONDS`.
#: The longest full simulation ``VERIFY=auto`` runs.
FULL_BUDGET_SECONDS = 2 * 3600
#: Decode steps a sample runs through the KV-cache nets.
SAMPLE_DECODE_TOKENS = 4
#: Simulator seconds on this machine kind (2 cores) per call, by what a call costs:
#: prefill blocks per parameter and token, one-token blocks and the LM head per
#: parameter. Measured on SmolLM2 at seq 256 (block 21 s, block_cache 0.9 s, lm_head 1.3 s);
#: Qwen1.5-1.8B's block (280 s), block_cache (13 s) and lm_head (14 s) follow the same rates.
PREFILL_SECONDS_PER_PARAM_TOKEN = 2.4e-8
DECODE_SECONDS_PER_PARAM = 2.6e-7
HEAD_SECONDS_PER_PARAM = 4.6e-8


@dataclass(frozen=True)
class VerifyPolicy:
    """Which nets the end-to-end checks run on the simulator, how many decode steps, and
    why: recorded in the report, so a sampled verification is never taken for a full one."""

    mode: str
    blocks: tuple[int, ...]
    num_layers: int
    decode_tokens: int
    estimated_full_seconds: float
    estimated_seconds: float
    reason: str

    def simulated(self, name: str) -> bool:
        """Whether net ``name`` runs on the simulator (a block not sampled runs float)."""
        index = block_index(name)
        return index is None or index in self.blocks

    def to_json(self) -> dict[str, Any]:
        skipped = [i for i in range(self.num_layers) if i not in self.blocks]
        return {
            "mode": self.mode,
            "simulated_blocks": list(self.blocks),
            "blocks_on_onnxruntime": skipped,
            "decode_tokens": self.decode_tokens,
            "estimated_full_seconds": round(self.estimated_full_seconds),
            "estimated_seconds": round(self.estimated_seconds),
            "reason": self.reason,
        }


def simulation_seconds(
    blocks: int, layer_params: int, head_params: int, seq_len: int, rows: int, decode: int
) -> float:
    """Estimated simulator seconds of the checks with ``blocks`` blocks simulated: one
    prefill pass (``seq_len`` tokens) and ``decode`` one-token passes through them, and the
    LM head on ``rows`` teacher-forced rows plus once per decode step."""
    prefill = blocks * layer_params * seq_len * PREFILL_SECONDS_PER_PARAM_TOKEN
    decoding = decode * blocks * layer_params * DECODE_SECONDS_PER_PARAM
    return prefill + decoding + (rows + decode) * head_params * HEAD_SECONDS_PER_PARAM


def verify_policy(
    choice: str,
    num_layers: int,
    layer_params: int,
    head_params: int,
    seq_len: int,
    rows: int,
    decode_tokens: int,
) -> VerifyPolicy:
    """The policy ``VERIFY=choice`` names for a model of ``num_layers`` layers of
    ``layer_params`` parameters, whose checks read ``rows`` teacher-forced rows and run
    ``decode_tokens`` decode steps (``auto``: full within :data:`FULL_BUDGET_SECONDS`)."""
    full = simulation_seconds(num_layers, layer_params, head_params, seq_len, rows, decode_tokens)
    decision = decide(choice, full, FULL_BUDGET_SECONDS, "simulation")
    if decision.mode == "full":
        every = tuple(range(num_layers))
        return VerifyPolicy("full", every, num_layers, decode_tokens, full, full, decision.reason)
    blocks = sampled(num_layers)
    decode = min(decode_tokens, SAMPLE_DECODE_TOKENS)
    sample = simulation_seconds(len(blocks), layer_params, head_params, seq_len, rows, decode)
    return VerifyPolicy("sample", blocks, num_layers, decode, full, sample, decision.reason)


def dispatch(
    policy: VerifyPolicy, simulator: Callable[..., Any], reference: Callable[..., Any]
) -> Callable[[str, dict[str, np.ndarray]], Any]:
    """A runner that sends each net to the simulator or, where ``policy`` leaves it out,
    to the float reference: one chain in which the sampled nets see real inputs."""

    def run(name: str, inputs: dict[str, np.ndarray]) -> Any:
        return (simulator if policy.simulated(name) else reference)(name, inputs)

    return run


class ScoredRunner:
    """Runs ``candidate`` and, on the first call of each net, ``reference`` on the very same
    inputs, keeping the worst output agreement (cosine; integer outputs 1.0/0.0 for equal or
    not). For a prefill net only the rows a runtime reads are scored: padding rows are fully
    masked, and there the bf16 kernel and the float graph legitimately disagree.

    Asking the reference once per net is also what keeps it cheap to hold: a one-session
    :func:`~common.export.piece_export.onnx_runner` opens each float piece once, in the
    run's order, and never re-opens one for the decode loop's later tokens. Nets that
    ``scored`` rejects (those the candidate runs on the reference itself) are not scored."""

    def __init__(
        self,
        candidate: PieceRunner,
        reference: PieceRunner,
        scored: Callable[[str], bool] = lambda _name: True,
    ):
        self.candidate, self.reference, self.scored = candidate, reference, scored
        self.scores: dict[str, float] = {}

    def __call__(self, name: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        got = self.candidate(name, inputs)
        if name not in self.scores and self.scored(name):
            want = self.reference(name, inputs)
            rows = live_rows(inputs)
            self.scores[name] = min(agreement(g, w, rows) for g, w in zip(got, want, strict=True))
        return got


def live_rows(inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, int] | None:
    """Indices of a prefill's rows whose mask row is not fully blocked, and the row count
    (``None`` for a net without a multi-row mask: all of it is live)."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.shape[-2] == 1:
        return None
    return np.flatnonzero((mask[0, 0] > MASK_BLOCKED / 2).any(axis=-1)), mask.shape[-2]


def agreement(got: np.ndarray, want: np.ndarray, rows: tuple[np.ndarray, int] | None) -> float:
    """Cosine of two outputs over the live rows (axis 1, for outputs with one row per
    position); 1.0/0.0 for integer outputs."""
    got, want = np.asarray(got), np.asarray(want)
    if rows is not None and want.ndim >= 2 and want.shape[1] == rows[1]:
        got, want = got[:, rows[0]], want[:, rows[0]]
    if np.issubdtype(want.dtype, np.integer):
        return 1.0 if np.array_equal(got.astype(np.int64), want.astype(np.int64)) else 0.0
    return cosine(got, want)


@dataclass(frozen=True)
class ImageReference:
    """The float side of the image-prompt check: the prompt as the pieces take it (the
    float vision tower's embeddings, HF's 3-row M-RoPE positions), its greedy tokens and
    the logits that chose each (``[n, V]``)."""

    prompt: MultimodalPrompt
    tokens: list[int]
    logits: np.ndarray


def image_reference(parts: Parts, inputs: dict[str, Any], count: int) -> ImageReference:
    """``count`` greedy tokens of processor ``inputs`` (one picture prompt) and their
    logits, as Hugging Face ``generate`` gives them: the vision tower read first, then the
    language model part by part (:mod:`common.analysis.layerwise_decode`), so a model
    that does not fit whole is checked too. Computed before the simulator loads."""
    with parts.vision_tower() as tower:
        prompt = multimodal_prompt(parts.adapter, inputs)
        visual = VisualPrompt(inputs, vision_features(tower, inputs))
    tokens = reference_greedy(parts, visual, count)
    return ImageReference(prompt, tokens, reference_logits(parts, visual, tokens))


def image_prompt_check(
    run: PieceRunner, reference: ImageReference, dims: PieceDims, count: int
) -> dict[str, Any]:
    """VL models: ``count`` greedy tokens of an image prompt through the nets (prefill with
    the float vision tower's embeddings spliced in and HF's 3-row M-RoPE positions, then the
    KV-cache decode loop), against the float reference's first ``count``."""
    logits: list[np.ndarray] = []
    tokens = greedy_decode(run, dims, reference.prompt, count, logits)
    expected, ref_logits = reference.tokens[:count], reference.logits[:count]
    matched = first_mismatch(tokens, expected)
    # Logits agree step by step while the inputs are the same: up to the first divergence.
    steps = zip(logits[: matched + 1], ref_logits[: matched + 1], strict=False)
    return {
        "image_tokens": len(reference.prompt.rows),
        "prompt_tokens": len(reference.prompt.token_ids),
        "greedy_tokens": tokens,
        "reference_tokens": expected,
        "greedy_match_tokens": matched,
        "logits_cos_min": min(cosine(a, b) for a, b in steps),
    }


def first_mismatch(tokens: list[int], expected: list[int]) -> int:
    """How many leading tokens agree (``len(expected)`` when all do)."""
    return next(
        (i for i, (a, b) in enumerate(zip(tokens, expected, strict=False)) if a != b),
        len(expected),
    )

"""Model-quality numbers every stage reports: perplexity, logit agreement, a greedy answer.

All three work on any causal LM that maps ``input_ids`` to ``.logits`` (text or VL, fp32
or half). They score fixed windows one at a time (batch 1) so memory stays bounded by one
window's logits, and they stream: nothing keeps the logits of more than one window.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.core.errors import EdgeforgeError
from common.core.progress import progress as progress_bar
from common.models.streaming import StreamedModel


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise EdgeforgeError(f"{type(model).__name__} has no parameters to evaluate") from None


def _vocab_size(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return getattr(embedding, "num_embeddings", None)


def check_windows(
    windows: torch.Tensor, model: nn.Module, *, min_len: int = 1, what: str = "windows"
) -> torch.Tensor:
    """Validate token windows ``[n, seq_len]`` against the model; return them as int64.

    Out-of-range ids would otherwise surface as an index error deep inside the embedding.
    """
    if not isinstance(windows, torch.Tensor):
        raise EdgeforgeError(f"{what}: expected a torch.Tensor, got {type(windows).__name__}")
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise EdgeforgeError(f"{what}: expected integer token ids, got dtype {windows.dtype}")
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < min_len:
        raise EdgeforgeError(
            f"{what}: expected shape [n >= 1, seq_len >= {min_len}], got {list(windows.shape)}"
        )
    vocab = _vocab_size(model)
    low, high = int(windows.min()), int(windows.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise EdgeforgeError(
            f"{what}: token ids span [{low}, {high}] but the model's vocabulary is "
            f"[0, {vocab}); they were made with a different tokenizer"
        )
    return windows.long()


def model_logits(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[seq_len, vocab]`` of one window (half-precision models upcast)."""
    out = model(input_ids=window.to(_device(model))[None], use_cache=False)
    return out.logits[0].float()


def window_nll_sum(logits: torch.Tensor, window: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood of one window (float64 sum: exact for long
    windows)."""
    targets = window[1:].to(logits.device)
    return _nll_rows(logits[:-1], targets).double().sum().item()


def _nll_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood (float32, as the sums above take it)."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def perplexity(model: nn.Module, windows: torch.Tensor, *, progress: bool = True) -> dict[str, Any]:
    """Perplexity over fixed windows, each scored on its own (no context carried over).

    Every window predicts its tokens 1..seq_len-1 from the ones before, so ``tokens`` is
    ``n * (seq_len - 1)``; ``nll`` is the mean negative log-likelihood in nats and
    ``ppl = exp(nll)``. Fixed windows make two models (or a model before and after a
    transform) comparable token for token.
    """
    windows = check_windows(windows, model, min_len=2)
    total = 0.0
    with torch.inference_mode():
        for window in progress_bar(windows, desc="perplexity", unit="window", enabled=progress):
            total += window_nll_sum(model_logits(model, window), window)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    nll = total / tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": tokens}


class LogitComparison:
    """The running sums behind :func:`compare_logits`, fed one window at a time, so a
    layer-by-layer run (:mod:`common.analysis.layerwise`) scores exactly as a whole-model
    one does."""

    def __init__(self) -> None:
        self.cosine_sum, self.cosine_min, self.agree, self.max_abs = 0.0, math.inf, 0, 0.0
        self.count, self.nll_sum, self.nll_sum_reference, self.ppl_tokens = 0, 0.0, 0.0, 0

    #: Positions compared at once: float64 copies of whole ``[seq, vocab]`` logits and the
    #: cosine's temporaries took 3.9 GiB at 512 x 151936 (Qwen1.5-1.8B); every number is a
    #: per-position one summed after, so chunks give the same bits.
    ROWS = 64

    def add(self, got: torch.Tensor, want: torch.Tensor, window: torch.Tensor) -> None:
        """One window's logits ``[seq, vocab]`` of the model and the reference."""
        if got.shape != want.shape:
            raise EdgeforgeError(
                f"compare_logits: logits of shape {list(got.shape)} vs reference "
                f"{list(want.shape)}; the two models have different vocabularies"
            )
        want = want.to(got.device)
        targets = window[1:].to(got.device)
        nll, nll_reference, cosines = [], [], []
        for start in range(0, got.shape[0], self.ROWS):
            rows = slice(start, start + self.ROWS)
            g, w = got[rows].double(), want[rows].double()
            scored = slice(start, min(start + self.ROWS, got.shape[0] - 1))
            nll.append(_nll_rows(got[scored], targets[scored]))
            nll_reference.append(_nll_rows(want[scored], targets[scored]))
            cosines.append(F.cosine_similarity(g, w, dim=-1))
            self.agree += int((g.argmax(-1) == w.argmax(-1)).sum().item())
            self.max_abs = max(self.max_abs, (g - w).abs().max().item())
        self.nll_sum += torch.cat(nll).double().sum().item()
        self.nll_sum_reference += torch.cat(nll_reference).double().sum().item()
        self.ppl_tokens += window.shape[0] - 1
        cosine = torch.cat(cosines)
        self.cosine_sum += cosine.sum().item()
        self.cosine_min = min(self.cosine_min, cosine.min().item())
        self.count += got.shape[0]

    def result(self) -> dict[str, Any]:
        nll = self.nll_sum / self.ppl_tokens
        nll_reference = self.nll_sum_reference / self.ppl_tokens
        return {
            "cosine_mean": self.cosine_sum / self.count,
            "cosine_min": self.cosine_min,
            "top1_agreement": self.agree / self.count,
            "max_abs_diff": self.max_abs,
            "tokens": self.count,
            "nll": nll,
            "nll_reference": nll_reference,
            "ppl": math.exp(nll),
            "ppl_reference": math.exp(nll_reference),
            "ppl_tokens": self.ppl_tokens,
        }


def compare_logits(
    model: nn.Module, reference: nn.Module, windows: torch.Tensor, *, progress: bool = False
) -> dict[str, Any]:
    """How closely ``model``'s logits follow ``reference``'s, over every position.

    Per token: cosine similarity of the two logit rows (float64, so identical models give
    exactly 1) and whether their argmax agrees; overall the largest absolute difference.
    ``tokens`` is the number of positions compared (``n * seq_len``). From the same forward
    passes it also scores both models as :func:`perplexity` does (``ppl``,
    ``ppl_reference``, ``nll``, ``nll_reference``, over ``ppl_tokens``), so a before/after
    check costs two passes per window, not four.
    """
    windows = check_windows(windows, model, min_len=2)
    check_windows(windows, reference, min_len=2)
    comparison = LogitComparison()
    with torch.inference_mode():
        for window in progress_bar(windows, desc="compare logits", unit="window", enabled=progress):
            comparison.add(model_logits(model, window), model_logits(reference, window), window)
    return comparison.result()


def _text_tokenizer(tokenizer: Any) -> Any:
    """A VL processor carries its tokenizer; everything here needs only the tokenizer."""
    from transformers import ProcessorMixin

    return tokenizer.tokenizer if isinstance(tokenizer, ProcessorMixin) else tokenizer


def prompt_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    """Token ids ``[1, len]`` for ``prompt`` as a single user turn.

    With a chat template the prompt becomes a user message plus the assistant header (the
    template adds any BOS itself); without one, the raw text with the tokenizer's usual
    special tokens.
    """
    tokenizer = _text_tokenizer(tokenizer)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    else:
        encoded = tokenizer(prompt, return_tensors="pt")
    ids = encoded["input_ids"]
    if ids.numel() == 0:
        raise EdgeforgeError("greedy_generate: the prompt tokenizes to nothing; pass some text")
    return ids


def greedy_generate(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy answer to ``prompt``: only the new text, special tokens removed.

    Greedy means the argmax of the model's own logits at every step, stopping at EOS. The
    checkpoint's ``generation_config.json`` may ask for sampling or a repetition penalty;
    those are set aside for this call so the answer is a deterministic function of the
    weights (what a canary check needs).
    """
    from transformers import GenerationConfig

    text_tokenizer, ids = _greedy_prompt(model, tokenizer, prompt, max_new_tokens)
    saved = getattr(model, "generation_config", None)
    eos, pad = _eos_and_pad(saved, text_tokenizer)
    greedy = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=getattr(saved, "bos_token_id", None),
    )
    ids = ids.to(_device(model))
    model.generation_config = greedy  # generate() fills unset options from this
    try:
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=greedy
            )
    finally:
        model.generation_config = saved
    return text_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _greedy_prompt(
    model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int
) -> tuple[Any, torch.Tensor]:
    """The text tokenizer and the checked prompt ids ``[1, len]`` of a greedy answer."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise EdgeforgeError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    text_tokenizer = _text_tokenizer(tokenizer)
    ids = prompt_ids(text_tokenizer, prompt)
    check_windows(ids, model, what="prompt token ids")
    return text_tokenizer, ids


def _eos_and_pad(generation_config: Any, text_tokenizer: Any) -> tuple[Any, Any]:
    """The end-of-sequence id(s) and pad id a greedy answer uses: the checkpoint's
    generation config's, else the tokenizer's (pad falls back to EOS)."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = text_tokenizer.eos_token_id
    pad = getattr(generation_config, "pad_token_id", None)
    if pad is None:
        pad = text_tokenizer.pad_token_id if text_tokenizer.pad_token_id is not None else eos
    if isinstance(pad, list):
        pad = pad[0]
    return eos, pad


def greedy_answer_layerwise(
    streamed: StreamedModel, tokenizer: Any, prompt: str, max_new_tokens: int
) -> str:
    """:func:`greedy_generate`'s answer computed one part at a time
    (:func:`common.analysis.layerwise_decode.reference_greedy`): the same tokens up to the
    first EOS, which ends the answer as it ends ``generate``. Every new token reads the
    checkpoint once more, so the canary costs ``max_new_tokens`` passes over it."""
    from transformers import GenerationConfig

    from common.analysis.layerwise import Parts
    from common.analysis.layerwise_decode import reference_greedy

    text_tokenizer, ids = _greedy_prompt(streamed.model, tokenizer, prompt, max_new_tokens)
    saved = streamed.model.generation_config
    if (streamed.path / "generation_config.json").is_file():  # what from_pretrained reads
        saved = GenerationConfig.from_pretrained(streamed.path, local_files_only=True)
    eos, _pad = _eos_and_pad(saved, text_tokenizer)
    stop = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    tokens = reference_greedy(Parts(streamed.adapter, streamed), ids, max_new_tokens)
    end = next((i + 1 for i, token in enumerate(tokens) if token in stop), len(tokens))
    return text_tokenizer.decode(tokens[:end], skip_special_tokens=True)

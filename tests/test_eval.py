"""Evaluation numbers checked against the same quantities computed by hand.

The models are the project's tiny Qwen2 and Qwen2-VL checkpoints (``common.models.tiny_models``,
with their real byte-level BPE tokenizer and ChatML template). The references are written
out independently of the code under test: full-batch float64 log-softmax for perplexity,
batched cosine/argmax for logit agreement, a plain argmax loop for greedy decoding.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from common.analysis.eval import (
    compare_logits,
    greedy_answer_layerwise,
    greedy_generate,
    perplexity,
    prompt_ids,
)
from common.analysis.simulate import score_model
from common.core.errors import EdgeforgeError
from common.inputs.data import CALIB_CORPUS, iter_texts
from common.models import get_adapter
from common.models.loading import load_model, load_tokenizer
from common.models.streaming import StreamedModel
from common.models.tiny_models import build_tiny_model

PROMPT = "What is the capital of France?"
CHATML_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-eval")
    texts = list(iter_texts([CALIB_CORPUS]))
    for model_type in ("qwen2", "qwen2_vl"):
        build_tiny_model(model_type, root / model_type, seed=0, corpus=texts)
    return {"qwen2": root / "qwen2", "qwen2_vl": root / "qwen2_vl"}


@pytest.fixture(scope="module")
def model(tiny_dirs: dict[str, Path]) -> nn.Module:
    return load_model(tiny_dirs["qwen2"])


@pytest.fixture(scope="module")
def tokenizer(tiny_dirs: dict[str, Path]) -> Any:
    return load_tokenizer(tiny_dirs["qwen2"])


@pytest.fixture(scope="module")
def windows(model: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(0, model.config.vocab_size, (3, 17), generator=generator)


# -- perplexity --------------------------------------------------------------------------


def test_perplexity_matches_hand_computation(model: nn.Module, windows: torch.Tensor) -> None:
    with torch.inference_mode():
        logits = model(input_ids=windows).logits.double()  # all windows at once, float64
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = logprobs.gather(-1, windows[:, 1:, None]).squeeze(-1)
    nll = -picked.mean().item()

    scores = perplexity(model, windows, progress=False)

    assert scores["tokens"] == 3 * 16
    assert scores["nll"] == pytest.approx(nll, rel=1e-5)
    assert scores["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    # Random weights, random tokens: far from certain, and not absurdly far from the
    # vocabulary size (a broken score would be ~1 or overflow).
    assert 10 < scores["ppl"] < 100 * model.config.vocab_size


def test_perplexity_windows_are_independent(model: nn.Module, windows: torch.Tensor) -> None:
    """Scoring windows one by one equals averaging each window's own score."""
    per_window = [perplexity(model, w[None], progress=False)["nll"] for w in windows]
    together = perplexity(model, windows, progress=False)["nll"]
    assert together == pytest.approx(sum(per_window) / len(per_window), rel=1e-6)


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (torch.zeros(2, 8), "expected integer token ids"),
        (torch.zeros(8, dtype=torch.long), "expected shape [n >= 1, seq_len >= 2]"),
        (torch.zeros(2, 1, dtype=torch.long), "got [2, 1]"),
        (torch.full((1, 8), -1, dtype=torch.long), "span [-1, -1]"),
    ],
)
def test_perplexity_rejects_bad_windows(model: nn.Module, bad: torch.Tensor, fragment: str) -> None:
    with pytest.raises(EdgeforgeError) as err:
        perplexity(model, bad, progress=False)
    assert str(err.value).startswith("windows: ")
    assert fragment in str(err.value)


def test_perplexity_rejects_foreign_token_ids(model: nn.Module) -> None:
    vocab = model.config.vocab_size
    bad = torch.full((1, 8), vocab, dtype=torch.long)
    with pytest.raises(EdgeforgeError, match=rf"span \[{vocab}, {vocab}\] .* \[0, {vocab}\)"):
        perplexity(model, bad, progress=False)


# -- compare_logits ----------------------------------------------------------------------


def test_compare_logits_scores_both_models_like_perplexity(
    model: nn.Module, windows: torch.Tensor
) -> None:
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        layer = get_adapter(perturbed).layers()[0]
        layer.linears["down"].weight.mul_(3.0)
    result = compare_logits(perturbed, model, windows)
    alone, reference = (
        perplexity(perturbed, windows, progress=False),
        perplexity(model, windows, progress=False),
    )
    assert result["ppl"] == pytest.approx(alone["ppl"], rel=1e-12)
    assert result["ppl_reference"] == pytest.approx(reference["ppl"], rel=1e-12)
    assert result["ppl_tokens"] == alone["tokens"]
    assert result["ppl"] != pytest.approx(result["ppl_reference"], rel=1e-6)


def test_compare_logits_identical(model: nn.Module, windows: torch.Tensor) -> None:
    same = compare_logits(model, copy.deepcopy(model), windows)
    assert same["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert same["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert same["top1_agreement"] == 1.0
    assert same["max_abs_diff"] == 0.0
    assert same["tokens"] == windows.numel()


def test_compare_logits_perturbed(model: nn.Module, windows: torch.Tensor) -> None:
    perturbed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in get_adapter(perturbed).layers():
            down = layer.linears["down"].weight
            down.add_(torch.randn(down.shape, generator=generator) * down.std())
    result = compare_logits(perturbed, model, windows)

    with torch.inference_mode():  # the same numbers, computed in one batch
        a = perturbed(input_ids=windows).logits.double().flatten(0, 1)
        b = model(input_ids=windows).logits.double().flatten(0, 1)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert result["cosine_mean"] == pytest.approx(cosine.mean().item(), abs=1e-6)
    assert result["cosine_min"] == pytest.approx(cosine.min().item(), abs=1e-6)
    assert result["top1_agreement"] == (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    assert result["max_abs_diff"] == pytest.approx((a - b).abs().max().item(), rel=1e-5)
    assert result["cosine_mean"] < 1 - 1e-4
    assert result["cosine_min"] <= result["cosine_mean"]
    assert result["top1_agreement"] < 1.0


def test_compare_logits_vocab_mismatch(model: nn.Module, windows: torch.Tensor) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=model.config.vocab_size + 8,
    )
    other = LlamaForCausalLM(config).eval()
    with pytest.raises(EdgeforgeError, match="different vocabularies"):
        compare_logits(model, other, windows)


# -- greedy_generate ---------------------------------------------------------------------


def manual_greedy(model: nn.Module, ids: torch.Tensor, steps: int, eos: set[int]) -> list[int]:
    """Argmax of the full-sequence logits (no cache), one token at a time, stopping at EOS."""
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(token)
            if token in eos:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def eos_ids(model: nn.Module) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos}


def test_greedy_generate_matches_argmax_loop(tiny_dirs: dict[str, Path], tokenizer: Any) -> None:
    model = load_model(tiny_dirs["qwen2"])
    # Sampling and a repetition penalty in generation_config.json must not leak in.
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.7
    model.generation_config.repetition_penalty = 5.0
    saved = model.generation_config

    output = greedy_generate(model, tokenizer, PROMPT, max_new_tokens=8)

    ids = tokenizer(CHATML_PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert torch.equal(prompt_ids(tokenizer, PROMPT), ids)
    expected = manual_greedy(model, ids, 8, eos_ids(model))
    assert isinstance(output, str)
    assert output == tokenizer.decode(expected, skip_special_tokens=True)
    assert output.strip()
    assert model.generation_config is saved
    # Precondition: this seed's greedy answer repeats a token, so generate() left to the
    # checkpoint's generation_config (repetition penalty) would have answered otherwise.
    assert len(set(expected)) < len(expected)
    with torch.inference_mode():
        penalised = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert penalised[0, ids.shape[1] :].tolist() != expected


def test_layerwise_answer_equals_generate(tiny_dirs: dict[str, Path], tokenizer: Any) -> None:
    """One part at a time, the canary answer is generate()'s: the same tokens, cut at EOS."""
    streamed = StreamedModel(tiny_dirs["qwen2"])
    for steps in (1, 8, 30):
        want = greedy_generate(load_model(tiny_dirs["qwen2"]), tokenizer, PROMPT, steps)
        assert greedy_answer_layerwise(streamed, tokenizer, PROMPT, steps) == want


def test_greedy_generate_without_chat_template(model: nn.Module, tokenizer: Any) -> None:
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    ids = prompt_ids(plain, PROMPT)
    assert torch.equal(ids, plain(PROMPT, return_tensors="pt")["input_ids"])
    expected = manual_greedy(model, ids, 5, eos_ids(model))
    assert greedy_generate(model, plain, PROMPT, 5) == plain.decode(
        expected, skip_special_tokens=True
    )


def test_greedy_generate_rejects_bad_length(model: nn.Module, tokenizer: Any) -> None:
    with pytest.raises(EdgeforgeError, match="max_new_tokens: expected a positive int"):
        greedy_generate(model, tokenizer, PROMPT, max_new_tokens=0)


def test_vision_language_model_text_only(tiny_dirs: dict[str, Path]) -> None:
    """The VL family (M-RoPE positions, KV cache) scores and answers text like a text model,
    and accepts its processor where a tokenizer is expected."""
    from common.models.loading import load_processor

    model = load_model(tiny_dirs["qwen2_vl"])
    processor = load_processor(tiny_dirs["qwen2_vl"])
    vocab = model.config.text_config.vocab_size
    windows = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(3))

    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=windows).logits.double()[:, :-1], dim=-1)
    nll = -logprobs.gather(-1, windows[:, 1:, None]).mean().item()
    assert perplexity(model, windows, progress=False)["nll"] == pytest.approx(nll, rel=1e-5)

    ids = prompt_ids(processor, PROMPT)
    expected = manual_greedy(model, ids, 6, eos_ids(model))
    output = greedy_generate(model, processor, PROMPT, max_new_tokens=6)
    assert output == processor.tokenizer.decode(expected, skip_special_tokens=True)
    # One part at a time (M-RoPE's three rows counting the text): the same numbers
    streamed = StreamedModel(tiny_dirs["qwen2_vl"])
    layers = score_model(tiny_dirs["qwen2_vl"], windows, streamed=streamed)
    assert layers["nll"] == score_model(tiny_dirs["qwen2_vl"], windows, streamed=None)["nll"]
    assert greedy_answer_layerwise(streamed, processor, PROMPT, 6) == output

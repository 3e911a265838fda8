"""The static ONNX pieces equal the float model, and chaining them generates HF's tokens.

Each piece runs in onnxruntime and is compared with the Hugging Face model itself (hidden
states, KV cache, logits), not with the wrapper it was exported from, so a wrong rotary,
KV layout or mask shows up here. Then the host protocol (prefill + cached decode through the
pieces) must reproduce ``model.generate``'s greedy tokens exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import EdgeforgeError
from common.eval import prompt_ids
from common.models import get_adapter
from common.models.loading import load_model, load_tokenizer
from common.piece_export import (
    MASK_BLOCKED,
    cosine,
    decode_inputs,
    example_inputs,
    export_pieces,
    greedy_decode,
    onnx_runner,
    piece_dims,
    piece_signatures,
    prefill_inputs,
    reference_greedy,
    reference_logits,
)

#: Cosine every float piece must reach against the HF model (fp32 both sides).
COS_MIN = 0.99999
PROMPT = "What is the capital of France?"


def assert_same_greedy(tokens: list[int], reference: list[int]) -> None:
    """The pieces' tokens equal HF's on HF's whole (possibly EOS-shortened) run."""
    assert len(reference) >= 1
    assert tokens[: len(reference)] == reference


def check_model(model_dir: Path, out_dir: Path, seq_len: int, new_tokens: int) -> None:
    model = load_model(model_dir)
    adapter = get_adapter(model)
    tokenizer = load_tokenizer(model_dir)
    ids = prompt_ids(tokenizer, PROMPT)
    length = ids.shape[1]
    layers = adapter.num_layers
    pieces = export_pieces(adapter, seq_len, out_dir, progress=False)
    assert [p.name for p in pieces][:2] == ["embedding", "embedding_cache"]
    assert len(pieces) == 2 * layers + 5
    run = onnx_runner(out_dir)
    dims = piece_dims(adapter, seq_len)

    with torch.no_grad():
        ref = model(ids, output_hidden_states=True, use_cache=True)
    hidden_ref = [h[0].numpy() for h in ref.hidden_states]  # [L, H] per layer input

    pre = prefill_inputs(ids[0].tolist(), seq_len)
    caches: list[tuple[np.ndarray, np.ndarray]] = []
    (hidden,) = run("embedding", {"input_ids": pre["input_ids"]})
    assert cosine(hidden[0, :length], hidden_ref[0]) >= COS_MIN
    for i in range(layers):
        hidden, k, v = run(
            f"block_{i}",
            {
                "input_states": hidden,
                "position_ids": pre["position_ids"],
                "attention_mask": pre["attention_mask"],
            },
        )
        caches.append((k, v))
        cache = ref.past_key_values.layers[i]
        k_ref = cache.keys[0].transpose(0, 1).numpy()  # [KVH, L, D] -> [L, KVH, D]
        v_ref = cache.values[0].transpose(0, 1).numpy()
        assert cosine(k[0, :length], k_ref) >= COS_MIN, f"block_{i} past_k"
        assert np.abs(v[0, :length] - v_ref).max() < 1e-4, f"block_{i} past_v"
        if i < layers - 1:  # HF's last hidden state is already normed
            assert cosine(hidden[0, :length], hidden_ref[i + 1]) >= COS_MIN, f"block_{i}"
    (logits,) = run("lm_head", {"hidden_states": hidden[:, length - 1]})
    logits_ref = ref.logits[0, -1].numpy()
    assert cosine(logits[0], logits_ref) >= COS_MIN
    assert np.abs(logits[0] - logits_ref).max() < 1e-3
    (token,) = run("greedy_head", {"m_logits": logits})
    assert int(token.ravel()[0]) == int(logits_ref.argmax())

    # One decode step through block_cache equals HF's cached step for the next token.
    nxt = int(logits_ref.argmax())
    with torch.no_grad():
        step_ref = model(torch.tensor([[nxt]]), past_key_values=ref.past_key_values)
    step = decode_inputs(nxt, length, seq_len)
    (hidden,) = run("embedding_cache", {"input_ids": step["input_ids"]})
    for i in range(layers):
        hidden, k, _ = run(
            f"block_cache_{i}",
            {
                "input_states": hidden,
                "position_ids": step["position_ids"],
                "attention_mask": step["attention_mask"],
                "history_k": caches[i][0],
                "history_v": caches[i][1],
            },
        )
        k_ref = step_ref.past_key_values.layers[i].keys[0, :, -1].numpy()  # [KVH, D]
        assert k.shape == (1, 1, dims.num_kv_heads, dims.head_dim)
        assert cosine(k[0, 0], k_ref) >= COS_MIN, f"block_cache_{i} past_k"
    (logits,) = run("lm_head", {"hidden_states": hidden[:, 0]})
    assert cosine(logits[0], step_ref.logits[0, -1].numpy()) >= COS_MIN

    step_logits: list[np.ndarray] = []
    tokens = greedy_decode(run, dims, ids[0].tolist(), new_tokens, step_logits)
    reference = reference_greedy(model, ids, new_tokens)
    assert_same_greedy(tokens, reference)
    for step, want in enumerate(reference_logits(model, ids, reference)):
        assert cosine(step_logits[step], want) >= COS_MIN, f"decode step {step}"


def test_tiny_qwen2_pieces_match_hf(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    check_model(tiny_qwen2_dir, tmp_path, seq_len=64, new_tokens=12)


def test_smollm2_pieces_match_hf(smollm2_dir: Path, tmp_path: Path) -> None:
    """The real llama model: 30 layers, GQA 9/3, tied head; 24 tokens like the eval canary."""
    check_model(smollm2_dir, tmp_path, seq_len=64, new_tokens=24)


def test_prefill_and_decode_masks() -> None:
    pre = prefill_inputs([5, 6, 7], seq_len=5)
    mask = pre["attention_mask"][0, 0]
    assert pre["input_ids"].tolist() == [[5, 6, 7, 0, 0]]
    assert pre["position_ids"].tolist() == [[0, 1, 2, 0, 0]]
    assert (mask[:3, :3] == np.array([[0, -1e4, -1e4], [0, 0, -1e4], [0, 0, 0]])).all()
    assert (mask[3:] == MASK_BLOCKED).all() and (mask[:, 3:] == MASK_BLOCKED).all()
    step = decode_inputs(9, position=3, seq_len=5)
    assert step["attention_mask"][0, 0, 0].tolist() == [0, 0, 0, -1e4, -1e4, 0]
    assert step["position_ids"].tolist() == [[3]]


def test_penalty_sample_head_semantics(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    """Penalty divides positive / multiplies negative logits of seen tokens; probs sum to 1,
    at least 5 candidates survive, and the ONNX graph equals the torch module."""
    adapter = get_adapter(load_model(tiny_qwen2_dir))
    export_pieces(adapter, 8, tmp_path, only=lambda n: n.endswith("_head"), progress=False)
    run = onnx_runner(tmp_path)
    vocab = adapter.vocab_size
    logits = np.linspace(-3, 3, vocab, dtype=np.float32)[None]
    seen = np.full((1, 8), vocab - 1, dtype=np.int32)  # the top token, penalised
    probs, token = run(
        "penalty_sample_head",
        {
            "m_logits": logits,
            "input_ids": seen,
            "top_p": np.array([0.01], np.float32),
            "temperature": np.array([1.0], np.float32),
            "penalty": np.array([100.0], np.float32),
        },
    )
    assert token.shape == (1, 50) and int(token[0, 0]) == vocab - 2
    assert abs(float(probs.sum()) - 1.0) < 1e-5
    assert (probs[0, :5] > 0).all() and (probs[0, 5:] < 1e-6).all()
    (greedy,) = run("greedy_head", {"m_logits": logits})
    assert int(greedy.ravel()[0]) == vocab - 1


def test_bad_seq_len(tiny_qwen2_dir: Path) -> None:
    adapter = get_adapter(load_model(tiny_qwen2_dir))
    limit = adapter.text_config.max_position_embeddings
    with pytest.raises(EdgeforgeError, match=r"SEQ_LEN=.*max_position_embeddings"):
        piece_dims(adapter, limit + 1)
    with pytest.raises(EdgeforgeError, match="SEQ_LEN"):
        piece_dims(adapter, 1)


def test_signatures_match_example_inputs() -> None:
    from common.piece_export import PieceDims

    dims = PieceDims(16, 64, 4, 2, 16, 2, 1024)
    for kind, (specs, _) in piece_signatures(dims).items():
        for (name, shape, dtype), tensor in zip(specs, example_inputs(specs, 1024), strict=True):
            assert tuple(tensor.shape) == shape, (kind, name)
            assert str(tensor.dtype) == f"torch.{dtype}", (kind, name)

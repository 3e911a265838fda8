"""The static ONNX pieces equal the float model, and chaining them generates HF's tokens.

Each piece runs in onnxruntime and is compared with the Hugging Face model itself (hidden
states, KV cache, logits), not with the wrapper it was exported from, so a wrong rotary,
KV layout or mask shows up here. Then the host protocol (prefill + cached decode through the
pieces) must reproduce ``model.generate``'s greedy tokens exactly. The Qwen2-VL family's
language model runs the same checks with 3-row M-RoPE positions, for a text prompt and for
an image prompt whose vision embeddings (from HF's own tower) are spliced into the prefill.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.analysis.eval import prompt_ids
from common.core.errors import EdgeforgeError
from common.export.piece_export import (
    cosine,
    decode_inputs,
    example_inputs,
    export_pieces,
    greedy_decode,
    multimodal_prompt,
    onnx_runner,
    piece_signatures,
    prefill_inputs,
    reference_greedy,
    reference_logits,
)
from common.models import get_adapter
from common.models.loading import load_model, load_processor, load_tokenizer
from common.models.static_decoder import (
    MASK_BLOCKED,
    PieceDims,
    gather_rope,
    piece_dims,
    rotary_table,
)

#: Cosine every float piece must reach against the HF model (fp32 both sides).
COS_MIN = 0.99999
PROMPT = "What is the capital of France?"


def reference_multimodal(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], max_new_tokens: int
) -> tuple[list[int], np.ndarray]:
    """Hugging Face ``generate`` on processor ``inputs`` (pixels included): exactly
    ``max_new_tokens`` greedy tokens (EOS ignored, so the whole run is compared) and the raw
    logits ``[n, V]`` that chose each — what :func:`greedy_decode` on the matching
    :class:`MultimodalPrompt` must reproduce."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
        eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=config)
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return tokens, torch.cat(out.logits).float().numpy()


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
    # The greedy loop below cycles through every piece: a bounded runner would re-open
    # each one per token (SmolLM2: ~3 s a token), and a test-sized model fits open.
    run = onnx_runner(out_dir, max_sessions=len(pieces))
    dims = piece_dims(adapter, seq_len)
    rows = dims.rope_rows

    with torch.no_grad():
        ref = model(ids, output_hidden_states=True, use_cache=True)
    hidden_ref = [h[0].numpy() for h in ref.hidden_states]  # [L, H] per layer input

    pre = prefill_inputs(ids[0].tolist(), seq_len, rows)
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
    step = decode_inputs(nxt, length, seq_len, rows)
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


@pytest.mark.parametrize("fixture", ["tiny_qwen2_vl_dir", "tiny_qwen2_5_vl_dir"])
def test_tiny_vl_text_pieces_match_hf(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A text prompt on the VL language model: the same checks, positions ``[3,1,S]``."""
    check_model(request.getfixturevalue(fixture), tmp_path, seq_len=64, new_tokens=12)


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


@pytest.mark.parametrize("bound", [1, 2])
def test_onnx_runner_holds_at_most_its_bound_of_sessions(
    bound: int, tiny_qwen2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every piece of tiny-qwen2, twice over (the second pass re-opens what the first
    closed): never more than ``bound`` sessions alive at once, and every output equals
    that of a fresh session opened for the call with the same options."""
    import onnxruntime as ort

    adapter = get_adapter(load_model(tiny_qwen2_dir))
    pieces = export_pieces(adapter, 16, tmp_path, progress=False)
    live: weakref.WeakSet[ort.InferenceSession] = weakref.WeakSet()
    peak, opened = 0, 0

    class Counted(ort.InferenceSession):
        def __init__(self, *args: object, **kwargs: object) -> None:
            nonlocal peak, opened
            super().__init__(*args, **kwargs)
            live.add(self)
            opened += 1
            peak = max(peak, len(live))

    fresh = ort.InferenceSession  # the comparison's sessions are not counted
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    monkeypatch.setattr(ort, "InferenceSession", Counted)
    run = onnx_runner(tmp_path, max_sessions=bound)
    for _ in range(2):
        for piece in pieces:
            tensors = example_inputs(piece.inputs, adapter.vocab_size)
            feeds = {spec[0]: t.numpy() for spec, t in zip(piece.inputs, tensors, strict=True)}
            got = run(piece.name, feeds)
            session = fresh(str(piece.path), options, providers=["CPUExecutionProvider"])
            want = session.run(None, feeds)
            assert len(got) == len(want)
            for a, b in zip(got, want, strict=True):
                assert a.dtype == b.dtype and np.array_equal(a, b), piece.name
    assert peak == bound
    assert len(live) == bound
    assert opened == 2 * len(pieces)  # each pass opened every piece: none was kept


def test_onnx_runner_needs_room_for_a_session(tmp_path: Path) -> None:
    with pytest.raises(EdgeforgeError, match="max_sessions=0"):
        onnx_runner(tmp_path, max_sessions=0)


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


def test_attention_the_pieces_do_not_implement_is_refused(tiny_qwen2_dir: Path) -> None:
    """Sliding-window layers or soft-capping would export another function: refused."""
    model = load_model(tiny_qwen2_dir)
    model.config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(EdgeforgeError, match="layer_types has 'sliding_attention' layers"):
        piece_dims(get_adapter(model), 64)
    model.config.layer_types = ["full_attention", "full_attention"]
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(EdgeforgeError, match=r"final_logit_softcapping is 30\.0; the exported"):
        piece_dims(get_adapter(model), 64)


@pytest.mark.parametrize("section", [None, (2, 3, 3)])
def test_signatures_match_example_inputs(section: tuple[int, ...] | None) -> None:
    dims = PieceDims(16, 64, 4, 2, 16, 2, 1024, mrope_section=section)
    signatures = piece_signatures(dims)
    for kind, (specs, _) in signatures.items():
        for (name, shape, dtype), tensor in zip(specs, example_inputs(specs, 1024), strict=True):
            assert tuple(tensor.shape) == shape, (kind, name)
            assert str(tensor.dtype) == f"torch.{dtype}", (kind, name)
    positions = dict((n, s) for n, s, _ in signatures["block"][0])["position_ids"]
    assert positions == ((1, 16) if section is None else (3, 1, 16))
    if section is not None:  # the compile-check sample exercises distinct rows
        (_, pos, _) = example_inputs(signatures["block"][0], 1024)
        assert pos[0, 0, 5] == 5 and pos[1, 0, 5] == 2 and pos[2, 0, 5] == 1


# -- M-RoPE (Qwen2-VL / Qwen2.5-VL language model) -----------------------------------------

#: A non-square picture (84x112 px → 6x8 patches → 3x4 merged tokens), so the height and
#: width position rows differ from each other and from the temporal row.
IMAGE_HW = (84, 112)
IMAGE_PROMPT = "Describe this picture."
VL_FIXTURES = ["tiny_qwen2_vl_dir", "tiny_qwen2_5_vl_dir"]


def test_gather_rope_equals_hf_mrope(tiny_qwen2_5_vl_dir: Path) -> None:
    """The in-graph M-RoPE gather equals HF's rotary module on 3 distinct position rows."""
    adapter = get_adapter(load_model(tiny_qwen2_5_vl_dir))
    assert adapter.mrope_section == (2, 3, 3)
    cos, sin = rotary_table(adapter, 32)
    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 32, (3, 1, 20), generator=gen)
    probe = torch.zeros(1, 20, adapter.head_dim)
    with torch.no_grad():
        cos_ref, sin_ref = adapter.rotary_embedding()(probe, positions)
    section = adapter.mrope_section
    assert torch.allclose(gather_rope(cos, positions, section), cos_ref, atol=1e-6)
    assert torch.allclose(gather_rope(sin, positions, section), sin_ref, atol=1e-6)
    # 1-D positions through the same table are a different rotation: the rows matter.
    assert not torch.allclose(gather_rope(cos, positions[0], None), cos_ref, atol=1e-2)


def test_mrope_prefill_and_decode_inputs() -> None:
    positions = np.array([[0, 1, 1, 1, 3], [0, 1, 1, 2, 3], [0, 1, 2, 1, 3]])
    pre = prefill_inputs([5, 6, 6, 6, 7], seq_len=8, rope_rows=3, positions=positions)
    assert pre["position_ids"].shape == (3, 1, 8)
    assert pre["position_ids"][:, 0, :5].tolist() == positions.tolist()
    assert (pre["position_ids"][:, 0, 5:] == 0).all()
    text = prefill_inputs([5, 6, 7], seq_len=4, rope_rows=3)
    assert text["position_ids"][:, 0].tolist() == [[0, 1, 2, 0]] * 3
    step = decode_inputs(9, position=5, seq_len=8, rope_rows=3, rope_position=4)
    assert step["position_ids"].tolist() == [[[4]], [[4]], [[4]]]
    assert step["attention_mask"][0, 0, 0].tolist() == [0] * 5 + [-1e4] * 3 + [0]
    with pytest.raises(EdgeforgeError, match="larger SEQ_LEN"):
        prefill_inputs([5, 6], seq_len=4, rope_rows=3, positions=np.array([[0, 4]] * 3))
    with pytest.raises(EdgeforgeError, match=r"shape \(1, 2\); expected \(3, 2\)"):
        prefill_inputs([5, 6], seq_len=4, rope_rows=3, positions=np.array([[0, 1]]))


def _image_inputs(model_dir: Path) -> dict[str, torch.Tensor]:
    """Processor inputs for one chat turn: a deterministic picture, then a question."""
    processor = load_processor(model_dir)
    height, width = IMAGE_HW
    image = (np.arange(height * width * 3) % 251).astype(np.uint8).reshape(height, width, 3)
    content = [{"type": "image"}, {"type": "text", "text": IMAGE_PROMPT}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return dict(processor(text=[text], images=[image], return_tensors="pt"))


def _video_inputs(model_dir: Path) -> dict[str, torch.Tensor]:
    """Processor inputs for a 4-frame 56 px clip (2 temporal steps x 2x2 merged tokens)."""
    from common.export.vision_export import vl_prompt_inputs
    from common.inputs.vl_preprocess import geometry

    processor = load_processor(model_dir)
    pixels = np.arange(56 * 56 * 3)
    frames = [((pixels * (i + 1)) % 251).astype(np.uint8).reshape(56, 56, 3) for i in range(4)]
    return vl_prompt_inputs(processor, "What happens?", frames, geometry(processor, 56), "video")


@pytest.mark.parametrize("fixture", VL_FIXTURES)
def test_tiny_vl_vision_prompts_match_hf(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """An image prompt: positions from HF's rope index, vision embeddings from HF's tower
    spliced over the embedding piece's rows; the prefill KV cache (post-rope keys, so the
    3-row rotation itself), the logits of every decode step and the greedy tokens equal
    Hugging Face's own multimodal forward and ``generate``. Then the same end to end for a
    video prompt (temporal rows; Qwen2.5-VL spaces them by ``second_per_grid_ts``)."""
    model_dir = request.getfixturevalue(fixture)
    model = load_model(model_dir)
    adapter = get_adapter(model)
    inputs = _image_inputs(model_dir)
    seq_len, new_tokens = 80, 12
    pieces = export_pieces(adapter, seq_len, tmp_path, progress=False)
    run = onnx_runner(tmp_path)
    dims = piece_dims(adapter, seq_len)
    prompt = multimodal_prompt(adapter, inputs)
    length = len(prompt.token_ids)
    assert next(p.inputs[1][1] for p in pieces if p.kind == "block") == (3, 1, seq_len)
    assert len(prompt.rows) == 12 and prompt.embeds.shape == (12, dims.hidden_size)
    assert not (prompt.positions[1] == prompt.positions[2]).all()  # a real 2-D layout
    assert int(prompt.positions.max()) + 1 < length  # decode positions run behind the rows

    with torch.no_grad():
        ref = model(**inputs, use_cache=True)
    pre = prefill_inputs(prompt.token_ids, seq_len, 3, prompt.positions)
    flat = prefill_inputs(prompt.token_ids, seq_len, 3)  # 1-D positions: the wrong rotation
    (embedded,) = run("embedding", {"input_ids": pre["input_ids"]})
    embedded[0, prompt.rows] = prompt.embeds
    for name, positions in (("m-rope", pre["position_ids"]), ("flat", flat["position_ids"])):
        feed = {"input_states": embedded, "attention_mask": pre["attention_mask"]}
        _, k, _ = run("block_0", {**feed, "position_ids": positions})
        k_ref = ref.past_key_values.layers[0].keys[0].transpose(0, 1).numpy()
        err = float(np.abs(k[0, :length] - k_ref).max())
        assert (err < 1e-4) if name == "m-rope" else (err > 1e-2), (name, err)

    step_logits: list[np.ndarray] = []
    tokens = greedy_decode(run, dims, prompt, new_tokens, step_logits)
    reference, ref_logits = reference_multimodal(model, inputs, new_tokens)
    assert np.abs(step_logits[0] - ref.logits[0, -1].numpy()).max() < 1e-3
    for step, want in enumerate(ref_logits):
        assert cosine(step_logits[step], want) >= COS_MIN, f"decode step {step}"
        assert np.abs(step_logits[step] - want).max() < 1e-3, f"decode step {step}"
    assert tokens == reference

    video = _video_inputs(model_dir)
    prompt = multimodal_prompt(adapter, video)
    assert len(prompt.rows) == 8 and (video["mm_token_type_ids"][0, prompt.rows] == 2).all()
    step_logits = []
    tokens = greedy_decode(run, dims, prompt, new_tokens, step_logits)
    reference, ref_logits = reference_multimodal(model, video, new_tokens)
    for step, want in enumerate(ref_logits):
        assert cosine(step_logits[step], want) >= COS_MIN, f"video decode step {step}"
        assert np.abs(step_logits[step] - want).max() < 1e-3, f"video decode step {step}"
    assert tokens == reference


def test_multimodal_prompt_needs_mrope_pieces(tiny_qwen2_vl_dir: Path) -> None:
    adapter = get_adapter(load_model(tiny_qwen2_vl_dir))
    prompt = multimodal_prompt(adapter, _image_inputs(tiny_qwen2_vl_dir))
    dims = piece_dims(adapter, 64)
    flat = dataclasses.replace(dims, mrope_section=None)
    with pytest.raises(EdgeforgeError, match="M-RoPE"):
        greedy_decode(lambda *_: [], flat, prompt, 4)

"""The float decode reference one part at a time equals the whole model's, bit for bit.

``make sophgo`` gates its simulated bmodel on these tokens and logits, so a text model's
layer-by-layer reference must be the very numbers ``reference_greedy`` and
``reference_logits`` give over the whole model: tokens identical and logits within a
tolerance of zero (same modules, inputs, cache and mask, hence the same float ops).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.analysis import layerwise_decode
from common.analysis.eval import prompt_ids
from common.analysis.layerwise import Parts
from common.export.piece_export import reference_greedy, reference_logits
from common.models import get_adapter
from common.models.loading import load_model, load_tokenizer
from common.models.qwen import load_qwen_model
from common.models.streaming import StreamedModel
from tests.conftest import build_qwen1_checkpoint

PROMPT = "What is the capital of France?"
IMAGES = Path(__file__).resolve().parent.parent / "data" / "images"


def assert_same_reference(
    model_dir: Path, max_new_tokens: int, load: Callable[[Path], Any] = load_model
) -> list[int]:
    """Greedy tokens and teacher-forced logits from the streamed parts equal the whole
    model's (loaded by ``load``; Qwen1 through its remote code); returns the tokens."""
    remote = load is load_qwen_model
    ids = prompt_ids(load_tokenizer(model_dir, trust_remote_code=remote), PROMPT)
    model = load(model_dir)
    want = reference_greedy(model, ids, max_new_tokens)
    want_logits = reference_logits(model, ids, want)
    streamed = StreamedModel(model_dir, trust_remote_code=remote)
    parts = Parts(streamed.adapter, streamed)
    got = layerwise_decode.reference_greedy(parts, ids, max_new_tokens)
    assert got == want
    got_logits = layerwise_decode.reference_logits(parts, ids, got)
    assert got_logits.shape == (max_new_tokens, streamed.adapter.vocab_size)
    np.testing.assert_array_equal(got_logits, want_logits)
    return got


def test_tiny_qwen2_reference_equals_the_whole_model(tiny_qwen2_dir: Path) -> None:
    assert_same_reference(tiny_qwen2_dir, 8)


@pytest.mark.parametrize("modeling", ["modeling_qwen.py", "modeling_qwen_latest.py"])
def test_qwen1_reference_equals_the_whole_model(
    tiny_qwen2_dir: Path, tmp_path: Path, modeling: str
) -> None:
    """Qwen1's blocks with its own tuple cache. The trained context is cut to 16 so that the
    decode runs past it: the teacher-forced pass then takes the dynamic-NTK rotary and logn
    scaling, while the cached steps keep the prompt's alpha, as Qwen1's forward does."""
    model_dir = build_qwen1_checkpoint(tmp_path / "qwen1", tiny_qwen2_dir, modeling)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "seq_length": 16}))
    tokens = assert_same_reference(model_dir, 16, load_qwen_model)
    assert len(set(tokens)) > 2


@pytest.mark.smollm2
def test_smollm2_reference_equals_the_whole_model(smollm2_dir: Path) -> None:
    tokens = assert_same_reference(smollm2_dir, 12)
    assert len(set(tokens)) > 3  # a real model's varied answer, not one repeated token


def test_teacher_forced_logits_pick_the_greedy_tokens(tiny_qwen2_dir: Path) -> None:
    """Each row of the logits is the step that chose that token; a wrong continuation
    changes the rows after it, not before."""
    streamed = StreamedModel(tiny_qwen2_dir)
    parts = Parts(streamed.adapter, streamed)
    ids = prompt_ids(load_tokenizer(tiny_qwen2_dir), PROMPT)
    tokens = layerwise_decode.reference_greedy(parts, ids, 4)
    logits = layerwise_decode.reference_logits(parts, ids, tokens)
    assert [int(row.argmax()) for row in logits] == tokens
    wrong = [*tokens[:2], (tokens[2] + 1) % streamed.adapter.vocab_size, tokens[3]]
    forced = layerwise_decode.reference_logits(parts, ids, wrong)
    np.testing.assert_array_equal(forced[:3], logits[:3])
    assert not np.array_equal(forced[3], logits[3])


def test_one_part_in_memory_at_a_time(tiny_qwen2_dir: Path) -> None:
    """Whenever a part is read, nothing else is materialized but the final norm (read
    together with the LM head), and nothing is left after the decode."""
    streamed = StreamedModel(tiny_qwen2_dir)
    held: list[int] = []
    load = streamed.load

    def counting_load(module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        held.append(sum(p.numel() for p in streamed.model.parameters() if not p.is_meta))
        return load(module, prefix)

    streamed.load = counting_load  # type: ignore[method-assign]
    ids = prompt_ids(load_tokenizer(tiny_qwen2_dir), PROMPT)
    layerwise_decode.reference_greedy(Parts(streamed.adapter, streamed), ids, 2)
    layers = streamed.adapter.num_layers
    assert len(held) == 2 * (1 + layers + 2)  # per token: embedding, layers, norm + head
    assert max(held) == streamed.adapter.hidden_size  # the final norm's gain
    assert all(p.is_meta for p in streamed.model.parameters())


@pytest.mark.parametrize("mode", ["image", "video"])
@pytest.mark.parametrize("fixture", ["tiny_qwen2_5_vl_dir", "tiny_qwen2_vl_dir"])
def test_vision_language_reference_equals_the_whole_model(
    request: pytest.FixtureRequest, fixture: str, mode: str
) -> None:
    """A Qwen-VL prompt read part by part (the checkpoint in the hub's tensor names, the
    vision tower then each language layer) gives ``generate``'s greedy tokens and the
    whole model's prompt logits; features from elsewhere (ONNX) replace the tower's."""
    from common.export import vision_export as ve
    from common.inputs import vl_preprocess as vp
    from common.models.loading import load_processor

    model_dir = request.getfixturevalue(fixture)
    processor = load_processor(model_dir)
    geo = vp.geometry(processor, 112)
    frames = vp.prepare_frames(vp.list_frames(IMAGES, "images"), geo, processor)
    inputs = ve.vl_prompt_inputs(processor, PROMPT, frames[:1] if mode == "image" else frames,
                                 geo, mode)  # fmt: skip
    model = load_model(model_dir)
    want = ve.greedy_tokens(model, inputs, 6)
    want_logits = ve.prompt_logits(model, inputs).numpy()
    streamed = StreamedModel(model_dir)
    parts = Parts(streamed.adapter, streamed)
    with parts.vision_tower() as tower:
        prompt = layerwise_decode.VisualPrompt(
            inputs, layerwise_decode.vision_features(tower, inputs)
        )
    assert list(prompt.features) == [mode]
    assert layerwise_decode.reference_greedy(parts, prompt, 6) == want
    np.testing.assert_array_equal(layerwise_decode.reference_logits(parts, prompt, []), want_logits)
    # teacher-forced rows after the prompt are the decode's steps
    forced = layerwise_decode.reference_logits(parts, prompt, want)
    assert [int(row.argmax()) for row in forced] == want
    zeros = {mode: torch.zeros_like(prompt.features[mode])}
    with ve.vision_features_replaced(get_adapter(model), zeros[mode]):
        swapped = ve.greedy_tokens(model, inputs, 6)
    fed = layerwise_decode.VisualPrompt(inputs, zeros)
    assert layerwise_decode.reference_greedy(parts, fed, 6) == swapped

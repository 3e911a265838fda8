"""The static decoder refuses, before any export, every model feature it does not implement.

Its pieces call only the modules a llama block has and write attention out themselves, so
a checkpoint with more (Gemma2's feed-forward norms, Qwen3's q/k norms, another attention
scale, soft-capping, a partial rotary dim) would export another function without any error.
Each case here takes a supported tiny model, gives it one such feature, and checks that the
export (and sequential GPTQ, which runs the same blocks) stops with one ``EdgeforgeError``
naming the feature, and that nothing was written. That the supported models pass and their
pieces equal Hugging Face is ``tests/test_piece_export.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from common.backends.sequential_gptq import sequential_gptq
from common.core.errors import EdgeforgeError
from common.export.piece_export import export_pieces
from common.models import ModelAdapter, get_adapter
from common.models.loading import load_model
from common.models.static_decoder import check_supported, unsupported_features


@pytest.mark.parametrize("fixture", ["tiny_qwen2_dir", "tiny_qwen2_vl_dir", "tiny_qwen2_5_vl_dir"])
def test_supported_models_depart_in_nothing(fixture: str, request: pytest.FixtureRequest) -> None:
    """The checks do not fire on what the pieces do implement (1-D rope, M-RoPE, qkv bias)."""
    adapter = get_adapter(load_model(request.getfixturevalue(fixture)))
    assert unsupported_features(adapter) == []
    check_supported(adapter)


def _add_feedforward_norms(adapter: ModelAdapter) -> None:
    """Gemma2's layout: norms around the MLP that llama's block does not have."""
    for layer in adapter.layers():
        layer.module.pre_feedforward_layernorm = copy.deepcopy(layer.input_norm)
        layer.module.post_feedforward_layernorm = copy.deepcopy(layer.input_norm)


def _add_qk_norms(adapter: ModelAdapter) -> None:
    """Qwen3's layout: per-head norms of q and k inside attention."""
    for layer in adapter.layers():
        layer.attention.q_norm = nn.LayerNorm(adapter.head_dim)
        layer.attention.k_norm = nn.LayerNorm(adapter.head_dim)


def _set_config(key: str, value: object) -> Callable[[ModelAdapter], None]:
    return lambda adapter: setattr(adapter.text_config, key, value)


def _rescale_attention(adapter: ModelAdapter) -> None:
    """An attention module that scales scores otherwise (Gemma2's ``query_pre_attn_scalar``
    lands there; the config field may be absent in another family)."""
    for layer in adapter.layers():
        layer.attention.scaling = 0.5


def _halve_rotary(adapter: ModelAdapter) -> None:
    """A rotary table over half of ``head_dim`` (``partial_rotary_factor=0.5``)."""
    rotary = adapter.rotary_embedding()
    rotary.inv_freq = rotary.inv_freq[: rotary.inv_freq.numel() // 2].clone()


CASES = {
    "feedforward norms": (
        _add_feedforward_norms,
        r"model\.layers\.0\.pre_feedforward_layernorm \(in 2 of 2 layers\) is a weight the "
        r"static block never applies.*model\.layers\.0\.post_feedforward_layernorm",
    ),
    "q/k norms": (_add_qk_norms, r"model\.layers\.0\.self_attn\.q_norm \(in 2 of 2 layers\)"),
    "query_pre_attn_scalar": (
        _set_config("query_pre_attn_scalar", 144),
        r"query_pre_attn_scalar is 144 \(attention scaled by 1/sqrt\(144\), not "
        r"1/sqrt\(head_dim=16\)\)",
    ),
    "attention scaling": (
        _rescale_attention,
        r"model\.layers\.0's attention scaling is 0\.5 \(in 2 of 2 layers\), not "
        r"1/sqrt\(head_dim=16\)",
    ),
    "attn_logit_softcapping": (
        _set_config("attn_logit_softcapping", 50.0),
        r"attn_logit_softcapping is 50\.0",
    ),
    "final_logit_softcapping": (
        _set_config("final_logit_softcapping", 30.0),
        r"final_logit_softcapping is 30\.0",
    ),
    "sliding window": (_set_config("use_sliding_window", True), "use_sliding_window is true"),
    "partial rotary": (
        _halve_rotary,
        r"the rotary embedding turns 8 of head_dim=16 dims \(partial_rotary_factor\)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unsupported_feature_is_refused_before_export(
    case: str, tiny_qwen2_dir: Path, tmp_path: Path
) -> None:
    add_feature, message = CASES[case]
    adapter = get_adapter(load_model(tiny_qwen2_dir))
    assert (adapter.num_layers, adapter.head_dim) == (2, 16)  # the messages above say so
    add_feature(adapter)
    out = tmp_path / "pieces"
    with pytest.raises(EdgeforgeError, match=r"^piece export: the qwen2 model's .*" + message):
        export_pieces(adapter, 16, out, progress=False)
    assert not out.exists()
    windows = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(EdgeforgeError, match=message):
        sequential_gptq(adapter, windows, bits=8, progress=False)


def test_the_refusal_is_one_line_naming_every_departure(tiny_qwen2_dir: Path) -> None:
    """Two features at once: both named, in one line that points at the decoder's table."""
    adapter = get_adapter(load_model(tiny_qwen2_dir))
    _add_qk_norms(adapter)
    adapter.text_config.final_logit_softcapping = 30.0
    with pytest.raises(EdgeforgeError) as caught:
        check_supported(adapter)
    text = str(caught.value)
    assert "\n" not in text
    assert "final_logit_softcapping is 30.0" in text and "self_attn.q_norm" in text
    assert text.endswith("(common/models/static_decoder.py)")

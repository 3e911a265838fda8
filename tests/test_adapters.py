"""Model adapters and checkpoint loading, on tiny seeded models of every supported family.

The Qwen families are the project's tiny checkpoints (``common.models.tiny_models``: real
transformers classes, saved to disk and loaded back through ``load_model``); llama, which
the builder does not make, is built in memory with ``head_dim`` != ``hidden / heads`` so
an adapter that guesses the head width fails. Expected shapes are computed here from each
config's own fields, so a swapped or mis-pointed linear shows up as a wrong shape.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2ForCausalLM,
    Qwen2VLForConditionalGeneration,
)

from common.core.errors import EdgeforgeError
from common.inputs.data import CALIB_CORPUS, iter_texts
from common.models import (
    DECODER_ROLES,
    SUPPORTED_MODEL_TYPES,
    LlamaAdapter,
    Qwen2_5_VLAdapter,
    Qwen2Adapter,
    Qwen2VLAdapter,
    adapter_class,
    get_adapter,
    iter_linears,
)
from common.models.loading import (
    check_model_dir,
    load_model,
    load_processor,
    load_tokenizer,
)
from common.models.tiny_models import build_tiny_model

ALL_TYPES = ("llama", "qwen2", "qwen2_vl", "qwen2_5_vl")
TINY_TYPES = ("qwen2", "qwen2_vl", "qwen2_5_vl")
LLAMA_HEAD_DIM = 16  # != hidden 32 / 4 heads, so the adapter must honour config.head_dim
IDS = torch.tensor([[1, 17, 42, 5, 88, 63, 9, 30]])  # valid in every vocabulary here


def build_llama(*, seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    """A tiny random llama (hidden 32, 4 heads of 16, 2 KV heads, MLP 48, vocab 96)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=LLAMA_HEAD_DIM,
        vocab_size=96,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The project's tiny Qwen-family checkpoints, built once for this module."""
    root = tmp_path_factory.mktemp("tiny")
    for model_type in TINY_TYPES:
        build_tiny_model(model_type, root / model_type, seed=0, corpus=iter_texts([CALIB_CORPUS]))
    return {model_type: root / model_type for model_type in TINY_TYPES}


@pytest.fixture(scope="module")
def fresh(tiny_dirs: dict[str, Path]) -> Callable[[str], nn.Module]:
    """A new model of a family each call (for tests that modify it)."""

    def make(model_type: str) -> nn.Module:
        return build_llama() if model_type == "llama" else load_model(tiny_dirs[model_type])

    return make


@pytest.fixture(scope="module", params=ALL_TYPES)
def model(request: pytest.FixtureRequest, fresh: Callable[[str], nn.Module]) -> nn.Module:
    return fresh(request.param)


def text_config(model: nn.Module) -> Any:
    """The config the decoder was built from (nested under ``text_config`` for VL)."""
    return getattr(model.config, "text_config", model.config)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


# -- registry ----------------------------------------------------------------------------


def test_supported_types() -> None:
    assert SUPPORTED_MODEL_TYPES == ("llama", "qwen", "qwen2", "qwen2_5_vl", "qwen2_vl")


@pytest.mark.parametrize(
    ("model_type", "cls", "model_class", "is_vl"),
    [
        ("llama", LlamaAdapter, LlamaForCausalLM, False),
        ("qwen2", Qwen2Adapter, Qwen2ForCausalLM, False),
        ("qwen2_vl", Qwen2VLAdapter, Qwen2VLForConditionalGeneration, True),
        ("qwen2_5_vl", Qwen2_5_VLAdapter, Qwen2_5_VLForConditionalGeneration, True),
    ],
)
def test_registry_dispatch(
    fresh: Callable[[str], nn.Module], model_type: str, cls: type, model_class: type, is_vl: bool
) -> None:
    model = fresh(model_type)
    assert type(model) is model_class
    adapter = get_adapter(model)
    assert type(adapter) is cls
    assert adapter.model is model
    assert adapter.model_type == model_type
    assert adapter.is_vision_language is is_vl
    assert adapter_class(model_type) is cls


def test_unsupported_type_lists_supported() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32))
    with pytest.raises(EdgeforgeError) as err:
        get_adapter(gpt2)
    message = str(err.value)
    assert "'gpt2' is not supported" in message
    assert "llama, qwen, qwen2, qwen2_5_vl, qwen2_vl" in message
    assert "\n" not in message


def test_planned_type_says_planned() -> None:
    with pytest.raises(EdgeforgeError, match=r"'gemma' \(Gemma\) is planned but not supported"):
        adapter_class("gemma")


def test_not_a_hf_model() -> None:
    with pytest.raises(EdgeforgeError, match=r"has no config\.model_type"):
        get_adapter(nn.Linear(2, 2))


def test_base_model_without_head_is_rejected() -> None:
    base = build_llama().model  # LlamaModel: the decoder stack only
    with pytest.raises(EdgeforgeError, match=r"LlamaModel has no submodule 'model\.embed_tokens'"):
        get_adapter(base)


def test_wrong_adapter_for_model(fresh: Callable[[str], nn.Module]) -> None:
    with pytest.raises(EdgeforgeError, match="model_type is 'qwen2'"):
        LlamaAdapter(fresh("qwen2"))


# -- structure ---------------------------------------------------------------------------


def test_dims(model: nn.Module) -> None:
    adapter = get_adapter(model)
    cfg = text_config(model)
    head_dim = LLAMA_HEAD_DIM if adapter.model_type == "llama" else cfg.hidden_size // 4
    assert cfg.num_attention_heads == 4  # both builders use 4 query heads over 2 KV heads
    assert adapter.hidden_size == cfg.hidden_size
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (4, 2, head_dim)
    assert adapter.intermediate_size == cfg.intermediate_size
    assert adapter.num_layers == cfg.num_hidden_layers == len(adapter.layers())
    assert adapter.vocab_size == cfg.vocab_size
    assert adapter.rms_norm_eps == cfg.rms_norm_eps
    assert adapter.tie_word_embeddings is bool(model.config.tie_word_embeddings)


def test_layer_linears_have_the_right_shapes(model: nn.Module) -> None:
    adapter = get_adapter(model)
    cfg = text_config(model)
    hidden, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = LLAMA_HEAD_DIM if adapter.model_type == "llama" else hidden // heads
    expected = {  # nn.Linear weight is [out, in]
        "q": (heads * hd, hidden),
        "k": (kv_heads * hd, hidden),
        "v": (kv_heads * hd, hidden),
        "o": (hidden, heads * hd),
        "gate": (inter, hidden),
        "up": (inter, hidden),
        "down": (hidden, inter),
    }
    layers = adapter.layers()
    assert [layer.index for layer in layers] == list(range(cfg.num_hidden_layers))
    for layer in layers:
        assert tuple(layer.linears) == DECODER_ROLES
        for role, linear in layer.linears.items():
            assert isinstance(linear, nn.Linear)
            assert tuple(linear.weight.shape) == expected[role], (layer.index, role)
        assert tuple(layer.input_norm.weight.shape) == (hidden,)
        assert tuple(layer.post_attention_norm.weight.shape) == (hidden,)
        assert layer.attention.q_proj is layer.linears["q"]
        assert layer.mlp.down_proj is layer.linears["down"]
    # Qwen-family q/k/v carry biases, o does not; llama (attention_bias=False) has none.
    has_qkv_bias = adapter.model_type != "llama"
    assert (layers[0].linears["q"].bias is not None) is has_qkv_bias
    assert layers[0].linears["o"].bias is None
    assert tuple(adapter.embed_tokens().weight.shape) == (vocab, hidden)
    assert tuple(adapter.lm_head().weight.shape) == (vocab, hidden)
    assert tuple(adapter.final_norm().weight.shape) == (hidden,)
    assert adapter.rotary_embedding().inv_freq.numel() == hd // 2
    assert adapter.language_model().layers[0] is layers[0].module


def test_name_of_parts(model: nn.Module) -> None:
    adapter = get_adapter(model)
    modules = dict(model.named_modules())
    parts = {
        "embed_tokens": adapter.embed_tokens(),
        "final_norm": adapter.final_norm(),
        "lm_head": adapter.lm_head(),
        "rotary_embedding": adapter.rotary_embedding(),
        "language_model": adapter.language_model(),
    }
    if adapter.is_vision_language:
        parts["vision_tower"] = adapter.vision_tower()
        parts["vision_patch_embed"] = adapter.vision_patch_embed()
        parts["vision_merger"] = adapter.vision_merger().module
    for part, module in parts.items():
        assert modules[adapter.name_of(part)] is module, part
    with pytest.raises(EdgeforgeError, match=r"unknown part 'decoder'; known parts: embed"):
        adapter.name_of("decoder")


def test_iter_linears_names_are_named_modules(model: nn.Module) -> None:
    adapter = get_adapter(model)
    layers = text_config(model).num_hidden_layers
    modules = dict(model.named_modules())
    found = list(iter_linears(adapter))
    assert len(found) == 7 * layers + 1
    assert len(list(iter_linears(adapter, include_lm_head=False))) == 7 * layers
    for name, _role, linear in found:
        assert modules[name] is linear, name
    assert found[-1][:2] == ("lm_head", "lm_head")
    assert [role for _, role, _ in found[:7]] == list(DECODER_ROLES)
    assert len({name for name, _, _ in found}) == len(found)


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_adapter_holds_the_live_modules(fresh: Callable[[str], nn.Module], model_type: str) -> None:
    model = fresh(model_type)
    adapter = get_adapter(model)
    before = logits(model, IDS)
    with torch.no_grad():
        adapter.layers()[0].linears["down"].weight.zero_()
    after = logits(model, IDS)
    assert (before - after).abs().max().item() > 1e-4
    torch.testing.assert_close(logits(fresh(model_type), IDS), before, rtol=0, atol=0)


def test_replaced_module_is_seen(fresh: Callable[[str], nn.Module]) -> None:
    """Stages may swap a linear for a new one; the adapter resolves paths on every call."""
    model = fresh("qwen2")
    adapter = get_adapter(model)
    old = adapter.layers()[1].linears["up"]
    new = nn.Linear(old.in_features, old.out_features, bias=False)
    model.model.layers[1].mlp.up_proj = new
    assert adapter.layers()[1].linears["up"] is new


def test_tied_embeddings_follow_the_live_weights(fresh: Callable[[str], nn.Module]) -> None:
    model = fresh("qwen2")  # tied, like the small Qwen2.5 LLMs
    adapter = get_adapter(model)
    assert adapter.tie_word_embeddings is True
    assert adapter.lm_head().weight is adapter.embed_tokens().weight
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    assert adapter.tie_word_embeddings is False
    assert get_adapter(build_llama(tie=True)).tie_word_embeddings is True


def test_text_models_have_no_vision() -> None:
    adapter = get_adapter(build_llama())
    assert adapter.vision_tower() is None
    assert adapter.vision_patch_embed() is None
    assert adapter.vision_blocks() == []
    assert adapter.vision_merger() is None
    assert adapter.vision_hidden_size is None
    assert adapter.vision_num_heads is None
    assert len(list(iter_linears(adapter, include_vision=True))) == 7 * 2 + 1
    with pytest.raises(EdgeforgeError, match="llama is a text model: it has no vision_tower"):
        adapter.name_of("vision_tower")


def _vision_expectations(model: nn.Module) -> tuple[int, dict[str, tuple[int, int]], int]:
    """(block width, role -> weight shape, merger output width) from the vision config."""
    vc = model.config.vision_config
    if model.config.model_type == "qwen2_vl":
        dim, hidden = vc.embed_dim, int(vc.embed_dim * vc.mlp_ratio)
        mlp = {"fc1": (hidden, dim), "fc2": (dim, hidden)}
        out = vc.hidden_size
    else:
        dim, inter = vc.hidden_size, vc.intermediate_size
        mlp = {"gate": (inter, dim), "up": (inter, dim), "down": (dim, inter)}
        out = vc.out_hidden_size
    return dim, {"qkv": (3 * dim, dim), "proj": (dim, dim), **mlp}, out


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_vision_blocks_and_merger(fresh: Callable[[str], nn.Module], model_type: str) -> None:
    model = fresh(model_type)
    adapter = get_adapter(model)
    vc = model.config.vision_config
    dim, expected, out = _vision_expectations(model)
    modules = dict(model.named_modules())
    assert adapter.vision_tower() is model.model.visual
    assert isinstance(adapter.vision_patch_embed().proj, nn.Conv3d)
    assert adapter.vision_hidden_size == dim
    assert adapter.vision_num_heads == vc.num_heads
    assert dim != out  # the tiny configs keep block width and LM width apart
    blocks = adapter.vision_blocks()
    assert [b.index for b in blocks] == list(range(vc.depth))
    for block in blocks:
        assert block.module is modules[block.name]
        assert tuple(block.linears) == tuple(expected)
        for role, linear in block.linears.items():
            assert tuple(linear.weight.shape) == expected[role], (block.index, role)
            assert linear.bias is not None
            assert modules[block.linear_names[role]] is linear
        assert tuple(block.input_norm.weight.shape) == (dim,)
        assert tuple(block.post_attention_norm.weight.shape) == (dim,)
    merger = adapter.vision_merger()
    merged = dim * vc.spatial_merge_size**2
    assert merger.name == "model.visual.merger"
    assert tuple(merger.norm.weight.shape) == (dim,)
    assert tuple(merger.linears["merger_fc1"].weight.shape) == (merged, merged)
    assert tuple(merger.linears["merger_fc2"].weight.shape) == (out, merged)
    everything = list(iter_linears(adapter, include_vision=True))
    layers = text_config(model).num_hidden_layers
    assert len(everything) == 7 * layers + 1 + vc.depth * len(expected) + 2
    for name, _role, linear in everything:
        assert modules[name] is linear, name
    assert adapter.language_model() is model.model.language_model


def test_vision_block_is_live(fresh: Callable[[str], nn.Module]) -> None:
    """Zeroing the adapter's merger output changes what the vision tower returns."""
    model = fresh("qwen2_vl")
    adapter = get_adapter(model)
    vc = model.config.vision_config
    grid = torch.tensor([[1, 4, 4]])  # one frame of 4x4 patches -> 4 merged tokens
    patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    pixels = torch.randn(16, patch, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model.model.get_image_features(pixels, grid).pooler_output[0].clone()
    with torch.no_grad():
        adapter.vision_merger().linears["merger_fc2"].weight.zero_()
        adapter.vision_merger().linears["merger_fc2"].bias.zero_()
    with torch.inference_mode():
        after = model.model.get_image_features(pixels, grid).pooler_output[0]
    assert before.abs().max().item() > 1e-3
    assert after.abs().max().item() == 0.0


# -- rotary positions --------------------------------------------------------------------


def test_mrope_section(model: nn.Module) -> None:
    """VL models expose their config's M-RoPE split; text models have 1-D positions."""
    adapter = get_adapter(model)
    if adapter.is_vision_language:
        section = tuple(text_config(model).rope_parameters["mrope_section"])
        assert adapter.mrope_section == section
        assert 2 * sum(section) == adapter.head_dim
    else:
        assert adapter.mrope_section is None
        with pytest.raises(EdgeforgeError, match="uses 1-D rotary positions"):
            adapter.rope_index({"input_ids": IDS})


def test_bad_mrope_section(fresh: Callable[[str], nn.Module]) -> None:
    adapter = get_adapter(fresh("qwen2_vl"))
    adapter.rotary_embedding().mrope_section = [2, 3, 2]
    with pytest.raises(EdgeforgeError, match=r"mrope_section \[2, 3, 2\] must be 3 sections"):
        _ = adapter.mrope_section


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_rope_index(
    fresh: Callable[[str], nn.Module], tiny_dirs: dict[str, Path], model_type: str
) -> None:
    """Text tokens count up in all three rows; a 3x4-token picture takes (t, h, w) grid
    positions from where the text stopped, and the text after it resumes at max + 1."""
    adapter = get_adapter(fresh(model_type))
    processor = load_processor(tiny_dirs[model_type])
    image = torch.zeros(84, 112, 3, dtype=torch.uint8).numpy()  # 6x8 patches -> 3x4 tokens
    content = [{"type": "image"}, {"type": "text", "text": "Hi"}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    inputs = dict(processor(text=[text], images=[image], return_tensors="pt"))
    positions, deltas = adapter.rope_index(inputs)
    rows = torch.nonzero(inputs["mm_token_type_ids"][0]).ravel()
    start, length = int(rows[0]), inputs["input_ids"].shape[1]
    assert positions.shape == (3, 1, length) and rows.tolist() == list(range(start, start + 12))
    assert (positions[:, 0, :start] == torch.arange(start)).all()
    grid = torch.arange(12)
    expected = torch.stack([torch.zeros(12, dtype=torch.long), grid // 4, grid % 4]) + start
    assert positions[:, 0, start : start + 12].tolist() == expected.tolist()
    after = torch.arange(length - start - 12) + start + 4  # max(h, w) = 4 positions used
    assert (positions[:, 0, start + 12 :] == after).all()
    assert deltas.tolist() == [[int(positions.max()) + 1 - length]]
    with pytest.raises(EdgeforgeError, match="need input_ids and mm_token_type_ids"):
        adapter.rope_index({"input_ids": inputs["input_ids"]})


# -- loading -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    model = build_llama(seed=3)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path, model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_load_model_round_trip(saved_llama: tuple[Path, nn.Module]) -> None:
    path, original = saved_llama
    loaded = load_model(path)
    assert type(loaded) is LlamaForCausalLM
    assert not loaded.training
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(logits(loaded, IDS), logits(original, IDS), rtol=0, atol=0)
    assert check_model_dir(path).weight_files == (path / "model.safetensors",)


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_load_tiny_checkpoints(tiny_dirs: dict[str, Path], model_type: str) -> None:
    """Every tensor in the file lands in the model unchanged (nothing re-initialised)."""
    path = tiny_dirs[model_type]
    model = load_model(path)
    assert not model.training
    checked = check_model_dir(path)
    assert checked.model_type == model_type
    assert checked.is_vision_language is (model_type != "qwen2")
    state = model.state_dict()
    stored = load_file(path / "model.safetensors")
    assert stored
    for key, tensor in stored.items():
        name = _module_key(key) if checked.is_vision_language else key
        assert torch.equal(state[name], tensor), key


def _module_key(key: str) -> str:
    """transformers 5 saves Qwen-VL in the released layout (``model.layers``, ``visual.``);
    the modules live under ``model.language_model`` and ``model.visual``."""
    if key.startswith("visual."):
        return f"model.{key}"
    if key.startswith("model."):
        return f"model.language_model.{key.removeprefix('model.')}"
    return key


def test_load_tokenizer_and_processor(tiny_dirs: dict[str, Path]) -> None:
    tokenizer = load_tokenizer(tiny_dirs["qwen2"])
    assert tokenizer.eos_token == "<|im_end|>"
    processor = load_processor(tiny_dirs["qwen2_vl"])
    assert type(processor).__name__ == "Qwen2VLProcessor"
    with pytest.raises(EdgeforgeError, match="qwen2 is a text model with no processor"):
        load_processor(tiny_dirs["qwen2"])


def test_load_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(EdgeforgeError, match=r"nope: model directory does not exist"):
        load_model(tmp_path / "nope")


def test_load_no_config(saved_llama: tuple[Path, nn.Module], tmp_path: Path) -> None:
    path = _copy(saved_llama[0], tmp_path / "m")
    (path / "config.json").unlink()
    with pytest.raises(EdgeforgeError, match=r"config\.json: missing"):
        load_model(path)


def test_load_no_weights(saved_llama: tuple[Path, nn.Module], tmp_path: Path) -> None:
    path = _copy(saved_llama[0], tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(EdgeforgeError, match=r"/m: no weights \(model\.safetensors"):
        load_model(path)


def test_load_truncated_safetensors(saved_llama: tuple[Path, nn.Module], tmp_path: Path) -> None:
    path = _copy(saved_llama[0], tmp_path / "m")
    weights = path / "model.safetensors"
    full = weights.stat().st_size
    with weights.open("r+b") as f:
        f.truncate(full - 1000)
    with pytest.raises(EdgeforgeError) as err:
        load_model(path)
    assert str(err.value) == (
        f"{weights} is truncated ({full - 1000} bytes, header says {full}); "
        "copy or download it again"
    )


def test_load_header_only_fragment(saved_llama: tuple[Path, nn.Module], tmp_path: Path) -> None:
    path = _copy(saved_llama[0], tmp_path / "m")
    weights = path / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(100)  # cut inside the JSON header
    with pytest.raises(EdgeforgeError, match=r"model\.safetensors is truncated \(100 bytes"):
        load_model(path)


def test_load_missing_shard(saved_llama: tuple[Path, nn.Module], tmp_path: Path) -> None:
    path = _copy(saved_llama[0], tmp_path / "m")
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    names = load_file(path / "model-00001-of-00002.safetensors")
    index = {
        "weight_map": {
            **{name: "model-00001-of-00002.safetensors" for name in names},
            "lm_head.weight": "model-00002-of-00002.safetensors",
        }
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(EdgeforgeError, match=r"shard model-00002-of-00002\.safetensors is missing"):
        load_model(path)


def test_load_missing_tensor(saved_llama: tuple[Path, nn.Module], tmp_path: Path) -> None:
    """transformers would fill a missing tensor with random numbers; we refuse."""
    path = _copy(saved_llama[0], tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EdgeforgeError, match=r"lacks 1 tensor\(s\).*layers\.1\.mlp\.down_proj"):
        load_model(path)


@pytest.mark.parametrize(
    ("model_type", "fragment"),
    [
        ("bert", "model_type: 'bert' is not supported; supported: llama, qwen, qwen2"),
        ("gemma", "model_type: 'gemma' (Gemma) is planned"),
    ],
)
def test_load_bad_model_type(
    saved_llama: tuple[Path, nn.Module], tmp_path: Path, model_type: str, fragment: str
) -> None:
    path = _copy(saved_llama[0], tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = model_type
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgeforgeError) as err:
        load_model(path)
    assert str(err.value).startswith(f"{path / 'config.json'}: ")
    assert fragment in str(err.value)


def test_load_bad_config_json(saved_llama: tuple[Path, nn.Module], tmp_path: Path) -> None:
    path = _copy(saved_llama[0], tmp_path / "m")
    (path / "config.json").write_text("{not json")
    with pytest.raises(EdgeforgeError, match=r"config\.json: not valid JSON"):
        load_model(path)


def test_load_tokenizer_missing(saved_llama: tuple[Path, nn.Module]) -> None:
    with pytest.raises(EdgeforgeError, match=r"no tokenizer \(tokenizer\.json"):
        load_tokenizer(saved_llama[0])


def test_load_model_dtype(saved_llama: tuple[Path, nn.Module]) -> None:
    path, original = saved_llama
    half = load_model(path, torch.bfloat16)
    assert half.dtype == torch.bfloat16
    reference = copy.deepcopy(original).to(torch.bfloat16)
    torch.testing.assert_close(logits(half, IDS), logits(reference, IDS), rtol=0, atol=0)
    with pytest.raises(EdgeforgeError, match=r"dtype must be a floating torch\.dtype"):
        load_model(path, torch.int8)

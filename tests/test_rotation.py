"""Rotation preserves the model's function; rotation files load from both formats.

Tolerances: in float64 the rotated model's logits match the float64 original to 1e-9
(the transform is exact up to float64 rounding; measured ~1e-14). transformers' RMSNorm
computes in float32 whatever the model dtype, so the float64 checks swap in a float64
RMSNorm on both models first. In float32 (stock modules) the bound is 1e-4 on the tiny
models (|logits| ≲ 5) and 1e-3 on SmolLM2-135M (|logits| ≲ 35), i.e. float32 rounding.
"""

from __future__ import annotations

import itertools
import types
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import common.quant.rotation as rotation_module
from common.core.errors import EdgeforgeError
from common.models import ModelAdapter, get_adapter
from common.models.loading import load_model, load_processor
from common.quant.rotation import (
    Rotation,
    block_diagonal,
    check_rotation,
    load_rotation,
    make_rotation,
    rotate_model,
    rotation_for,
    save_rotation,
)

F64_TOL = 1e-9


def _float64_norms(adapter: ModelAdapter) -> None:
    """Make every RMSNorm of the language model compute in the input's dtype."""
    eps = adapter.rms_norm_eps
    norms = [adapter.final_norm()]
    for layer in adapter.layers():
        norms += [layer.input_norm, layer.post_attention_norm]

    def forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    for norm in norms:
        norm.forward = types.MethodType(forward, norm)


def _reference(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    model = load_model(model_dir, dtype=dtype)
    if dtype == torch.float64:
        _float64_norms(get_adapter(model))
    return model


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.double()


def _ids(vocab: int, length: int = 48) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0))


def _rotated(model_dir: Path, dtype: torch.dtype, mode: str = "hadamard", seed: int = 0):
    model = load_model(model_dir, dtype=dtype)
    adapter = get_adapter(model)
    rotation = rotation_for(adapter, mode=mode, seed=seed)
    info = rotate_model(adapter, rotation)
    if dtype == torch.float64:
        _float64_norms(adapter)
    return model, adapter, rotation, info


@pytest.mark.parametrize("mode", ["hadamard", "orthogonal"])
def test_tiny_qwen2_function_preserved(tiny_qwen2_dir: Path, mode: str) -> None:
    for dtype, tol in ((torch.float64, F64_TOL), (torch.float32, 1e-4)):
        reference = _reference(tiny_qwen2_dir, dtype)
        model, adapter, _, info = _rotated(tiny_qwen2_dir, dtype, mode)
        ids = _ids(adapter.vocab_size)
        diff = (_logits(model, ids) - _logits(reference, ids)).abs().max().item()
        assert diff < tol, (dtype, diff)
        assert info["untied_embeddings"] is True
        assert not adapter.tie_word_embeddings


def test_structure_after_rotation(tiny_qwen2_dir: Path) -> None:
    reference = load_model(tiny_qwen2_dir, dtype=torch.float64)
    ref_adapter = get_adapter(reference)
    _, adapter, rotation, _ = _rotated(tiny_qwen2_dir, torch.float64)
    r = rotation.R
    norms = [adapter.final_norm()]
    for layer, ref_layer in zip(adapter.layers(), ref_adapter.layers(), strict=True):
        norms += [layer.input_norm, layer.post_attention_norm]
        gamma = ref_layer.input_norm.weight.double()
        # Input rotation does not touch q/k biases; R_v rotates the v bias per kv head.
        for role in ("q", "k"):
            assert torch.equal(layer.linears[role].bias, ref_layer.linears[role].bias)
        b_kv = block_diagonal(rotation.R_v[layer.index], adapter.num_kv_heads)
        torch.testing.assert_close(
            layer.linears["v"].bias, b_kv.T @ ref_layer.linears["v"].bias, atol=1e-12, rtol=0
        )
        want_v = b_kv.T @ (ref_layer.linears["v"].weight * gamma[None, :]) @ r
        torch.testing.assert_close(layer.linears["v"].weight, want_v, atol=1e-12, rtol=0)
        b_q = block_diagonal(rotation.R_v[layer.index], adapter.num_heads)
        want_o = r.T @ ref_layer.linears["o"].weight @ b_q
        torch.testing.assert_close(layer.linears["o"].weight, want_o, atol=1e-12, rtol=0)
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    torch.testing.assert_close(
        adapter.embed_tokens().weight, ref_adapter.embed_tokens().weight @ r, atol=1e-12, rtol=0
    )


def test_untied_model_saves_and_reloads(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    model, adapter, _, _ = _rotated(tiny_qwen2_dir, torch.float32)
    model.save_pretrained(tmp_path / "rotated")
    reloaded = load_model(tmp_path / "rotated")
    assert not get_adapter(reloaded).tie_word_embeddings
    ids = _ids(adapter.vocab_size)
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (``torch.equal`` alone takes -0.0 for 0.0)."""
    return a.dtype == b.dtype == torch.float32 and torch.equal(
        a.detach().view(torch.int32), b.detach().view(torch.int32)
    )


@pytest.mark.parametrize(
    ("fixture", "tied"), [("tiny_qwen2_dir", True), ("tiny_qwen2_vl_dir", False)]
)
def test_row_blocks_give_the_bits_of_the_unblocked_product(
    fixture: str, tied: bool, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedding and LM head, rotated in several row blocks, equal the whole-matrix
    float64 product rounded once (what the unblocked code wrote) bit for bit; a tied head
    gets its own weight, built from the original embedding, not the rotated one."""
    model_dir = request.getfixturevalue(fixture)
    monkeypatch.setattr(rotation_module, "ROW_BLOCK_BYTES", 1)  # blocks of 2 · hidden rows
    original = get_adapter(load_model(model_dir))
    assert original.tie_word_embeddings is tied
    embed = original.embed_tokens().weight.detach()
    assert len(rotation_module._row_blocks(*embed.shape)) >= 4
    _, adapter, rotation, info = _rotated(model_dir, torch.float32, "orthogonal")
    assert info["untied_embeddings"] is tied
    r, gamma = rotation.R, original.final_norm().weight.detach().double()
    head = original.lm_head().weight.detach()
    assert _same_bits(adapter.embed_tokens().weight, (embed.double() @ r).float())
    assert _same_bits(adapter.lm_head().weight, ((head.double() * gamma[None, :]) @ r).float())
    assert adapter.lm_head().weight.data_ptr() != adapter.embed_tokens().weight.data_ptr()
    assert not adapter.tie_word_embeddings and adapter.config.tie_word_embeddings is False


def test_row_blocks_keep_the_bits_where_short_blocks_would_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At SmolLM2's width 576, MKL gives blocks of up to ~70 rows other last float64 bits
    than the whole product (64-row blocks: 4.4e-15 off, measured), which the tiny models'
    width 64 does not show; blocks at least ``width`` tall keep every bit."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6000, 576, generator=gen, dtype=torch.float64)
    r = torch.linalg.qr(torch.randn(576, 576, generator=gen, dtype=torch.float64))[0]
    gamma = torch.rand(576, generator=gen, dtype=torch.float64) + 0.5
    want = (weight * gamma[None, :]) @ r
    monkeypatch.setattr(rotation_module, "ROW_BLOCK_BYTES", 1)
    assert len(rotation_module._row_blocks(6000, 576)) == 6
    rotation_module._read_side(weight, r, gamma)
    assert torch.equal(weight.view(torch.int64), want.view(torch.int64))


@pytest.mark.parametrize(
    ("rows", "width"), [(151936, 1024), (151936, 4096), (151936, 8192), (49152, 576), (4097, 64)]
)
def test_row_blocks_bounded_and_tall(rows: int, width: int) -> None:
    """Blocks tile the rows, stay within the byte bound (or 2 · width rows, when that is
    larger) and, when there are several, are at least ``width`` rows tall."""
    blocks = rotation_module._row_blocks(rows, width)
    assert blocks[0].start == 0 and blocks[-1].stop == rows
    assert all(a.stop == b.start for a, b in itertools.pairwise(blocks))
    sizes = [b.stop - b.start for b in blocks]
    assert max(sizes) * width * 8 <= max(rotation_module.ROW_BLOCK_BYTES, 16 * width**2)
    assert len(blocks) == 1 or min(sizes) >= width


@pytest.mark.smollm2
@pytest.mark.parametrize("fixture", ["smollm2_dir", "smollm2_qwen2_dir"])
def test_smollm2_function_preserved(fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(fixture)
    reference = load_model(model_dir)
    model, adapter, _, info = _rotated(model_dir, torch.float32)
    assert info["untied_embeddings"] is True
    ids = _ids(adapter.vocab_size, 64)
    want = _logits(reference, ids)
    got = _logits(model, ids)
    assert (got - want).abs().max().item() < 1e-3
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def _image() -> Image.Image:
    image = Image.new("RGB", (112, 112))
    image.putdata(
        [((3 * x) % 256, (5 * y) % 256, (x + y) % 256) for y in range(112) for x in range(112)]
    )
    return image


def test_vl_image_prompt_logits_preserved(tiny_qwen2_vl_dir: Path) -> None:
    """The merger writes image tokens into the LM stream, so it must be rotated too."""
    processor = load_processor(tiny_qwen2_vl_dir)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[_image()], return_tensors="pt")
    for dtype, tol in ((torch.float64, F64_TOL), (torch.float32, 1e-4)):
        reference = _reference(tiny_qwen2_vl_dir, dtype)
        model, _, _, info = _rotated(tiny_qwen2_vl_dir, dtype)
        assert info["rotated_merger_output"].endswith("merger.mlp.2")
        batch = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
        with torch.inference_mode():
            want = reference(**batch).logits.double()
            got = model(**batch).logits.double()
        assert (got - want).abs().max().item() < tol, dtype


def test_vl_without_merger_rotation_breaks_image_tokens(tiny_qwen2_vl_dir: Path) -> None:
    """Guard for the test above: skipping the merger would change image-prompt logits."""
    processor = load_processor(tiny_qwen2_vl_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[_image()], return_tensors="pt")
    reference = load_model(tiny_qwen2_vl_dir)
    model, adapter, rotation, _ = _rotated(tiny_qwen2_vl_dir, torch.float32)
    fc2 = adapter.vision_merger().linears["merger_fc2"]
    with torch.no_grad():  # undo the merger's rotation only
        fc2.weight.copy_((rotation.R @ fc2.weight.double()).float())
        fc2.bias.copy_((rotation.R @ fc2.bias.double()).float())
    with torch.inference_mode():
        diff = (model(**inputs).logits - reference(**inputs).logits).abs().max().item()
    assert diff > 1e-2


# ----------------------------------------------------------------------- generation errors


def test_no_hadamard_for_hidden_size_names_it() -> None:
    with pytest.raises(EdgeforgeError, match=r"hidden_size 90: .*rotate_mode=orthogonal"):
        make_rotation(90, 16, 2, "hadamard", 0)
    with pytest.raises(EdgeforgeError, match=r"head_dim 18: .*rotate_mode=orthogonal"):
        make_rotation(64, 18, 2, "hadamard", 0)
    assert make_rotation(90, 18, 2, "orthogonal", 0).R.shape == (90, 90)


# ----------------------------------------------------------------------- rotation files


def _small_rotation(num_layers: int = 2) -> Rotation:
    return make_rotation(64, 16, num_layers, "hadamard", 3)


def test_safetensors_round_trip_is_exact_and_deterministic(tmp_path: Path) -> None:
    rotation = _small_rotation()
    save_rotation(tmp_path / "a.safetensors", rotation)
    save_rotation(tmp_path / "b.safetensors", _small_rotation())
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    loaded = load_rotation(tmp_path / "a.safetensors")
    assert torch.equal(loaded.R, rotation.R)
    assert all(torch.equal(a, b) for a, b in zip(loaded.R_v, rotation.R_v, strict=True))


def _save_mllm_pickle(path: Path, rotation: Rotation, location: str = "cpu") -> None:
    """What the mllm convertor writes: ``torch.save({"R": .., "R_v": [..]})``; with
    ``location="cuda:0"`` the storages are tagged as CUDA, as on the GPU it runs on."""
    data = {"R": rotation.R, "R_v": list(rotation.R_v)}
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: location
    try:
        torch.save(data, path)
    finally:
        torch.serialization.location_tag = original


@pytest.mark.parametrize("location", ["cpu", "cuda:0"])
def test_mllm_torch_pickle_reader(tmp_path: Path, location: str) -> None:
    rotation = _small_rotation()
    path = tmp_path / "R.bin"
    _save_mllm_pickle(path, rotation, location)
    with zipfile.ZipFile(path) as zf:  # the file really records the device we asked for
        pickled = next(zf.read(n) for n in zf.namelist() if n.endswith("data.pkl"))
    assert location.encode() in pickled
    loaded = load_rotation(path)
    assert loaded.R.device.type == "cpu"
    assert torch.equal(loaded.R, rotation.R)
    assert all(torch.equal(a, b) for a, b in zip(loaded.R_v, rotation.R_v, strict=True))
    assert loaded.info["format"] == "torch-pickle"


def test_pickle_with_vision_keys_ignores_them(tmp_path: Path) -> None:
    rotation = _small_rotation()
    torch.save(
        {"R": rotation.R, "R_v": list(rotation.R_v), "R_vit": torch.eye(8)}, tmp_path / "R.bin"
    )
    assert load_rotation(tmp_path / "R.bin").info["ignored_keys"] == ["R_vit"]


@pytest.mark.parametrize(
    ("writer", "fragment"),
    [
        (lambda p: p.write_bytes(b"hello, this is not a rotation"), "not a rotation file"),
        (lambda p: torch.save({"weights": torch.eye(3)}, p), "expected a dict with 'R'"),
        (lambda p: torch.save([torch.eye(3)], p), "not a rotation file"),
        (lambda p: torch.save({"R": torch.eye(3), "R_v": []}, p), "'R_v' must be a non-empty"),
        (
            lambda p: torch.save({"R": torch.ones(3, 4), "R_v": [torch.eye(2)]}, p),
            "R must be a square matrix",
        ),
    ],
)
def test_not_a_rotation_file(tmp_path: Path, writer, fragment: str) -> None:
    path = tmp_path / "R.bin"
    writer(path)
    with pytest.raises(EdgeforgeError, match=fragment) as exc:
        load_rotation(path)
    assert str(path) in str(exc.value)


def test_safetensors_without_r_is_not_a_rotation_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": torch.eye(4)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(EdgeforgeError, match="not a rotation file"):
        load_rotation(tmp_path / "w.safetensors")
    with pytest.raises(EdgeforgeError, match="does not exist"):
        load_rotation(tmp_path / "missing.safetensors")


def test_shape_mismatch_and_non_orthogonal(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    adapter = get_adapter(load_model(tiny_qwen2_dir))
    wrong_hidden = make_rotation(128, adapter.head_dim, adapter.num_layers, "hadamard", 0)
    save_rotation(tmp_path / "big.safetensors", wrong_hidden)
    with pytest.raises(EdgeforgeError, match=r"R has shape \[128, 128\] but .*hidden_size is 64"):
        rotation_for(adapter, mode="hadamard", seed=0, r_path=tmp_path / "big.safetensors")
    fewer = make_rotation(64, adapter.head_dim, adapter.num_layers - 1, "hadamard", 0)
    with pytest.raises(EdgeforgeError, match="1 R_v matrices but the model has 2 layers"):
        check_rotation(fewer, adapter, "x")
    wrong_head = make_rotation(64, 8, adapter.num_layers, "hadamard", 0)
    with pytest.raises(EdgeforgeError, match=r"R_v\[0\] has shape \[8, 8\] .*head_dim is 16"):
        check_rotation(wrong_head, adapter, "x")
    good = make_rotation(64, adapter.head_dim, adapter.num_layers, "hadamard", 0)
    scaled = Rotation(good.R * 2, good.R_v)
    with pytest.raises(EdgeforgeError, match="R is not orthogonal"):
        check_rotation(scaled, adapter, "x")


def test_safetensors_header_length_starting_with_pickle_byte(tmp_path: Path) -> None:
    """A safetensors header of 0x..80 bytes starts with 0x80, a pickle's first byte too."""
    base = make_rotation(64, 16, 2, "hadamard", 0)
    path = tmp_path / "r.safetensors"
    for pad in range(0, 256, 8):  # header lengths are multiples of 8: one of these hits 0x80
        save_rotation(path, Rotation(base.R, base.R_v, {"note": "x" * pad}))
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert torch.equal(load_rotation(path).R, base.R)

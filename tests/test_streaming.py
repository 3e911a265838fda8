"""Layer-by-layer machinery: checkpoints written a tensor at a time, random real-shape
checkpoints, streamed forwards equal to whole-model ones, lazily written .mllm files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.analysis.eval import compare_logits
from common.analysis.layerwise import Parts, head, run_layers
from common.core.errors import EdgeforgeError
from common.export import checkpoint_writer
from common.export.checkpoint_writer import CheckpointWriter, TensorSpec, write_transformed
from common.export.mllm_format import (
    mllm_mismatches,
    mllm_named_tensors,
    write_mllm,
    write_mllm_lazily,
)
from common.export.random_checkpoint import write_random_checkpoint
from common.inputs.data import EVAL_CORPUS, eval_windows
from common.models import get_adapter
from common.models.loading import load_model, load_tokenizer
from common.models.streaming import StreamedModel, float32_bytes
from common.quant.rotation import rotate_model, rotation_for
from common.quant.transforms import Transforms


def _small_qwen2_config(layers: int = 3) -> object:
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256,
        tie_word_embeddings=False,
    )  # fmt: skip


def test_writer_shards_load_with_transformers(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    """Shards of at most the limit, an index transformers reads, the same tensors; the
    same seed gives the same bytes."""
    out = write_random_checkpoint(
        _small_qwen2_config(), tmp_path / "a", max_shard_bytes=200_000, tokenizer_dir=tiny_qwen2_dir
    )
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    model = load_model(out, dtype=torch.bfloat16)  # plain from_pretrained, every tensor found
    stored = {k: v for f in files for k, v in load_file(out / f).items()}
    assert set(stored) == {n for n, _ in model.named_parameters()}
    assert all(torch.equal(stored[n], p) for n, p in model.named_parameters())
    assert all(stored[n].dtype == torch.bfloat16 for n in stored)
    assert float32_bytes(out) == 2 * sum(t.numel() * 2 for t in stored.values())
    again = write_random_checkpoint(
        _small_qwen2_config(), tmp_path / "b", max_shard_bytes=200_000, tokenizer_dir=tiny_qwen2_dir
    )
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in files)


def test_writer_refuses_out_of_order_and_missing(tmp_path: Path) -> None:
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (3,))]
    with (
        pytest.raises(EdgeforgeError, match=r"got 'b' .* expected 'a'"),
        CheckpointWriter(tmp_path / "x", specs) as writer,
    ):
        writer.add("b", torch.zeros(3))
    with (
        pytest.raises(EdgeforgeError, match="'b' and later were never written"),
        CheckpointWriter(tmp_path / "y", specs) as writer,
    ):
        writer.add("a", torch.zeros(2))


def test_transformed_checkpoint_equals_whole_model_rotation(
    tmp_path: Path, tiny_qwen2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rotating part by part into shards gives the tensors of rotate_model on the whole
    model, under the names save_pretrained uses, readable by plain transformers."""
    monkeypatch.setattr(checkpoint_writer, "MAX_SHARD_BYTES", 100_000)
    streamed = StreamedModel(tiny_qwen2_dir)
    assert streamed.tied
    rotation = rotation_for(streamed.adapter, mode="hadamard", seed=1)
    write_transformed(streamed, Transforms(rotation), tmp_path / "rot")
    model = load_model(tiny_qwen2_dir)
    rotate_model(get_adapter(model), rotation)
    written = load_model(tmp_path / "rot")
    assert not written.config.tie_word_embeddings
    mine = dict(written.named_parameters())
    assert mine.keys() == dict(model.named_parameters()).keys() | {"lm_head.weight"}
    assert all(torch.equal(mine[n], p) for n, p in model.named_parameters())
    assert torch.equal(mine["lm_head.weight"], model.lm_head.weight)
    with pytest.raises(EdgeforgeError, match="online Hadamard"):
        write_transformed(streamed, Transforms(rotation, online_down=True), tmp_path / "x")


def test_layerwise_logits_equal_the_whole_model(tiny_qwen2_dir: Path) -> None:
    """Embedding, layers one at a time, then the head: the whole model's logits bit for bit."""
    windows = eval_windows([EVAL_CORPUS], load_tokenizer(tiny_qwen2_dir), 3, 48)
    streamed = StreamedModel(tiny_qwen2_dir)
    parts = Parts(streamed.adapter, streamed)
    hidden = run_layers(parts, windows)
    model = load_model(tiny_qwen2_dir)
    with head(parts) as logits, torch.inference_mode():
        for i, window in enumerate(windows):
            want = model(input_ids=window[None], use_cache=False).logits
            assert torch.equal(logits(hidden[i : i + 1]), want)
    assert compare_logits(model, model, windows)["top1_agreement"] == 1.0


def test_lazy_mllm_is_byte_identical(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    named = mllm_named_tensors(get_adapter(load_model(tiny_qwen2_dir)))
    tensors = dict(named)
    write_mllm(tmp_path / "a.mllm", named)
    specs = [(n, t.dtype, t.numel()) for n, t in named]
    write_mllm_lazily(tmp_path / "b.mllm", specs, tensors.__getitem__)
    assert (tmp_path / "a.mllm").read_bytes() == (tmp_path / "b.mllm").read_bytes()
    assert mllm_mismatches(tmp_path / "b.mllm", list(tensors), tensors.__getitem__) == []
    changed = dict(tensors, **{named[0][0]: tensors[named[0][0]] + 1})
    assert mllm_mismatches(tmp_path / "b.mllm", list(tensors), changed.__getitem__) == [named[0][0]]
    assert mllm_mismatches(tmp_path / "b.mllm", [*tensors, "extra"], tensors.__getitem__) == [
        "extra"
    ]


def test_pickled_checkpoint_streams_too(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    """A pytorch_model.bin has no header: it is memory-mapped, counted in the estimates,
    and gives the whole model's logits part by part like safetensors."""
    import shutil

    model = load_model(tiny_qwen2_dir)
    (tmp_path / "bin").mkdir()
    # transformers 5 writes only safetensors; older hub checkpoints are pickles like this
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    shutil.copy(tiny_qwen2_dir / "config.json", tmp_path / "bin" / "config.json")
    streamed = StreamedModel(tmp_path / "bin")
    assert streamed.weights.mapped_bytes > 0
    windows = eval_windows([EVAL_CORPUS], load_tokenizer(tiny_qwen2_dir), 2, 32)
    parts = Parts(streamed.adapter, streamed)
    hidden = run_layers(parts, windows)
    with head(parts) as logits, torch.inference_mode():
        for i, window in enumerate(windows):
            want = model(input_ids=window[None], use_cache=False).logits
            assert torch.equal(logits(hidden[i : i + 1]), want)


def test_vision_language_checkpoint_in_the_hubs_names(
    tmp_path: Path, tiny_qwen2_5_vl_dir: Path
) -> None:
    """A random Qwen2.5-VL checkpoint is stored under the hub's tensor names (what
    ``save_pretrained`` writes, not transformers 5's module paths), loads with plain
    ``from_pretrained``, and each part read by name equals the loaded model's."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_qwen2_5_vl_dir)
    out = write_random_checkpoint(config, tmp_path / "vl", tokenizer_dir=tiny_qwen2_5_vl_dir)
    stored = {k for f in out.glob("*.safetensors") for k in load_file(f)}
    assert any(k.startswith("model.layers.0.") for k in stored)
    assert any(k.startswith("visual.blocks.0.") for k in stored)
    assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in stored)
    model = load_model(out)
    streamed = StreamedModel(out)
    for prefix in ("model.visual", "model.language_model.layers.1", "lm_head", "model.visual"):
        module = streamed.model.get_submodule(prefix)
        with streamed.loaded(module, prefix):
            for name, param in module.named_parameters():
                assert torch.equal(param, model.get_parameter(f"{prefix}.{name}")), name
            # read again, a part keeps the buffers its constructor computed (rotary tables)
            for name, buffer in module.named_buffers():
                assert torch.equal(buffer, model.get_buffer(f"{prefix}.{name}")), name

"""The tiny random-weight models stand in for real checkpoints across the whole suite.

So they have to be what a real checkpoint is: directories that the stock transformers Auto
classes load offline, whose tokenizer/processor behave like Qwen's, and whose bytes are
fixed by (seed, corpus) so that build manifests and artifact hashes are reproducible.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from common.core.errors import EdgeforgeError
from common.core.records import hash_tree
from common.models.tiny_models import (
    QWEN_ADDED_TOKENS,
    TINY_SPECS,
    VL_MAX_PIXELS,
    build_tiny_model,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED = 0
VL_TYPES = ("qwen2_vl", "qwen2_5_vl")
PROMPT = "What is the capital of France?"

#: The corpus the builder trains its tokenizer on, as Python source, so a subprocess
#: rebuild reads exactly the texts this process reads. It is the project's calibration
#: corpus (what `make model` uses) once common/inputs/data.py provides it; until then, the
#: licence texts every Debian system ships.
CORPUS_SOURCE = textwrap.dedent(
    """
    from pathlib import Path

    def corpus():
        try:
            from common.inputs.data import CALIB_CORPUS, iter_texts
        except ImportError:
            for path in sorted(Path("/usr/share/common-licenses").iterdir()):
                if path.is_file():
                    yield from path.read_text(errors="replace").split("\\n\\n")
        else:
            yield from iter_texts([CALIB_CORPUS])
    """
)


def corpus() -> Iterator[str]:
    """Real English text for the tokenizer (the same texts on every call)."""
    namespace: dict[str, object] = {}
    exec(CORPUS_SOURCE, namespace)
    yield from namespace["corpus"]()  # type: ignore[operator]


def _never_read() -> Iterator[str]:
    """A corpus that fails the test if the builder reads it (bad input must fail first)."""
    raise AssertionError("the corpus was read before the arguments were validated")
    yield ""  # pragma: no cover


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny model, built once for this module."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {}
    for model_type in TINY_SPECS:
        dirs[model_type] = root / model_type
        build_tiny_model(model_type, dirs[model_type], seed=SEED, corpus=corpus())
    return dirs


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _text_config(model_type: str, model_dir: Path) -> dict:
    config = _config(model_dir)
    return config if model_type == "qwen2" else config["text_config"]


def _test_image(width: int, height: int) -> Image.Image:
    """A deterministic gradient (not a flat colour, so patches differ)."""
    image = Image.new("RGB", (width, height))
    image.putdata(
        [((3 * x) % 256, (5 * y) % 256, (x + y) % 256) for y in range(height) for x in range(width)]
    )
    return image


# ----------------------------------------------------------------------- reproducibility


def test_rebuild_in_process_is_byte_identical(built: dict[str, Path], tmp_path: Path) -> None:
    rng_before = torch.get_rng_state()
    build_tiny_model("qwen2", tmp_path / "again", seed=SEED, corpus=corpus())
    assert torch.equal(torch.get_rng_state(), rng_before), "the build disturbed the global RNG"
    first, second = hash_tree(built["qwen2"]), hash_tree(tmp_path / "again")
    assert set(first) >= {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }
    assert first == second


def test_rebuild_in_fresh_process_is_byte_identical(built: dict[str, Path], tmp_path: Path) -> None:
    """A new interpreter has new hash seeds (Python and the Rust tokenizer trainer)."""
    out = tmp_path / "again"
    script = CORPUS_SOURCE + textwrap.dedent(
        f"""
        from common.models.tiny_models import build_tiny_model
        build_tiny_model("qwen2_5_vl", {str(out)!r}, seed={SEED}, corpus=corpus())
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    first, second = hash_tree(built["qwen2_5_vl"]), hash_tree(out)
    assert {"processor_config.json", "model.safetensors"} <= set(first)
    assert first == second


def test_seed_changes_weights_not_tokenizer(built: dict[str, Path], tmp_path: Path) -> None:
    build_tiny_model("qwen2", tmp_path / "seed1", seed=SEED + 1, corpus=corpus())
    first, second = hash_tree(built["qwen2"]), hash_tree(tmp_path / "seed1")
    assert first["model.safetensors"] != second["model.safetensors"]
    assert first["tokenizer.json"] == second["tokenizer.json"]
    assert first["config.json"] == second["config.json"]


def test_all_files_world_readable(built: dict[str, Path]) -> None:
    for model_dir in built.values():
        for path in model_dir.iterdir():
            assert path.stat().st_mode & 0o777 == 0o644, path


# ----------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("model_type", list(TINY_SPECS))
def test_tokenizer(built: dict[str, Path], model_type: str) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    model_dir = built[model_type]
    spec = TINY_SPECS[model_type]
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    vocab_size = _text_config(model_type, model_dir)["vocab_size"]
    assert len(tokenizer) == vocab_size == 1024

    # Added tokens follow the BPE vocab in Qwen's order, each one id, never split.
    base = len(tokenizer) - len(spec.added_tokens)
    for offset, (token, special) in enumerate(spec.added_tokens):
        assert tokenizer.convert_tokens_to_ids(token) == base + offset
        assert tokenizer.encode(f"a{token}b") == [
            *tokenizer.encode("a"),
            base + offset,
            *tokenizer.encode("b"),
        ]
        assert tokenizer.added_tokens_decoder[base + offset].special == special, token
    for required in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert required in dict(spec.added_tokens)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None

    # transformers rebuilds Qwen2Tokenizer from vocab/merges with its own pre-tokenizer; the
    # result must match tokenizer.json as saved (i.e. BPE was trained with that pipeline).
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = "In the beginning, Ünïcödé and 12345 numbers\n\n  spaces\tand tabs! Don't we're"
    assert tokenizer.encode(text) == raw.encode(text).ids
    assert tokenizer.decode(tokenizer.encode(text)) == text
    # A real BPE: common English words are single tokens, text compresses well below bytes.
    assert len(tokenizer.tokenize(" the")) == 1
    sample = "And the people said that they would go with them into the land of the king."
    assert len(tokenizer.encode(sample)) < len(sample.encode()) / 2

    messages = [{"role": "user", "content": PROMPT}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    ids = ids["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2


def test_vl_chat_template_emits_vision_tokens(built: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built["qwen2_vl"], local_files_only=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>" in rendered


# ----------------------------------------------------------------------- config


def test_qwen2_config(built: dict[str, Path]) -> None:
    config = _config(built["qwen2"])
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert config["hidden_size"] % config["num_attention_heads"] == 0
    assert config["num_attention_heads"] > config["num_key_value_heads"]  # GQA
    generation = json.loads((built["qwen2"] / "generation_config.json").read_text())
    assert generation["do_sample"] is False
    assert generation["eos_token_id"] == [config["eos_token_id"], config["bos_token_id"]]
    assert generation["pad_token_id"] == config["bos_token_id"]


@pytest.mark.parametrize("model_type", VL_TYPES)
def test_vl_config_matches_tokenizer(built: dict[str, Path], model_type: str) -> None:
    from transformers import AutoTokenizer

    model_dir = built[model_type]
    config = _config(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    for key, token in (
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ):
        assert config[key] == tokenizer.convert_tokens_to_ids(token), key
    text, vision = config["text_config"], config["vision_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert 2 * sum(text["rope_parameters"]["mrope_section"]) == head_dim
    assert text["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    out_key = "hidden_size" if model_type == "qwen2_vl" else "out_hidden_size"
    assert vision[out_key] == text["hidden_size"]
    assert vision["patch_size"] == 14 and vision["spatial_merge_size"] == 2
    if model_type == "qwen2_5_vl":
        assert vision["window_size"] == 112 and vision["fullatt_block_indexes"] == [1]


# ----------------------------------------------------------------------- models


def test_qwen2_loads_and_generates(built: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = built["qwen2"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True, output_loading_info=True
    )
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert logits.shape == (1, inputs["input_ids"].shape[1], 1024)
    assert torch.isfinite(logits).all()
    # Random but not degenerate: the next-token distribution is neither flat nor one-hot.
    assert 0.3 < logits[0, -1].std().item() < 10
    assert torch.equal(out[0, : inputs["input_ids"].shape[1]], inputs["input_ids"][0])
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("model_type", VL_TYPES)
def test_vl_processor_grid(built: dict[str, Path], model_type: str) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(built[model_type], local_files_only=True)
    assert type(processor).__name__ == TINY_SPECS[model_type].processor_class
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert type(processor.video_processor).__name__ == "Qwen2VLVideoProcessor"
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # (width, height) -> (t, h, w) patch grid: sides round to multiples of 28 px, and the
    # pixel budget caps large images at 224x224.
    cases = {(56, 56): (1, 4, 4), (112, 56): (1, 4, 8), (112, 112): (1, 8, 8)}
    cases[(448, 448)] = (1, 16, 16)
    assert VL_MAX_PIXELS == 224 * 224
    text = "<|vision_start|><|image_pad|><|vision_end|>Describe."
    for (width, height), grid in cases.items():
        batch = processor(text=[text], images=[_test_image(width, height)], return_tensors="pt")
        assert batch["image_grid_thw"].tolist() == [list(grid)], (width, height)
        patches = grid[0] * grid[1] * grid[2]
        assert batch["pixel_values"].shape == (patches, 3 * 2 * 14 * 14)
        assert (batch["input_ids"] == image_pad).sum().item() == patches // 4


@pytest.mark.parametrize("model_type", VL_TYPES)
def test_vl_loads_and_generates(built: dict[str, Path], model_type: str) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = built[model_type]
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model, info = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True, output_loading_info=True
    )
    assert type(model).__name__ == TINY_SPECS[model_type].architecture
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text
    inputs = processor(text=[text], images=[_test_image(112, 112)], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    prompt_len = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert logits.shape == (1, prompt_len, 1024)
    assert torch.isfinite(logits).all()
    assert torch.equal(out[0, :prompt_len], inputs["input_ids"][0])
    assert prompt_len < out.shape[1] <= prompt_len + 3
    # The image reaches the logits: a different image changes them.
    other = processor(text=[text], images=[_test_image(112, 112).rotate(90)], return_tensors="pt")
    with torch.inference_mode():
        assert not torch.allclose(model(**other).logits, logits)


# ----------------------------------------------------------------------- overrides


def test_overrides_change_dims_and_keep_them_consistent(tmp_path: Path) -> None:
    out = tmp_path / "wide"
    build_tiny_model(
        "qwen2_vl",
        out,
        seed=SEED,
        corpus=corpus(),
        vocab_size=512,
        overrides={"text_config": {"hidden_size": 128, "num_hidden_layers": 3}},
    )
    config = _config(out)
    text = config["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]) == (128, 3, 512)
    # head_dim 32 -> mRoPE sections rescaled; merger output follows the LM width.
    assert text["rope_parameters"]["mrope_section"] == [4, 6, 6]
    assert config["vision_config"]["hidden_size"] == 128


@pytest.mark.parametrize(
    ("model_type", "overrides", "fragments"),
    [
        ("qwen2", {"hidden_sise": 96}, ["'hidden_sise'", "hidden_size"]),
        ("qwen2", {"vocab_size": 2048}, ["'vocab_size'", "tokenizer"]),
        ("qwen2", {"num_key_value_heads": 3}, ["num_key_value_heads 3"]),
        ("qwen2", {"num_hidden_layers": 0}, ["num_hidden_layers", "positive"]),
        ("qwen2", {"rope_parameters": {"rope_type": "nope"}}, ["'nope'"]),
        ("qwen2_vl", {"hidden_size": 128}, ["'hidden_size'", "text_config"]),
        ("qwen2_vl", {"vision_config": {"depthh": 3}}, ["'vision_config.depthh'"]),
        ("qwen2_vl", {"image_token_id": 7}, ["'image_token_id'"]),
        (
            "qwen2_vl",
            {"text_config": {"rope_parameters": {"mrope_section": [1, 1, 1]}}},
            ["mrope_section"],
        ),
        ("qwen2_5_vl", {"vision_config": {"window_size": 100}}, ["window_size 100"]),
        ("qwen2_5_vl", {"vision_config": {"fullatt_block_indexes": [5]}}, ["[5]"]),
        ("qwen2_5_vl", {"text_config": "big"}, ["overrides.text_config"]),
    ],
)
def test_bad_overrides(
    tmp_path: Path, model_type: str, overrides: dict, fragments: list[str]
) -> None:
    out = tmp_path / "m"
    with pytest.raises(EdgeforgeError) as excinfo:
        build_tiny_model(model_type, out, seed=SEED, corpus=_never_read(), overrides=overrides)
    message = str(excinfo.value)
    assert "\n" not in message
    assert model_type in message
    for fragment in fragments:
        assert fragment in message
    assert not out.exists()


def test_unknown_model_type_lists_supported(tmp_path: Path) -> None:
    with pytest.raises(EdgeforgeError, match=r"'llama'.*qwen2, qwen2_5_vl, qwen2_vl"):
        build_tiny_model("llama", tmp_path / "m", seed=SEED, corpus=_never_read())


@pytest.mark.parametrize("vocab_size", [100, 256 + len(QWEN_ADDED_TOKENS), True, 1024.0])
def test_bad_vocab_size(tmp_path: Path, vocab_size: object) -> None:
    with pytest.raises(EdgeforgeError, match="vocab_size"):
        build_tiny_model(
            "qwen2", tmp_path / "m", seed=SEED, corpus=_never_read(), vocab_size=vocab_size
        )


@pytest.mark.parametrize("seed", [-1, 1.5, None])
def test_bad_seed(tmp_path: Path, seed: object) -> None:
    with pytest.raises(EdgeforgeError, match="seed"):
        build_tiny_model("qwen2", tmp_path / "m", seed=seed, corpus=_never_read())


@pytest.mark.parametrize("texts", [[], ["", ""], [b"bytes"]])
def test_bad_corpus(tmp_path: Path, texts: Iterable[object]) -> None:
    out = tmp_path / "m"
    with pytest.raises(EdgeforgeError, match="corpus"):
        build_tiny_model("qwen2", out, seed=SEED, corpus=iter(texts))  # type: ignore[arg-type]
    assert not out.exists()


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(EdgeforgeError, match=r"precious.*not empty"):
        build_tiny_model("qwen2", out, seed=SEED, corpus=_never_read())
    assert (out / "notes.txt").read_text() == "keep me"


def test_builds_into_an_existing_empty_directory(tmp_path: Path) -> None:
    """The model step hands the builder a fresh empty directory inside its atomic temp."""
    out = tmp_path / "model"
    out.mkdir()
    build_tiny_model("qwen2", out, seed=SEED, corpus=corpus(), vocab_size=400)
    assert (out / "model.safetensors").is_file()
    assert _config(out)["vocab_size"] == 400
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp left behind

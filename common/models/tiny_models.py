"""Deterministic random-weight tiny Qwen-family models, saved as real Hugging Face directories.

The test suite cannot download real checkpoints (everything runs offline) and real ones are
far too big to convert in a unit test, yet every converter, quantizer and target has to be
exercised on the exact on-disk layout a user's checkpoint has. So this module builds small
models of each supported architecture -- ``qwen2`` (Qwen2ForCausalLM), ``qwen2_vl``
(Qwen2VLForConditionalGeneration) and ``qwen2_5_vl`` (Qwen2_5_VLForConditionalGeneration) --
with the real transformers classes, a real byte-level BPE tokenizer trained on a text corpus
with Qwen's pre-tokenizer and special tokens, and (for the VL models) the real processor.

The dims are small but structurally faithful: grouped-query attention, q/k/v biases, a
multimodal RoPE whose ``mrope_section`` matches the head dim, a vision tower with a patch
merger (and, for Qwen2.5-VL, window attention with one full-attention block). Weights are
drawn from a per-tensor ``torch.Generator`` seeded from ``(seed, tensor name)``, so the same
seed and corpus always give byte-identical files and the caller's global RNG is untouched.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError

from common.core.errors import EdgeforgeError
from common.core.records import atomic_path

#: Qwen2/Qwen2.5 added tokens in their real id order (they follow the BPE vocab), with the
#: ``special`` flag each has in the released tokenizers. Qwen2-VL ships the first 14.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

#: The Qwen2-Instruct ChatML template (default system prompt when none is given).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: The Qwen2-VL-Instruct template (also Qwen2.5-VL's): image/video content items become
#: ``<|vision_start|><|image_pad|><|vision_end|>``, which the processor then expands.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: The tokenizer sees at most this many characters of the corpus: enough for ~1k merges on
#: English text, and it bounds build time when a caller passes a multi-GB corpus.
TOKENIZER_MAX_CHARS = 4_000_000

#: Pixel budget of the VL image/video processors: a 56x56 image is 4 merged vision tokens,
#: the 224x224 cap is 64, so test prompts stay a few dozen tokens long.
VL_MIN_PIXELS = 56 * 56
VL_MAX_PIXELS = 224 * 224

_BYTE_ALPHABET_SIZE = 256
_FILE_MODE = 0o644
_ROPE_THETA = 1_000_000.0
_MAX_POSITIONS = 32768
#: Biases and norm gains are drawn around 0 / 1 with this std, not left at 0 / 1, so a
#: converter that drops or misplaces one changes the logits and a test notices.
_NORM_AND_BIAS_STD = 0.1

# Text-model dims shared by the three architectures: 4 query heads over 2 KV heads (GQA),
# head_dim 16.
_TEXT_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": _MAX_POSITIONS,
    "rms_norm_eps": 1e-6,
    "use_sliding_window": False,
    "max_window_layers": 2,
    "attention_dropout": 0.0,
}

#: A Qwen-VL config's fields naming the vision placeholder tokens, and those tokens.
VISION_TOKEN_FIELDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
# Config keys that the builder owns: they must agree with the tokenizer it trains.
_TOKENIZER_OWNED_KEYS = frozenset(
    {
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
    }
)
_SUB_CONFIGS = ("text_config", "vision_config")
_TEXT_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)
_VISION_SIZES = (
    "depth",
    "embed_dim",
    "hidden_size",
    "intermediate_size",
    "out_hidden_size",
    "mlp_ratio",
    "num_heads",
    "patch_size",
    "spatial_merge_size",
    "temporal_patch_size",
    "window_size",
    "tokens_per_second",
)
#: Sizes checked to be positive integers before the config class sees them, per scope
#: ("" is the top level of a qwen2 config).
_POSITIVE_DIMS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"": _TEXT_SIZES, "text_config": _TEXT_SIZES, "vision_config": _VISION_SIZES}
)


@dataclass(frozen=True)
class TinySpec:
    """How to build one tiny architecture.

    ``config`` holds the default config dict (with tokenizer-owned ids left out); the VL
    ones nest ``text_config`` / ``vision_config`` exactly as transformers 5 saves them.
    ``auto_class`` names the transformers Auto class that loads the saved directory.
    """

    model_type: str
    recipe_name: str
    architecture: str
    auto_class: str
    config: Mapping[str, Any]
    num_added_tokens: int
    chat_template: str
    processor_class: str | None

    @property
    def added_tokens(self) -> tuple[tuple[str, bool], ...]:
        """The Qwen added tokens this family's tokenizer carries, in id order."""
        return QWEN_ADDED_TOKENS[: self.num_added_tokens]

    def default_config(self) -> dict[str, Any]:
        """A fresh, mutable deep copy of the default config dict."""
        return copy.deepcopy(_thaw(self.config))


def _freeze(value: Any) -> Any:
    """Read-only view of nested dicts/lists so the module-level specs cannot be mutated."""
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """Inverse of :func:`_freeze`: plain dicts and lists that a config class accepts."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's temporal/height/width split of the rotary half-dim, scaled to ``head_dim``.

    Real Qwen2-VL uses [16, 24, 24] for head_dim 128 (a 1/4, 3/8, 3/8 split of the 64
    rotary frequencies); the sections must sum to head_dim / 2.
    """
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def _text_rope(mrope: bool) -> dict[str, Any]:
    head_dim = _TEXT_DIMS["hidden_size"] // _TEXT_DIMS["num_attention_heads"]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": _ROPE_THETA}
    if mrope:
        rope["mrope_section"] = _mrope_section(head_dim)
    return rope


#: The buildable architectures, keyed by Hugging Face ``model_type``.
TINY_SPECS: dict[str, TinySpec] = {
    "qwen2": TinySpec(
        model_type="qwen2",
        recipe_name="tiny-qwen2",
        architecture="Qwen2ForCausalLM",
        auto_class="AutoModelForCausalLM",
        # Tied embeddings like the small Qwen2.5 LLMs (0.5B-3B).
        config=_freeze(
            {**_TEXT_DIMS, "rope_parameters": _text_rope(False), "tie_word_embeddings": True}
        ),
        num_added_tokens=22,
        chat_template=QWEN2_CHAT_TEMPLATE,
        processor_class=None,
    ),
    "qwen2_vl": TinySpec(
        model_type="qwen2_vl",
        recipe_name="tiny-qwen2-vl",
        architecture="Qwen2VLForConditionalGeneration",
        auto_class="AutoModelForImageTextToText",
        # Untied like Qwen2-VL-7B, so the suite covers a separate lm_head too.
        config=_freeze(
            {
                "text_config": {**_TEXT_DIMS, "rope_parameters": _text_rope(True)},
                "vision_config": {
                    "depth": 2,
                    "embed_dim": 32,
                    "hidden_size": _TEXT_DIMS["hidden_size"],
                    "hidden_act": "quick_gelu",
                    "mlp_ratio": 4,
                    "num_heads": 2,
                    "in_channels": 3,
                    "patch_size": 14,
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                },
                "tie_word_embeddings": False,
            }
        ),
        num_added_tokens=14,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
        processor_class="Qwen2VLProcessor",
    ),
    "qwen2_5_vl": TinySpec(
        model_type="qwen2_5_vl",
        recipe_name="tiny-qwen2.5-vl",
        architecture="Qwen2_5_VLForConditionalGeneration",
        auto_class="AutoModelForImageTextToText",
        # Tied like Qwen2.5-VL-3B. window_size 112 px = 4x4 merged tokens per window;
        # block 1 attends globally, block 0 within windows, as in the real model.
        config=_freeze(
            {
                "text_config": {**_TEXT_DIMS, "rope_parameters": _text_rope(True)},
                "vision_config": {
                    "depth": 2,
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "out_hidden_size": _TEXT_DIMS["hidden_size"],
                    "hidden_act": "silu",
                    "num_heads": 2,
                    "in_channels": 3,
                    "patch_size": 14,
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                    "tokens_per_second": 2,
                    "window_size": 112,
                    "fullatt_block_indexes": [1],
                },
                "tie_word_embeddings": True,
            }
        ),
        num_added_tokens=22,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
        processor_class="Qwen2_5_VLProcessor",
    ),
}


def _spec(model_type: str) -> TinySpec:
    try:
        return TINY_SPECS[model_type]
    except KeyError:
        raise EdgeforgeError(
            f"tiny model_type {model_type!r} is not supported; supported: "
            f"{', '.join(sorted(TINY_SPECS))}"
        ) from None


# --------------------------------------------------------------------------- config


def _config_classes(model_type: str) -> dict[str, type]:
    """The transformers config class of the top level and of each sub-config."""
    from transformers import Qwen2_5_VLConfig, Qwen2Config, Qwen2VLConfig

    top = {"qwen2": Qwen2Config, "qwen2_vl": Qwen2VLConfig, "qwen2_5_vl": Qwen2_5_VLConfig}
    classes: dict[str, type] = {"": top[model_type]}
    for key, sub in getattr(top[model_type], "sub_configs_defaults", {}).items():
        classes[key] = getattr(sub, "config_class", sub)
    return classes


def _own_fields(config_class: type) -> set[str]:
    """Fields a model config declares itself (dims and ids), not PreTrainedConfig plumbing."""
    from transformers import PreTrainedConfig

    base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    return {f.name for f in dataclasses.fields(config_class)} - base


def _merge_overrides(
    model_type: str, config: dict[str, Any], overrides: Mapping[str, Any]
) -> set[str]:
    """Apply ``overrides`` to ``config`` in place; return the dotted keys that were set.

    Keys are checked against the transformers config class (sub-configs by their nested
    dict), so a typo fails here instead of becoming a silently ignored config attribute.
    """
    classes = _config_classes(model_type)
    touched: set[str] = set()

    def apply(target: dict[str, Any], values: Any, scope: str) -> None:
        where = f"overrides.{scope}" if scope else "overrides"
        if not isinstance(values, Mapping):
            raise EdgeforgeError(f"tiny {model_type}: {where} must be an object")
        allowed = _own_fields(classes[scope]) - _TOKENIZER_OWNED_KEYS
        for key, value in values.items():
            dotted = f"{scope}.{key}" if scope else key
            if key in _TOKENIZER_OWNED_KEYS:
                raise EdgeforgeError(
                    f"tiny {model_type}: overrides key {dotted!r} is set from the trained "
                    "tokenizer (use the vocab_size argument for the vocabulary size)"
                )
            if key not in allowed:
                hint = ""
                if not scope and "text_config" in classes:
                    hint = " (text and vision dims go under text_config / vision_config)"
                raise EdgeforgeError(
                    f"tiny {model_type}: unknown overrides key {dotted!r}; known: "
                    f"{', '.join(sorted(allowed))}{hint}"
                )
            if not scope and key in _SUB_CONFIGS:
                apply(target.setdefault(key, {}), value, key)
                continue
            if isinstance(value, Mapping) and isinstance(target.get(key), dict):
                # e.g. rope_parameters: merge, so {"rope_theta": ...} keeps mrope_section.
                target[key] = {**target[key], **copy.deepcopy(dict(value))}
                touched.update(f"{dotted}.{sub}" for sub in value)
            else:
                target[key] = copy.deepcopy(value)
            touched.add(dotted)

    apply(config, overrides, "")
    return touched


def _derive_dependent_dims(model_type: str, config: dict[str, Any], touched: set[str]) -> None:
    """Keep dims that must agree in step after overrides, unless the recipe set them itself.

    Changing the LM width or head count would otherwise leave the mRoPE sections or the
    vision merger's output width inconsistent with the text model.
    """
    if model_type == "qwen2":
        return
    text, vision = config["text_config"], config["vision_config"]
    if "text_config.rope_parameters.mrope_section" not in touched:
        heads = text["num_attention_heads"]
        if isinstance(heads, int) and heads > 0 and isinstance(text["hidden_size"], int):
            text["rope_parameters"]["mrope_section"] = _mrope_section(text["hidden_size"] // heads)
    out_key = "hidden_size" if model_type == "qwen2_vl" else "out_hidden_size"
    if f"vision_config.{out_key}" not in touched:
        vision[out_key] = text["hidden_size"]


def _check_dims(model_type: str, config: Any) -> None:
    """Reject geometries the modeling code would only fail on (or silently mis-handle) later."""
    text = config.text_config if model_type != "qwen2" else config
    where = "text_config." if model_type != "qwen2" else ""
    hidden, heads, kv = text.hidden_size, text.num_attention_heads, text.num_key_value_heads
    if hidden % heads:
        raise EdgeforgeError(
            f"tiny {model_type}: {where}hidden_size {hidden} is not a multiple of "
            f"num_attention_heads {heads}"
        )
    if kv <= 0 or heads % kv:
        raise EdgeforgeError(
            f"tiny {model_type}: {where}num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {kv}"
        )
    head_dim = hidden // heads
    if head_dim % 2:
        raise EdgeforgeError(f"tiny {model_type}: head dim {head_dim} must be even for RoPE")
    if model_type == "qwen2":
        return
    section = text.rope_parameters.get("mrope_section")
    if not section or len(section) != 3 or 2 * sum(section) != head_dim:
        raise EdgeforgeError(
            f"tiny {model_type}: text_config.rope_parameters.mrope_section {section} must be "
            f"3 sections summing to head_dim/2 = {head_dim // 2}"
        )
    vision = config.vision_config
    if vision.in_channels != 3:
        raise EdgeforgeError(
            f"tiny {model_type}: vision_config.in_channels must be 3 (the processor emits RGB)"
        )
    width = vision.embed_dim if model_type == "qwen2_vl" else vision.hidden_size
    out = vision.hidden_size if model_type == "qwen2_vl" else vision.out_hidden_size
    if width <= 0 or vision.num_heads <= 0 or width % vision.num_heads:
        raise EdgeforgeError(
            f"tiny {model_type}: vision width {width} is not a positive multiple of "
            f"vision_config.num_heads {vision.num_heads}"
        )
    if (width // vision.num_heads) % 4:
        raise EdgeforgeError(
            f"tiny {model_type}: vision head dim {width // vision.num_heads} must be a "
            "multiple of 4 (2-D rotary embedding)"
        )
    if out != hidden:
        raise EdgeforgeError(
            f"tiny {model_type}: vision merger output width {out} must equal "
            f"text_config.hidden_size {hidden}"
        )
    if model_type == "qwen2_5_vl":
        unit = vision.patch_size * vision.spatial_merge_size
        if vision.window_size <= 0 or vision.window_size % unit:
            raise EdgeforgeError(
                f"tiny {model_type}: vision_config.window_size {vision.window_size} must be a "
                f"positive multiple of patch_size*spatial_merge_size = {unit}"
            )
        bad = [i for i in vision.fullatt_block_indexes if not 0 <= i < vision.depth]
        if bad:
            raise EdgeforgeError(
                f"tiny {model_type}: vision_config.fullatt_block_indexes {bad} are outside "
                f"depth {vision.depth}"
            )


def _check_values(model_type: str, config: Mapping[str, Any]) -> None:
    """Checks on the raw dict, before the config class warns or fails less clearly.

    Every size in :data:`_POSITIVE_DIMS` is an int >= 1 and the RoPE type is one
    transformers implements (it would only log a warning for an unknown one).
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    text_scope = "" if model_type == "qwen2" else "text_config"
    rope = (config.get(text_scope, {}) if text_scope else config).get("rope_parameters")
    if not isinstance(rope, Mapping):
        raise EdgeforgeError(
            f"tiny {model_type}: {text_scope + '.' if text_scope else ''}rope_parameters "
            "must be an object"
        )
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        raise EdgeforgeError(
            f"tiny {model_type}: rope_parameters.rope_type {rope_type!r} is unknown; "
            f"known: default, {', '.join(sorted(ROPE_INIT_FUNCTIONS))}"
        )
    for scope, keys in _POSITIVE_DIMS.items():
        values = config.get(scope, {}) if scope else config
        for key in keys:
            value = values.get(key)
            if key in values and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                dotted = f"{scope}.{key}" if scope else key
                raise EdgeforgeError(
                    f"tiny {model_type}: {dotted} must be a positive integer, got {value!r}"
                )


def _make_config(
    spec: TinySpec, vocab_size: int, ids: Mapping[str, int], overrides: Mapping[str, Any] | None
) -> Any:
    """The transformers config object: defaults, recipe overrides, then tokenizer ids."""
    config = spec.default_config()
    touched = _merge_overrides(spec.model_type, config, overrides or {})
    _check_values(spec.model_type, config)
    _derive_dependent_dims(spec.model_type, config, touched)
    token_ids = {
        "vocab_size": vocab_size,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
    }
    if spec.model_type == "qwen2":
        config.update(token_ids)
    else:
        config["text_config"].update(token_ids)
        config.update({key: ids[token] for key, token in VISION_TOKEN_FIELDS.items()})
    config_class = _config_classes(spec.model_type)[""]
    try:
        result = config_class(**config, dtype="float32", architectures=[spec.architecture])
    except (StrictDataclassError, TypeError, ValueError, KeyError) as exc:
        reason = " ".join(str(exc).split())
        raise EdgeforgeError(f"tiny {spec.model_type}: invalid overrides: {reason}") from None
    _check_dims(spec.model_type, result)
    return result


# --------------------------------------------------------------------------- tokenizer


def _capped_texts(corpus: Iterable[str], limit: int) -> Iterator[str]:
    """The corpus's texts up to ``limit`` characters in all, in order; fails when empty."""
    total = 0
    for text in corpus:
        if not isinstance(text, str):
            raise EdgeforgeError(
                f"tokenizer corpus yielded a {type(text).__name__}, expected str texts"
            )
        if not text:
            continue
        if total + len(text) > limit:
            text = text[: limit - total]
        total += len(text)
        yield text
        if total >= limit:
            break
    if total == 0:
        raise EdgeforgeError("tokenizer corpus yielded no text to train the tiny BPE on")


def _train_bpe(
    corpus: Iterable[str], bpe_size: int
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train byte-level BPE with exactly Qwen2's normalizer and pre-tokenizer.

    transformers rebuilds ``Qwen2Tokenizer`` from the saved vocab/merges with its own
    pipeline, so merges learned under a different pre-tokenizer would tokenize differently
    after a reload. Returns the vocab and merges; the trainer is deterministic (its ties
    break on pair ids, which follow the sorted byte alphabet).
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_capped_texts(corpus, TOKENIZER_MAX_CHARS), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _check_vocab_size(spec: TinySpec, vocab_size: Any) -> None:
    """The vocabulary must hold the byte alphabet, the added tokens and at least one merge."""
    minimum = _BYTE_ALPHABET_SIZE + spec.num_added_tokens + 1
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < minimum:
        raise EdgeforgeError(
            f"tiny {spec.model_type}: vocab_size must be an integer >= {minimum} "
            f"(256 bytes + {spec.num_added_tokens} added tokens + merges), got {vocab_size!r}"
        )


def _build_tokenizer(spec: TinySpec, corpus: Iterable[str], vocab_size: int) -> Any:
    """A ``Qwen2Tokenizer`` with BPE trained on ``corpus`` and Qwen's added tokens after it.

    The added tokens take the ids right after the BPE vocab, as in the released Qwen
    tokenizers (where ``<|endoftext|>`` is 151643); eos is ``<|im_end|>`` (chat models),
    pad is ``<|endoftext|>``.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    added = spec.added_tokens
    _check_vocab_size(spec, vocab_size)
    vocab, merges = _train_bpe(corpus, vocab_size - len(added))
    base = len(vocab)
    for offset, (token, _special) in enumerate(added):
        vocab[token] = base + offset
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=_MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens(
        [
            AddedToken(token, special=special, normalized=False, lstrip=False, rstrip=False)
            for token, special in added
        ]
    )
    tokenizer.chat_template = spec.chat_template
    for offset, (token, _special) in enumerate(added):
        if tokenizer.convert_tokens_to_ids(token) != base + offset:
            raise RuntimeError(f"added token {token} did not get id {base + offset}")
    if len(tokenizer) > vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} ids, more than {vocab_size}")
    return tokenizer


def _build_processor(spec: TinySpec, tokenizer: Any, vision: Any) -> Any:
    """The real VL processor (image + video processors + tokenizer + chat template)."""
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    common = {
        "min_pixels": VL_MIN_PIXELS,
        "max_pixels": VL_MAX_PIXELS,
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
    }
    processor_class = getattr(transformers, spec.processor_class or "")
    return processor_class(
        image_processor=Qwen2VLImageProcessor(**common),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**common),
        chat_template=spec.chat_template,
    )


# --------------------------------------------------------------------------- weights


def _tensor_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed for one tensor, stable across runs, processes and platforms.

    Keyed by the parameter's module path, so the draw for one tensor does not depend on
    how many tensors were drawn before it (adding a layer leaves the others unchanged).
    """
    digest = hashlib.sha256(f"edgeforge-tiny:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from its own seeded generator.

    Matrices (linear, embedding, conv) get N(0, 1/fan_in) so activations and logits keep
    unit scale through the random network (outputs are neither flat nor saturated, which
    makes numerical comparisons meaningful). 1-D weights are norm gains drawn around 1,
    biases around 0. Tied tensors appear once, so they get one draw.
    """
    for name, param in model.named_parameters():
        generator = torch.Generator(device="cpu").manual_seed(_tensor_seed(seed, name))
        values = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if param.ndim >= 2:
            values *= 1.0 / math.sqrt(math.prod(param.shape[1:]))
        elif name.endswith("bias"):
            values *= _NORM_AND_BIAS_STD
        else:
            values = 1.0 + _NORM_AND_BIAS_STD * values
        param.copy_(values.to(param.dtype))


def _build_model(spec: TinySpec, config: Any, seed: int) -> torch.nn.Module:
    """Instantiate the real architecture class in fp32 and fill it from ``seed``.

    Construction runs under a forked RNG: transformers' own init draws from the global
    generator, and neither that draw nor our weights should depend on or disturb it.
    """
    import transformers

    model_class = getattr(transformers, spec.architecture)
    with torch.random.fork_rng(devices=[]):
        model = model_class(config).to(torch.float32)
    _init_weights(model, seed)
    model.eval()
    return model


def _generation_config(ids: Mapping[str, int]) -> Any:
    """Greedy decoding that stops at ``<|im_end|>`` or ``<|endoftext|>`` (Qwen-Instruct)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' per-save progress bar (noise in build logs), then restore it."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- public API


def build_tiny_model(
    model_type: str,
    out_dir: Path,
    *,
    seed: int,
    corpus: Iterable[str],
    vocab_size: int = 1024,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """Build the tiny ``model_type`` model into ``out_dir``; return its tokenizer object.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (fp32),
    the tokenizer files and, for VL models, the processor files. Same arguments and corpus
    give byte-identical files. ``out_dir`` is replaced atomically; it may already exist
    only as an empty directory or a previous model directory (one with ``config.json``).
    ``overrides`` changes config entries (VL: nested under ``text_config`` /
    ``vision_config``); dependent dims (mRoPE sections, vision merger width) follow the
    text model unless overridden too. The returned tokenizer is the one built in code: the
    reference the written directory's tokenizer is checked against.
    """
    spec = _spec(model_type)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise EdgeforgeError(f"tiny {model_type}: seed must be a non-negative integer")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise EdgeforgeError(f"tiny {model_type}: overrides must be an object")
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise EdgeforgeError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
            raise EdgeforgeError(
                f"{out_dir}: not empty and not a model directory; refusing to replace it"
            )
    # Validate overrides before the (slower) tokenizer training, with placeholder ids.
    _check_vocab_size(spec, vocab_size)
    placeholder_ids = {token: i for i, (token, _) in enumerate(spec.added_tokens)}
    _make_config(spec, vocab_size, placeholder_ids, overrides)

    tokenizer = _build_tokenizer(spec, corpus, vocab_size)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token, _ in spec.added_tokens}
    config = _make_config(spec, vocab_size, ids, overrides)
    model = _build_model(spec, config, seed)
    model.generation_config = _generation_config(ids)

    processor = (
        None
        if spec.processor_class is None
        else _build_processor(spec, tokenizer, config.vision_config)
    )
    with atomic_path(out_dir) as tmp, _quiet_progress_bars():
        tmp.mkdir()
        model.save_pretrained(tmp)
        (processor or tokenizer).save_pretrained(tmp)
        # transformers writes the weights through a private temp file (mode 0600); give
        # every file the same plain mode so copies and archives of the directory match.
        for path in tmp.iterdir():
            path.chmod(_FILE_MODE)
    return tokenizer

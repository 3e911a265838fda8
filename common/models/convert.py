"""Checkpoint conversions that produce plain fp32 Hugging Face directories.

* ``gguf_to_hf``: a GGUF file (llama.cpp format) to safetensors + config + tokenizer, via
  transformers' maintained GGUF reader (dequantization and the llama.cpp Q/K row
  permutation are handled there).
* ``llama_to_qwen2``: the same weights as a ``qwen2`` checkpoint. Qwen2 is Llama plus
  q/k/v biases, so zero biases give the same function; it lets every qwen2 code path run
  on real pretrained weights. The tokenizer files are copied byte for byte and marked so
  that ``AutoTokenizer`` reads them as written rather than building Qwen's pipeline for
  a ``qwen2`` config (``common.models.tokenizer_fidelity``).

Both write into a directory the caller provides (an atomic temp path, see
``common.core.records.atomic_path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from common.core.errors import EdgeforgeError
from common.models.tokenizer_fidelity import (
    copy_tokenizer_files,
    keep_tokenizer_json,
    load_gguf_tokenizer,
)

#: Config fields copied verbatim from a Llama config into the Qwen2 config.
_SHARED_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_parameters",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def _save_fresh(model_cls: type, config, state_dict: dict[str, torch.Tensor], out_dir: Path):
    """Build ``model_cls(config)`` without random init, load ``state_dict`` strictly, save."""
    with torch.device("meta"):
        model = model_cls(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = set(missing) - tied
    if missing or unexpected:
        raise EdgeforgeError(
            f"weights do not fit {model_cls.__name__}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    model.save_pretrained(out_dir)
    return model


def gguf_to_hf(gguf_path: Path, out_dir: Path) -> Any:
    """Dequantize ``gguf_path`` to an fp32 Hugging Face directory at ``out_dir``; return the
    tokenizer read from the GGUF (the reference the written one is checked against).

    transformers refuses to ``save_pretrained`` a GGUF-loaded model, so its state dict is
    copied into a fresh model built from the same config minus the quantization config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf_path = Path(gguf_path)
    tokenizer = load_gguf_tokenizer(gguf_path)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, dtype=torch.float32, gguf_file=gguf_path.name, trust_remote_code=False
    )
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(**config_dict)
    config.architectures = [type(loaded).__name__]
    state = {k: v.detach().clone() for k, v in loaded.state_dict().items()}
    model = _save_fresh(type(loaded), config, state, out_dir)
    loaded.generation_config.save_pretrained(out_dir)
    del model, loaded
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def llama_to_qwen2(src_dir: Path, out_dir: Path) -> None:
    """Rewrite the Llama checkpoint in ``src_dir`` as an equivalent ``qwen2`` checkpoint."""
    from transformers import (
        AutoConfig,
        GenerationConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    src_dir = Path(src_dir)
    src = AutoConfig.from_pretrained(src_dir, trust_remote_code=False)
    if src.model_type != "llama":
        raise EdgeforgeError(
            f"{src_dir / 'config.json'}: model_type {src.model_type!r}; llama-to-qwen2 needs llama"
        )
    if getattr(src, "attention_bias", False) or getattr(src, "mlp_bias", False):
        raise EdgeforgeError(
            f"{src_dir / 'config.json'}: attention_bias/mlp_bias set; qwen2 has biases only on "
            "q/k/v, so this Llama cannot be expressed as qwen2"
        )
    head_dim = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads
    if head_dim * src.num_attention_heads != src.hidden_size:
        raise EdgeforgeError(
            f"{src_dir / 'config.json'}: head_dim {head_dim} × heads != hidden_size; qwen2 "
            "derives head_dim from hidden_size"
        )
    config = Qwen2Config(
        **{k: getattr(src, k) for k in _SHARED_CONFIG_FIELDS},
        use_sliding_window=False,
        architectures=["Qwen2ForCausalLM"],
    )
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(src_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    if not state:
        raise EdgeforgeError(f"{src_dir}: no *.safetensors weights to convert")
    for i in range(src.num_hidden_layers):
        prefix = f"model.layers.{i}.self_attn"
        for proj in ("q_proj", "k_proj", "v_proj"):
            weight = state[f"{prefix}.{proj}.weight"]
            state[f"{prefix}.{proj}.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    _save_fresh(Qwen2ForCausalLM, config, state, out_dir)
    GenerationConfig.from_pretrained(src_dir).save_pretrained(out_dir)
    copy_tokenizer_files(src_dir, out_dir)
    keep_tokenizer_json(out_dir)

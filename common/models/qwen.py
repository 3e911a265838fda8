"""Qwen1 (Qwen-1.8B/7B/14B[-Chat], ``QWenLMHeadModel``): remote code, GPT-2-style paths.

The model is not part of transformers: its ``modeling_qwen.py`` ships in the checkpoint and
loads with ``trust_remote_code``. ``transformer`` is the decoder stack (``wte``, blocks
``h.N``, ``ln_f``, ``rotary_emb``); each block is pre-RMSNorm attention (``ln_1``,
``attn.c_attn`` fused q/k/v with bias, ``attn.c_proj``) then a SwiGLU MLP whose roles hide
behind GPT-2 names (``mlp.w2`` is the SiLU-gated branch, ``mlp.w1`` the linear one,
``mlp.c_proj`` the down projection). The config speaks its own dialect too: ``kv_channels``
is the head width, ``intermediate_size`` is twice the MLP width, ``layer_norm_epsilon`` the
RMSNorm epsilon, ``seq_length`` the trained context.

Qwen1's code predates transformers 5, which breaks it three times; :func:`load_qwen_model`
repairs each without touching the code. (1) Models are built on the meta device and non-persistent
buffers re-created only through ``_init_weights``, which Qwen1 never taught to, so
``registered_causal_mask`` and ``logn_tensor`` come back as uninitialised memory and the
model silently attends to the future: the loader rebuilds them with the checkpoint's own
constructor. (2) ``generate`` hands the model a ``DynamicCache`` where its code indexes a
tuple of per-layer ``(key, value)``: the loader opts the class out of Cache objects, so
generation carries the model's own tuples as transformers 4 did. (3) ``QWenModel.forward``
calls ``PreTrainedModel.get_head_mask``, which transformers 5 removed: the loader gives the
class transformers 4's answer for "no head mask" (one ``None`` per layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.core.errors import EdgeforgeError
from common.models.base import BlockSpec, ModelAdapter

QWEN_DECODER_SPEC = BlockSpec(
    input_norm="ln_1",
    post_attention_norm="ln_2",
    attention="attn",
    mlp="mlp",
    linears={
        "qkv": "attn.c_attn",
        "o": "attn.c_proj",
        "gate": "mlp.w2",
        "up": "mlp.w1",
        "down": "mlp.c_proj",
    },
)


class QwenAdapter(ModelAdapter):
    """``QWenLMHeadModel`` (remote code); q/k/v are one fused ``qkv`` linear, no GQA."""

    model_type = "qwen"
    language_model_path = "transformer"
    embed_tokens_path = "wte"
    layers_path = "h"
    final_norm_path = "ln_f"
    rotary_embedding_path = "rotary_emb"
    decoder_spec = QWEN_DECODER_SPEC

    @property
    def head_dim(self) -> int:
        return int(self.text_config.kv_channels)

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def intermediate_size(self) -> int:
        """Width of one MLP branch (the config stores the two branches' sum)."""
        return int(self.text_config.intermediate_size) // 2

    @property
    def rms_norm_eps(self) -> float:
        return float(self.text_config.layer_norm_epsilon)

    @property
    def trained_context(self) -> int:
        """``seq_length``: past it the model switches on dynamic NTK and logn scaling."""
        return int(self.text_config.seq_length)


def _restore_non_persistent_buffers(model: torch.nn.Module) -> None:
    """Overwrite every non-persistent buffer with what the model's own ``__init__`` computes.

    The reference instance is built with parameters on the meta device (no weight memory)
    and real buffers, from the same config, so masks, rotary and logn tables are exactly
    the remote code's.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False), torch.random.fork_rng(devices=[]):
        fresh = type(model)(model.config)
    wanted = dict(fresh.named_buffers())
    for name, buffer in model.named_buffers():
        module_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(module_name)
        if leaf in owner._non_persistent_buffers_set:
            buffer.copy_(wanted[name].to(buffer.dtype))


def _tuple_cache_only(cls: type) -> bool:
    """Qwen1 keeps its KV cache as tuples; ``generate`` must not substitute a Cache."""
    return False


def _no_head_mask(self: Any, head_mask: Any, num_hidden_layers: int) -> list[None]:
    """transformers 4's ``get_head_mask`` for the only case inference uses: no mask."""
    if head_mask is not None:
        raise EdgeforgeError("Qwen1: head_mask is not supported (transformers 5 dropped it)")
    return [None] * num_hidden_layers


def load_qwen_model(model_dir: Path, dtype: torch.dtype = torch.float32) -> Any:
    """Load a Qwen1 checkpoint with its own remote code, offline, in eval mode.

    ``model_dir`` must hold ``config.json`` with an ``auto_map`` and the modeling files it
    names (that code runs: only point this at checkpoints you trust; a step reaches it only
    from a recipe that sets ``source.trust_remote_code``, which
    :func:`common.steps.model_build.build_model` checks). Missing or mis-shaped tensors are
    an error, as in :func:`common.models.loading.load_model`.
    """
    from transformers import PreTrainedModel
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.models.auto.auto_factory import add_generation_mixin_to_remote_model

    from common.models.loading import _first_line, check_loading_info, check_model_dir

    checked = check_model_dir(model_dir)
    if checked.model_type != QwenAdapter.model_type:
        raise EdgeforgeError(
            f"{checked.path / 'config.json'}: model_type is {checked.model_type!r}, "
            "expected 'qwen' (Qwen1 remote code)"
        )
    auto_map = checked.config.get("auto_map") or {}
    if "AutoModelForCausalLM" not in auto_map:
        raise EdgeforgeError(
            f"{checked.path / 'config.json'}: no auto_map.AutoModelForCausalLM; a Qwen1 "
            "checkpoint names its modeling_qwen.QWenLMHeadModel there"
        )
    module_file = checked.path / (auto_map["AutoModelForCausalLM"].split(".")[0] + ".py")
    if not module_file.is_file():
        raise EdgeforgeError(
            f"{module_file}: missing; copy the checkpoint's remote code files with its weights"
        )
    try:
        # The class straight from the checkpoint's code, not through the Auto registry: a
        # second load of the same code would get the registered class, which lacks the
        # GenerationMixin transformers adds to remote code on first load.
        model_class = add_generation_mixin_to_remote_model(
            get_class_from_dynamic_module(
                auto_map["AutoModelForCausalLM"], checked.path, local_files_only=True
            )
        )
        model, info = model_class.from_pretrained(
            checked.path, dtype=dtype, local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:
        raise EdgeforgeError(
            f"{checked.path}: the remote code could not load it: {_first_line(exc)}"
        ) from None
    check_loading_info(checked.path, info)
    with torch.no_grad():
        _restore_non_persistent_buffers(model)
    type(model)._supports_default_dynamic_cache = classmethod(_tuple_cache_only)
    for module in model.modules():  # QWenModel.forward is the caller
        if isinstance(module, PreTrainedModel) and not hasattr(module, "get_head_mask"):
            type(module).get_head_mask = _no_head_mask
    model.eval()
    QwenAdapter(model)  # the paths the export walks are there, or one line says why
    return model


def load_qwen_tokenizer(model_dir: Path) -> Any:
    """The checkpoint's tokenizer, offline, trusting its remote code.

    Qwen1's ``config.json`` carries an ``auto_map``, so even a stock tokenizer class makes
    transformers ask (interactively, with a timeout) whether to run that code; released
    checkpoints also map ``AutoTokenizer`` to their own ``tokenization_qwen.QWenTokenizer``,
    which needs the ``tiktoken`` package.
    """
    from transformers import AutoTokenizer

    from common.models.loading import _first_line

    model_dir = Path(model_dir)
    try:
        return AutoTokenizer.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=True
        )
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:
        raise EdgeforgeError(
            f"{model_dir}: the tokenizer could not load: {_first_line(exc)}"
        ) from None

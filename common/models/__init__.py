"""Model adapters: the registry from ``config.model_type`` to the family's adapter.

Stages never name a Hugging Face attribute path; they call :func:`get_adapter` and walk the
model through it. A new family with the llama block layout is one module in this package
defining a :class:`~common.models.base.ModelAdapter` subclass, plus one entry in
``_ADAPTERS`` (and removing it from ``PLANNED_MODEL_TYPES``). A block that differs (extra
norms, ``(1 + w)`` RMSNorm, scaled embeddings, soft-capping, sliding windows) also needs the
static decoder (:mod:`common.models.static_decoder`, whose table says what it supports and
which refuses the rest), rotation and sequential profiling taught about it: CONTRIBUTING.md
lists every file and which of them would otherwise compute wrong numbers without an error.
"""

from __future__ import annotations

from torch import nn

from common.core.errors import EdgeforgeError
from common.models.base import (
    DECODER_ROLES,
    Block,
    BlockSpec,
    DecoderLayer,
    ModelAdapter,
    VisionBlock,
    VisionMerger,
    iter_linears,
)
from common.models.llama import LlamaAdapter
from common.models.qwen import QwenAdapter
from common.models.qwen2 import Qwen2Adapter
from common.models.qwen2_5_vl import Qwen2_5_VLAdapter
from common.models.qwen2_vl import Qwen2VLAdapter

_ADAPTERS: dict[str, type[ModelAdapter]] = {
    cls.model_type: cls
    for cls in (LlamaAdapter, QwenAdapter, Qwen2Adapter, Qwen2VLAdapter, Qwen2_5_VLAdapter)
}

#: ``config.model_type`` values with an adapter, sorted.
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_ADAPTERS))

#: Families on the roadmap: asking for one is an error that says so, not "unknown".
PLANNED_MODEL_TYPES: dict[str, str] = {
    "opt": "OPT",
    "gemma": "Gemma",
    "phi": "Phi",
    "falcon": "Falcon",
    "mixtral": "Mixtral MoE",
}


def adapter_class(model_type: str, *, source: str = "config.model_type") -> type[ModelAdapter]:
    """The adapter class for ``model_type``; ``source`` names where the value came from
    (e.g. ``/path/config.json: model_type``) so the error points at the right file."""
    cls = _ADAPTERS.get(model_type)
    if cls is not None:
        return cls
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if model_type in PLANNED_MODEL_TYPES:
        raise EdgeforgeError(
            f"{source}: {model_type!r} ({PLANNED_MODEL_TYPES[model_type]}) is planned but not "
            f"supported yet; supported: {supported}"
        )
    raise EdgeforgeError(f"{source}: {model_type!r} is not supported; supported: {supported}")


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Wrap a loaded model in its family's adapter (chosen by ``model.config.model_type``)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise EdgeforgeError(
            f"get_adapter: {type(model).__name__} has no config.model_type; pass a Hugging "
            "Face model loaded with common.models.loading.load_model()"
        )
    return adapter_class(model_type, source=f"{type(model).__name__} config.model_type")(model)


__all__ = [
    "DECODER_ROLES",
    "PLANNED_MODEL_TYPES",
    "SUPPORTED_MODEL_TYPES",
    "Block",
    "BlockSpec",
    "DecoderLayer",
    "LlamaAdapter",
    "ModelAdapter",
    "Qwen2Adapter",
    "Qwen2VLAdapter",
    "Qwen2_5_VLAdapter",
    "QwenAdapter",
    "VisionBlock",
    "VisionMerger",
    "adapter_class",
    "get_adapter",
    "iter_linears",
]

"""The model-adapter contract: the one place that knows where a family keeps its tensors.

Every later stage (profiling, rotation, int8 export, ONNX export) walks a model only through
a :class:`ModelAdapter`, so supporting a new architecture means writing one adapter that
declares its attribute paths, never touching the stages. Adapters hold the live model and
resolve modules on every call: what they return *is* the model's module (editing its weight
edits the model), and a stage that replaces a submodule is seen by the next call.

Paths are plain dotted module names, so the same strings serve as stable tensor names in
hooks, reports and exported files (they match ``model.named_modules()``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from common.core.errors import EdgeforgeError

#: The roles of a llama-style decoder layer's linears, in forward order.
DECODER_ROLES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class BlockSpec:
    """Where a repeated block keeps its parts, as paths relative to the block module.

    ``linears`` maps a role (``"q"``, ``"fc1"``, …) to its path; its order is the order
    :func:`iter_linears` yields them in, so keep it the forward order.
    """

    input_norm: str
    post_attention_norm: str
    attention: str
    mlp: str
    linears: Mapping[str, str]


@dataclass(frozen=True)
class Block:
    """A pre-norm residual block as live modules: norm → attention, norm → MLP.

    ``name`` is the block's dotted name in the model; ``linear_names`` gives each role's
    dotted name so hooks and reports name tensors the same way everywhere.
    """

    index: int
    name: str
    module: nn.Module
    input_norm: nn.Module
    post_attention_norm: nn.Module
    attention: nn.Module
    mlp: nn.Module
    linears: dict[str, nn.Linear]
    linear_names: dict[str, str]


@dataclass(frozen=True)
class DecoderLayer(Block):
    """One decoder layer of the language model; roles are :data:`DECODER_ROLES`."""


@dataclass(frozen=True)
class VisionBlock(Block):
    """One vision-transformer block.

    Roles are ``qkv`` (fused) and ``proj`` for attention; ``fc1``/``fc2`` (Qwen2-VL) or
    ``gate``/``up``/``down`` (Qwen2.5-VL) for the MLP.
    """


@dataclass(frozen=True)
class VisionMerger:
    """The patch merger that maps grouped vision tokens into the language model's width.

    Roles are ``merger_fc1`` and ``merger_fc2`` so they never collide with a block's roles.
    """

    name: str
    module: nn.Module
    norm: nn.Module
    linears: dict[str, nn.Linear]
    linear_names: dict[str, str]


def join_name(*parts: str) -> str:
    """Dotted module name from parts, skipping empty ones (the root module is ``""``)."""
    return ".".join(part for part in parts if part)


class ModelAdapter:
    """A family's view of a Hugging Face causal LM (text or vision-language).

    Subclasses set the class attributes below; the methods resolve them against the live
    model. ``language_model_path`` is absolute; the other text paths are relative to the
    language model, the vision paths relative to the vision tower.
    """

    model_type: ClassVar[str]
    is_vision_language: ClassVar[bool] = False

    language_model_path: ClassVar[str]
    lm_head_path: ClassVar[str] = "lm_head"
    embed_tokens_path: ClassVar[str] = "embed_tokens"
    layers_path: ClassVar[str] = "layers"
    final_norm_path: ClassVar[str] = "norm"
    rotary_embedding_path: ClassVar[str] = "rotary_emb"
    decoder_spec: ClassVar[BlockSpec]

    vision_tower_path: ClassVar[str | None] = None
    vision_patch_embed_path: ClassVar[str] = "patch_embed"
    vision_blocks_path: ClassVar[str] = "blocks"
    vision_block_spec: ClassVar[BlockSpec | None] = None
    vision_merger_path: ClassVar[str] = "merger"
    vision_rotary_embedding_path: ClassVar[str] = "rotary_pos_emb"
    vision_merger_norm_path: ClassVar[str] = "ln_q"
    vision_merger_linears: ClassVar[Mapping[str, str]] = {
        "merger_fc1": "mlp.0",
        "merger_fc2": "mlp.2",
    }

    def __init__(self, model: nn.Module) -> None:
        """Wrap ``model``; fails now, with one line, if it is not the structure we expect."""
        config = getattr(model, "config", None)
        found = getattr(config, "model_type", None)
        if found != self.model_type:
            raise EdgeforgeError(
                f"{type(model).__name__}: config.model_type is {found!r}, but the "
                f"{self.model_type} adapter was asked for; use common.models.get_adapter(model)"
            )
        self.model = model
        self.config = config
        self.text_config = config.get_text_config(decoder=True)
        self._check_structure()

    # -- module resolution -------------------------------------------------------------

    def _module(self, name: str) -> nn.Module:
        """The live submodule called ``name``; a missing one is the caller's wrong class."""
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise EdgeforgeError(
                f"{type(self.model).__name__} has no submodule {name!r}, which the "
                f"{self.model_type} adapter needs; load the checkpoint with "
                "common.models.loading.load_model() (a *ForCausalLM / "
                "*ForConditionalGeneration model, not a bare base model)"
            ) from None

    def _typed(self, name: str, kind: type[nn.Module]) -> Any:
        module = self._module(name)
        if not isinstance(module, kind):
            raise EdgeforgeError(
                f"{type(self.model).__name__}.{name} is a {type(module).__name__}, expected "
                f"{kind.__name__}; the {self.model_type} adapter does not support this variant"
            )
        return module

    def _check_structure(self) -> None:
        """Resolve every path once so a wrong model fails at wrap time, not mid-stage."""
        self.embed_tokens()
        self.final_norm()
        self.lm_head()
        self.rotary_embedding()
        self.layers()
        if self.is_vision_language:
            self.vision_patch_embed()
            self.vision_blocks()
            self.vision_merger()

    def _block(self, spec: BlockSpec, name: str) -> dict[str, Any]:
        """The fields of a :class:`Block` at ``name``, laid out as ``spec`` says."""
        linear_names = {role: join_name(name, path) for role, path in spec.linears.items()}
        return {
            "name": name,
            "module": self._module(name),
            "input_norm": self._module(join_name(name, spec.input_norm)),
            "post_attention_norm": self._module(join_name(name, spec.post_attention_norm)),
            "attention": self._module(join_name(name, spec.attention)),
            "mlp": self._module(join_name(name, spec.mlp)),
            "linears": {role: self._typed(n, nn.Linear) for role, n in linear_names.items()},
            "linear_names": linear_names,
        }

    # -- language model ----------------------------------------------------------------

    def language_model(self) -> nn.Module:
        """The decoder stack (embeddings, layers, final norm), without the LM head."""
        return self._module(self.language_model_path)

    def embed_tokens(self) -> nn.Embedding:
        return self._typed(self.name_of("embed_tokens"), nn.Embedding)

    def final_norm(self) -> nn.Module:
        return self._module(self.name_of("final_norm"))

    def lm_head(self) -> nn.Linear:
        """The output projection; with tied embeddings its weight *is* the embedding's."""
        return self._typed(self.lm_head_path, nn.Linear)

    def rotary_embedding(self) -> nn.Module:
        return self._module(self.name_of("rotary_embedding"))

    @property
    def mrope_section(self) -> tuple[int, ...] | None:
        """How multimodal RoPE splits the rotary half-dim into (temporal, height, width)
        sections, each rotated by its own row of 3-row position ids; None for 1-D RoPE."""
        return None

    def rope_index(self, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE position ids ``[3, B, L]`` and each sequence's decode offset ``[B, 1]``
        for processor ``inputs``; text models have no multimodal positions."""
        raise EdgeforgeError(
            f"{self.model_type} uses 1-D rotary positions: it has no multimodal rope index"
        )

    def layers(self) -> list[DecoderLayer]:
        """Every decoder layer, in order, as live modules."""
        stack_name = self.name_of("layers")
        stack = self._typed(stack_name, nn.ModuleList)
        return [
            DecoderLayer(index=i, **self._block(self.decoder_spec, join_name(stack_name, str(i))))
            for i in range(len(stack))
        ]

    def name_of(self, part: str) -> str:
        """Dotted name of a named part (``embed_tokens``, ``final_norm``, ``layers``,
        ``rotary_embedding``, ``lm_head``, ``vision_tower``, ``vision_merger``, …)."""
        text_parts = {
            "embed_tokens": self.embed_tokens_path,
            "final_norm": self.final_norm_path,
            "layers": self.layers_path,
            "rotary_embedding": self.rotary_embedding_path,
        }
        if part in text_parts:
            return join_name(self.language_model_path, text_parts[part])
        if part == "language_model":
            return self.language_model_path
        if part == "lm_head":
            return self.lm_head_path
        vision_parts = {
            "vision_tower": "",
            "vision_patch_embed": self.vision_patch_embed_path,
            "vision_blocks": self.vision_blocks_path,
            "vision_merger": self.vision_merger_path,
            "vision_rotary_embedding": self.vision_rotary_embedding_path,
        }
        if part in vision_parts:
            if self.vision_tower_path is None:
                raise EdgeforgeError(f"{self.model_type} is a text model: it has no {part}")
            return join_name(self.vision_tower_path, vision_parts[part])
        known = ", ".join([*text_parts, "language_model", "lm_head", *vision_parts])
        raise EdgeforgeError(f"name_of: unknown part {part!r}; known parts: {known}")

    # -- dimensions (from the text config; the modules are built from it) ----------------

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        kv = getattr(self.text_config, "num_key_value_heads", None)
        return int(kv if kv is not None else self.num_heads)

    @property
    def head_dim(self) -> int:
        """Per-head width; families that ignore ``config.head_dim`` override this."""
        explicit = getattr(self.text_config, "head_dim", None)
        return int(explicit) if explicit else self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return int(self.text_config.intermediate_size)

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def vocab_size(self) -> int:
        return int(self.text_config.vocab_size)

    @property
    def rms_norm_eps(self) -> float:
        return float(self.text_config.rms_norm_eps)

    def attention_departures(self) -> list[str]:
        """How the text config departs from full causal attention without soft-capping.

        The static decoder (:mod:`common.models.static_decoder`, the ONNX pieces) and
        sequential profiling implement exactly that attention. A config with sliding-window
        layers or logit soft-capping would get another function from them without any error,
        so they refuse it with these lines (empty: nothing departs); the static decoder adds
        the departures only it gets wrong (another attention scale, extra norms). The
        Hugging Face forward, used everywhere else, is right.
        """
        config = self.text_config
        problems = []
        kinds = sorted({t for t in getattr(config, "layer_types", None) or []} - {"full_attention"})
        if kinds:
            problems.append(f"layer_types has {', '.join(map(repr, kinds))} layers")
        elif getattr(config, "use_sliding_window", False):
            problems.append("use_sliding_window is true")
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, key, None) is not None:
                problems.append(f"{key} is {getattr(config, key)}")
        return problems

    @property
    def tie_word_embeddings(self) -> bool:
        """Whether the LM head shares the embedding's weight *now* (what rotation must
        respect), rather than what the config asked for at load time."""
        return self.lm_head().weight is self.embed_tokens().weight

    # -- vision (None / empty for text models) -------------------------------------------

    @property
    def vision_hidden_size(self) -> int | None:
        """Width of the vision blocks (not the merger's output width)."""
        return None

    @property
    def vision_num_heads(self) -> int | None:
        return None

    def vision_tower(self) -> nn.Module | None:
        if self.vision_tower_path is None:
            return None
        return self._module(self.vision_tower_path)

    def vision_patch_embed(self) -> nn.Module | None:
        if self.vision_tower_path is None:
            return None
        return self._module(self.name_of("vision_patch_embed"))

    def vision_rotary_embedding(self) -> nn.Module | None:
        """The vision tower's 2-D rotary table module (maps (h, w) positions to cos/sin)."""
        if self.vision_tower_path is None:
            return None
        return self._module(self.name_of("vision_rotary_embedding"))

    @property
    def vision_window_attention(self) -> tuple[int, tuple[int, ...]] | None:
        """``(window_size_px, full_attention_block_indexes)`` for towers that attend
        within windows (Qwen2.5-VL); None when every block attends globally."""
        return None

    def vision_blocks(self) -> list[VisionBlock]:
        if self.vision_tower_path is None or self.vision_block_spec is None:
            return []
        stack_name = self.name_of("vision_blocks")
        stack = self._typed(stack_name, nn.ModuleList)
        return [
            VisionBlock(
                index=i, **self._block(self.vision_block_spec, join_name(stack_name, str(i)))
            )
            for i in range(len(stack))
        ]

    def vision_merger(self) -> VisionMerger | None:
        if self.vision_tower_path is None:
            return None
        name = self.name_of("vision_merger")
        linear_names = {
            role: join_name(name, path) for role, path in self.vision_merger_linears.items()
        }
        return VisionMerger(
            name=name,
            module=self._module(name),
            norm=self._module(join_name(name, self.vision_merger_norm_path)),
            linears={role: self._typed(n, nn.Linear) for role, n in linear_names.items()},
            linear_names=linear_names,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.model).__name__}, layers={self.num_layers}, "
            f"hidden={self.hidden_size}, heads={self.num_heads}/{self.num_kv_heads})"
        )


def iter_linears(
    adapter: ModelAdapter, include_lm_head: bool = True, include_vision: bool = False
) -> Iterator[tuple[str, str, nn.Linear]]:
    """Yield ``(qualified_name, role, linear)`` for every linear a stage may transform.

    Order: decoder layers in order (roles in forward order), then the LM head (role
    ``lm_head``), then — with ``include_vision`` — vision blocks and the merger. Names are
    ``model.named_modules()`` names.
    """
    for layer in adapter.layers():
        for role, linear in layer.linears.items():
            yield layer.linear_names[role], role, linear
    if include_lm_head:
        yield adapter.lm_head_path, "lm_head", adapter.lm_head()
    if include_vision:
        for block in adapter.vision_blocks():
            for role, linear in block.linears.items():
                yield block.linear_names[role], role, linear
        merger = adapter.vision_merger()
        if merger is not None:
            for role, linear in merger.linears.items():
                yield merger.linear_names[role], role, linear

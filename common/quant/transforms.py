"""The function-preserving transforms a quant plan names, on a whole model or part by part.

A plan's (or profile's) ``transforms`` are ``{"rotation": {"mode", "seed"} | {"path"},
"online_hadamard": bool}``: the residual rotation of :mod:`common.quant.rotation` and the
online Hadamard of :mod:`common.quant.online_hadamard`. Both touch each part of the model
on its own (the embedding, one decoder layer, the final norm with the LM head), so a
streamed model (:class:`common.models.streaming.StreamedModel`) applies them to each part
as it is read, with the same bits as the whole-model application.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.hooks import RemovableHandle

from common.models import DecoderLayer, ModelAdapter
from common.quant.online_hadamard import apply_online_hadamard, online_hadamard_layer
from common.quant.rotation import (
    Rotation,
    rotate_embedding,
    rotate_head,
    rotate_layer,
    rotate_merger,
    rotate_model,
    rotation_for,
)


@dataclass(frozen=True)
class Transforms:
    """The resolved transforms: the rotation matrices (drawn or read) and the online flag."""

    rotation: Rotation | None = None
    online_down: bool = False

    @classmethod
    def of(cls, adapter: ModelAdapter, transforms: Mapping[str, Any]) -> Transforms:
        """Resolve a plan's ``transforms`` for ``adapter``'s model (shapes only: a model
        on meta will do): draw the seeded rotation, or read its file (checked against
        the model by :func:`~common.quant.rotation.rotation_for`)."""
        spec = transforms.get("rotation")
        rotation = None
        if spec:
            r_path = spec.get("path")
            rotation = rotation_for(
                adapter,
                mode=spec.get("mode", "hadamard"),
                seed=int(spec.get("seed", 0)),
                r_path=Path(r_path) if r_path else None,
            )
        return cls(rotation, bool(transforms.get("online_hadamard")))

    def whole(self, adapter: ModelAdapter) -> list[RemovableHandle]:
        """Transform a whole loaded model in place; returns the online hooks' handles."""
        if self.rotation is not None:
            rotate_model(adapter, self.rotation)
        return apply_online_hadamard(adapter)[1] if self.online_down else []

    def embedding(self, adapter: ModelAdapter) -> None:
        """Transform the (materialized) embedding."""
        if self.rotation is not None:
            rotate_embedding(adapter, self.rotation.R)

    def layer(self, adapter: ModelAdapter, layer: DecoderLayer) -> RemovableHandle | None:
        """Transform one (materialized) decoder layer; the online hook's handle, if any,
        is the caller's to remove when the layer is released."""
        if self.rotation is not None:
            rotate_layer(adapter, layer, self.rotation)
        return online_hadamard_layer(layer)[1] if self.online_down else None

    def vision_tower(self, adapter: ModelAdapter) -> None:
        """Transform the (materialized) vision tower of a vision-language model: its
        merger writes image tokens into the rotated stream; the tower's own basis stays."""
        if self.rotation is not None:
            rotate_merger(adapter, self.rotation.R)

    def head(self, adapter: ModelAdapter) -> None:
        """Transform the (materialized) final norm and LM head. A tied head is read from
        the stored embedding, so it is transformed as a head of its own."""
        if self.rotation is not None:
            rotate_head(adapter, self.rotation.R)

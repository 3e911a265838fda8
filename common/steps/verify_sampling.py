"""``VERIFY=full|sample|auto``: how much of a build's checks run on the vendor's own runtime.

A vendor runtime on this kind of machine is a CPU model of the chip (TPU-MLIR's simulator,
Qualcomm's HTP emulator), seconds to minutes per call of a real-size block: checking every
block of a 3B-7B model on it takes hours. A target therefore offers a declared policy:
``full`` runs every check on the runtime; ``sample`` runs the first, middle and last
blocks there (where activations differ most in range and outliers) and the others in the
same chain on onnxruntime, unscored; ``auto`` picks ``full`` when the target's estimate
of it fits the target's budget. The decision and its reason go into the report, so a
sampled verification is never taken for a full one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

VERIFY_CHOICES = ("auto", "full", "sample")
#: Blocks a sample runs on the vendor runtime, as fractions of the depth.
SAMPLE_FRACTIONS = (0.0, 0.5, 1.0)


def sampled(count: int) -> tuple[int, ...]:
    """The indices of :data:`SAMPLE_FRACTIONS` in a stack of ``count`` blocks."""
    return tuple(sorted({round(f * (count - 1)) for f in SAMPLE_FRACTIONS}))


def block_index(piece: str, stack: str = "") -> int | None:
    """The layer index of a block piece of ``stack`` (``block_3``, ``block_cache_3``;
    ``stack="vision_"``: ``vision_block_3``), None for any other piece (an embedding, a
    head, a merger), which a sample always runs."""
    match = re.fullmatch(rf"{stack}block(?:_cache)?_(\d+)", piece)
    return None if match is None else int(match.group(1))


@dataclass(frozen=True)
class Decision:
    """``full`` or ``sample``, and why (as the report says it)."""

    mode: str
    reason: str


def decide(choice: str, full_seconds: float, budget_seconds: float, what: str) -> Decision:
    """What ``VERIFY=choice`` means for checks whose full run on the vendor runtime is
    estimated at ``full_seconds`` (``auto``: full within ``budget_seconds``); ``what``
    names that run in the reason (``"simulation"``)."""
    if choice not in VERIFY_CHOICES:
        raise ValueError(f"VERIFY: one of {', '.join(VERIFY_CHOICES)}, got {choice!r}")
    budget = f"{budget_seconds / 3600:g} h"
    if choice == "full" or (choice == "auto" and full_seconds <= budget_seconds):
        why = "asked for (VERIFY=full)" if choice == "full" else f"estimate within {budget}"
        return Decision("full", why)
    if choice == "sample":
        return Decision("sample", "asked for (VERIFY=sample)")
    return Decision(
        "sample",
        f"a full {what} would take about {full_seconds / 3600:.1f} h, over {budget} "
        "(VERIFY=full runs it anyway)",
    )

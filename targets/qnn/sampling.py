"""``VERIFY=`` for ``make qnn``: which pieces run on the HTP emulator.

Qualcomm's x86 HTP emulator runs a real-size block in seconds to tens of seconds a call,
and the checks call each prefill block once per prompt (the golden input, every held-out
window, every picture prompt twice): Qwen2.5-VL-3B at ``PREFILL_LEN`` 320 would take
about 6 h in full. Under ``VERIFY=sample`` (:mod:`common.steps.verify_sampling`) the
first, middle and last decoder layers (prefill and decode pieces), vision blocks, and
every piece that is not a block (LM head, patch embedding, merger) run on the emulator;
every other piece is still compiled for every SoC and loaded in a strict all-on-QNN
session, and in the chain its QDQ graph runs on onnxruntime CPU (the quantized model,
not the binary), unscored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.steps.verify_sampling import block_index, decide, sampled

#: The longest emulator verification ``VERIFY=auto`` runs in full.
FULL_BUDGET_SECONDS = 3600
#: Emulator seconds per parameter and token of a call on this machine kind (2 cores):
#: a Qwen2.5-VL-3B vision block (19.7 M parameters) over a 448 px picture's 1024 patches
#: took 25 s a call.
SECONDS_PER_PARAM_TOKEN = 1.2e-9
#: Emulator seconds of a call beyond its arithmetic (graph execution set-up, I/O).
SECONDS_PER_CALL = 0.5


@dataclass(frozen=True)
class Stack:
    """One stack of blocks as the checks call it: its depth, one block's parameters, the
    tokens a call carries, and the calls per block."""

    depth: int
    params: int
    tokens: int
    calls: int

    def seconds(self, blocks: int) -> float:
        """Estimated emulator seconds of ``blocks`` of these blocks."""
        call = self.params * self.tokens * SECONDS_PER_PARAM_TOKEN + SECONDS_PER_CALL
        return blocks * self.calls * call


@dataclass(frozen=True)
class EmulatorPolicy:
    """Which layers and vision blocks run on the emulator, the estimates, and why."""

    mode: str
    layers: tuple[int, ...]
    num_layers: int
    vision_blocks: tuple[int, ...]
    vision_depth: int
    estimated_full_seconds: float
    estimated_seconds: float
    reason: str

    def emulated(self, piece: str) -> bool:
        """Whether ``piece`` runs on the emulator (every piece that is not a block does)."""
        for stack, chosen in (("vision_", self.vision_blocks), ("", self.layers)):
            index = block_index(piece, stack)
            if index is not None:
                return index in chosen
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "emulated_layers": list(self.layers),
            "layers_on_cpu_qdq": [i for i in range(self.num_layers) if i not in self.layers],
            "emulated_vision_blocks": list(self.vision_blocks),
            "vision_blocks_on_cpu_qdq": [
                i for i in range(self.vision_depth) if i not in self.vision_blocks
            ],
            "estimated_full_seconds": round(self.estimated_full_seconds),
            "estimated_seconds": round(self.estimated_seconds),
            "reason": self.reason,
        }

    def chain_graph(self) -> str:
        """What computed the end-to-end chain's logits (the accuracy block's ``graph``)."""
        if self.mode == "full":
            return "QNN HTP emulator, every piece"
        return (
            f"QNN HTP emulator for decoder layers {list(self.layers)} of {self.num_layers}, "
            "the other layers' QDQ graphs on onnxruntime CPU"
        )

    def note(self) -> str | None:
        """The report's line on a sampled verification (None in full)."""
        if self.mode == "full":
            return None
        vision = (
            f" and vision blocks {list(self.vision_blocks)} of {self.vision_depth}"
            if self.vision_depth
            else ""
        )
        return (
            f"VERIFY=sample ({self.reason}): decoder layers {list(self.layers)} of "
            f"{self.num_layers}{vision} ran on the HTP emulator, with the LM head and every "
            "piece that is not a block. The other pieces were compiled and loaded all on QNN "
            "but not run: in the chain their QDQ graphs ran on onnxruntime CPU, unscored. "
            f"Estimated emulator time: {self.estimated_seconds / 3600:.1f} h sampled, "
            f"{self.estimated_full_seconds / 3600:.1f} h in full."
        )


def emulator_policy(
    choice: str, prefill: Stack, decode: Stack, vision: Stack | None, fixed_seconds: float
) -> EmulatorPolicy:
    """The policy ``VERIFY=choice`` names for a model whose prefill and decode pieces
    (``decode.depth`` = ``prefill.depth``) and vision blocks are called as the stacks say;
    ``fixed_seconds``: the emulator calls of the pieces that always run (LM head, patch
    embedding, merger)."""
    tower = vision or Stack(0, 0, 0, 0)

    def seconds(layers: int, blocks: int) -> float:
        text = prefill.seconds(layers) + decode.seconds(layers)
        return text + tower.seconds(blocks) + fixed_seconds

    full = seconds(prefill.depth, tower.depth)
    decision = decide(choice, full, FULL_BUDGET_SECONDS, "emulator verification")
    if decision.mode == "full":
        layers, blocks = tuple(range(prefill.depth)), tuple(range(tower.depth))
    else:
        layers, blocks = sampled(prefill.depth), sampled(tower.depth) if tower.depth else ()
    return EmulatorPolicy(
        decision.mode, layers, prefill.depth, blocks, tower.depth, full,
        seconds(len(layers), len(blocks)), decision.reason,
    )  # fmt: skip

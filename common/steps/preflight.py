"""The memory preflight of target steps that still hold the whole model in float32.

Layer-by-layer steps (``make profile``) estimate their peak from the part they hold; the
target builds that load the whole model estimate it as multiples of the checkpoint's
float32 size, each multiple named after what holds it (a reference copy, GPTQ levels, the
simulator), so the error line tells a user where the memory goes. Every target declares
``MAX_MEMORY`` with :func:`max_memory_option` and calls :func:`whole_model_preflight`
after resolving the model and before loading it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.core.memory import Estimate, MemoryCap
from common.core.options import ByteSize, option
from common.steps.phases import Run

#: What to do when a whole-model step does not fit: nothing of its own lowers the peak.
WHOLE_MODEL_REMEDY = (
    "no option of this step lowers it (it holds the whole model in float32): free memory, "
    "use a machine with more, or set MAX_MEMORY to what you have to go ahead anyway"
)


def max_memory_option() -> Any:
    """The ``MAX_MEMORY`` field every target's ``Options`` declares (command line only)."""
    return option(
        None,
        ByteSize(),
        "memory cap checked before the model is loaded, e.g. 16GB "
        "(default: what the machine has available)",
        make="MAX_MEMORY",
        recipe=False,
        record=False,
    )


def whole_model_preflight(
    run: Run,
    model_dir: Path,
    step: str,
    max_memory: int | None,
    copies: Mapping[str, float],
    *,
    remote_code: bool = False,
) -> None:
    """Estimate ``step``'s peak as ``copies`` (``{"what holds it": multiple of the float32
    checkpoint}``) plus the checkpoint's own files, which ``from_pretrained`` maps while
    it converts them (their pages count in RSS: 11.0 GiB measured loading a bf16 1.8B
    model whose float32 weights are 6.8 GiB), and stop with one line over the cap. A model
    that runs its own code is refused first unless the step supports it (``remote_code``):
    "not supported" is the answer, not "too big"."""
    from common.models.loading import refuse_remote_code
    from common.models.streaming import float32_bytes, stored_bytes

    if not remote_code:
        refuse_remote_code(model_dir)

    model = float32_bytes(model_dir)
    parts = {name: int(model * factor) for name, factor in copies.items()}
    parts["checkpoint mapped while loading"] = stored_bytes(model_dir)
    run.preflight(Estimate(step, parts), MemoryCap.resolve(max_memory), WHOLE_MODEL_REMEDY)

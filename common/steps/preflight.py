"""The memory preflight of steps, before any weight is loaded.

Layer-by-layer steps estimate their peak from the part they hold plus what they keep
across parts (:func:`layerwise_preflight`); steps that load the whole model estimate it as
multiples of the checkpoint's float32 size, each multiple named after what holds it (a
reference copy, GPTQ levels, the simulator), so the error line tells a user where the
memory goes. Every target declares ``MAX_MEMORY`` with :func:`max_memory_option` and
runs a preflight after resolving the model and before loading it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    held: Mapping[str, int] | None = None,
) -> None:
    """Estimate ``step``'s peak as ``copies`` (``{"what holds it": multiple of the float32
    checkpoint}``) and ``held`` (``{"what": bytes}``, for what is not a multiple of the
    model) plus the checkpoint's own files, which ``from_pretrained`` maps while
    it converts them (their pages count in RSS: 11.0 GiB measured loading a bf16 1.8B
    model whose float32 weights are 6.8 GiB), and stop with one line over the cap. A model
    that runs its own code is refused first unless the step supports it (``remote_code``):
    "not supported" is the answer, not "too big"."""
    from common.models.loading import refuse_remote_code
    from common.models.streaming import float32_bytes, stored_bytes

    if not remote_code:
        refuse_remote_code(model_dir)

    model = float32_bytes(model_dir)
    parts = {name: int(model * factor) for name, factor in copies.items()} | dict(held or {})
    parts["checkpoint mapped while loading"] = stored_bytes(model_dir)
    run.preflight(Estimate(step, parts), MemoryCap.resolve(max_memory), WHOLE_MODEL_REMEDY)


def layerwise_preflight(
    run: Run,
    model_dir: Path,
    step: str,
    max_memory: int | None,
    *,
    held: Callable[[Any], Mapping[str, int]],
    copies: Mapping[str, float],
    sequential: bool | None = None,
    vision: float = 0.0,
    lower: str,
) -> Any:
    """Run ``step`` one part at a time where the model allows it (plain causal layers; a
    vision-language model's language model on text, as the whole model runs text;
    ``sequential`` False forces a whole-model run), else whole; estimate
    the peak of that mode and stop with one line over the cap. Returns the
    :class:`~common.models.streaming.StreamedModel` to read parts from, or None for a
    whole-model run (then estimated as :func:`whole_model_preflight` does with ``copies``).

    A layer-by-layer peak is the largest part, pickled checkpoint pages mapped while they
    load, and ``held(adapter)``: what the step keeps across parts (hidden states of its
    windows, a window's logits), named; ``lower`` says which options shrink that.

    A step that also runs a vision-language model's vision tower reads it whole
    (``vision``: the multiple of the tower's float32 weights it holds meanwhile, e.g. an
    export); counted beside the largest language part, as if both were held at once."""
    from common.models.loading import refuse_remote_code
    from common.models.streaming import StreamedModel

    refuse_remote_code(model_dir)  # "not supported" is the answer, not "too big"
    streamed = StreamedModel(model_dir)
    adapter = streamed.adapter
    fits = not adapter.attention_departures()
    if sequential and not fits:  # says why it cannot
        streamed.check_layerwise("run it with SEQUENTIAL=0", text_windows=True)
    if not fits or sequential is False:
        whole_model_preflight(run, model_dir, f"{step} (whole model)", max_memory, copies)
        return None
    parts = {
        "largest part (float32)": streamed.largest_part_bytes(),
        "pickled .bin pages (mapped)": streamed.weights.mapped_bytes,
        **held(adapter),
    }
    if adapter.is_vision_language and vision:
        tower = streamed.vision_tower_bytes()
        parts[f"vision tower ({vision:g}x its float32 weights)"] = int(vision * tower)
    run.preflight(
        Estimate(f"{step} (one layer at a time)", parts), MemoryCap.resolve(max_memory), lower
    )
    return streamed

"""The ``make profile`` step: calibration windows → activation profile directory.

Writes ``build/<MODEL>/profile/`` atomically: ``profile.json`` (seed-compatible keys plus
``edgeforge`` statistics), ``channel_absmax.safetensors`` (per-channel abs-max of every
linear input and output), the rotation used (when the model was rotated first, as the
seed's ``online_rotation`` flow does), ``report.json``/``report.md`` with plots, and
``manifest.json``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from common.core.errors import EdgeforgeError
from common.core.memory import Estimate, MemoryCap
from common.core.recipes import Recipe, model_build_dir
from common.core.records import atomic_path, build_manifest, write_json_atomic
from common.core.resources import gib
from common.quant.hadamard import ROTATE_MODES
from common.steps.phases import Run

DEFAULT_NUM_SAMPLES = 128
DEFAULT_SEQ_LEN = 512
DEFAULT_SEED = 42


def profile_dir_name(
    rotate: str | None = None, *, r_path: bool = False, online_down: bool = False
) -> str:
    """The folder under ``build/<MODEL>/`` a profile of these transforms is written to:
    ``profile`` for the checkpoint as stored, ``profile-hadamard`` (``-orthogonal``,
    ``-r-path``) for a rotated one, ``…-online-down`` with the online Hadamard. Profiles
    of differently transformed models describe different tensors, so one never
    overwrites another (``make qnn`` reads the rotated one by default)."""
    parts = ["profile"]
    if r_path:
        parts.append("r-path")
    elif rotate:
        parts.append(rotate)
    if online_down:
        parts.append("online-down")
    return "-".join(parts)


@dataclass(frozen=True)
class ProfileSettings:
    """What ``make profile`` was asked for (recorded in the profile and the manifest)."""

    corpus: str
    num_samples: int = DEFAULT_NUM_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    seed: int = DEFAULT_SEED
    no_bias: bool = True
    sequential: bool | None = None  # None: one layer at a time where the model allows
    max_memory: int | None = None  # bytes; None: what the machine has available
    rotate: str | None = None  # None, or a rotation mode (random_rotate)
    r_path: str | None = None  # R_path: a rotation file to apply
    online_down: bool = False
    images: str | None = None  # folder of calibration images (vision-language models)
    image_size: int = 224  # square side the images are resized to (patch·merge multiple)
    exact_percentiles: bool = False  # count every value, not only the histograms' tails

    def check(self) -> None:
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise EdgeforgeError(f"num_samples: must be an integer ≥ 1, got {self.num_samples!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise EdgeforgeError(f"seq_len: must be an integer ≥ 2, got {self.seq_len!r}")
        if self.rotate and self.rotate not in ROTATE_MODES:
            raise EdgeforgeError(
                f"ROTATE={self.rotate}: expected one of {', '.join(ROTATE_MODES)} or none"
            )
        if self.rotate and self.r_path:
            raise EdgeforgeError(
                "random_rotate and R_path are mutually exclusive: give one rotation source"
            )

    @property
    def dir_name(self) -> str:
        """Output folder name (:func:`profile_dir_name`)."""
        return profile_dir_name(self.rotate, r_path=bool(self.r_path), online_down=self.online_down)

    @property
    def transforms(self) -> dict[str, Any]:
        """The model transforms, in the quant plan's vocabulary."""
        out: dict[str, Any] = {}
        if self.rotate or self.r_path:
            out["rotation"] = (
                {"path": self.r_path} if self.r_path else {"mode": self.rotate, "seed": self.seed}
            )
        if self.online_down:
            out["online_hadamard"] = True
        return out


def calibration_windows(
    model_dir: Path, settings: ProfileSettings, *, trust_remote_code: bool = False
) -> torch.Tensor:
    """The seeded calibration sample; corpus and size errors name the option at fault.
    ``trust_remote_code`` (the recipe's) loads the tokenizer of a model that runs its own
    code, for the steps that support one."""
    from common.inputs.data import corpus_files, sample_windows
    from common.models.loading import load_tokenizer

    try:
        corpus_files([settings.corpus])
    except EdgeforgeError as exc:
        raise EdgeforgeError(f"dataset_path (--corpus): {exc}") from None
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    try:
        return sample_windows(
            [settings.corpus], tokenizer, settings.num_samples, settings.seq_len, settings.seed
        )
    except EdgeforgeError as exc:
        raise EdgeforgeError(f"num_samples={settings.num_samples}: {exc}") from None


#: The instruction paired with every calibration image.
IMAGE_PROMPT = "Describe this image in detail."


def vision_calibration(model_dir: Path, settings: ProfileSettings) -> list[dict[str, Any]]:
    """One processor-encoded prompt per image of ``settings.images`` (sorted by name),
    each square-resized to ``image_size`` (rounded to the patch·merge grid as the
    processor would); none without ``--images``. Errors name the option."""
    if not settings.images:
        return []
    from common.export.vision_export import image_prompt_inputs
    from common.inputs.vl_preprocess import list_frames, snap_size
    from common.models.loading import check_model_dir, load_processor

    if not check_model_dir(model_dir).is_vision_language:
        raise EdgeforgeError(
            f"--images: {model_dir} is a text model; image calibration needs a "
            "vision-language model — drop --images"
        )
    processor = load_processor(model_dir)
    size, note = snap_size(processor, settings.image_size, "--image-size")
    if note:
        print(f"[profile] {note}", file=sys.stderr)
    paths = list_frames(Path(settings.images), "--images")
    return [inputs for (inputs,) in image_prompt_inputs(processor, [IMAGE_PROMPT], paths, size)]


@dataclass
class ProfilePlan:
    """How a profile will run: one layer at a time (``streamed``) or whole, and its
    estimated peak, checked against the memory cap before any model is loaded."""

    streamed: Any  # StreamedModel, or None for a whole-model run
    estimate: Estimate
    lower: str


def _window_bytes(adapter: Any, settings: ProfileSettings) -> int:
    """Hidden states of every calibration window, float32 (sequential mode holds two)."""
    return settings.num_samples * settings.seq_len * adapter.hidden_size * 4


def plan_profile(
    model_dir: Path, settings: ProfileSettings, *, trust_remote_code: bool = False
) -> ProfilePlan:
    """Choose the mode and estimate its peak. Models run one layer at a time unless
    ``SEQUENTIAL=0`` (their statistics are identical either way), vision-language ones
    with image calibration too (the vision tower read first, as one part); layers that
    are not plain causal attention run whole."""
    from common.models.streaming import StreamedModel, stored_bytes
    from common.quant.rotation import rotation_bytes

    streamed = StreamedModel(model_dir, trust_remote_code=trust_remote_code)
    adapter = streamed.adapter
    rotation = rotation_bytes(adapter) if settings.transforms.get("rotation") else 0
    layered = Estimate(
        "make profile (one layer at a time)",
        {
            # With --images the vision tower is one more part, read first for the
            # pictures' tokens (the prompts' hidden states: a few MiB beside the windows').
            "largest part (float32)": max(
                streamed.largest_part_bytes(),
                streamed.vision_tower_bytes() if settings.images else 0,
            ),
            "hidden states": 2 * _window_bytes(adapter, settings),
            "rotation (float64)": rotation,
            "pickled .bin pages (mapped)": streamed.weights.mapped_bytes,
        },
    )
    fits_layers = not adapter.attention_departures()
    sequential = fits_layers if settings.sequential is None else settings.sequential
    if sequential:
        return ProfilePlan(
            streamed, layered, f"lower NUM_SAMPLES (now {settings.num_samples}) or SEQ_LEN"
        )
    untie = settings.transforms.get("rotation") and streamed.tied
    whole = Estimate(
        "make profile (whole model)",
        {
            "float32 model": streamed.weights.nbytes(""),
            "checkpoint mapped while loading": stored_bytes(model_dir),
            "untied LM head": streamed.part_bytes(adapter.name_of("embed_tokens")) if untie else 0,
            "rotation (float64)": rotation,
            "one window's logits": settings.seq_len * adapter.vocab_size * 4,
        },
    )
    lower = (
        f"SEQUENTIAL=1 (one layer at a time) needs about {gib(layered.total)}"
        if fits_layers
        else "this model is profiled whole (its layers are not all plain causal "
        "attention); use a machine with more memory"
    )
    return ProfilePlan(None, whole, lower)


def collect(
    model_dir: Path, plan: ProfilePlan, settings: ProfileSettings, windows: torch.Tensor
) -> Any:
    """Run the profiler as ``plan`` says; returns (profiler, rotation or None)."""
    from common.analysis.profiling import profile_model, profile_sequential

    vision_inputs = vision_calibration(model_dir, settings)
    if plan.streamed is not None:
        from common.quant.transforms import Transforms

        transforms = Transforms.of(plan.streamed.adapter, settings.transforms)
        profiler = profile_sequential(
            plan.streamed,
            windows,
            transforms=transforms,
            no_bias=settings.no_bias,
            vision_inputs=vision_inputs,
            exact=settings.exact_percentiles,
        )
        return profiler, transforms.rotation
    from common.analysis.simulate import transformed_model

    with transformed_model(model_dir, settings.transforms) as (model, rotation):
        profiler = profile_model(
            model,
            windows,
            no_bias=settings.no_bias,
            vision_inputs=vision_inputs,
            exact=settings.exact_percentiles,
        )
        return profiler, rotation


def run_profile(
    recipe: Recipe, model_dir: Path, settings: ProfileSettings, build_dir: Path | None = None
) -> Path:
    """Profile ``model_dir`` and write ``build/<MODEL>/<settings.dir_name>/``; returns the
    directory.

    A model that runs its own code (Qwen1) is profiled one layer at a time only: the
    whole-model path loads through transformers' Auto classes, which do not run it.
    """
    from safetensors.torch import save_file

    from common.analysis.profile_report import write_report
    from common.analysis.profiling import profile_document
    from common.models.loading import refuse_remote_code

    settings.check()
    trust = recipe.trust_remote_code
    run = Run("profile", ("calibrate", "profile", "package"))
    run.phase("calibrate")
    plan = plan_profile(model_dir, settings, trust_remote_code=trust)
    if plan.streamed is None:
        refuse_remote_code(model_dir, "make profile with SEQUENTIAL=0")
    settings = replace(settings, sequential=plan.streamed is not None)
    run.preflight(plan.estimate, MemoryCap.resolve(settings.max_memory), plan.lower)
    windows = calibration_windows(model_dir, settings, trust_remote_code=trust)
    run.phase("profile")
    profiler, rotation = collect(model_dir, plan, settings, windows)
    stats = profiler.results()
    meta = {
        "model": recipe.name,
        "settings": asdict(settings),
        "transforms": settings.transforms,
        "tokens": windows.numel(),
    }
    doc = profile_document(stats, meta)
    run.phase("package")
    out_dir = model_build_dir(recipe, build_dir) / settings.dir_name
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        write_json_atomic(tmp / "profile.json", doc)
        save_file(profiler.channel_absmax(), str(tmp / "channel_absmax.safetensors"))
        if rotation is not None:
            from common.quant.rotation import save_rotation

            save_rotation(tmp / "rotation.safetensors", rotation)
        write_report(tmp, doc, profiler.channel_absmax(), run.resources())
        manifest = build_manifest(
            step="profile",
            inputs={"corpus": Path(settings.corpus), "model_config": model_dir / "config.json"},
            outputs=tmp,
            recipe=recipe.data,
            options=asdict(settings),
        )
        write_json_atomic(tmp / "manifest.json", manifest)
    seconds = run.finish()["profile"]  # to 0.1 s
    rate = f"{windows.numel() / seconds:.0f} tok/s" if seconds > 0 else "under 0.1 s"
    print(
        f"[profile] {windows.numel()} tokens in {seconds:.1f} s ({rate}); "
        f"wrote {out_dir / 'profile.json'}",
        file=sys.stderr,
    )
    return out_dir


@dataclass(frozen=True)
class QnnProfileRequest:
    """A seed-000 config file's ``profile_config``, in our terms."""

    settings: ProfileSettings
    output_path: Path
    save_rotation: Path | None
    model_path: Path


def from_qnn_config(path: Path, seq_len: int = DEFAULT_SEQ_LEN) -> QnnProfileRequest:
    """Map mllm's ``profile_config`` (validated by :mod:`common.backends.qnn_config`) onto settings.

    ``online_rotation`` with ``random_rotate`` draws a seeded Hadamard rotation (mllm's was
    unseeded) and ``R_path`` applies a saved one; paths resolve against the config file.
    """
    from common.backends.qnn_config import load_qnn_config, rotation_settings

    data = load_qnn_config(path)
    section = data["profile_config"]
    rotation = rotation_settings(data, path, "profile_config")
    base = Path(path).resolve().parent
    rotate = r_path = None
    if rotation.online_rotation:
        rotate = "hadamard" if rotation.random_rotate else None
        r_path = str(rotation.r_path) if rotation.r_path else None
    return QnnProfileRequest(
        settings=ProfileSettings(
            corpus=str(base / section["dataset_path"]),
            num_samples=section["num_samples"],
            seq_len=seq_len,
            no_bias=section["no_bias"],
            rotate=rotate,
            r_path=r_path,
        ),
        output_path=base / section["output_path"],
        save_rotation=rotation.save_rotation if rotate else None,
        model_path=base / section["model_config"]["model_name"],
    )

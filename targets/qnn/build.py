"""``make qnn``: the mllm int8 model and QNN HTP context binaries, verified on the emulator.

Reads the activation profile of ``make profile`` (by default the Hadamard-rotated one,
``build/<MODEL>/profile-hadamard/profile.json``; ``--rotate none`` reads the plain
``profile/``; its transforms are applied to the model first) and, when ``make simulate``
has run, its ``shadow_layers.json`` (the chosen ``T``; ``--t`` overrides it). Writes
``build/<MODEL>/qnn/``:

* ``model.int8.mllm`` + ``shadow_layers.json`` + ``model.int8.plan.json`` (the plan the file
  was written from), re-read and checked to reproduce the fake-quant model's logits;
* ``<SOC>/<piece>_ctx.onnx`` + ``_qnn.bin`` per decoder layer (prefill graph of
  ``PREFILL_LEN`` tokens, decode graph of one token over a ``KV_LEN`` cache) and the LM
  head, compiled by the QNN EP for each SoC from the piece's QDQ graph, with the SoC/arch
  read back from the binary (``--keep-qdq`` keeps those graphs in ``qdq/<piece>.onnx``);
* ``quant_plan.json``: the binaries' plan (``common.backends.qdq.QdqPlan``: per linear its
  weight and each side's encoding or float fallback), the only source the QDQ step reads;
* ``tokenizer/`` (``config.json`` + the tokenizer files, checked to encode like the
  source's under ``AutoTokenizer``; a vision-language model's processor configs too,
  checked to prepare its pictures like the source's under ``AutoProcessor``);
* ``report.json`` / ``report.md`` (+ ``layers.png``) and ``manifest.json``.

A failed numerical gate raises ``CheckFailed`` (exit 1) after everything is written.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mllm_int8  # this folder (the script's own directory is first on sys.path)
import pipeline
import report as rep
import sampling
import vision

from common.backends import qdq, qnn_ep
from common.core.disk import DiskEstimate, disk_preflight
from common.core.errors import CheckFailed, EdgeforgeError, run_cli
from common.core.gates import failures, records
from common.core.memory import Estimate, MemoryCap
from common.core.options import (
    Boolean,
    Choice,
    ChoiceList,
    FilePath,
    Integer,
    Number,
    describe,
    option,
    resolve_target,
    target_parser,
)
from common.core.paths import IMAGES_DIR
from common.core.piece_cache import PieceCache, cache_key
from common.core.records import (
    atomic_path,
    build_manifest,
    tree_bytes,
    write_bytes_atomic,
    write_json_atomic,
)
from common.core.resources import resources_line
from common.models.tokenizer_fidelity import write_tokenizer_dir
from common.quant.gptq import ROW_SLICE_BYTES
from common.quant.hadamard import ROTATE_MODES
from common.quant.int8 import MSE_RATIOS
from common.steps.phases import Run
from common.steps.preflight import max_memory_option
from common.steps.verify_sampling import VERIFY_CHOICES

TARGET = "qnn"
#: The phases of a run (common/steps/phases.py), in order.
PHASES = ("resolve", "reference", "quantize", "compile", "verify", "package")
#: Gates per preset: worst per-piece cosine vs float, end-to-end top-1 agreement.
GATES: dict[str, dict[str, float]] = {
    "w8a16": {"layer_cos": 0.999, "top1": 0.95},
    "w8a8": {"layer_cos": 0.99, "top1": 0.0},
    "w4a16": {"layer_cos": 0.95, "top1": 0.0},
}
#: The int8 .mllm must reproduce the fake-quant model's logits this closely.
MLLM_MAX_ABS = 1e-4
#: What the compile phase holds between pieces, over the runtime the preflight adds:
#: onnxruntime's and the QNN backend's libraries and allocations, the golden and
#: calibration activations of every piece, and the heap's growth over a long build
#: (measured: 0.72 GiB at Qwen1.5-1.8B; 0.75-0.86 GiB for a 42-layer model of 64 MiB
#: layers, whose 85 pieces' peaks crept up by 0.2-0.3 GiB over the build as glibc's
#: heap fragmented; with a margin, as its peak varies by 0.1 GiB from run to run).
BUILD_OVERHEAD = int(1.0 * 2**30)


@dataclass(frozen=True)
class Options:
    """Options of ``make qnn`` (command line > recipe ``targets.qnn`` > these defaults)."""

    socs: tuple[str, ...] = option(
        (qnn_ep.DEFAULT_SOC,),
        ChoiceList(tuple(qnn_ep.SOC_TABLE), fold_case=True),
        "comma list of SoCs to compile for, e.g. SM8650,SM8750",
        make="SOCS",
    )
    preset: str = option(
        qdq.DEFAULT_PRESET, Choice(tuple(qdq.PRESETS)), "precision preset", make="PRESET"
    )
    #: Rotated by default because ``w8a8`` needs it: plain, SmolLM2's layers 12-19 carry
    #: outlier channels into the q/k/v and gate/up inputs (12 pieces below cos 0.99, top-1
    #: 0.69); rotated, every piece is >= 0.996.
    rotate: str = option(
        "hadamard",
        Choice((*ROTATE_MODES, "none")),
        "residual rotation of the profile read by default (none: the model as stored)",
        make="ROTATE",
    )
    prefill_len: int = option(32, Integer(1), "tokens of the prefill graph", make="PREFILL_LEN")
    kv_len: int = option(64, Integer(2), "KV cache rows of the decode graph", make="KV_LEN")
    calib_windows: int = option(16, Integer(1), "calibration windows", flag="--calib-windows")
    #: Held-out windows of PREFILL_LEN tokens chained through the prefill binaries end to end.
    #: 32 windows of 32 rows: top-1 agreement near 0.98 within about ±0.8 % (95 %
    #: interval, the accuracy block), where 8 windows gave ±2 %.
    e2e_windows: int = option(32, Integer(1), "held-out windows end to end", make="E2E_WINDOWS")
    #: GPTQ (``common.backends.sequential_gptq``) or to nearest.
    rounding: str = option(
        "gptq", Choice(("gptq", "nearest")), "how integer weights are rounded", make="ROUNDING"
    )
    #: GPTQ calibration: windows x tokens (8192 tokens: H of a 1536-wide down_proj input is
    #: well conditioned from ~5x its width).
    gptq_windows: int = option(32, Integer(1), "GPTQ calibration windows", flag="--gptq-windows")
    gptq_seq_len: int = option(
        256, Integer(2), "tokens per GPTQ window (at least 2)", flag="--gptq-seq-len"
    )
    vtcm_mb: int = option(qnn_ep.DEFAULT_VTCM_MB, Integer(1), "HTP VTCM MB", flag="--vtcm-mb")
    #: HTP graph finalization: 3 optimizes most for the device; at Qwen1.5-1.8B's size the
    #: compiler runs out of memory on Qwen2 blocks with q/k/v biases there
    #: (QNN_COMMON_ERROR_MEM_ALLOC) that 1 compiles. ``auto`` finalizes each graph at 3 and
    #: lowers to 1 only the ones that run out, each named in the report; a number is strict.
    opt_mode: int | str = option(
        qnn_ep.AUTO_OPT_MODE,
        Choice((qnn_ep.AUTO_OPT_MODE, 1, 2, 3)),
        "HTP graph optimization (auto: 3, lowered to 1 per graph only where 3 runs out of "
        "memory, reported)",
        make="OPT_MODE",
    )
    t01m_clip_threshold: float | None = option(
        None,
        Number(above=0),
        "t01m_clip_threshold (default: make simulate's choice, else clip_all)",
        flag="--t",
        recipe="t",
    )
    quant_bias: bool = option(False, Boolean(), "int8 bias in the .mllm", flag="--quant-bias")
    keep_qdq: bool = option(
        False,
        Boolean(),
        "keep each piece's QDQ ONNX (the graph the encodings were imposed on) in qdq/; about "
        "twice the fp32 weights, so off by default",
        flag="--keep-qdq",
        recipe=False,
    )
    #: Vision-language models: every picture of IMAGES, square-resized, makes a calibration
    #: prompt (beside the text windows) and a checked prompt of the end-to-end chain.
    images: Path = option(
        IMAGES_DIR,
        FilePath(),
        "pictures of the vision-language prompts (calibration and the end-to-end check)",
        make="IMAGES",
        recipe=False,
    )
    image_size: int = option(
        448,
        Integer(28),
        "square side (px) the pictures are resized to (vision-language models; rounded to "
        "the patch x merge grid as the processor would)",
        make="IMAGE_SIZE",
    )
    #: The vision tower's pieces on the HTP: their own preset, since a vision tower's
    #: activations are not the language model's (w8a16: every piece >= 0.999).
    vision_preset: str = option(
        qdq.DEFAULT_PRESET,
        Choice(tuple(qdq.PRESETS)),
        "precision preset of the vision pieces (vision-language models)",
        make="VISION_PRESET",
    )
    #: How many pieces the emulator runs (targets/qnn/sampling.py): every one of
    #: Qwen2.5-VL-3B's at PREFILL_LEN 320 would take about 6 h on 2 cores.
    verify: str = option(
        "auto",
        Choice(VERIFY_CHOICES),
        "full: every piece on the emulator; sample: first/middle/last layers and vision "
        "blocks; auto: by cost",
        make="VERIFY",
        recipe=False,
    )
    profile: Path | None = option(
        None,
        FilePath(),
        "profile JSON (default: make profile's for ROTATE, "
        "build/<MODEL>/profile-hadamard/profile.json)",
        make="PROFILE",
        recipe=False,
    )
    max_memory: int | None = max_memory_option()

    def __post_init__(self) -> None:
        if self.kv_len <= self.prefill_len:
            raise EdgeforgeError(
                f"KV_LEN: must exceed PREFILL_LEN ({self.prefill_len}) so the decode graph has "
                f"a row for the token after the prompt, got {self.kv_len}"
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return target_parser("make qnn", __doc__.splitlines()[0], Options).parse_args(argv)


def settings(options: Options) -> dict[str, Any]:
    """The build settings the manifest and report record, from the resolved options."""
    opts = describe(options)
    del opts["profile"]  # an input (recorded with its hash), not a build setting
    return opts


def check_profile(profile: dict[str, Any], recipe_name: str, path: Path) -> dict[str, Any]:
    """The profile's transforms, after checking it was made for this model."""
    meta = profile["edgeforge"]
    if meta.get("model") != recipe_name:
        raise EdgeforgeError(
            f"{path}: profile was made for model {meta.get('model')!r}, not {recipe_name!r}; "
            f"run make profile MODEL={recipe_name}"
        )
    transforms = meta.get("transforms") or {}
    if transforms.get("online_hadamard"):
        raise EdgeforgeError(
            f"{path}: profile assumes an online Hadamard on down_proj inputs, which the QNN "
            "pieces do not contain; profile without --online-down"
        )
    return transforms


def simulate_threshold(path: Path, recipe_name: str) -> float | None:
    """The ``T`` ``make simulate`` chose (``shadow_layers.json``; None = clip_all), after
    checking the file was made for this model."""
    import json

    try:
        doc = json.loads(path.read_text())
        model, threshold = doc["model"], doc["t01m_clip_threshold"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EdgeforgeError(
            f"{path}: not a shadow_layers.json from make simulate ({exc})"
        ) from None
    if model != recipe_name:
        raise EdgeforgeError(
            f"{path}: made for model {model!r}, not {recipe_name!r}; "
            f"run make simulate MODEL={recipe_name}"
        )
    if threshold is not None and not (isinstance(threshold, int | float) and threshold > 0):
        raise EdgeforgeError(f"{path}: t01m_clip_threshold must be > 0 or null, got {threshold!r}")
    return threshold


def f32_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan with every range rounded to float32 (what the .mllm stores), scales
    recomputed from it, so the file and the fake-quant model use the same grid."""
    import numpy as np

    from common.analysis.quant_plan import bits_of
    from common.quant.int8 import qmax

    for entry in plan["tensors"].values():
        for side in ("input", "output"):
            tensor = entry[side]
            if "range" in tensor:
                tensor["range"] = float(np.float32(tensor["range"]))
                tensor["scale"] = tensor["range"] / qmax(bits_of(tensor))
    return plan


#: Peak of building a piece over its float32 weights, the part itself included: its
#: static float copy, onnxruntime's calibration and quantize, the CPU QDQ run and the
#: compile. Measured 6.6x on a 64 MiB decoder layer (and vision pieces go the same way).
PIECE_FACTOR = 7
#: The same for the LM head, whose QDQ model is built from a narrow copy
#: (``qdq.quantize_narrow``): 3.6x for Qwen1.5-1.8B's (1.16 GiB); onnxruntime's quantize
#: of the whole head had taken 6.6 GiB more, as it still would for a head kept float.
HEAD_FACTOR = 4
#: The compiler process each piece's compile starts (``qnn_ep.compile_context``): a fresh
#: Python with onnxruntime and the QNN backend reading the QDQ piece and writing its binary.
#: Measured: 0.30 GiB for a 16.8 M-weight decoder layer, 1.93 GiB for Qwen1.5-1.8B's LM
#: head (311 M weights), so about 0.21 GiB and 6 bytes a weight. A layer's runs beside the
#: heap the layer's build kept (0.30 GiB beside 2.05 GiB: 2.32 GiB measured together); the
#: head's ran once the head's build had handed its memory back (1.8B: tree peak 6.12 GiB,
#: the build process's own). So a decoder layer's compiler is what adds to the peak.
COMPILER_BASE = int(0.21 * 2**30)
COMPILER_BYTES_PER_WEIGHT = 6


def memory_estimate(
    streamed: Any, gptq: bool, head_narrow: bool = True, grouped: bool = False
) -> Estimate:
    """The largest of the build's peaks: building the largest piece (a decoder layer at
    :data:`PIECE_FACTOR`, the LM head at :data:`HEAD_FACTOR` when ``head_narrow``, else
    at the same factor) with a layer's compiler process beside it; with GPTQ, the
    end of GPTQ (every linear's levels, one byte per weight, before they go to disk,
    beside the LM head's rounding); for a vision-language model, its vision tower read
    whole while its largest vision piece (a block or the merger) is built.
    Both with the checkpoint's pickled files mapped while they load. Every other phase
    holds one part at a time."""
    adapter, mapped = streamed.adapter, streamed.weights.mapped_bytes
    # The head has the embedding's shape, tied or not.
    head = streamed.part_bytes(adapter.name_of("embed_tokens"))
    head_factor = HEAD_FACTOR if head_narrow else PIECE_FACTOR
    slices = 3 if grouped else 2
    layer = streamed.largest_layer_bytes()
    largest = max(layer, head)
    compiler = COMPILER_BASE + COMPILER_BYTES_PER_WEIGHT * layer // 4  # float32 bytes
    overhead = {
        "onnxruntime, QNN backend, captured activations": BUILD_OVERHEAD,
        "a decoder layer's QNN compiler process, beside": compiler,
    }
    if PIECE_FACTOR * layer >= head_factor * head:
        piece = {f"largest decoder layer while built ({PIECE_FACTOR}x its weights)":
                 PIECE_FACTOR * layer}  # fmt: skip
    else:
        piece = {f"LM head while built ({head_factor}x its weights)": head_factor * head}
    levels = {
        "GPTQ levels of every linear (1 byte per weight)": streamed.weights.nbytes("") // 4,
        # The LM head last: the part, its levels put back in column order (1 byte per
        # weight), and GPTQ's reordered copy and error update of one slice of rows each
        # (with groups, each weight's step too: a third).
        f"the LM head's GPTQ (its weights, 1/4 for its levels, {slices} slices of rows)": largest
        + largest // 4
        + slices * min(largest, ROW_SLICE_BYTES),
    }
    candidates = [{**piece, **overhead}, levels] if gptq else [{**piece, **overhead}]
    tower = streamed.vision_tower_bytes()
    if tower:  # read whole, for the picture prompts' embeddings and the vision pieces
        vision_parts = [b.name for b in adapter.vision_blocks()] + [
            adapter.name_of("vision_merger")
        ]
        piece_bytes = max(streamed.part_bytes(name) for name in vision_parts)
        candidates.append({
            "vision tower (float32), read whole": tower,
            f"largest vision piece while built ({PIECE_FACTOR}x its weights)":
                PIECE_FACTOR * piece_bytes,
            **overhead,
        })  # fmt: skip
    parts = max(candidates, key=lambda c: sum(c.values()))  # the first of equals
    return Estimate("make qnn", {**parts, "pickled .bin pages (mapped)": mapped})


#: What a piece's files carry besides its weights (QNN 2.51, measured on tiny-qwen2's
#: pieces, 37 K weights, and on 16.8 M-weight decoder layers): a context binary about
#: 95 KB and 2.1 % more (its graph, encodings, the HTP's own sections), a QDQ graph about
#: 43 KB and 0.7 % (the graph, a scale and zero point per output channel).
BINARY_OVERHEAD = (100_000, 40)  # bytes, and 1/40 of the weights
QDQ_OVERHEAD = (50_000, 100)
#: What lowers the disk a ``make qnn`` needs.
DISK_REMEDY = (
    "free space there or set BUILD_DIR to a larger disk (each float piece is removed once "
    "it is built; fewer SOCS= write fewer binaries)"
)


def _entry_bytes(qdq_weights: int, binary_weights: int, socs: int) -> int:
    """A piece's cache entry: its QDQ graph and a context binary per SoC, from the bytes
    of the weights each holds."""
    (qdq_fixed, qdq_share), (bin_fixed, bin_share) = QDQ_OVERHEAD, BINARY_OVERHEAD
    graph = qdq_weights + qdq_weights // qdq_share + qdq_fixed
    return graph + socs * (binary_weights + binary_weights // bin_share + bin_fixed)


def disk_estimate(
    streamed: Any, plan: qdq.QdqPlan, socs: int, vision_bits: int | None, gptq: bool,
    reused: int,
) -> DiskEstimate:  # fmt: skip
    """What ``make qnn`` holds on disk at its fullest, the larger of two moments:

    * the compile phase's start: every float piece (float32; each layer twice, its prefill
      and decode graphs, the LM head, a vision-language model's vision pieces), the largest
      piece's static copy beside them, and GPTQ's levels (one byte a weight);
    * the package: each piece's cache entry (its QDQ graph and a context binary per SoC,
      weights at the plan's width, a float linear at 4 and 2 bytes a weight), the int8
      ``.mllm`` and the levels, less ``reused``: entries an earlier run left.

    In between, each float piece goes once it is built and its entry is smaller than it
    (up to three SoCs), so the disk in use falls from the first moment to the second. The
    package's binaries are hard links into the cache: no second copy."""
    from common.models import iter_linears

    adapter = streamed.adapter

    def widths(names: dict[str, Any]) -> tuple[int, int]:
        """Bytes of these linears' weights in the QDQ graph and in a binary."""
        in_graph = in_binary = 0
        for name, linear in names.items():
            count, bits = linear.weight.numel(), plan.linears[name].weight.bits
            in_graph += 4 * count if bits is None else count * bits // 8
            in_binary += 2 * count if bits is None else count * bits // 8  # fp16 on the HTP
        return in_graph, in_binary

    layers = {layer.index: streamed.part_bytes(layer.name) for layer in adapter.layers()}
    entries = 0
    for layer in adapter.layers():
        named = {layer.linear_names[role]: m for role, m in layer.linears.items()}
        entries += 2 * _entry_bytes(*widths(named), socs)  # prefill and decode graphs
    head = streamed.part_bytes(adapter.name_of("embed_tokens"))  # the head's shape, tied or not
    entries += _entry_bytes(*widths({adapter.lm_head_path: adapter.lm_head()}), socs)
    tower = streamed.vision_tower_bytes()
    if tower and vision_bits is not None:
        pieces = len(adapter.vision_blocks()) + 1  # and the merger
        stored = tower * vision_bits // 32
        entries += _entry_bytes(stored, stored, socs) + (pieces - 1) * _entry_bytes(0, 0, socs)
    weights = sum(linear.weight.numel() for _name, _role, linear in iter_linears(adapter))
    levels = {"GPTQ levels": weights} if gptq else {}
    # The .mllm: the decoder's linears a byte a weight, the embedding and LM head float32.
    mllm = weights - head // 4 + 2 * head
    start = DiskEstimate(
        "make qnn",
        {"float ONNX pieces": 2 * sum(layers.values()) + head + tower,
         "a piece's static copy": max(max(layers.values()), head), **levels},
    )  # fmt: skip
    end = DiskEstimate(
        "make qnn",
        {"compiled pieces (QDQ graphs and binaries)": entries,
         "int8 .mllm": mllm, **levels},
        reused,
    )  # fmt: skip
    return max(start, end, key=lambda estimate: estimate.total)


def check_groups(adapter: Any, scheme: Any, config: Path) -> None:
    """Refuse, before any work, a grouped preset whose groups of input columns do not
    divide some linear's inputs (``config`` names the model)."""
    from common.models import iter_linears

    group = scheme.weights.group_size
    for name, _role, linear in iter_linears(adapter) if group else ():
        if linear.in_features % group:
            raise EdgeforgeError(
                f"{config}: {name} reads {linear.in_features} inputs, which PRESET="
                f"{scheme.name}'s groups of {group} input columns do not divide; choose a "
                "per-channel preset (w8a16, w8a8)"
            )


def emulator_policy(
    choice: str,
    streamed: Any,
    prefill_len: int,
    windows: int,
    pictures: vision.PicturePrompts | None,
) -> sampling.EmulatorPolicy:
    """``VERIFY=``'s policy for this model, from the checkpoint's shapes alone (no weight
    is read): each prefill block is called on the golden input, the ``windows`` held-out
    windows and, for a vision-language model, each picture's prompt twice (float and
    chained vision tokens); each decode block on the golden step and the generated tokens
    of the image chain; each vision piece on every picture and the golden one."""
    adapter = streamed.adapter

    def params(name: str) -> int:
        return streamed.part_bytes(name) // 4

    shown = len(pictures.check) if pictures is not None else 0
    layer, depth = params(adapter.layers()[0].name), adapter.num_layers
    prefill = sampling.Stack(depth, layer, prefill_len, 1 + windows + 2 * shown)
    decode = sampling.Stack(depth, layer, 1, 1 + shown * vision.CHAIN_NEW_TOKENS)
    # The LM head has the embedding's shape (tied or not) and one golden call.
    fixed = sampling.Stack(1, params(adapter.name_of("embed_tokens")), 1, 1).seconds(1)
    tower = None
    if pictures is not None:
        blocks, patches = adapter.vision_blocks(), pictures.geometry.patches
        tower = sampling.Stack(len(blocks), params(blocks[0].name), patches, 1 + shown)
        for piece in ("vision_patch_embed", "vision_merger"):
            always = sampling.Stack(1, params(adapter.name_of(piece)), patches, 1 + shown)
            fixed += always.seconds(1)
    return sampling.emulator_policy(choice, prefill, decode, tower, fixed)


#: Layout version of the cached GPTQ levels: bump it when GPTQ computes other levels for
#: the same inputs, so no older entry is reused.
LEVELS_FORMAT = 1


def model_files(model_dir: Path) -> list[Path]:
    """The files that make a checkpoint's weights (hashed into cache keys)."""
    weights = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    return [model_dir / "config.json", *weights]


def rotation_file(rotation: dict[str, Any] | None) -> Path | None:
    """The rotation file a profile's transforms name, if any (hashed into cache keys)."""
    return Path(rotation["path"]) if rotation and rotation.get("path") else None


def gptq_levels(
    cache: PieceCache, inputs: dict[str, Any], compute: Callable[[], qdq.WeightLevels]
) -> tuple[qdq.WeightLevels, str]:
    """GPTQ's levels for ``inputs`` (everything they depend on), computed by ``compute``
    once and kept in ``cache`` (a build killed while compiling pieces does not run GPTQ,
    its longest phase at 1.8B, again), and the key they are kept under. They are read
    back a piece at a time (:class:`pipeline.StoredLevels`): one byte per weight of the
    whole model is not held through the compile phase."""
    import torch
    from safetensors.torch import save_file

    def build(folder: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for name, (levels, scale) in compute().items():
            tensors[f"{name}.levels"] = levels.contiguous()
            tensors[f"{name}.scale"] = scale.contiguous()
        save_file(tensors, str(folder / "levels.safetensors"))

    key = cache_key({"format": LEVELS_FORMAT, **inputs})
    entry = cache.fetch_or_build("gptq", key, build)
    return pipeline.StoredLevels(entry / "levels.safetensors"), key


def build(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    from common.analysis.layerwise import Parts
    from common.analysis.layerwise_decode import vision_features
    from common.analysis.profiling import load_profile
    from common.analysis.quant_plan import PlanOptions, build_plan
    from common.backends.sequential_gptq import sequential_gptq
    from common.core.recipes import load_recipe, model_build_dir
    from common.export import piece_export as pe
    from common.inputs.data import CALIB_CORPUS, EVAL_CORPUS, eval_windows, sample_windows
    from common.models import iter_linears
    from common.models.loading import copy_processor_files, load_tokenizer
    from common.models.streaming import StreamedModel
    from common.quant.transforms import Transforms
    from common.steps.model_build import (
        build_model,
        check_packaged_processor,
        check_packaged_tokenizer,
    )
    from common.steps.profile_step import profile_dir_name

    run.phase("resolve")
    recipe = load_recipe(args.model)
    options = resolve_target(Options, args, recipe, TARGET)
    opts = settings(options)
    versions = qnn_ep.qnn_versions()  # fails early, clearly, without the wheel
    socs = [qnn_ep.soc_by_name(s) for s in opts["socs"]]
    # The preset with this build's rounding, so the plan names what is built.
    scheme = qdq.preset_by_name(opts["preset"]).with_weights(rounding=opts["rounding"])
    build_dir = model_build_dir(recipe, args.build_dir)
    rotate = None if opts["rotate"] == "none" else opts["rotate"]
    default_profile = build_dir / profile_dir_name(rotate) / "profile.json"
    profile_path = Path(args.profile) if args.profile else default_profile
    model_dir = build_model(recipe, args.build_dir, args.model_path)
    out_dir = build_dir / TARGET
    inputs = {"profile": profile_path, "model_config": model_dir / "config.json"}
    decision = build_dir / "simulate" / "shadow_layers.json"
    if args.t01m_clip_threshold is None and decision.is_file():
        opts["t01m_clip_threshold"] = simulate_threshold(decision, recipe.name)
        inputs["shadow_layers"] = decision
    tokenizer = load_tokenizer(model_dir)
    lengths = (opts["prefill_len"], opts["kv_len"])
    window = lengths[0] + 1  # the prompt and the token the decode graph is checked on
    held_out = eval_windows(EVAL_CORPUS, tokenizer, opts["e2e_windows"], window).tolist()
    golden_ids = held_out[0]
    e2e_ids = [ids[: lengths[0]] for ids in held_out]
    calib_ids = sample_windows(CALIB_CORPUS, tokenizer, opts["calib_windows"], window, 0)
    calib_ids = [w.tolist() for w in calib_ids]
    gptq_ids = None
    if opts["rounding"] == "gptq":
        gptq_ids = sample_windows(
            CALIB_CORPUS, tokenizer, opts["gptq_windows"], opts["gptq_seq_len"], 0
        )

    if args.profile is None and not profile_path.is_file():
        raise EdgeforgeError(
            f"{profile_path}: profile not found; run make profile MODEL={recipe.name}"
            + (f" ROTATE={rotate}" if rotate else "")
            + " (make qnn does it for you)"
        )
    profile = load_profile(profile_path)
    transforms = check_profile(profile, recipe.name, profile_path)
    rotation = transforms.get("rotation")
    rotated = "none" if not rotation else rotation.get("mode", f"R_PATH {rotation.get('path')}")
    if (args.profile is None or args.rotate is not None) and rotated != opts["rotate"]:
        raise EdgeforgeError(
            f"{profile_path}: ROTATE={opts['rotate']} but this profile's rotation is "
            f"{rotated}; give a profile of that rotation (make profile ROTATE=<mode> writes "
            "build/<MODEL>/profile-<mode>/) or drop ROTATE="
        )
    stats = profile["edgeforge"]["stats"]
    mllm_plan = f32_plan(
        build_plan(
            profile,
            PlanOptions(
                weight_granularity="per_tensor",
                act_bits=8,
                threshold=opts["t01m_clip_threshold"],
                quant_bias=opts["quant_bias"],
            ),
            name=f"{recipe.name}-qnn-int8",
            transforms=transforms,
        )
    )
    # One part of the model in memory at a time: read from the checkpoint and transformed
    # as the profile was (rotation) whenever a phase needs it, released after.
    streamed = StreamedModel(model_dir)
    # Text windows run a vision-language model's language model as its own forward runs
    # text; picture prompts bring their vision embeddings and M-RoPE rows with them.
    streamed.check_layerwise("make qnn runs one layer at a time", text_windows=True)
    adapter = streamed.adapter
    pictures = None
    if adapter.is_vision_language:
        vision.check_picture_profile(profile, profile_path, recipe.name)
        check_prompt = recipe.eval_defaults.get("prompt", "Describe this image.")
        pictures = vision.picture_prompts(
            model_dir, opts["images"], opts["image_size"], check_prompt, lengths[0], run
        )
        opts["image_size"] = pictures.geometry.size  # as built, after rounding
    policy = emulator_policy(opts["verify"], streamed, lengths[0], opts["e2e_windows"], pictures)
    if policy.mode == "sample":
        run.log(policy.note() or "")
    # The binaries' plan (written and read back in the quantize phase) says whether the
    # LM head is quantized, so built from a narrow copy.
    binaries_plan = qdq.qdq_plan(mllm_plan, stats, scheme, name=f"{recipe.name}-qnn-{scheme.name}")
    heads = [name for name, role, _m in iter_linears(adapter) if role == "lm_head"]
    check_groups(adapter, scheme, model_dir / "config.json")
    run.preflight(
        memory_estimate(
            streamed,
            opts["rounding"] == "gptq",
            qdq.narrowable(binaries_plan, heads),
            grouped=scheme.weights.group_size is not None,
        ),
        MemoryCap.resolve(options.max_memory),
        "free memory, use a machine with more, or set MAX_MEMORY to what you have to go "
        "ahead anyway",
    )
    load_profile(profile_path, adapter)  # covers every linear of this model
    parts = Parts(adapter, streamed, Transforms.of(adapter, transforms))
    # GPTQ's levels and every compiled piece outlive a killed run: the same command then
    # continues from the last complete step (build/<MODEL>/qnn-pieces/).
    cache_dir = build_dir / f"{TARGET}-pieces"
    vision_bits = qdq.preset_by_name(opts["vision_preset"]).weights.bits if pictures else None
    disk = disk_estimate(
        streamed, binaries_plan, len(socs), vision_bits, opts["rounding"] == "gptq",
        tree_bytes(cache_dir),
    )  # fmt: skip
    disk_preflight(disk, build_dir, DISK_REMEDY)
    run.log(f"disk: needs about {disk.describe()} under {build_dir}")
    cache = PieceCache(cache_dir)
    with atomic_path(out_dir) as tmp:
        run.phase("reference")
        work = tmp / "_work"
        float_dir = work / "float"
        pe.export_pieces(
            adapter,
            lengths[0],
            float_dir,
            only=lambda n: (n.startswith("block_") and "cache" not in n) or n == "lm_head",
            parts=parts,
        )
        pe.export_pieces(
            adapter, lengths[1], float_dir, only=lambda n: "block_cache" in n, parts=parts
        )
        calibration = [pipeline.Prompt(ids) for ids in calib_ids]
        checked = [pipeline.Prompt(ids) for ids in e2e_ids]
        picture_checks: list[pipeline.Prompt] = []
        continued: list[tuple[dict[str, Any], Any, range]] = []  # picture prompts + tokens
        float_features: list[Any] = []  # the float tower's merged tokens of each picture
        vision_ref = None
        if pictures is not None:  # the float tower's embeddings, as the runtime splices them
            pixels = [inputs["pixel_values"] for inputs in pictures.check]
            with parts.vision_tower() as tower:
                # One tower pass a picture: its calibration and check prompts hold its pixels.
                float_features = [vision_features(tower, inputs) for inputs in pictures.check]
                vision_ref = vision.reference(adapter, pictures.geometry, pixels, float_dir)
            calibration += [
                pipeline.image_prompt(adapter, inputs, features)
                for inputs, features in zip(pictures.calibration, float_features, strict=True)
            ]
            picture_checks = [
                pipeline.image_prompt(adapter, inputs, features)
                for inputs, features in zip(pictures.check, float_features, strict=True)
            ]
            continued = [
                vision.continuation(parts, inputs, prompt, lengths[0])
                for inputs, prompt in zip(pictures.check, picture_checks, strict=True)
            ]
        with parts.embedding():  # the chain embeds its windows on the host
            golden = pipeline.capture(
                pe.onnx_runner(float_dir), adapter, golden_ids, calibration, lengths
            )
        run.phase("quantize")
        # The binaries' plan is written first and read back: the QDQ step sees only the file.
        write_json_atomic(tmp / "quant_plan.json", binaries_plan.to_json())
        plan = qdq.load_qdq_plan(tmp / "quant_plan.json")
        vision_plan = None
        if vision_ref is not None:
            made = vision.plan(vision_ref, opts["vision_preset"], recipe.name)
            write_json_atomic(tmp / "vision_quant_plan.json", made.to_json())
            vision_plan = qdq.load_qdq_plan(tmp / "vision_quant_plan.json")
        spec = plan.scheme.weights
        weight_bits, group_size = spec.bits, spec.group_size
        source = {"model": model_files(model_dir), "transforms": transforms,
                  "rotation_file": rotation_file(rotation), "bits": weight_bits,
                  **({"group_size": group_size} if group_size else {}),
                  # the clips an mse scale is chosen among: other clips, other levels
                  **({"scales": spec.scales, "clips": MSE_RATIOS}
                     if spec.scales == "mse" else {})}  # fmt: skip
        if spec.rounding == "gptq":
            # A vision-language model's calibration pictures join GPTQ's text windows.
            shown = [p.image for p in calibration if p.image is not None]
            seen = [(p.token_ids, p.positions, p.rows, p.embeds) for p in shown]
            levels, levels_key = gptq_levels(
                cache,
                {**source, "windows": gptq_ids, **({"pictures": seen} if seen else {})},
                lambda: sequential_gptq(
                    adapter,
                    gptq_ids,
                    weight_bits,
                    group_size=group_size,
                    scales=spec.scales,
                    parts=parts,
                    pictures=shown,
                ),
            )
        else:  # rounded by each piece as it is built
            levels = pipeline.NearestLevels(adapter, spec)
            levels_key = cache_key({"rounding": "nearest", **source})
        run.phase("compile")
        setup = pipeline.PieceSetup(
            adapter, float_dir, work, tmp, tmp / "qdq" if opts["keep_qdq"] else work / "qdq",
            socs, opts["vtcm_mb"], pipeline.ModeChoice(opts["opt_mode"]), cache, versions,
            policy.emulated,
        )  # fmt: skip
        vision_rows: list[dict[str, Any]] = []
        features: list[Any] = []  # each picture's merged tokens from the vision binaries
        chained: list[pipeline.Prompt] = []  # picture -> vision binaries -> LM binaries
        if vision_ref is not None and vision_plan is not None and pictures is not None:
            vision_weights = vision_plan.scheme.weights
            vision_key = cache_key({"rounding": "nearest", **source, "vision": True,
                                    "bits": vision_weights.bits,
                                    "group_size": vision_weights.group_size})  # fmt: skip
            with parts.vision_tower():
                vision_rows, features = vision.build(
                    setup, pictures.geometry, vision_ref, vision_plan, vision_key, pixels
                )
            chained = [
                vision.chained_prompt(adapter, merged, *continuation)
                for merged, continuation in zip(features, continued, strict=True)
            ]
        rows, out = pipeline.build_all(
            setup, parts, golden, plan, levels, levels_key,
            checked + picture_checks + chained, lengths,
        )  # fmt: skip
        reused = cache.reused
        if reused:
            run.log(f"reused from an earlier run: {len(reused)} steps ({', '.join(reused)})")
        lowered = pipeline.lowered_pieces(rows)
        if lowered:
            run.log(
                f"OPT_MODE=auto: {len(lowered)} graphs finalized at mode 1, mode 3 ran out of "
                f"memory on them or on the same graph of an earlier layer: {', '.join(lowered)}"
            )
        run.phase("verify")
        e2e = pipeline.end_to_end(
            parts, out.prefill[: len(checked)], checked, graph=policy.chain_graph()
        )
        picture_e2e = image_chain = None
        if pictures is not None:
            shown = len(checked) + len(picture_checks)
            picture_e2e = {
                **pipeline.end_to_end(parts, out.prefill[len(checked) : shown], picture_checks),
                "images": [path.name for path in pictures.paths],
                "image_size": opts["image_size"],
                "prompt": pictures.check_prompt,
                "vision_tokens": [len(p.image.rows) for p in picture_checks if p.image],
            }
            image_chain = {
                **pipeline.end_to_end(parts, out.prefill[shown:], chained, out.decoded[shown:]),
                "generated_tokens": [len(p.decoded) for p in chained],
                "vision_merged_vs_torch": vision.merged_similarity(features, float_features),
                "vision_preset": vision_plan.scheme.name if vision_plan else None,
            }
        write_json_atomic(tmp / "model.int8.plan.json", mllm_plan)
        write_json_atomic(
            tmp / "shadow_layers.json",
            {
                "model": recipe.name,
                "t01m_clip_threshold": opts["t01m_clip_threshold"],
                "shadow_layers": mllm_plan["shadow_layers"],
                "summary": mllm_plan["summary"],
            },
        )
        mllm_int8.write_int8_mllm(tmp / "model.int8.mllm", parts, mllm_plan, stats)
        mllm = mllm_int8.check_int8_mllm(parts, mllm_plan, tmp / "model.int8.mllm", golden_ids)
        tokenizer_dir = write_tokenizer_dir(model_dir, tmp / "tokenizer")  # what the app reads
        tokenizer_check = check_packaged_tokenizer(
            recipe, tokenizer_dir, out_dir / "tokenizer", args.build_dir, args.model_path
        )
        processor_check = None
        if pictures is not None:  # the app prepares pictures as the model's processor does
            copy_processor_files(model_dir, tokenizer_dir)
            processor_check = check_packaged_processor(
                model_dir, tokenizer_dir, out_dir / "tokenizer", pictures.paths,
                pictures.geometry.size,
            )  # fmt: skip
        run.phase("package")
        shutil.rmtree(work)
        first = rows[0]["binaries"][socs[0].name]
        report = {
            "model": recipe.name,
            "preset": scheme.name,
            "rounding": opts["rounding"],
            "prefill_len": lengths[0],
            "kv_len": lengths[1],
            "soc_model": first["soc_model"],
            "htp_arch": first["htp_arch"],
            "socs": {s.name: {"soc_model": s.soc_model, "htp_arch": s.htp_arch} for s in socs},
            "qnn_version": versions["qnn_sdk"],
            "versions": versions,
            "layers": rows,
            "vision_pieces": vision_rows,
            "end_to_end": e2e,
            "picture_prompts": picture_e2e,
            "image_chain": image_chain,
            "float_linears": sorted(plan.float_linears()),
            "mllm_int8": mllm,
            "tokenizer": tokenizer_check,
            "processor": processor_check,
            "reused_from_cache": reused,
            "opt_mode": {"asked": opts["opt_mode"], "lowered_to_1": lowered},
            "verify": policy.to_json(),
            "notes": [note for note in [policy.note()] if note],
        }
        vision_limits = GATES[vision_plan.scheme.name] if vision_plan else None
        checks = rep.gates(report, GATES[scheme.name], MLLM_MAX_ABS, vision_limits)
        report["gates"] = records(checks)
        report["passed"] = all(g.passed for g in checks)
        report["resources"] = run.resources()  # the package phase up to this point
        write_json_atomic(tmp / "report.json", report)
        rep.plot_layers(vision_rows + rows, tmp / "layers.png")
        markdown = rep.render(report) + resources_line(report["resources"])
        write_bytes_atomic(tmp / "report.md", markdown.encode())
        manifest = build_manifest(
            step=TARGET,
            inputs=inputs,
            outputs=tmp,
            recipe=recipe.data,
            options=opts,
            toolchains=versions,
        )
        write_json_atomic(tmp / "manifest.json", manifest)
    cache.prune()  # the package is written: only this build's steps are worth keeping
    return report


def main(argv: list[str] | None = None) -> int:
    run = Run(TARGET, PHASES)
    report = build(parse_args(argv), run)
    run.finish()
    failed = failures(report["gates"])
    if failed:
        raise CheckFailed("; ".join(failed))
    scored = [r["cos_vs_float"] for r in report["layers"] if r["emulated"]]
    run.log(
        f"{report['model']}: {len(report['layers'])} pieces all on QNN, worst cos "
        f"{min(scored):.5f} ({len(scored)} on the emulator), end-to-end top-1 "
        f"{report['end_to_end']['top1_agreement']:.3f}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)

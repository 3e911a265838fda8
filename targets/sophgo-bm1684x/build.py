"""``make sophgo``: a llama/qwen2 checkpoint → one BM1684X bmodel, verified on the simulator.

Two routes build the bmodel. ``onnx`` (default): the model is cut into static ONNX pieces
(``common.export.piece_export``), each compiled by TPU-MLIR (``model_transform`` checked against
onnxruntime, ``model_deploy`` checked tpu-vs-top MLIR), up to one compile per core at once,
and combined into ``<model>_<mode>_seq<S>_1dev.bmodel``. ``llm_convert``: the vendor's
one-shot converter builds the bmodel straight from a half-precision copy of the checkpoint.
Either way the combined bmodel is then loaded once into tpu-mlir's chip simulator: every net
is run against the float ONNX pieces on onnxruntime (same inputs), and a greedy decode through
the simulated nets (prefill, then the KV-cache decode pieces) is compared token for token with
Hugging Face's greedy decode. Text models, Qwen1 included, are read one part at a time
(:mod:`common.models.streaming`): the float reference (:mod:`common.analysis.layerwise_decode`)
and the export hold one decoder layer or the embedding at a time, so the build holds the
largest part's export, the largest piece's compile or the simulated bmodel rather than
the float32 model (:func:`memory_estimate`); vision-language models and
``ROUTE=llm_convert`` still load it whole (:func:`layer_by_layer`). Under ``VERIFY=sample``
(on the onnx route) the simulator loads a bmodel of the simulated nets only
(:func:`verification_bmodel`); the shipped bmodel still holds every net.
The package — bmodel, tokenizer/config files, ``manifest.json``,
``report.json``/``report.md`` with per-step timings and, once both routes are built, a table
comparing them — lands in ``build/<MODEL>/sophgo-bm1684x/<mode>[-<chip>][-llm_convert]/``;
intermediates in ``.../work-<same>/``. Each compiled piece (bmodel and tool logs) is kept in
``.../compiled-<same>/<piece>.<key>/`` (:mod:`common.core.piece_cache`), keyed by its ONNX
bytes, options and toolchain, so a run that is killed or fails continues, when run again,
from the last complete piece; a successful run prunes the entries it did not use.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sophgo_verify import (
    ScoredRunner,
    VerifyPolicy,
    dispatch,
    first_mismatch,
    image_prompt_check,
    image_reference,
    kv_decode,
    prefill_greedy,
    verify_policy,
)

from common.backends.tpu_mlir import CHIPS, QUANTIZE, ROUTES, Toolchain, mode_scheme
from common.core.disk import DiskEstimate, disk_preflight
from common.core.errors import CheckFailed, EdgeforgeError, run_cli
from common.core.gates import failures, gate, markdown_table, records
from common.core.memory import Estimate, MemoryCap, room_bytes
from common.core.options import (
    Choice,
    FilePath,
    Integer,
    Text,
    option,
    resolve_target,
    target_parser,
)
from common.core.paths import REPO_ROOT
from common.core.piece_cache import PieceCache
from common.core.progress import progress
from common.core.records import atomic_path, build_manifest, dumps_json, tree_bytes
from common.core.resources import resources_line
from common.models.tokenizer_fidelity import copy_tokenizer_files, describe
from common.steps.phases import Run
from common.steps.preflight import max_memory_option, whole_model_preflight
from common.steps.verify_sampling import VERIFY_CHOICES

TARGET = "sophgo-bm1684x"
#: The phases of a run (common/steps/phases.py), in order.
PHASES = ("resolve", "reference", "export", "compile", "verify", "package")
DEFAULT_SEQ_LEN = 256
#: Minimum per-piece cosine (simulator vs onnxruntime) by mode, and whether the greedy
#: tokens must equal HF's: the issue's acceptance bars.
PIECE_GATE = {"bf16": 0.999, "f16": 0.999, "w8bf16": 0.99, "w4bf16": 0.95}
GREEDY_GATE = {"bf16": True, "f16": True, "w8bf16": False, "w4bf16": False}
#: ``ROUTE=llm_convert`` is the vendor's converter, built as its anchor: its greedy tokens
#: are reported, not gated (its bf16 attention differs from ours, so a near-tie step of the
#: float model can flip), and its teacher-forced logits must keep this cosine to HF's
#: instead, with the float model's own top-1 margin at the first flip in the report.
VENDOR_LOGITS_GATE = {"bf16": 0.995, "f16": 0.995, "w8bf16": 0.98, "w4bf16": 0.9}
#: HF files a runtime needs next to the bmodel (weights and our manifest excluded).
COPY_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")
#: Picture of the VL image-prompt check (shipped in data/images) and its square side: 112 px
#: is 4x4 merged tokens on the Qwen2-VL family.
VL_IMAGE = REPO_ROOT / "data" / "images" / "astronaut.jpg"
VL_IMAGE_SIZE = 112
#: The simulator's share of the float32 weights of the nets it loads (the whole combined
#: bmodel, or under VERIFY=sample the verification bmodel), bf16 in the largest mode.
SIMULATOR_SHARE = 0.5
#: What a whole-model build holds throughout, in multiples of the float32 model; beside
#: it, the simulator's bmodel or the largest compile (:func:`verify_or_compile`).
WHOLE_MODEL_COPIES = {"float32 model": 1.0}
#: Memory while one part's pieces are exported, in multiples of its float32 weights: the
#: part, the traced graph's constants, the ONNX model and its serialized bytes (measured
#: 4.1x for SmolLM2's 108 MiB embedding, 4.6x for a 256 MiB layer, 5.7x for a 64 MiB one).
EXPORT_FACTOR = 6
#: An onnxruntime session of a piece, in multiples of its float32 weights (measured 2.8x
#: for SmolLM2's embedding, 1.8x for a 256 MiB layer: a fixed part shrinks with size).
SESSION_FACTOR = 2
#: What to do when a layer-by-layer build does not fit: no option of its own lowers it.
LAYERWISE_REMEDY = (
    "no option of this step lowers it (its peaks are the largest part's export, the "
    "largest piece's compile and the simulator holding the bmodel it runs): free memory, "
    "use a machine with more, or set "
    "MAX_MEMORY to what you have to go ahead anyway"
)
#: What lowers the disk a layer-by-layer build needs.
DISK_REMEDY = (
    "free space there or set BUILD_DIR to a larger disk (the float ONNX pieces are removed "
    "once the package is written; MODE=w8bf16 or w4bf16 store a half or a quarter of bf16's "
    "block weights)"
)


@dataclass(frozen=True)
class Options:
    """Options of ``make sophgo`` (command line > recipe ``targets.sophgo-bm1684x`` > these)."""

    mode: str = option("bf16", Choice(tuple(QUANTIZE)), "precision", make="MODE", recipe=False)
    chip: str = option("bm1684x", Choice(CHIPS), "target chip", make="CHIP", recipe=False)
    route: str = option(
        "onnx",
        Choice(ROUTES),
        "onnx: our pieces through model_transform/model_deploy; llm_convert: the vendor's",
        make="ROUTE",
        recipe=False,
    )
    seq_len: int = option(DEFAULT_SEQ_LEN, Integer(2), "static context", make="SEQ_LEN")
    q_group_size: int = option(64, Integer(1), "W4/W8 weight group size", make="Q_GROUP_SIZE")
    decode_tokens: int | None = option(
        None,
        Integer(1),
        "tokens generated through the KV-cache decode nets (default: max-new-tokens)",
        make="DECODE_TOKENS",
        recipe=False,
    )
    prompt: str | None = option(
        None,
        Text(),
        "end-to-end check prompt (recipe eval prompt)",
        flag="--prompt",
        recipe=False,
    )
    max_new_tokens: int = option(
        32, Integer(1), "greedy tokens checked end to end", flag="--max-new-tokens", recipe=False
    )
    jobs: int | None = option(
        None, Integer(1), "parallel compiles (core count)", flag="--jobs", recipe=False
    )
    #: How much of the checks runs on the simulator (sophgo_verify.verify_policy): a full
    #: simulation of Qwen1.5-1.8B at seq 256 takes about 5 h on 2 cores, Qwen-7B's days.
    verify: str = option(
        "auto",
        Choice(VERIFY_CHOICES),
        "full: every net simulated; sample: first/middle/last blocks; auto: by cost",
        make="VERIFY",
        recipe=False,
    )
    venv: Path = option(
        REPO_ROOT / ".venv-tpu-mlir", FilePath(), "tpu-mlir venv", flag="--venv", recipe=False
    )
    max_memory: int | None = max_memory_option()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return target_parser("make sophgo", __doc__.split("\n\n")[0], Options).parse_args(argv)


def options_record(opts: Options) -> dict[str, Any]:
    """The options as the manifest and report record them (machine paths left out)."""
    return {
        "mode": opts.mode,
        "chip": opts.chip,
        "route": opts.route,
        "seq_len": opts.seq_len,
        "q_group_size": opts.q_group_size,
        "max_new_tokens": opts.max_new_tokens,
        "verify": opts.verify,
    }


def package_name(opts: dict[str, Any]) -> str:
    """``<mode>`` for the default chip and route, suffixed by any other chip or route, so
    builds that differ only there never overwrite each other."""
    name = opts["mode"]
    if opts["chip"] != "bm1684x":
        name += f"-{opts['chip']}"
    if opts["route"] != "onnx":
        name += f"-{opts['route']}"
    return name


class Stopwatch:
    """Wall seconds per named step, in order (the report's timing table)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = time.monotonic()

    def lap(self, step: str) -> float:
        now = time.monotonic()
        self.seconds[step] = round(now - self._mark, 1)
        self._mark = now
        return self.seconds[step]


def route_table(reports: list[dict[str, Any]]) -> list[str]:
    """Markdown comparing builds of the same model/mode/chip/seq by route: totals, then
    per-piece cosine side by side."""
    lines = [
        "| route | build (s) | bmodel bytes | min piece cos | greedy match |",
        "|---|---|---|---|---|",
    ]
    for rep in reports:
        worst = min(piece["cos"] for piece in rep["pieces"] if piece["cos"] is not None)
        lines.append(
            f"| {rep['route']} | {rep['build_seconds']:.0f} | {rep['bmodel_bytes']:,} | "
            f"{worst:.6f} | {rep['greedy_match_tokens']}/{rep['greedy_total_tokens']} |"
        )
    names = [piece["name"] for piece in reports[0]["pieces"]]
    for rep in reports[1:]:
        names += [p["name"] for p in rep["pieces"] if p["name"] not in names]
    cos = [{p["name"]: p["cos"] for p in rep["pieces"]} for rep in reports]
    lines += ["", "| piece | " + " | ".join(r["route"] for r in reports) + " |"]
    lines.append("|---|" + "---|" * len(reports))
    for name in names:
        cells = [f"{c[name]:.6f}" if c.get(name) is not None else "—" for c in cos]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def report_markdown(report: dict[str, Any], others: list[dict[str, Any]]) -> str:
    lines = [
        f"# {report['model']} → {report['chip']} {report['mode']} (seq {report['seq_len']}, "
        f"route {report['route']})",
        "",
        f"tpu-mlir {report['tpu_mlir_version']}; bmodel `{report['bmodel']}` "
        f"({report['bmodel_bytes']:,} bytes); build {report['build_seconds']:.0f} s.",
        "",
        f"Greedy tokens on the simulator vs Hugging Face: prefill nets (teacher-forced) "
        f"{report['greedy_match_tokens']}/{report['greedy_total_tokens']} equal, logits min cos "
        f"{report['decode_logits_cos_min']:.6f}; KV-cache decode loop "
        f"{report['kv_decode_match_tokens']}/{report['kv_decode_total_tokens']} equal. Gate "
        f"{'passed' if report['passed'] else 'FAILED'}.",
        "",
        f"Packaged tokenizer: {describe(report['tokenizer'])}.",
        "",
        *markdown_table(report["gates"]),
        "",
        "Per piece: cosine of the simulated net vs the float ONNX piece on onnxruntime, on the"
        " same inputs — those of its first call in the greedy run (prefill: the rows a"
        " runtime reads), or deterministic example inputs for nets the run does not call.",
        "",
        "| piece | cos (simulator vs onnxruntime) | inputs | tool compares (cos) | compile s |",
        "|---|---|---|---|---|",
    ]
    for piece in report["pieces"]:
        tools = ", ".join(f"{c:.6f}" for c in piece["tool_cos"]) or "—"
        spent = "+".join(f"{s:.0f}" for s in piece["compile_seconds"]) or "—"
        cos = "—" if piece["cos"] is None else f"{piece['cos']:.6f}"
        lines.append(f"| {piece['name']} | {cos} | {piece['inputs']} | {tools} | {spent} |")
    lines += ["", "| step | wall s |", "|---|---|"]
    lines += [f"| {step} | {sec:.1f} |" for step, sec in report["timings"].items()]
    lines += ["", "| simulated net kind | calls | mean s |", "|---|---|---|"]
    for kind, (calls, mean) in report["simulator_calls"].items():
        lines.append(f"| {kind} | {calls} | {mean:.2f} |")
    if report.get("image_prompt"):
        image = report["image_prompt"]
        lines += [
            "",
            f"Image prompt ({image['image']} at {image['image_size']} px = "
            f"{image['image_tokens']} vision tokens from the float HF tower, 3-row M-RoPE "
            f"positions; {image['prompt_tokens']} prompt tokens): KV-cache decode "
            f"{image['greedy_match_tokens']}/{len(image['reference_tokens'])} tokens equal to "
            f"Hugging Face, logits min cos {image['logits_cos_min']:.6f}.",
        ]
    for note in report["notes"]:
        lines += ["", note]
    if others:
        lines += ["", "## Routes side by side", "", *route_table([report, *others])]
    return "\n".join(lines) + "\n"


def sibling_reports(root: Path, opts: dict[str, Any], seq_len: int) -> list[dict[str, Any]]:
    """Reports of the other routes for the same mode, chip and context (already built)."""
    found = []
    for route in ROUTES:
        if route == opts["route"]:
            continue
        path = root / package_name({**opts, "route": route}) / "report.json"
        if path.is_file():
            other = json.loads(path.read_text())
            if other.get("seq_len") == seq_len and "build_seconds" in other:
                found.append(other)
    return found


def counted(run: Any, bar: Any) -> Any:
    """``run`` that advances ``bar`` once per net call (the progress of a long simulation)."""

    def call(name: str, inputs: dict[str, Any]) -> Any:
        outputs = run(name, inputs)
        bar.update(1)
        return outputs

    return call


def piece_inputs(name: str, greedy: dict[str, float], scores: dict[str, float]) -> str:
    """What a piece's simulator score was measured on, for the report's table."""
    if name in greedy:
        return "greedy run"
    return "example" if name in scores else "not simulated (VERIFY=sample)"


def net_kind(name: str) -> str:
    """``block_cache_3`` → ``block_cache``: simulator calls are summarised per kind."""
    return name.rstrip("0123456789").rstrip("_") or name


def layer_by_layer(route: str) -> bool:
    """Whether the build reads the model one part at a time (:mod:`common.models.streaming`)
    instead of loading it whole. Every model does — text, Qwen1 (its patched copy is
    exported part by part, ``qwen1.export_patched``) and vision-language (the image-prompt
    check reads the vision tower, then the language layers) — except on
    ``ROUTE=llm_convert`` (the vendor's converter reads a whole half-precision copy, which
    :func:`~common.backends.tpu_mlir.save_half_checkpoint` writes from the loaded model)."""
    return route == "onnx"


def largest_compile(streamed: Any) -> dict[str, int]:
    """The largest piece's tpu-mlir compile (:func:`~common.backends.tpu_mlir.compile_bytes`:
    a block over its layer's weights, the embedding and LM head pieces over theirs). The
    build admits compiles while they fit the memory left (``compile_pieces``' budget), so
    the largest one on its own is the phase's peak when the cap is tight."""
    from common.backends.tpu_mlir import compile_bytes

    adapter = streamed.adapter
    layer = streamed.largest_layer_bytes()
    embedding = streamed.part_bytes(adapter.name_of("embed_tokens"))
    head = embedding if streamed.tied else streamed.part_bytes(adapter.lm_head_path)
    compiles = {
        "block": compile_bytes("block", layer),
        "embedding": compile_bytes("embedding", embedding),
        "lm_head": compile_bytes("lm_head", head),
    }
    kind = max(compiles, key=compiles.__getitem__)
    return {f"tpu-mlir compiling the largest piece ({kind})": compiles[kind]}


def simulated_bytes(streamed: Any, sampled: Collection[int] | None) -> int:
    """float32 bytes of the weights in the bmodel the simulator loads: the whole model, or
    with ``sampled`` blocks (``VERIFY=sample``) the verification bmodel of the simulated
    nets only, without the other layers (:func:`verification_bmodel`)."""
    total = streamed.weights.nbytes("")
    if sampled is None:
        return total
    left_out = [layer for layer in streamed.adapter.layers() if layer.index not in sampled]
    return total - sum(streamed.part_bytes(layer.name) for layer in left_out)


def verify_or_compile(
    streamed: Any, beside: Mapping[str, int], sampled: Collection[int] | None = None
) -> dict[str, int]:
    """The larger of the verify phase (the simulator holding its bf16 bmodel, the whole
    one or, with ``sampled`` blocks, the verification bmodel: :func:`simulated_bytes`,
    with ``beside`` held next to it) and the compile phase (:func:`largest_compile`)."""
    simulator = int(SIMULATOR_SHARE * simulated_bytes(streamed, sampled))
    what = "simulator (bf16 bmodel)"
    if sampled is not None:
        what = f"simulator (bf16 bmodel of the sampled nets, blocks {list(sampled)})"
    verify = {what: simulator, **beside}
    return max((verify, largest_compile(streamed)), key=lambda phase: sum(phase.values()))


def memory_estimate(streamed: Any, sampled: Collection[int] | None = None) -> Estimate:
    """The largest of a layer-by-layer build's three peaks: exporting the largest part's
    pieces (:data:`EXPORT_FACTOR`), compiling the largest piece (:func:`largest_compile`),
    and verifying, when the simulator holds its bmodel (the whole one, or under
    ``VERIFY=sample`` the ``sampled`` blocks' verification bmodel) beside one onnxruntime
    session of the largest piece (:data:`SESSION_FACTOR`). Each with the pages of a
    pickled ``.bin`` checkpoint mapped. The float reference holds one part and a small KV
    cache, a VL model's vision tower while its image prompt's features are computed."""
    largest = streamed.largest_part_bytes()
    tower = streamed.vision_tower_bytes()
    reference = {"vision tower read for the image reference (float32)": tower}
    mapped = {"pickled .bin pages (mapped)": streamed.weights.mapped_bytes}
    export = {
        f"largest part exported ({EXPORT_FACTOR}x its float32 weights)": EXPORT_FACTOR * largest
    }
    session = {
        f"onnxruntime session of the largest piece ({SESSION_FACTOR}x)": SESSION_FACTOR * largest
    }
    later = verify_or_compile(streamed, session, sampled)
    peak = max((export, later, reference), key=lambda phase: sum(phase.values()))
    return Estimate("make sophgo (one layer at a time)", {**peak, **mapped})


#: The chip's kernel module every compiled piece carries (tpu-mlir 1.30.2: 5,598,792 bytes);
#: ``model_tool --combine`` stores it once.
KERNEL_MODULE_BYTES = 5_600_000


def stored_bytes_per_float(weights: Any) -> float:
    """Bytes a bmodel stores per float32 byte of ``weights`` (a scheme's :class:`Weights`):
    half types 2 of 4; int8/int4 their width plus a bf16 scale and a zero point per group."""
    if weights.bits is None:
        return 0.5
    per_group = 3 / weights.group_size if weights.group_size else 0.0
    return (weights.bits / 8 + per_group) / 4


def disk_estimate(
    streamed: Any, mode: str, q_group_size: int, sampled: Collection[int] | None, reused: int
) -> DiskEstimate:
    """What a layer-by-layer ``make sophgo`` holds on disk at its fullest, the verify phase:
    the float ONNX pieces (float32, each layer and the embedding twice: prefill and decode
    graphs), the compiled pieces (each its own kernel module and weights at the mode's width),
    the combined bmodel (``model_tool --combine`` stores a layer's weights once for both of
    its graphs: measured on tiny-qwen2, 0.50 MB of weights for 0.77 MB of pieces) and, with
    ``sampled`` blocks, the verification bmodel. ``reused``: compiled pieces already on disk."""
    scheme = mode_scheme(mode, q_group_size)
    adapter = streamed.adapter
    embedding = streamed.part_bytes(adapter.name_of("embed_tokens"))
    head = embedding if streamed.tied else streamed.part_bytes(adapter.lm_head_path)
    layers = {layer.index: streamed.part_bytes(layer.name) for layer in adapter.layers()}
    embedded = 0.5 * embedding  # the embedding nets keep the half type in every mode
    stored = {i: stored_bytes_per_float(scheme.weights) * n for i, n in layers.items()}
    headed = stored_bytes_per_float(scheme.weight("lm_head")) * head

    def bmodel(blocks: Collection[int]) -> int:
        return int(embedded + sum(stored[i] for i in blocks) + headed) + KERNEL_MODULE_BYTES

    pieces = 2 * len(layers) + 5  # both graphs of each layer and the embedding, three heads
    parts = {
        "float ONNX pieces": 2 * embedding + 2 * sum(layers.values()) + head,
        "compiled pieces": int(2 * embedded + 2 * sum(stored.values()) + headed)
        + pieces * KERNEL_MODULE_BYTES,
        "combined bmodel": bmodel(layers),
    }
    if sampled is not None:
        parts["verification bmodel"] = bmodel(sampled)
    return DiskEstimate("make sophgo (one layer at a time)", parts, reused)


def verify_policy_of(options: Options, adapter: Any, dims: Any, decode_tokens: int) -> VerifyPolicy:
    """``VERIFY=``'s policy for this model, known before any weight is read (the shapes
    suffice, a model on meta will do): the preflight counts the bmodel it simulates. The
    checks read ``max_new_tokens`` teacher-forced rows, as many as the reference gives."""
    return verify_policy(
        options.verify,
        dims.num_layers,
        sum(p.numel() for p in adapter.layers()[0].module.parameters()),
        adapter.lm_head().weight.numel(),
        dims.seq_len,
        options.max_new_tokens,
        decode_tokens,
    )


def sampled_blocks(policy: VerifyPolicy) -> tuple[int, ...] | None:
    """The blocks of the verification bmodel, or None when the simulator loads the whole
    bmodel (``VERIFY=full``)."""
    return policy.blocks if policy.mode == "sample" else None


def verification_bmodel(
    toolchain: Toolchain, builds: Sequence[Any], policy: VerifyPolicy, workdir: Path
) -> Path:
    """Under ``VERIFY=sample``, the nets the simulator runs (embedding, heads, the sampled
    blocks) combined into a bmodel of their own, from the same compiled pieces and by the
    same ``model_tool --combine`` as the shipped one: the simulator then holds those nets'
    weights (a few GiB at 7B) instead of the whole bmodel's (14 GiB). The shipped bmodel
    is combined from every piece, unchanged."""
    from common.backends.tpu_mlir import combine

    workdir.mkdir(parents=True, exist_ok=True)
    nets = [build.bmodel for build in builds if policy.simulated(build.name)]
    return combine(toolchain, nets, workdir / "verify.bmodel", workdir)


def main(argv: list[str] | None = None) -> int:
    import torch

    from common.analysis import layerwise_decode
    from common.analysis.eval import prompt_ids
    from common.analysis.layerwise import Parts
    from common.backends.tpu_mlir import (
        Simulator,
        bmodel_plan,
        combine,
        compile_pieces,
        fused_norm_reference,
        run_llm_convert,
        save_half_checkpoint,
    )
    from common.core.recipes import load_recipe, model_build_dir
    from common.export.piece_export import (
        compare_runners,
        cosine,
        export_pieces,
        onnx_runner,
        reference_greedy,
        reference_logits,
    )
    from common.models import get_adapter, iter_linears
    from common.models.loading import load_model, load_tokenizer
    from common.models.qwen import load_qwen_tokenizer
    from common.models.static_decoder import piece_dims
    from common.models.streaming import StreamedModel
    from common.steps.model_build import build_model, check_packaged_tokenizer

    args = parse_args(argv)
    run = Run("sophgo", PHASES)
    run.phase("resolve")
    recipe = load_recipe(args.model)
    options = resolve_target(Options, args, recipe, TARGET)
    opts = options_record(options)
    toolchain = Toolchain(options.venv)
    version = toolchain.version()
    model_dir = build_model(recipe, args.build_dir, args.model_path)
    decode_tokens = options.decode_tokens or options.max_new_tokens
    if decode_tokens > options.max_new_tokens:
        raise EdgeforgeError(
            f"DECODE_TOKENS={decode_tokens}: expected 1..max_new_tokens ({options.max_new_tokens})"
        )
    qwen1 = None
    if recipe.model_type == "qwen":  # remote code: patched copy, own pieces (qwen1.py)
        import qwen1

        qwen1.check_route(opts["route"])  # before any estimate: "not supported", not "too big"
    parts = None  # the parts of a model read one at a time; else ``model`` is whole
    root = model_build_dir(recipe, args.build_dir) / TARGET
    label = package_name(opts)
    if layer_by_layer(opts["route"]):
        streamed = StreamedModel(model_dir, trust_remote_code=recipe.trust_remote_code)
        adapter = streamed.adapter
        # Refuses what the pieces cannot compute (sliding windows, soft-capping): the
        # attention that layer-by-layer runs refuse too (StreamedModel.check_layerwise).
        # Qwen1's limit is its trained context, past which its own code changes rotary.
        if qwen1 is not None:
            dims = qwen1.qwen1_dims(adapter, opts["seq_len"])
        else:
            dims = piece_dims(adapter, opts["seq_len"])
        policy = verify_policy_of(options, adapter, dims, decode_tokens)
        run.preflight(
            memory_estimate(streamed, sampled_blocks(policy)),
            MemoryCap.resolve(options.max_memory),
            LAYERWISE_REMEDY,
        )
        disk = disk_estimate(
            streamed, opts["mode"], opts["q_group_size"], sampled_blocks(policy),
            tree_bytes(root / f"compiled-{label}"),
        )  # fmt: skip
        disk_preflight(disk, root, DISK_REMEDY)
        run.log(f"disk: needs about {disk.describe()} under {root}")
        parts = Parts(adapter, streamed)
        tokenizer = load_qwen_tokenizer(model_dir) if qwen1 else load_tokenizer(model_dir)
    else:
        whole_model_preflight(
            run,
            model_dir,
            "make sophgo",
            options.max_memory,
            WHOLE_MODEL_COPIES,
            held=verify_or_compile(StreamedModel(model_dir), {}),
        )
        model = load_model(model_dir)
        adapter = get_adapter(model)
        dims = piece_dims(adapter, opts["seq_len"])
        policy = verify_policy_of(options, adapter, dims, decode_tokens)
        tokenizer = load_tokenizer(model_dir)
    # The language model's linears, named in the plan written beside the bmodel.
    linears = [(name, role) for name, role, _ in iter_linears(adapter)]
    prompt = options.prompt or recipe.eval_defaults.get("prompt", "What is the capital of France?")
    ids = prompt_ids(tokenizer, prompt)
    if ids.shape[1] + options.max_new_tokens - 1 > dims.seq_len:
        raise EdgeforgeError(
            f"SEQ_LEN={dims.seq_len} is too short for the check: prompt ({ids.shape[1]} "
            f"tokens) + max_new_tokens ({options.max_new_tokens})"
        )

    prompt_list = ids[0].tolist()
    image_inputs = None
    if adapter.is_vision_language:  # image prompt too; fits SEQ_LEN?
        from common.export.vision_export import image_prompt_inputs
        from common.models.loading import load_processor

        processor = load_processor(model_dir)
        image_inputs = image_prompt_inputs(processor, [prompt], [VL_IMAGE], VL_IMAGE_SIZE)[0][0]
        length = image_inputs["input_ids"].shape[1]
        if length + decode_tokens > dims.seq_len:
            raise EdgeforgeError(
                f"SEQ_LEN={dims.seq_len} is too short for the image check: prompt ({length} "
                f"tokens with the picture) + {decode_tokens} new tokens"
            )
    run.phase("reference")
    if parts is not None:  # each new token reads every part again (layerwise_decode)
        with progress(total=options.max_new_tokens, desc="reference greedy", unit="token") as bar:
            expected = layerwise_decode.reference_greedy(
                parts, ids, options.max_new_tokens, bar=bar
            )
        ref_logits = layerwise_decode.reference_logits(parts, ids, expected)
    else:
        with torch.no_grad():
            expected = reference_greedy(model, ids, options.max_new_tokens)
            ref_logits = reference_logits(model, ids, expected)
    image_ref = None
    if image_inputs is not None:  # the vision tower, then the language model's parts
        image_ref = image_reference(parts or Parts(adapter), image_inputs, decode_tokens)

    work = root / f"work-{label}"
    shutil.rmtree(work, ignore_errors=True)
    # Compiled pieces outlive a killed run: the next one continues from the last complete one.
    compiled = PieceCache(root / f"compiled-{label}")
    bmodel_name = f"{recipe.name}_{opts['mode']}_seq{dims.seq_len}_1dev.bmodel"
    watch = Stopwatch()
    run.phase("export")
    run.log(f"exporting pieces (seq {dims.seq_len}) to {work / 'onnx'}")
    if qwen1 is not None:  # the patched copy, one part at a time
        pieces = qwen1.export_patched(model_dir, dims.seq_len, work)
    else:
        pieces = export_pieces(adapter, dims.seq_len, work / "onnx", parts=parts)
    watch.lap("export onnx pieces")
    # One float session open at a time: ScoredRunner and compare_runners ask the reference
    # once per net, so each piece's session opens once and closes when the next one opens.
    reference = onnx_runner(work / "onnx")
    run.phase("compile")
    notes: list[str] = []
    compile_info: dict[str, tuple[list[float], list[float]]] = {}
    if opts["route"] == "onnx":
        builds = compile_pieces(
            toolchain, pieces, dims.vocab_size, opts["mode"], opts["chip"], compiled,
            options.jobs, opts["q_group_size"], room_bytes(options.max_memory),
        )  # fmt: skip
        compile_info = {b.name: ([c.cos for c in b.compares], list(b.seconds)) for b in builds}
        reused = f" ({len(compiled.reused)} reused from an earlier run)" if compiled.reused else ""
        run.log(f"compiled {len(builds)} pieces{reused} in {watch.lap('compile pieces'):.0f} s")
        bmodel = combine(toolchain, [b.bmodel for b in builds], work / bmodel_name, work)
        watch.lap("combine")
        notes.append(
            "model_deploy ran with --skip_validation: its tpu-MLIR-vs-top compare is kept (the "
            "tool compares column), its bmodel simulation is not, because every net of the "
            "combined bmodel is simulated against onnxruntime below."
        )
    else:
        half = save_half_checkpoint(model_dir, work / "hf-half", opts["mode"], COPY_SUFFIXES)
        watch.lap("save half checkpoint")
        bmodel = run_llm_convert(
            toolchain, half, dims.seq_len, opts["mode"], opts["chip"], opts["q_group_size"],
            work,
        )  # fmt: skip
        run.log(f"llm_convert built {bmodel.name} in {watch.lap('llm_convert'):.0f} s")
        reference = fused_norm_reference(reference, adapter, dims.num_layers)
        notes.append(
            "llm_convert folds the final norm into the last block and makes lm_head a bare "
            "projection; the float reference is rearranged the same way (same math). Its "
            "sample head has another signature, so penalty_sample_head is not compared."
        )
    # What building the bmodel cost (the llm_convert route exports ONNX only as reference).
    build_steps = ("export onnx pieces", "compile pieces", "combine")
    if opts["route"] != "onnx":
        build_steps = ("save half checkpoint", "llm_convert")
    build_seconds = sum(watch.seconds[step] for step in build_steps)
    run.phase("verify")
    simulated = bmodel
    if opts["route"] == "onnx" and policy.mode == "sample":
        simulated = verification_bmodel(toolchain, builds, policy, work / "verify-bmodel")
        watch.lap("combine the verification bmodel")
    run.log(
        f"VERIFY={policy.mode} ({policy.reason}): blocks {list(policy.blocks)} on the "
        f"simulator, {policy.decode_tokens} decode steps, about "
        f"{policy.estimated_seconds / 60:.0f} min"
    )
    with Simulator(toolchain, simulated, work / "simulator") as sim:
        watch.lap("simulator load")
        # The shipped bmodel's nets: every piece on the onnx route (the simulator may hold
        # only the sampled ones), the vendor's own set on llm_convert.
        checked = pieces if opts["route"] == "onnx" else [p for p in pieces if p.name in sim.nets]
        simulator_nets = sorted(sim.nets)
        # One bar over every simulated call of the greedy run (seconds each on the chip model).
        layers = len(policy.blocks)
        total = 1 + layers + len(expected) + (policy.decode_tokens - 1) * (layers + 3)
        bar = progress(total=total, desc="simulate", unit="net")
        # Nets the policy leaves out run float in the same chain and are not scored.
        chain = dispatch(policy, counted(sim, bar), reference)
        scored = ScoredRunner(chain, reference, policy.simulated)
        prefill_tokens, step_logits, *cache = prefill_greedy(scored, dims, prompt_list, expected)
        watch.lap("simulate greedy (prefill, teacher-forced)")
        decoded = kv_decode(
            scored, dims, len(prompt_list), prefill_tokens[0], (cache[0], cache[1]),
            policy.decode_tokens,
        )  # fmt: skip
        bar.close()
        watch.lap("simulate greedy (kv-cache decode)")
        image = None
        if image_inputs is not None:
            image = image_prompt_check(scored, image_ref, dims, policy.decode_tokens)
            image |= {"image": VL_IMAGE.name, "image_size": VL_IMAGE_SIZE}
            watch.lap("simulate image prompt (kv-cache decode)")
        rest = [
            piece
            for piece in checked
            if piece.name not in scored.scores and policy.simulated(piece.name)
        ]
        scores = scored.scores | compare_runners(sim, reference, rest, dims.vocab_size)
        watch.lap("simulate other pieces vs onnxruntime")
        calls: dict[str, list[float]] = {}
        for name, spent in sim.calls.items():
            calls.setdefault(net_kind(name), []).extend(spent)
    matched = first_mismatch(prefill_tokens, expected)
    decode_expected = expected[: policy.decode_tokens]
    decode_matched = first_mismatch(decoded, decode_expected)
    step_cos = [cosine(a, b) for a, b in zip(step_logits, ref_logits, strict=True)]
    piece_floor = PIECE_GATE[opts["mode"]]
    low = [name for name, cos in scores.items() if cos < piece_floor]
    checks = [
        gate("min_piece_cos", min(scores.values()), ">=", piece_floor,
             f"below: {', '.join(low)}" if low else None),
    ]  # fmt: skip
    greedy_gated = GREEDY_GATE[opts["mode"]] and opts["route"] == "onnx"
    if greedy_gated:
        checks.append(gate("greedy_prefill_match_tokens", matched, "==", len(expected)))
        if image:
            total = len(image["reference_tokens"])
            checks.append(gate("image_greedy_match_tokens", image["greedy_match_tokens"], "==",
                               total))  # fmt: skip
        checks.append(gate("kv_decode_match_tokens", decode_matched, "==", len(decode_expected)))
    flip_margin = None
    if matched < len(expected):  # how close the float model itself was to the flipped token
        row = ref_logits[matched]
        flip_margin = float(row[expected[matched]] - row[prefill_tokens[matched]])
    if opts["route"] != "onnx":
        logits_gate = VENDOR_LOGITS_GATE[opts["mode"]]
        checks.append(gate("teacher_forced_logits_cos_min", min(step_cos), ">=", logits_gate))
        note = (
            f"Vendor route: greedy tokens are reported, not gated; the gate is per-piece cos "
            f">= {piece_floor} and teacher-forced logits cos >= {logits_gate} against Hugging "
            "Face."
        )
        if flip_margin is not None:
            note += (
                f" First flip at token {matched}: the float model's own logit margin between "
                f"its token and the simulator's is {flip_margin:.4f}."
            )
        notes.append(note)

    if policy.mode == "sample":
        notes.append(
            f"VERIFY=sample ({policy.reason}): blocks {list(policy.blocks)} of "
            f"{dims.num_layers} ran on the simulator, the others on onnxruntime (float) in "
            f"the same chain, so the greedy tokens check the sampled nets in context, not the "
            f"whole bmodel; {policy.decode_tokens} decode steps. The other blocks are "
            "compiled and passed tpu-mlir's own compares (tool column); a full simulation "
            f"would take about {policy.estimated_full_seconds / 3600:.1f} h (VERIFY=full)."
        )
        if simulated != bmodel:
            notes.append(
                f"The simulator loaded {simulated.name} ({simulated.stat().st_size:,} bytes): "
                "the simulated nets combined from the same compiled pieces by the same "
                f"model_tool --combine as {bmodel_name}, which ships with every net."
            )
    out = root / label
    run.phase("package")
    others = sibling_reports(root, opts, dims.seq_len)
    simulated_size = simulated.stat().st_size  # before the move: it may be the bmodel
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        # Moved, not copied: the work folder is rebuilt by every run, and at 7B (bf16) the
        # combined bmodel is about 15 GB.
        bmodel.replace(tmp / bmodel_name)
        for path in sorted(model_dir.iterdir()):
            if path.suffix in COPY_SUFFIXES and path.name != "manifest.json":
                shutil.copy2(path, tmp / path.name)
        copy_tokenizer_files(model_dir, tmp)  # with any tokenizer code (Qwen-7B's)
        plan = bmodel_plan(
            opts["mode"], opts["q_group_size"], opts["route"], linears, f"{recipe.name}-{label}"
        )
        (tmp / "quant_plan.json").write_text(dumps_json(plan))
        tokenizer_check = check_packaged_tokenizer(
            recipe, tmp, out, args.build_dir, args.model_path
        )
        watch.lap("package")
        report = {
            "model": recipe.name,
            "mode": opts["mode"],
            "chip": opts["chip"],
            "route": opts["route"],
            "seq_len": dims.seq_len,
            "q_group_size": opts["q_group_size"],
            "tpu_mlir_version": version,
            "bmodel": bmodel_name,
            "bmodel_bytes": (tmp / bmodel_name).stat().st_size,
            "build_seconds": round(build_seconds, 1),
            "timings": watch.seconds,
            "simulator_calls": {
                kind: [len(spent), round(sum(spent) / len(spent), 3)]
                for kind, spent in calls.items()
            },
            "verify": {
                **policy.to_json(),
                "simulated_bmodel": simulated.name,
                "simulated_bmodel_bytes": simulated_size,
                "simulated_bmodel_nets": simulator_nets,
            },
            "pieces": [
                {
                    "name": piece.name,
                    "cos": scores.get(piece.name),
                    "inputs": piece_inputs(piece.name, scored.scores, scores),
                    "tool_cos": compile_info.get(piece.name, ([], []))[0],
                    "compile_seconds": compile_info.get(piece.name, ([], []))[1],
                }
                for piece in checked
            ],
            "piece_gate": piece_floor,
            "prompt": prompt,
            "greedy_tokens": prefill_tokens,
            "reference_tokens": expected,
            "greedy_match_tokens": matched,
            "greedy_total_tokens": len(expected),
            "greedy_gated": greedy_gated,
            "first_flip_float_margin": flip_margin,
            "decode_logits_cos_min": min(step_cos),
            "kv_decode_tokens": decoded,
            "image_prompt": image,
            "tokenizer": tokenizer_check,
            "kv_decode_match_tokens": decode_matched,
            "kv_decode_total_tokens": len(decode_expected),
            "notes": notes,
            "routes_compared": [other["route"] for other in others],
            "compiled_pieces_reused": compiled.reused,
            "gates": records(checks),
            "passed": all(g.passed for g in checks),
        }
        report["resources"] = run.resources()  # the package phase up to this point
        (tmp / "report.json").write_text(dumps_json(report))
        markdown = report_markdown(report, others) + resources_line(report["resources"])
        (tmp / "report.md").write_text(markdown)
        manifest = build_manifest(
            step="sophgo", outputs=tmp, recipe=recipe.data,
            inputs={"model": model_dir, **({"patches": qwen1.PATCH_DIR} if qwen1 else {})},
            options=opts, toolchains={"tpu_mlir": version},
        )  # fmt: skip
        (tmp / "manifest.json").write_text(dumps_json(manifest))
    compiled.prune()  # the package is written: only this build's pieces are worth keeping
    # The float ONNX pieces (4 bytes a weight, every layer twice: about 60 GB at 7B) served
    # this run only: the next one exports into a fresh work folder. The simulated bmodel the
    # report names and the tools' logs stay.
    shutil.rmtree(work / "onnx", ignore_errors=True)
    worst = min(scores.values())
    run.finish()
    run.log(
        f"wrote {out} (greedy {matched}/{len(expected)}, kv decode "
        f"{decode_matched}/{len(decode_expected)}, min piece cos {worst:.6f})"
    )
    failed = failures(checks)
    if failed:
        raise CheckFailed(f"{out}/report.md: below the {opts['mode']} gate: {'; '.join(failed)}")
    return 0


if __name__ == "__main__":
    run_cli(main)

"""Per-piece QDQ → EPContext → emulator verification, and the end-to-end chain.

Every decoder layer is exported twice by :mod:`common.export.piece_export` (prefill ``block_i``
of ``PREFILL_LEN`` = ``P`` tokens; decode ``block_cache_i`` of one token over a static
``KV_LEN``-row KV cache; finite −1e4 masks), plus ``lm_head``. Golden inputs are captured
by running the float pieces on onnxruntime CPU over one held-out window of ``P + 1``
tokens (prefill over ``P``, one decode step for the token after them, whose history is the
prefill's K/V in the first ``P`` rows of the ``KV_LEN`` cache); calibration inputs (for
activations the profile does not cover) over a few calibration windows. Each QDQ piece is compiled
for every requested SoC, its binary's metadata is asserted, and the first SoC's binary
is run on the HTP emulator in a strict session: cosine vs the float piece and vs the same
QDQ model on CPU. The prefill binaries are also chained from the embedding to the last
layer, and the final norm + LM head are applied on the host in float (where the mllm
runtime runs them), giving end-to-end logits to compare with the FP32 model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.analysis.accuracy import accuracy_block
from common.analysis.eval import LogitComparison
from common.analysis.layerwise import Parts, head, run_groups, run_layers
from common.analysis.layerwise_decode import VisualPrompt, prompt_group
from common.backends import qdq, qnn_ep
from common.core.piece_cache import PieceCache, cache_key
from common.core.progress import progress
from common.export import onnx_files
from common.export import piece_export as pe
from common.models import ModelAdapter, iter_linears
from common.models.static_decoder import MROPE_ROWS
from common.quant.schemes import Weights

Feeds = dict[str, np.ndarray]


@dataclass
class Golden:
    """Per piece: the golden input, the float output, and calibration inputs."""

    inputs: dict[str, Feeds]
    outputs: dict[str, list[np.ndarray]]
    calibration: dict[str, list[Feeds]]


#: Calibration rows/steps per calibration window for the one-token graphs (decode blocks,
#: LM head): a MinMax range from one token per window misses the next token's values.
CALIB_POSITIONS = 8
#: Layout version of a cached piece (:func:`build_all`): bump it when :func:`build_piece`
#: writes other files or other bytes for the same inputs, so no older entry is reused.
PIECE_FORMAT = 5  # 2: binaries compiled from bytes in their own process; 3: OPT_MODE lowering;
#                  4: a graph starts at mode 1 once its twin of an earlier layer ran out at 3;
#                  5: every output of each chained input is kept (the K/V the decode check reads)
#: The folder of a piece's entry that holds its QDQ model (the others are one per SoC).
QDQ_FOLDER = "qdq"


#: Modes to try per SoC name, and why a lower one is where they start (None: it is not).
Modes = dict[str, tuple[tuple[int, ...], str | None]]


class ModeChoice:
    """The HTP optimization modes each graph is compiled at. ``OPT_MODE=auto`` tries mode 3,
    then 1 where finalization runs out of memory; a graph whose twin in an earlier layer
    (the same piece kind: the same ops and shapes, other weights, so the same finalizer
    memory) ran out on that SoC starts at 1, naming the twin, instead of running out
    again: one failed finalization per piece kind, not one per layer (every block of
    Qwen1.5-1.8B runs out at 3). A numbered ``OPT_MODE`` is the one mode for every graph."""

    def __init__(self, opt_mode: int | str) -> None:
        auto = opt_mode == qnn_ep.AUTO_OPT_MODE
        self.modes = qnn_ep.AUTO_OPT_MODES if auto else (int(opt_mode),)
        self._ran_out: dict[tuple[str, str], str] = {}  # (piece kind, SoC) -> first piece

    def of(self, name: str, socs: Sequence[qnn_ep.Soc]) -> Modes:
        """The modes of piece ``name`` on each of ``socs``."""
        out: Modes = {}
        for soc in socs:
            twin = self._ran_out.get((_kind(name), soc.name))
            out[soc.name] = (self.modes, None)
            if twin is not None and len(self.modes) > 1:
                reason = (
                    f"{twin} (the same graph, other weights) ran out of memory at graph "
                    f"finalization at OPT_MODE {self.modes[0]}"
                )
                out[soc.name] = (self.modes[-1:], reason)
        return out

    def saw(self, row: Mapping[str, Any]) -> None:
        """Note the binaries of a built (or cached) piece's report ``row`` that were
        lowered, for the pieces of its kind after it."""
        for soc, binary in row["binaries"].items():
            if binary["lowered_because"]:
                self._ran_out.setdefault((_kind(row["name"]), soc), row["name"])


def _kind(name: str) -> str:
    """A piece's kind: its name without the layer index (``block_cache_3``: ``block_cache``)."""
    return name.rstrip("0123456789").rstrip("_")


def _positions(first: int, last: int, count: int) -> list[int]:
    """Up to ``count`` decode positions spread over ``first..last`` (always ``last``)."""
    picks = np.linspace(first, last, num=min(count, last - first + 1)).round().astype(int)
    return sorted({int(p) for p in picks})


def _history(cache: np.ndarray, kv_len: int) -> np.ndarray:
    """The prefill's K or V ``[1,P,KVH,D]`` in the first rows of a zeroed ``KV_LEN`` cache."""
    full = np.zeros((1, kv_len, *cache.shape[2:]), dtype=cache.dtype)
    full[:, : cache.shape[1]] = cache
    return full


def _kv_history(outs: Sequence[np.ndarray], kv_len: int) -> tuple[np.ndarray, np.ndarray]:
    """A prefill block's K and V outputs as the decode graph's ``KV_LEN``-row history."""
    return _history(outs[1], kv_len), _history(outs[2], kv_len)


def _prefill_feeds(hidden: np.ndarray, pre: Feeds) -> Feeds:
    """A prefill block's inputs: the states, with the prompt's positions and mask."""
    return {
        "input_states": hidden,
        "position_ids": pre["position_ids"],
        "attention_mask": pre["attention_mask"],
    }


def _decode_feeds(token: np.ndarray, step: Feeds, history: tuple[np.ndarray, np.ndarray]) -> Feeds:
    """A decode block's inputs: one token's states, its position and mask, and the
    layer's K/V history."""
    return {
        "input_states": token,
        "position_ids": step["position_ids"],
        "attention_mask": step["attention_mask"],
        "history_k": history[0],
        "history_v": history[1],
    }


def _embedded_steps(
    embed: torch.nn.Module, steps: Sequence[Sequence[Feeds]]
) -> list[list[np.ndarray]]:
    """The embedding of each decode step's token, per prompt."""
    with torch.no_grad():
        return [
            [embed(torch.from_numpy(step["input_ids"]).long()).numpy() for step in prompt]
            for prompt in steps
        ]


Recorder = Callable[[str, Feeds, list[np.ndarray]], None]


def rope_rows(adapter: ModelAdapter) -> int:
    """Rows of position ids the pieces take: 3 for an M-RoPE (Qwen2-VL family) model."""
    return 1 if adapter.mrope_section is None else MROPE_ROWS


@dataclass(frozen=True)
class Prompt:
    """Tokens the prefill pieces run: a text window (its first ``PREFILL_LEN`` tokens
    prefill; one more is the decode graph's), or a vision-language picture prompt
    (``image``: its M-RoPE rows and the vision tower's embeddings over its placeholder
    rows, as the runtime splices them; ``visual``: the same prompt as the float model
    takes it, for the reference)."""

    ids: Sequence[int]
    image: pe.MultimodalPrompt | None = None
    visual: VisualPrompt | None = None
    #: Positions the chain also runs the decode graphs at: each decodes ``ids[p]`` over
    #: the prefill's K/V rows ``< p`` (the tokens after a picture, teacher-forced).
    decoded: Sequence[int] = ()

    def prefill(self, prefill_len: int, rows: int) -> Feeds:
        """The prefill pieces' ids, positions and mask for this prompt."""
        positions = None if self.image is None else self.image.positions
        return pe.prefill_inputs(list(self.ids[:prefill_len]), prefill_len, rows, positions)

    def embedded(self, embed: torch.nn.Module, prefill: Feeds) -> np.ndarray:
        """The prefill's input states: ``embed`` of its ids, vision embeddings in place."""
        with torch.no_grad():
            hidden = embed(torch.from_numpy(prefill["input_ids"]).long()).numpy()
        return hidden if self.image is None else self.image.spliced(hidden)

    def decode(self, position: int, kv_len: int, rows: int) -> Feeds:
        """The decode graph's inputs for the token at ``position``, whose M-RoPE position
        after a picture runs behind its cache row."""
        rope = None if self.image is None else int(self.image.positions[0, position])
        return pe.decode_inputs(int(self.ids[position]), position, kv_len, rows, rope)

    def checked_from(self) -> int:
        """The first row the end-to-end check compares: a picture prompt's first vision
        token (the rows before it cannot see the picture; they are a text prompt's, the
        same for every picture, which the text windows measure), else 0."""
        if self.image is None or not len(self.image.rows):
            return 0
        return int(self.image.rows.min())

    def last_prompt_row(self) -> int:
        """The row whose logits pick the first generated token: the last before
        :attr:`decoded` (a continued prompt), else the last."""
        return (self.decoded[0] if len(self.decoded) else len(self.ids)) - 1

    def text_after_picture(self) -> int:
        """The first row after the prompt's last vision token (0 for text)."""
        if self.image is None or not len(self.image.rows):
            return 0
        return int(self.image.rows.max()) + 1


def image_prompt(
    adapter: ModelAdapter, inputs: Mapping[str, Any], features: Mapping[str, torch.Tensor]
) -> Prompt:
    """The :class:`Prompt` of processor ``inputs`` holding one picture prompt, with its
    vision embeddings ``features`` (the float tower's,
    :func:`~common.analysis.layerwise_decode.vision_features`)."""
    image = pe.multimodal_prompt(adapter, inputs, features)
    return Prompt(image.token_ids, image, VisualPrompt(inputs, features))


@dataclass(frozen=True)
class Window:
    """One prompt of the float chain, the decode positions to run (each ``p`` decodes
    ``prompt.ids[p]`` over the prefill's rows ``< p``), and where its pieces'
    inputs/outputs go."""

    prompt: Prompt
    positions: Sequence[int]
    record: Recorder


def _chain(
    run: pe.PieceRunner, adapter: ModelAdapter, windows: Sequence[Window], lengths: tuple[int, int]
) -> None:
    """For every window: float prefill over its prompt's first ``P`` ids (a picture's
    rows hold its vision embeddings); for every decode position ``p``
    the LM head on the prefill row ``p - 1`` and one decode step for ``ids[p]`` over the
    prefill's K/V (rows ``>= p`` masked), calling ``record(piece, inputs, outputs)`` for
    every piece run. ``lengths`` is ``(PREFILL_LEN, KV_LEN)``.

    Piece-major: every window and position goes through ``block_0`` before any goes
    through ``block_1``, so ``run`` needs one piece's session at a time and opens each
    once; only the windows' hidden states (``windows x P x hidden``) wait between pieces.
    Each piece's calls are still recorded window by window, positions ascending, so the
    calibration lists keep the order a window-at-a-time chain gave them."""
    prefill_len, kv_len = lengths
    rows = rope_rows(adapter)
    embed = adapter.embed_tokens()
    pres = [w.prompt.prefill(prefill_len, rows) for w in windows]
    steps = [[w.prompt.decode(p, kv_len, rows) for p in w.positions] for w in windows]
    hiddens = [w.prompt.embedded(embed, pre) for w, pre in zip(windows, pres, strict=True)]
    tokens = _embedded_steps(embed, steps)
    caches: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in windows]
    for i in range(adapter.num_layers):
        for w, (window, pre) in enumerate(zip(windows, pres, strict=True)):
            feeds = _prefill_feeds(hiddens[w], pre)
            outs = run(f"block_{i}", feeds)
            window.record(f"block_{i}", feeds, outs)
            hiddens[w] = outs[0]
            caches[w].append(_kv_history(outs, kv_len))
    for window, hidden in zip(windows, hiddens, strict=True):
        for position in window.positions:
            window.record("lm_head", {"hidden_states": hidden[:, position - 1]}, [])
    for i in range(adapter.num_layers):
        for w, window in enumerate(windows):
            for j, step in enumerate(steps[w]):
                feeds = _decode_feeds(tokens[w][j], step, caches[w][i])
                outs = run(f"block_cache_{i}", feeds)
                window.record(f"block_cache_{i}", feeds, outs)
                tokens[w][j] = outs[0]


def capture(
    run: pe.PieceRunner,
    adapter: ModelAdapter,
    golden_ids: Sequence[int],
    calibration: Sequence[Prompt],
    lengths: tuple[int, int],
) -> Golden:
    """Golden inputs/outputs from one held-out window of ``P + 1`` tokens (decode of its
    last token, LM head on the last prefill row), calibration inputs from the
    ``calibration`` prompts: text windows of ``P + 1`` tokens, decoded at positions over
    the window, and picture prompts, decoded at their text rows after the picture."""
    golden = Golden({}, {}, {})
    prefill_len = lengths[0]

    def keep_golden(name: str, feeds: Feeds, outs: list[np.ndarray]) -> None:
        golden.inputs[name] = feeds
        golden.outputs[name] = outs

    def keep_calib(name: str, feeds: Feeds, _outs: list[np.ndarray]) -> None:
        golden.calibration.setdefault(name, []).append(feeds)

    windows = [Window(Prompt(golden_ids), [prefill_len], keep_golden)]
    for prompt in calibration:
        last = min(len(prompt.ids) - 1, prefill_len)
        first = max(prompt.text_after_picture(), 1)
        windows.append(Window(prompt, _positions(first, last, CALIB_POSITIONS), keep_calib))
    _chain(run, adapter, windows, lengths)
    return golden


class NearestLevels(Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
    """Round-to-nearest levels of every decoder linear and the LM head, computed when a
    piece asks for its own, from the part of the model in memory then: the whole model's
    levels (one byte per weight, 1.8 GB at 1.8B) are never held at once."""

    def __init__(self, adapter: ModelAdapter, spec: Weights) -> None:
        self.spec = spec
        self.linears = {name: m for name, _role, m in iter_linears(adapter)}

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight = {name: self.linears[name].weight}
        return qdq.nearest_levels(weight, self.spec)[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.linears)

    def __len__(self) -> int:
        return len(self.linears)


class StoredLevels(Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
    """Levels and scales kept in a safetensors file (``<name>.levels``, ``<name>.scale``),
    each linear's read when a piece asks for it."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        with safe_open(str(path), "pt") as stored:
            self.names = sorted({key.rsplit(".", 1)[0] for key in stored.keys()})  # noqa: SIM118

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as stored:
            return (
                stored.get_tensor(f"{name}.levels").clone(),
                stored.get_tensor(f"{name}.scale").clone(),
            )

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def piece_linears(adapter: ModelAdapter, piece: str) -> dict[str, torch.Tensor]:
    """The float weights of the linears inside ``piece`` (by qualified name)."""
    if piece == "lm_head":
        return {
            name: m.weight.detach() for name, role, m in iter_linears(adapter) if role == "lm_head"
        }
    index = int(piece.rsplit("_", 1)[1])
    layer = adapter.layers()[index]
    ids = {id(m) for m in layer.linears.values()}
    return {name: m.weight.detach() for name, _role, m in iter_linears(adapter) if id(m) in ids}


def _cpu_run(model: Path, feeds: Feeds) -> list[np.ndarray]:
    """Reference run on onnxruntime CPU with graph optimizations off, so every Q/DQ pair
    is executed literally as written. HTP may fuse ops and skip intermediate encodings
    (e.g. the x² inside a decomposed RMSNorm), so the two can differ where such an
    intermediate has a huge range."""
    return _cpu_runs(model, [feeds])[0]


def _cpu_runs(model: Path, feeds: Sequence[Feeds]) -> list[list[np.ndarray]]:
    """:func:`_cpu_run` on each of ``feeds``, in one session."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # No arena: it kept its largest buffer (the LM head's dequantized weights, 1.2 GB at
    # Qwen1.5-1.8B) after the session closed.
    so.enable_cpu_mem_arena = False
    session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [session.run(None, {n: each[n] for n in names}) for each in feeds]


def _worst_cos(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    return min(pe.cosine(x, y) for x, y in zip(a, b, strict=True))


def build_piece(
    name: str,
    float_dir: Path,
    work_dir: Path,
    out_dir: Path,
    *,
    weights: Mapping[str, torch.Tensor],
    adapter: ModelAdapter,
    plan: qdq.QdqPlan,
    levels: qdq.WeightLevels,
    golden: Golden,
    socs: Sequence[qnn_ep.Soc],
    vtcm_mb: int,
    modes: Modes,
    chain_inputs: Sequence[Feeds] = (),
    emulate: bool = True,
) -> tuple[dict[str, Any], list[list[np.ndarray]]]:
    """QDQ from ``plan`` (with ``levels`` as the integer weights) into
    ``out_dir/qdq/<name>.onnx``, compile it into ``out_dir/<soc>/`` for each SoC at its
    ``modes`` (:class:`ModeChoice`), load it in a strict all-on-QNN session and verify it
    on the emulator; returns the report row and the QNN outputs on each of
    ``chain_inputs``. Not ``emulate`` (``VERIFY=sample``): loaded but not run, the row has
    no emulator cosines and the outputs are the QDQ graph's on onnxruntime CPU.
    ``weights`` are the piece's linears (by qualified name, as the plan names them);
    ``adapter`` exports the LM head's narrow copy."""
    qdq_path = out_dir / QDQ_FOLDER / f"{name}.onnx"
    qdq_path.parent.mkdir(parents=True, exist_ok=True)
    quantize: dict[str, Any] = dict(
        plan=plan,
        weights=weights,
        calibration=golden.calibration[name],
        levels={n: levels[n] for n in weights},
    )
    if name == "lm_head" and qdq.narrowable(plan, weights):  # the vocab-wide piece
        narrow = pe.export_narrow_head(adapter, work_dir / "narrow", qdq.NARROW_ROWS)
        qdq.quantize_narrow(narrow, qdq_path, work_dir=work_dir, **quantize)
    else:
        static = qdq.static_float_model(
            float_dir / f"{name}.onnx", work_dir / f"{name}.static.onnx"
        )
        qdq.quantize_piece(static, qdq_path, **quantize)
        # A float copy of the piece read by nothing after this: at Qwen2.5-VL-3B the copies
        # of all pieces would add 26 GB to the float pieces' 26.
        onnx_files.remove(static)
    feeds = golden.inputs[name]
    float_out = golden.outputs[name] or _cpu_run(float_dir / f"{name}.onnx", feeds)
    # Not emulated, the QDQ graph on the CPU also stands in for the binary in the chain:
    # one session for the golden input and the chain's.
    cpu_outs = _cpu_runs(qdq_path, [feeds] if emulate else [feeds, *chain_inputs])
    cpu_out = cpu_outs[0]
    row: dict[str, Any] = {"name": name, "binaries": {}}
    session = None
    for soc in socs:
        ctx = out_dir / soc.name / f"{name}_ctx.onnx"
        ctx.parent.mkdir(parents=True, exist_ok=True)
        tried, starts_lower = modes[soc.name]
        compiled = qnn_ep.compile_at_modes(qdq_path, ctx, soc, vtcm_mb, tried)
        info = qnn_ep.check_binary_target(compiled.binary, soc, vtcm_mb, compiled.opt_mode)
        row["binaries"][soc.name] = {
            "ctx": f"{soc.name}/{ctx.name}",
            "bin": f"{soc.name}/{compiled.binary.name}",
            "soc_model": info.soc_model,
            "htp_arch": info.htp_arch,
            "vtcm_mb": info.vtcm_mb,
            "optimization_level": info.optimization_level,
            "lowered_because": compiled.lowered_because or starts_lower,
        }
        if session is None:  # asserts {EPContext: 1} on QNN
            options = qnn_ep.provider_options(soc, vtcm_mb, compiled.opt_mode)
            session = qnn_ep.strict_session(ctx, options)
    assert session is not None
    row.update(cpu_qdq_cos_vs_float=_worst_cos(cpu_out, float_out), all_nodes_on_qnn=True)
    if not emulate:
        row.update(cos_vs_float=None, cos_vs_cpu_qdq=None, emulated=False)
        return row, cpu_outs[1:]
    qnn_out = session.run(None, feeds)
    row.update(
        cos_vs_float=_worst_cos(qnn_out, float_out),
        cos_vs_cpu_qdq=_worst_cos(qnn_out, cpu_out),
        emulated=True,
    )
    return row, [session.run(None, feeds) for feeds in chain_inputs]


def lowered_pieces(rows: Sequence[dict[str, Any]]) -> list[str]:
    """``piece/SoC`` of every binary ``OPT_MODE=auto`` finalized below its first mode."""
    return [
        f"{row['name']}/{soc}"
        for row in rows
        for soc, binary in row["binaries"].items()
        if binary["lowered_because"]
    ]


def piece_key(
    name: str,
    float_dir: Path,
    chain_inputs: Sequence[Feeds],
    *,
    plan: qdq.QdqPlan,
    levels_key: str,
    golden: Golden,
    socs: Sequence[qnn_ep.Soc],
    vtcm_mb: int,
    modes: Modes,
    versions: dict[str, str],
    emulate: bool,
) -> str:
    """The cache key of a piece: every input :func:`build_piece` reads (the float piece's
    bytes, the plan, its integer weights by ``levels_key`` (the hash of what made them:
    GPTQ's inputs, or the checkpoint and rounding), its calibration, golden and chain
    inputs), the SoCs and HTP options, the QNN versions, and whether the emulator runs it
    (the chained outputs are the emulator's, else the CPU QDQ graph's). No weight is read."""
    float_model = float_dir / f"{name}.onnx"
    return cache_key(
        {
            "format": PIECE_FORMAT,
            "float": float_model,
            "float_data": onnx_files.data_file(float_model),
            "plan": plan.to_json(),
            "levels": levels_key,
            "piece": name,
            "calibration": golden.calibration[name],
            "inputs": golden.inputs[name],
            "outputs": golden.outputs[name],
            "chain": list(chain_inputs),
            "socs": [soc.name for soc in socs],
            "vtcm_mb": vtcm_mb,
            "modes": {soc: [list(tried), why] for soc, (tried, why) in modes.items()},
            "versions": versions,
            "emulated": emulate,
        }
    )


def _link_tree(src: Path, dest: Path) -> None:
    """Hard-link every file under ``src`` into the same place under ``dest`` (a copy where
    the file system refuses), so a cached piece costs no second copy of its binaries."""
    for path in sorted(src.rglob("*")):
        if path.is_file():
            target = dest / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)


@dataclass
class PieceSetup:
    """What every piece of one build shares: where float pieces are read and scratch
    files, binaries (per SoC) and QDQ graphs go, the SoCs and HTP options, the
    :class:`ModeChoice` of the build so far, the cache its entries live in, and which
    pieces run on the emulator (``VERIFY=``, :mod:`sampling`)."""

    adapter: ModelAdapter
    float_dir: Path
    work_dir: Path
    out_dir: Path
    qdq_dir: Path
    socs: Sequence[qnn_ep.Soc]
    vtcm_mb: int
    choice: ModeChoice
    cache: PieceCache
    versions: dict[str, str]
    emulated: Callable[[str], bool]


def cached_piece(
    setup: PieceSetup,
    name: str,
    chain_inputs: Sequence[Feeds],
    part: Callable[[], AbstractContextManager[Any]],
    weights: Callable[[], Mapping[str, torch.Tensor]],
    *,
    plan: qdq.QdqPlan,
    levels: qdq.WeightLevels,
    levels_key: str,
    golden: Golden,
) -> tuple[dict[str, Any], list[list[np.ndarray]]]:
    """Piece ``name``'s report row and its binary's outputs on each of ``chain_inputs``:
    built into its ``setup.cache`` entry by :func:`build_piece` (with
    ``part()`` entered, which puts its weights in memory, and ``weights()`` naming its
    linears), or the entry a killed run completed, as it is; then linked into
    ``setup.out_dir`` (binaries per SoC) and ``setup.qdq_dir``, and the float piece in
    ``setup.float_dir`` removed."""
    modes = setup.choice.of(name, setup.socs)
    emulate = setup.emulated(name)

    def build(folder: Path) -> None:
        with part():
            row, chained = build_piece(
                name, setup.float_dir, setup.work_dir, folder, weights=weights(),
                adapter=setup.adapter, plan=plan, levels=levels, golden=golden,
                socs=setup.socs, vtcm_mb=setup.vtcm_mb, modes=modes, chain_inputs=chain_inputs,
                emulate=emulate,
            )  # fmt: skip
        (folder / "row.json").write_text(json.dumps(row))
        np.savez(folder / "chained.npz", **{f"{i}_{j}": out for i, outs in enumerate(chained)
                                            for j, out in enumerate(outs)})  # fmt: skip

    key = piece_key(
        name, setup.float_dir, chain_inputs, plan=plan, levels_key=levels_key, golden=golden,
        socs=setup.socs, vtcm_mb=setup.vtcm_mb, modes=modes, versions=setup.versions,
        emulate=emulate,
    )  # fmt: skip
    entry = setup.cache.fetch_or_build(name, key, build)
    row = json.loads((entry / "row.json").read_text())
    setup.choice.saw(row)
    with np.load(entry / "chained.npz") as stored:
        outputs = len(stored.files) // max(len(chain_inputs), 1)
        chained = [[stored[f"{i}_{j}"] for j in range(outputs)] for i in range(len(chain_inputs))]
    for path in entry.iterdir():
        if path.is_dir():
            dest = setup.qdq_dir if path.name == QDQ_FOLDER else setup.out_dir / path.name
            _link_tree(path, dest)
    # The float piece has given its golden outputs, its key and its QDQ graph: nothing reads
    # it again, and at Qwen2.5-VL-3B the float pieces are 26 GB, so each goes once built.
    onnx_files.remove(setup.float_dir / f"{name}.onnx")
    return row, chained


@dataclass
class Chained:
    """What the QNN chain computed for each prompt: the last prefill block's hidden states
    ``[1, PREFILL_LEN, H]``, and the last decode block's ``[n, H]`` at the prompt's
    :attr:`Prompt.decoded` positions."""

    prefill: list[np.ndarray]
    decoded: list[np.ndarray]


def build_all(
    setup: PieceSetup,
    parts: Parts,
    golden: Golden,
    plan: qdq.QdqPlan,
    levels: qdq.WeightLevels,
    levels_key: str,
    chain: Sequence[Prompt],
    lengths: tuple[int, int],
) -> tuple[list[dict[str, Any]], Chained]:
    """Every language piece's report row, and what the QNN chain computed for each prompt
    of ``chain`` (embedded on the host, a picture's vision embeddings spliced in): its
    prefill through every prefill binary and, at its :attr:`Prompt.decoded` positions,
    one decode step through every decode binary over the K/V the prefill binaries wrote
    (``lengths``: ``(PREFILL_LEN, KV_LEN)``).

    Each piece goes through :func:`cached_piece`, its part of the model read through
    ``parts`` meanwhile. ``levels`` may compute or read a piece's integer weights when
    asked (:class:`NearestLevels`, :class:`StoredLevels`); ``levels_key`` names where they
    come from."""
    adapter = parts.adapter
    prefill_len, kv_len = lengths
    rows: list[dict[str, Any]] = []
    starts = [prompt.prefill(prefill_len, rope_rows(adapter)) for prompt in chain]
    steps = [[p.decode(at, kv_len, rope_rows(adapter)) for at in p.decoded] for p in chain]
    with parts.embedding() as embed:
        hiddens = [p.embedded(embed, pre) for p, pre in zip(chain, starts, strict=True)]
        tokens = _embedded_steps(embed, steps)
    # Per-layer K/V histories of the prompts the decode graphs run on.
    caches: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {
        w: [] for w, prompt in enumerate(steps) if prompt
    }
    layers = adapter.layers()
    names = [f"block_{i}" for i in range(adapter.num_layers)]
    names += [f"block_cache_{i}" for i in range(adapter.num_layers)] + ["lm_head"]
    for name in progress(names, desc=f"qnn {plan.scheme.name}", unit="piece"):
        index = int(name.rsplit("_")[-1]) if name != "lm_head" else 0
        feeds: list[Feeds] = []
        if name.startswith("block_cache"):
            feeds = [
                _decode_feeds(token, step, caches[w][index])
                for w, (prompt, inputs) in enumerate(zip(steps, tokens, strict=True))
                for step, token in zip(prompt, inputs, strict=True)
            ]
        elif name.startswith("block_"):
            feeds = [_prefill_feeds(h, pre) for h, pre in zip(hiddens, starts, strict=True)]
        part = parts.head if name == "lm_head" else partial(parts.layer, layers[index])
        row, chained = cached_piece(
            setup, name, feeds, part, partial(piece_linears, adapter, name),
            plan=plan, levels=levels, levels_key=levels_key, golden=golden,
        )  # fmt: skip
        rows.append(row)
        if name.startswith("block_cache"):
            outs = iter(chained)
            tokens = [[next(outs)[0] for _ in prompt] for prompt in steps]
        elif name.startswith("block_"):
            hiddens = [outs[0] for outs in chained]
            for w, history in caches.items():
                history.append(_kv_history(chained[w], kv_len))
    decoded = [
        np.concatenate([t.reshape(1, -1) for t in prompt]) if prompt else np.zeros((0, 0))
        for prompt in tokens
    ]
    return rows, Chained(hiddens, decoded)


def end_to_end(
    parts: Parts,
    hiddens: Sequence[np.ndarray],
    prompts: Sequence[Prompt],
    decoded: Sequence[np.ndarray] | None = None,
    graph: str | None = None,
) -> dict[str, Any]:
    """Final norm + LM head (float, host) on the QNN chain's hidden states vs the FP32
    model's logits on the same prompts (run a part at a time through ``parts``): cosine
    over all logits and top-1 agreement over every compared row of every prompt (one
    window of 32 tokens would measure top-1 in steps of 3 %): all of a text window's,
    a picture prompt's from its first vision token on (:meth:`Prompt.checked_from`);
    and, on the row that picks the first token a runtime generates after each prompt
    (:meth:`Prompt.last_prompt_row`), the worst logit cosine and how often the argmax
    agrees.
    With ``decoded`` (:attr:`Chained.decoded` of the same prompts), the decode binaries'
    logits at each prompt's :attr:`Prompt.decoded` positions against the float model's
    rows there, as ``decode``.
    Text windows and picture prompts (the float model given the same vision embeddings)
    are not mixed in one call. Held-out text windows with ``graph`` (what computed the
    chain: the emulator, the CPU QDQ graphs) also give the common accuracy block
    (:func:`common.analysis.accuracy.accuracy_block`: perplexity ratio, top-1 agreement
    with its interval) as ``accuracy``."""
    if any(p.visual is not None for p in prompts):
        groups = run_groups(
            parts, lambda embed: [prompt_group(parts.adapter, embed, p.visual) for p in prompts]
        )  # fmt: skip
        reference = [hidden[0] for hidden in groups]
    else:
        reference = list(run_layers(parts, torch.tensor([list(p.ids) for p in prompts])))
    # One prompt's logits at a time: all of them at once ([windows x rows, vocab], twice,
    # and float64 copies for the cosine) took about 5 GiB at 32 x 32 x 151936 (Qwen1.5).
    text, steps = _Agreement(), _Agreement()
    comparison = LogitComparison() if graph is not None else None
    next_cos, next_agree = [], []
    with head(parts) as logits:
        chain = zip(hiddens, reference, prompts, strict=True)
        for index, (hidden, ref, prompt) in enumerate(chain):
            rows = slice(prompt.checked_from(), len(prompt.ids))
            got = logits(torch.from_numpy(np.asarray(hidden[:, rows], np.float32)))[0]
            want = logits(ref[None, rows])[0].float()
            text.add(got.numpy(), want.numpy())
            # The logits of the first token a runtime generates after the prompt.
            row = prompt.last_prompt_row() - prompt.checked_from()
            next_cos.append(pe.cosine(got[row].numpy(), want[row].numpy()))
            next_agree.append(bool(got[row].argmax() == want[row].argmax()))
            if comparison is not None:
                comparison.add(got, want, torch.tensor(prompt.ids))
            if decoded is not None and len(prompt.decoded):
                got = logits(torch.from_numpy(decoded[index][None]).float())[0]
                steps.add(got.numpy(), logits(ref[None, list(prompt.decoded)])[0].float().numpy())
    out: dict[str, Any] = {
        **text.result(),
        "windows": len(prompts),
        "next_token_cos": min(next_cos),
        "next_token_agreement": float(np.mean(next_agree)),
    }
    if steps.rows:
        out["decode"] = steps.result()
    if comparison is not None:
        out["accuracy"] = accuracy_block(comparison.result(), graph, len(prompts[0].ids))
    return out


class _Agreement:
    """Cosine over all ``[rows, V]`` logits fed to :meth:`add` (as if concatenated), top-1
    agreement, and the rows compared, from running float64 sums."""

    def __init__(self) -> None:
        self.dot = self.got_sq = self.want_sq = 0.0
        self.agree = self.rows = 0

    def add(self, got: np.ndarray, want: np.ndarray) -> None:
        for row_got, row_want in zip(got, want, strict=True):  # one float64 row at a time
            g, w = row_got.astype(np.float64), row_want.astype(np.float64)
            self.dot += float(g @ w)
            self.got_sq += float(g @ g)
            self.want_sq += float(w @ w)
        self.agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        self.rows += len(got)

    def result(self) -> dict[str, Any]:
        norm = (self.got_sq * self.want_sq) ** 0.5
        both_zero = self.got_sq == self.want_sq == 0.0
        return {
            "cos": self.dot / norm if norm else float(both_zero),
            "top1_agreement": self.agree / self.rows,
            "tokens": self.rows,
        }

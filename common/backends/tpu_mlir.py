"""Drive SOPHGO's TPU-MLIR tools (a separate Python 3.10 venv) as logged subprocesses.

tpu-mlir cannot share the project's interpreter (cp310 only, numpy 1.24 / protobuf 3.20
pins), so every tool runs as a subprocess of its own venv: ``bin`` first on PATH (the tools
re-exec each other through ``python3``), a fresh working directory per step (they litter
intermediates into the cwd), and the whole output captured to a log whose path and last
lines are in the error when a step fails. The tools print their own numerical verdicts
(``min_similarity = (cos, euclid, sqnr)`` and ``npz compare PASSED|FAILED``);
:func:`parse_compares` turns those lines into numbers for the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.core.errors import EdgeforgeError
from common.core.memory import MemoryGate
from common.core.piece_cache import PieceCache, cache_key
from common.core.progress import progress
from common.export.onnx_files import data_file
from common.export.piece_export import Piece, PieceRunner, example_inputs
from common.models.base import ModelAdapter
from common.quant.schemes import (
    SCHEMES,
    QuantScheme,
    Weights,
    float_activation_plan,
    scheme_by_name,
    schemes_for,
)

#: Chips this module compiles for (both accepted by ``model_deploy --chip``).
CHIPS = ("bm1684x", "bm1688")
#: The schemes ``MODE=`` may name (:data:`common.quant.schemes.SCHEMES`): ``bf16``/``f16``
#: keep every weight in that half type; ``w8bf16``/``w4bf16`` are weight-only int8/int4, per
#: group of ``Q_GROUP_SIZE`` input columns with a zero point each, bf16 activations.
MODES = schemes_for("sophgo")
#: The half types by tpu-mlir's names.
_HALF = {"bfloat16": "BF16", "float16": "F16"}


def quantize_flag(weights: Weights, activations: str) -> str:
    """``model_deploy --quantize`` for linears with ``weights`` between ``activations``:
    the half type (``BF16``) when the weights are float, else weight-only (``W4BF16``)."""
    half = _HALF[activations]
    return half if weights.bits is None else f"W{weights.bits}{half}"


#: User-facing mode → ``model_deploy --quantize`` value of the blocks.
QUANTIZE = {mode: quantize_flag(SCHEMES[mode].weights, SCHEMES[mode].activations) for mode in MODES}


def mode_scheme(mode: str, q_group_size: int) -> QuantScheme:
    """The scheme ``MODE=mode`` builds, grouped weights at ``q_group_size`` columns
    (``Q_GROUP_SIZE``: both routes pass it for W8 and W4 alike, and model_deploy applies
    it to both)."""
    scheme = scheme_by_name(mode, MODES, "MODE")
    if scheme.weights.granularity == "group":
        scheme = scheme.with_weights(group_size=q_group_size)
    return scheme


def weight_flags(weights: Weights, flag: str, symmetric: str) -> list[str]:
    """The group size (``flag``; 0 is one scale per output channel) and symmetry
    (``symmetric``; a zero point per group otherwise) of integer ``weights``."""
    if weights.bits is None:
        return []
    if weights.scales != "absmax":  # tpu-mlir computes its own, from each group's range
        raise EdgeforgeError(f"weights: scales {weights.scales}; tpu-mlir chooses its own")
    return [flag, str(weights.group_size or 0), *([symmetric] if weights.symmetric else [])]


#: How the bmodel is built: our ONNX pieces through model_transform/model_deploy, or the
#: vendor's one-shot ``llm_convert`` from a half-precision HF checkpoint.
ROUTES = ("onnx", "llm_convert")
#: Lines of a failed step's log quoted in the error.
LOG_TAIL_LINES = 8

_SIMILARITY = re.compile(
    r"min_similarity = \(([-+0-9.eE]+), ([-+0-9.eE]+|nan), ([-+0-9.eE]+|inf|nan)\)"
)
_VERDICT = re.compile(r"npz compare (PASSED|FAILED)")


@dataclass(frozen=True)
class Compare:
    """One ``npz_tool compare`` verdict as the tool printed it."""

    cos: float
    euclid: float
    sqnr: float
    passed: bool


def parse_compares(text: str) -> list[Compare]:
    """Every ``min_similarity`` line paired with the PASSED/FAILED verdict that follows it,
    in output order (model_transform prints one, model_deploy two: tpu-vs-top and
    bmodel-vs-tpu)."""
    compares: list[Compare] = []
    for match in _SIMILARITY.finditer(text):
        verdict = _VERDICT.search(text, match.end())
        cos, euclid, sqnr = (float(g) for g in match.groups())
        compares.append(Compare(cos, euclid, sqnr, bool(verdict and verdict[1] == "PASSED")))
    return compares


@dataclass(frozen=True)
class Toolchain:
    """The tpu-mlir venv created by ``make sophgo-toolchain``."""

    venv: Path

    def __post_init__(self) -> None:
        # Absolute: the tools run with their own cwd, where a relative venv path would miss.
        object.__setattr__(self, "venv", Path(self.venv).absolute())

    def bin(self, tool: str) -> Path:
        return self.venv / "bin" / tool

    def env(self) -> dict[str, str]:
        """The tools' environment: venv first on PATH; no inherited PYTHONPATH or
        LD_LIBRARY_PATH, which would mix the project's 3.11 packages or libs into 3.10."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_LIBRARY_PATH")}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.venv)
        env["PYTHONNOUSERSITE"] = "1"
        return env

    def python(self, args: Sequence[str], what: str, cwd: Path | None = None) -> str:
        """Run the venv's python with ``args``; its stdout, or an error naming ``what``."""
        if not self.bin("python").exists():
            raise EdgeforgeError(
                f"{self.venv}: no tpu-mlir venv here; run 'make sophgo-toolchain' first"
            )
        proc = subprocess.run(
            [str(self.bin("python")), *args],
            env=self.env(),
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-LOG_TAIL_LINES:])
            raise EdgeforgeError(f"tpu-mlir venv {self.venv}: {what} failed: {tail}")
        return proc.stdout

    def package_dir(self) -> Path:
        """``site-packages/tpu_mlir`` of this venv."""
        found = sorted(self.venv.glob("lib/python3.*/site-packages/tpu_mlir"))
        if not found:
            raise EdgeforgeError(
                f"{self.venv}: no tpu_mlir package; run 'make sophgo-toolchain' first"
            )
        return found[0]

    def version(self) -> str:
        """The installed tpu-mlir distribution version (recorded in every manifest)."""
        out = self.python(
            ["-c", "from importlib.metadata import version; print(version('tpu_mlir'))"],
            what="reading the tpu_mlir version",
        )
        return out.strip()

    def run(self, tool: str, args: Sequence[str], cwd: Path, log: Path) -> str:
        """Run ``tool args`` in ``cwd`` with the whole output in ``log``; returns the output.

        A non-zero exit raises with the log path and its last lines, which is where the
        tools put the reason (an unsupported op, a failed compare).
        """
        if not self.bin(tool).exists():
            raise EdgeforgeError(
                f"{self.bin(tool)}: tpu-mlir tool missing; run 'make sophgo-toolchain' first"
            )
        cwd.mkdir(parents=True, exist_ok=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as sink:
            sink.write(f"$ {tool} {' '.join(args)}\n")
            sink.flush()
            proc = subprocess.run(
                [str(self.bin(tool)), *args],
                cwd=cwd,
                env=self.env(),
                stdout=sink,
                stderr=subprocess.STDOUT,
                check=False,
            )
        text = log.read_text(errors="replace")
        if proc.returncode != 0:
            tail = " | ".join(text.strip().splitlines()[-LOG_TAIL_LINES:])
            raise EdgeforgeError(f"{tool} failed (exit {proc.returncode}); log {log}: {tail}")
        return text


def shapes_arg(shapes: Sequence[Sequence[int]]) -> str:
    """``--input_shapes`` syntax: ``[[1,64,64],[1,64]]``."""
    return "[" + ",".join("[" + ",".join(str(d) for d in s) + "]" for s in shapes) + "]"


#: Piece kinds whose graph onnx-simplifier and constant folding leave as it is (a
#: ``Gather``; a norm and one ``MatMul``), so ``model_transform`` skips both for them:
#: Qwen1.5-1.8B's lm_head and embedding gave the same top MLIR and weights either way, in
#: 17 s and 5.0 GiB instead of 89 s and 13.1 GiB (the simplifier copies the model
#: several times over).
PLAIN_KINDS = ("embedding", "embedding_cache", "lm_head")
#: What ``model_transform`` adds to one compile, whatever the piece.
COMPILE_BASE_BYTES = int(0.4 * 2**30)
#: Peak of one piece's compile (its largest tool process) over its float32 weights:
#: simplified (11x: the 1.8B lm_head's 13.1 GiB, blocks measured at 10x) and plain
#: (:data:`PLAIN_KINDS`: 4.2x transform, 2.8x deploy, with a margin).
COMPILE_FACTOR = {"simplified": 11.0, "plain": 4.5}


def compile_bytes(kind: str, weight_bytes: int) -> int:
    """Estimated peak of compiling a piece of ``kind`` with ``weight_bytes`` of float32
    weights (its ``.onnx`` and data file): what :func:`compile_pieces` admits it at."""
    factor = COMPILE_FACTOR["plain" if kind in PLAIN_KINDS else "simplified"]
    return COMPILE_BASE_BYTES + int(factor * weight_bytes)


def weight_bytes(onnx: Path) -> int:
    """Bytes of an exported piece on disk, its data file included: its float32 weights."""
    data = data_file(onnx)
    return onnx.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def transform_args(
    name: str,
    onnx: Path,
    shapes: Sequence[Sequence[int]],
    test_input: Path,
    mlir: Path,
    simplify: bool = True,
) -> list[str]:
    """``model_transform`` flags: ONNX → top MLIR, checked against onnxruntime on
    ``test_input`` (the reference outputs land next to the MLIR as ``<name>_top_out.npz``).
    Without ``simplify``, no onnx-simplifier or constant folding (:data:`PLAIN_KINDS`):
    the tool parses ``--do_onnx_sim`` with ``type=bool``, so only an empty value is false."""
    return [
        "--model_name", name,
        "--model_def", str(onnx),
        "--input_shapes", shapes_arg(shapes),
        "--test_input", str(test_input),
        "--test_result", f"{name}_top_out.npz",
        "--mlir", str(mlir),
        *([] if simplify else ["--do_onnx_sim", ""]),
    ]  # fmt: skip


def check_mode_chip(mode: str, chip: str) -> None:
    """Reject an unknown ``MODE``/``CHIP`` before any work, naming the choices."""
    if mode not in MODES:
        raise EdgeforgeError(f"MODE={mode!r} is not supported; use one of {', '.join(MODES)}")
    if chip not in CHIPS:
        raise EdgeforgeError(f"CHIP={chip!r} is not supported; use one of {', '.join(CHIPS)}")


#: model_deploy's tpu-vs-top check (cosine, euclidean similarity on the piece's example
#: input) where its default (0.90, 0.80) is tighter than the mode can be: with 4-bit
#: weights, SmolLM2's blocks measure cosine 0.945–0.993 and euclidean 0.66–0.88 against
#: the float top MLIR. There it stays a coarse lowering check; the mode's own gate (cosine
#: ≥ 0.95, simulator vs onnxruntime on the greedy run's real inputs) judges every piece.
TOOL_TOLERANCE = {"w4bf16": (0.9, 0.5)}


def deploy_args(
    name: str,
    kind: str,
    mode: str,
    chip: str,
    mlir: Path,
    bmodel: Path,
    q_group_size: int = 64,
) -> list[str]:
    """``model_deploy`` flags per piece kind, as the vendor's LLM flow sets them (Part B.2):
    embeddings and blocks keep half-precision I/O so the runtime chains them without casts;
    ``lm_head`` keeps float logits; the token heads stay F32; ``block_cache`` gets its own
    I/O buffers (``io_alone``) so the KV cache can be bound in place.

    The tool still checks the quantized tpu MLIR against the top MLIR on the sample
    (``--test_input``), which localises a lowering error; ``--skip_validation`` drops only
    its bmodel-vs-tpu simulator pass, because every bmodel is run on the simulator against
    onnxruntime afterwards anyway (:class:`Simulator`) — that pass was minutes per real-size
    block and checked against an intermediate instead of the float model."""
    check_mode_chip(mode, chip)
    scheme = mode_scheme(mode, q_group_size)
    half = _HALF[scheme.activations]
    args = ["--mlir", str(mlir), "--chip", chip, "--model", str(bmodel), "--skip_validation"]
    args += ["--test_input", f"{name}_in_f32.npz", "--test_reference", f"{name}_top_out.npz"]
    if kind in ("embedding", "embedding_cache"):
        return [*args, "--quantize", half, "--quant_input", "--quant_output"]
    if kind == "lm_head":
        head = quantize_flag(scheme.weight("lm_head"), scheme.activation("lm_head"))
        return [*args, "--quantize", head, "--quant_input"]
    if kind in ("greedy_head", "penalty_sample_head"):
        return [*args, "--quantize", "F32"]
    quant = ["--quantize", QUANTIZE[mode]]
    quant += weight_flags(scheme.weights, "--q_group_size", "--q_symmetric")
    if mode in TOOL_TOLERANCE:
        quant += ["--tolerance", ",".join(str(t) for t in TOOL_TOLERANCE[mode])]
    args += [*quant, "--quant_input", "--quant_output"]
    if kind == "block_cache":
        args += ["--addr_mode", "io_alone"]
    return args


@dataclass(frozen=True)
class PieceBuild:
    """A compiled piece: its bmodel, the tools' own compares, the step logs and each
    step's wall seconds (``model_transform``, ``model_deploy``)."""

    name: str
    bmodel: Path
    compares: tuple[Compare, ...]
    logs: tuple[Path, ...]
    seconds: tuple[float, float]


def compile_piece(
    toolchain: Toolchain,
    name: str,
    kind: str,
    onnx: Path,
    inputs: dict[str, np.ndarray],
    mode: str,
    chip: str,
    workdir: Path,
    q_group_size: int = 64,
) -> PieceBuild:
    """ONNX → top MLIR (checked against onnxruntime) → tpu MLIR (checked against the top
    MLIR) → bmodel (checked later, on the simulator against onnxruntime).

    ``inputs`` is the validation sample both tools run. It must not contain fully masked
    attention rows: on those the bf16 kernel and the MLIR reference legitimately disagree
    (a constant -1e4 row offset swamps bf16 precision), which fails the tool's compare for
    rows a runtime never reads.

    The tools' ``.npz`` files (the sample, the fp32 weights twice over, the addressed
    weights, the reference outputs) are removed once the bmodel is written: about 4x the
    bmodel, they filled the 39 GB left on disk at Qwen1.5-1.8B (500 MB a block entry
    against a 107 MB bmodel), and nothing reads them again. The MLIR and logs stay.
    """
    # Absolute: the tools run inside workdir, where relative paths would point elsewhere.
    workdir, onnx = workdir.absolute(), onnx.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    sample = workdir / f"{name}_in.npz"
    np.savez(sample, **inputs)
    mlir = workdir / f"{name}.mlir"
    shapes = [list(v.shape) for v in inputs.values()]
    start = time.monotonic()
    out = toolchain.run(
        "model_transform",
        transform_args(name, onnx, shapes, sample, mlir, simplify=kind not in PLAIN_KINDS),
        workdir,
        workdir / "model_transform.log",
    )
    transformed = time.monotonic()
    bmodel = workdir / f"{name}_{mode}.bmodel"
    out += toolchain.run(
        "model_deploy",
        deploy_args(name, kind, mode, chip, mlir, bmodel, q_group_size),
        workdir,
        workdir / "model_deploy.log",
    )
    seconds = (transformed - start, time.monotonic() - transformed)
    logs = (workdir / "model_transform.log", workdir / "model_deploy.log")
    for scratch in workdir.glob("*.npz"):  # see the docstring: 4x the bmodel, never read again
        scratch.unlink()
    return PieceBuild(name, bmodel, tuple(parse_compares(out)), logs, seconds)


def combine(toolchain: Toolchain, bmodels: Sequence[Path], dest: Path, workdir: Path) -> Path:
    """``model_tool --combine`` the pieces into one bmodel (the kernel module stored once)."""
    args = ["--combine", *(str(b.absolute()) for b in bmodels), "-o", str(dest.absolute())]
    toolchain.run("model_tool", args, workdir, workdir / "model_tool_combine.log")
    return dest


#: The simulator worker (runs under the venv's python with the combined bmodel as argv[1]).
#: It loads the bmodel into the chip model once and keeps every net it has run (the
#: vendor's ``model_inference`` re-reads the chip type and kernel mode through two
#: ``model_tool`` subprocesses, copies the bmodel and reloads it on every call, which cost
#: seconds per decode step). Requests are ``net<TAB>in.npz<TAB>out.npz`` lines, answered
#: ``ok``/``error ...`` on the original stdout; the runtime's own prints go to stderr (the
#: log), so they cannot corrupt the protocol. Inputs are lowered and outputs widened with
#: the tool's own helpers, as ``model_inference`` does.
_WORKER = r"""
import importlib, os, sys, traceback
import numpy as np
reply = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
from filelock import FileLock
from tools import model_runner as tool
from tpu_mlir.python.utils.lowering import bf16_to_fp32, lowering
bmodel = sys.argv[1]
chip = tool.get_chip_from_model(bmodel)
with FileLock("/tmp/cmodel_so.lock"):
    tool.link_cmodel_so(chip)
    tool.link_custom_so(chip)
    tool.link_bmlib_so(chip)
    runtime = importlib.import_module("pyruntime_bm")
    tool.bind_cmodel_so(chip)
model = runtime.Model(bmodel, 0, "")
nets = {}
reply.write("ready " + " ".join(model.networks) + "\n")

def widen(tensor):
    if tensor.dtype == "bf16":
        return bf16_to_fp32(tensor.data)
    if tensor.dtype == "f16":
        return tensor.data.astype(np.float32)
    return np.array(tensor.data)

for line in sys.stdin:
    name, src, dst = line.rstrip("\n").split("\t")
    try:
        if name not in nets:
            nets[name] = model.Net(name)
        net = nets[name]
        with np.load(src) as data:
            for tensor in net.inputs:
                value = data[tensor.name]
                if value.shape != tensor.data.shape:
                    raise ValueError(f"{tensor.name}: shape {value.shape} != {tensor.data.shape}")
                tensor.data[...] = lowering(
                    value, pdtype=tensor.dtype, pshape=value.shape,
                    pzero_point=tensor.qzero_point, pscale=tensor.qscale,
                ).reshape(value.shape)
        net.forward()
        np.savez(dst, *[widen(t) for t in net.outputs])
        reply.write("ok\n")
    except Exception as exc:
        traceback.print_exc()
        reply.write("error " + repr(exc).replace("\n", " ") + "\n")
"""


#: Importing ``tpu_mlir`` sets PATH/PYTHONPATH/LD_LIBRARY_PATH for its tools (the chip
#: model is a shared library found through LD_LIBRARY_PATH, which only takes effect at
#: process start), so the worker re-execs itself once with that environment — the same
#: thing the console scripts do.
_BOOTSTRAP = (
    "import os, sys, tpu_mlir; "
    "os.execv(sys.executable, [sys.executable, '-c', sys.argv[1], *sys.argv[2:]])"
)


class Simulator:
    """Runs the nets of one (combined) bmodel on tpu-mlir's CPU model of the chip, in one
    long-lived worker process that loads the bmodel once: the simulated artifact is the
    very file that ships, and a decode step costs only the simulated compute."""

    def __init__(self, toolchain: Toolchain, bmodel: Path, workdir: Path):
        self.workdir = workdir = workdir.absolute()
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "simulator.log"
        toolchain.package_dir()  # a missing toolchain fails here, with the fix to run
        self._sink = self.log.open("w")
        self._proc = subprocess.Popen(
            [str(toolchain.bin("python")), "-c", _BOOTSTRAP, _WORKER, str(bmodel.absolute())],
            cwd=workdir,
            env=toolchain.env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._sink,
            text=True,
        )
        assert self._proc.stdout is not None
        ready = self._proc.stdout.readline().split()
        if ready[:1] != ["ready"]:
            self.close()
            raise EdgeforgeError(f"simulator could not load {bmodel}; log {self.log}")
        self.nets = frozenset(ready[1:])
        #: Simulated calls and their wall seconds per net (the report's timing table).
        self.calls: dict[str, list[float]] = {}

    def __call__(self, name: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if name not in self.nets:
            raise EdgeforgeError(f"simulator: the bmodel has no net {name!r}")
        src, dst = self.workdir / "request_in.npz", self.workdir / "request_out.npz"
        np.savez(src, **inputs)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        start = time.monotonic()
        self._proc.stdin.write(f"{name}\t{src}\t{dst}\n")
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline().strip()
        self.calls.setdefault(name, []).append(time.monotonic() - start)
        if answer != "ok":
            raise EdgeforgeError(
                f"simulator run of {name} failed ({answer or 'worker exited'}); log {self.log}"
            )
        with np.load(dst) as data:
            return [data[k] for k in data.files]

    def close(self) -> None:
        """Stop the worker (end of input) and close the log."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
        self._proc.wait(timeout=60)
        self._sink.close()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _saved_build(entry: Path) -> PieceBuild:
    """A :class:`PieceBuild` read back from its cache entry's ``build.json``."""
    record = json.loads((entry / "build.json").read_text())
    return PieceBuild(
        record["name"],
        entry / record["bmodel"],
        tuple(Compare(**c) for c in record["compares"]),
        tuple(entry / log for log in record["logs"]),
        tuple(record["seconds"]),
    )


def _save_build(build: PieceBuild, entry: Path) -> None:
    """Write ``build.json`` beside the piece's outputs (paths relative to the entry)."""
    record = {
        "name": build.name,
        "bmodel": str(build.bmodel.relative_to(entry.absolute())),
        "compares": [dataclasses.asdict(c) for c in build.compares],
        "logs": [str(log.relative_to(entry.absolute())) for log in build.logs],
        "seconds": list(build.seconds),
    }
    (entry / "build.json").write_text(json.dumps(record, indent=1))


def compile_pieces(
    toolchain: Toolchain,
    pieces: Sequence[Piece],
    vocab_size: int,
    mode: str,
    chip: str,
    cache: PieceCache,
    jobs: int | None = None,
    q_group_size: int = 64,
    budget: int | None = None,
) -> list[PieceBuild]:
    """Compile every piece in its own entry of ``cache``, up to ``jobs`` (default: the core
    count) at once, and only as many as ``budget`` bytes hold (:func:`compile_bytes` each;
    a piece larger than the budget compiles alone); each tool is a separate process, so
    threads are enough to overlap them.

    A piece whose entry exists (same ONNX bytes, shapes, mode, chip, group size and
    toolchain) was compiled by an earlier run, perhaps one that was killed: it is reused,
    so a rerun continues from the last complete piece (``cache.reused`` names them).
    """
    from concurrent.futures import ThreadPoolExecutor

    version = toolchain.version()
    gate = MemoryGate(budget)

    def one(piece: Piece) -> PieceBuild:
        inputs = {
            spec[0]: tensor.numpy()
            for spec, tensor in zip(
                piece.inputs, example_inputs(piece.inputs, vocab_size), strict=True
            )
        }
        key = cache_key({
            "onnx": piece.path, "onnx_data": data_file(piece.path), "kind": piece.kind,
            "inputs": [list(spec) for spec in piece.inputs], "vocab_size": vocab_size,
            "mode": mode, "chip": chip, "q_group_size": q_group_size, "tpu_mlir": version,
        })  # fmt: skip

        def build(entry: Path) -> None:
            with gate.admitted(compile_bytes(piece.kind, weight_bytes(piece.path))):
                built = compile_piece(
                    toolchain, piece.name, piece.kind, piece.path, inputs, mode, chip, entry,
                    q_group_size,
                )  # fmt: skip
            _save_build(built, entry)

        return _saved_build(cache.fetch_or_build(piece.name, key, build))

    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        return list(progress(pool.map(one, pieces), total=len(pieces), desc=f"compile {mode}"))


def save_half_checkpoint(model_dir: Path, dest: Path, mode: str, keep: Sequence[str]) -> Path:
    """A copy of the checkpoint in the half type ``llm_convert`` requires (it rejects fp32:
    "Not support quantize type: torch.float32"): f16 for ``MODE=f16``, else bf16 — the
    same rounding our ONNX route's BF16 lowering applies to the weights. Tokenizer and
    config files (suffixes ``keep``) are copied, as the converter packages them."""
    import shutil

    import torch

    from common.models.loading import load_model

    dtype = torch.float16 if mode == "f16" else torch.bfloat16
    model = load_model(model_dir, dtype=dtype)
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(model_dir.iterdir()):
        if path.suffix in keep and path.name != "manifest.json":
            shutil.copy2(path, dest / path.name)
    model.save_pretrained(dest)
    return dest


def llm_convert_args(
    hf_dir: Path, seq_len: int, mode: str, chip: str, q_group_size: int, out_dir: Path
) -> list[str]:
    """``llm_convert`` flags: static ``seq_len``, our mode/chip, the scheme's group size and
    symmetry, and ``--do_sample`` so ``lm_head`` returns logits and ``greedy_head`` is a
    separate net — the same nets as the ONNX route, which lets one checker run both."""
    check_mode_chip(mode, chip)
    weights = mode_scheme(mode, q_group_size).weights
    return [
        "-m", str(hf_dir), "-s", str(seq_len), "-q", mode,
        *weight_flags(weights, "-g", "--symmetric"),
        "-c", chip, "-o", str(out_dir), "--do_sample",
    ]  # fmt: skip


def bmodel_plan(
    mode: str, q_group_size: int, route: str, linears: Iterable[tuple[str, str]], name: str
) -> dict[str, Any]:
    """The plan written beside a bmodel (``quant_plan.json``): per linear ``(name, role)``
    of the language model, the weight and activation dtypes both routes tell tpu-mlir to
    build (:func:`mode_scheme`, :func:`deploy_args`), and what the other nets hold."""
    scheme = mode_scheme(mode, q_group_size)
    return float_activation_plan(
        scheme,
        linears,
        name=name,
        artifact=f"SOPHGO combined bmodel, route {route}",
        extra={
            "route": route,
            "embedding": scheme.activations,
            "sampling_heads": "float32",
        },
    )


def run_llm_convert(
    toolchain: Toolchain,
    hf_dir: Path,
    seq_len: int,
    mode: str,
    chip: str,
    q_group_size: int,
    workdir: Path,
) -> Path:
    """Build the combined bmodel with ``llm_convert`` (needs the venv's torch >= 2.1 and
    GNU ``parallel`` in its ``bin``, both from ``make sophgo-toolchain LLM_CONVERT=1``);
    returns the one combined bmodel it writes."""
    out = workdir.absolute() / "llm_convert"
    args = llm_convert_args(hf_dir.absolute(), seq_len, mode, chip, q_group_size, out)
    toolchain.run("llm_convert", args, workdir, workdir / "llm_convert.log")
    found = sorted(out.glob("*.bmodel"))
    if len(found) != 1:
        raise EdgeforgeError(
            f"llm_convert: expected one combined bmodel in {out}, found {len(found)}; "
            f"log {workdir / 'llm_convert.log'}"
        )
    return found[0]


def fused_norm_reference(reference: PieceRunner, adapter: ModelAdapter, layers: int) -> PieceRunner:
    """The float pieces in ``llm_convert``'s layout: it applies the final norm at the end of
    the last ``block``/``block_cache`` and makes ``lm_head`` a bare projection. Composed,
    both layouts compute the same logits; per net, this is the float twin of each bmodel net.
    The norm and projection are the adapter's own modules, run in float32."""
    import torch

    norm, head = adapter.final_norm(), adapter.lm_head()
    last = {f"block_{layers - 1}", f"block_cache_{layers - 1}"}

    def apply(module: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(np.asarray(x, np.float32))).numpy()

    def run(name: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if name == "lm_head":
            return [apply(head, inputs["hidden_states"])]
        outputs = reference(name, inputs)
        if name in last:
            outputs = [apply(norm, outputs[0]), *outputs[1:]]
        return outputs

    return run

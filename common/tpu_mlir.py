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

import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import EdgeforgeError
from common.piece_export import Piece, example_inputs

#: Chips this module compiles for (both accepted by ``model_deploy --chip``).
CHIPS = ("bm1684x", "bm1688")
#: User-facing mode → ``model_deploy --quantize`` value.
QUANTIZE = {"bf16": "BF16", "f16": "F16", "w8bf16": "W8BF16", "w4bf16": "W4BF16"}
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


def transform_args(
    name: str, onnx: Path, shapes: Sequence[Sequence[int]], test_input: Path, mlir: Path
) -> list[str]:
    """``model_transform`` flags: ONNX → top MLIR, checked against onnxruntime on
    ``test_input`` (the reference outputs land next to the MLIR as ``<name>_top_out.npz``)."""
    return [
        "--model_name", name,
        "--model_def", str(onnx),
        "--input_shapes", shapes_arg(shapes),
        "--test_input", str(test_input),
        "--test_result", f"{name}_top_out.npz",
        "--mlir", str(mlir),
    ]  # fmt: skip


def check_mode_chip(mode: str, chip: str) -> None:
    """Reject an unknown ``MODE``/``CHIP`` before any work, naming the choices."""
    if mode not in QUANTIZE:
        raise EdgeforgeError(f"MODE={mode!r} is not supported; use one of {', '.join(QUANTIZE)}")
    if chip not in CHIPS:
        raise EdgeforgeError(f"CHIP={chip!r} is not supported; use one of {', '.join(CHIPS)}")


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
    I/O buffers (``io_alone``) so the KV cache can be bound in place."""
    check_mode_chip(mode, chip)
    half = "F16" if mode == "f16" else "BF16"
    args = ["--mlir", str(mlir), "--chip", chip, "--model", str(bmodel)]
    args += ["--test_input", f"{name}_in_f32.npz", "--test_reference", f"{name}_top_out.npz"]
    if kind in ("embedding", "embedding_cache"):
        return [*args, "--quantize", half, "--quant_input", "--quant_output"]
    if kind == "lm_head":
        return [*args, "--quantize", half, "--quant_input"]
    if kind in ("greedy_head", "penalty_sample_head"):
        return [*args, "--quantize", "F32"]
    quant = ["--quantize", QUANTIZE[mode]]
    if mode.startswith("w4"):
        quant += ["--q_group_size", str(q_group_size)]
    args += [*quant, "--quant_input", "--quant_output"]
    if kind == "block_cache":
        args += ["--addr_mode", "io_alone"]
    return args


@dataclass(frozen=True)
class PieceBuild:
    """A compiled piece: its bmodel, the tools' own compares, and the step logs."""

    name: str
    bmodel: Path
    compares: tuple[Compare, ...]
    logs: tuple[Path, ...]


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
    """ONNX → top MLIR (checked against onnxruntime) → bmodel (checked on the simulator).

    ``inputs`` is the validation sample both tools run. It must not contain fully masked
    attention rows: on those the bf16 kernel and the MLIR reference legitimately disagree
    (a constant -1e4 row offset swamps bf16 precision), which fails the tool's compare for
    rows a runtime never reads.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    sample = workdir / f"{name}_in.npz"
    np.savez(sample, **inputs)
    mlir = workdir / f"{name}.mlir"
    shapes = [list(v.shape) for v in inputs.values()]
    out = toolchain.run(
        "model_transform",
        transform_args(name, onnx, shapes, sample, mlir),
        workdir,
        workdir / "model_transform.log",
    )
    bmodel = workdir / f"{name}_{mode}.bmodel"
    out += toolchain.run(
        "model_deploy",
        deploy_args(name, kind, mode, chip, mlir, bmodel, q_group_size),
        workdir,
        workdir / "model_deploy.log",
    )
    logs = (workdir / "model_transform.log", workdir / "model_deploy.log")
    return PieceBuild(name, bmodel, tuple(parse_compares(out)), logs)


def combine(toolchain: Toolchain, bmodels: Sequence[Path], dest: Path, workdir: Path) -> Path:
    """``model_tool --combine`` the pieces into one bmodel (the kernel module stored once)."""
    args = ["--combine", *map(str, bmodels), "-o", str(dest)]
    toolchain.run("model_tool", args, workdir, workdir / "model_tool_combine.log")
    return dest


#: The simulator worker (runs under the venv's python): one ``model_inference`` per request
#: line ``bmodel<TAB>in.npz<TAB>out.npz``, answered ``ok``/``error ...`` on the original
#: stdout; the tool's own prints go to stderr (the log), so they cannot corrupt the protocol.
_WORKER = r"""
import os, sys, traceback
import numpy as np
reply = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
from tools.model_runner import model_inference
for line in sys.stdin:
    bmodel, src, dst = line.rstrip("\n").split("\t")
    try:
        with np.load(src) as data:
            inputs = {k: data[k] for k in data.files}
        outputs = model_inference(inputs, bmodel, dump_all=False)
        np.savez(dst, *[np.asarray(v) for v in outputs.values()])
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
    "import os, sys, tpu_mlir; os.execv(sys.executable, [sys.executable, '-c', sys.argv[1]])"
)


class Simulator:
    """Runs per-piece bmodels on tpu-mlir's CPU model of the chip, in one long-lived worker
    process (importing the runtime once instead of once per call)."""

    def __init__(self, toolchain: Toolchain, bmodels: dict[str, Path], workdir: Path):
        self.bmodels = bmodels
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "simulator.log"
        toolchain.package_dir()  # a missing toolchain fails here, with the fix to run
        self._sink = self.log.open("w")
        self._proc = subprocess.Popen(
            [str(toolchain.bin("python")), "-c", _BOOTSTRAP, _WORKER],
            cwd=workdir,
            env=toolchain.env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._sink,
            text=True,
        )

    def __call__(self, name: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if name not in self.bmodels:
            raise EdgeforgeError(f"simulator: no bmodel for piece {name!r}")
        src, dst = self.workdir / "request_in.npz", self.workdir / "request_out.npz"
        np.savez(src, **inputs)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(f"{self.bmodels[name]}\t{src}\t{dst}\n")
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline().strip()
        if answer != "ok":
            raise EdgeforgeError(
                f"simulator run of {name} failed ({answer or 'worker exited'}); log {self.log}"
            )
        with np.load(dst) as data:
            return [data[k] for k in data.files]

    def close(self) -> None:
        """Stop the worker (end of input) and close the log."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait(timeout=60)
        self._sink.close()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def compile_pieces(
    toolchain: Toolchain,
    pieces: Sequence[Piece],
    vocab_size: int,
    mode: str,
    chip: str,
    workdir: Path,
    jobs: int | None = None,
    q_group_size: int = 64,
) -> list[PieceBuild]:
    """Compile every piece in its own directory, up to ``jobs`` (default: the core count)
    at once; each tool is a separate process, so threads are enough to overlap them."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def one(piece: Piece) -> PieceBuild:
        inputs = {
            spec[0]: tensor.numpy()
            for spec, tensor in zip(
                piece.inputs, example_inputs(piece.inputs, vocab_size), strict=True
            )
        }
        return compile_piece(
            toolchain, piece.name, piece.kind, piece.path, inputs, mode, chip,
            workdir / piece.name, q_group_size,
        )  # fmt: skip

    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        return list(tqdm(pool.map(one, pieces), total=len(pieces), desc=f"compile {mode}"))

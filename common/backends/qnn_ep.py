"""Strict onnxruntime sessions on Qualcomm's QNN HTP backend, EPContext compilation, and
the read-back of what a compiled context binary was built for.

The ``onnxruntime-qnn`` wheel ships Qualcomm's x86-64 ``libQnnHtp.so``: on this host it
*emulates* the Hexagon NPU, and it finalizes graphs into context binaries for a chosen
SoC. Every way of getting it wrong is silent: passing
``providers=["QNNExecutionProvider"]`` gives a CPU session, a failed EP creation retries on
CPU, and ``get_providers()`` lists QNN even when every node runs on CPU. So sessions here
are built only one way — the plugin library registered, the EP attached per device,
``session.disable_cpu_ep_fallback=1``, ``enable_fallback=0`` — and every session's node
assignment is asserted to be all-QNN before it is returned.

A binary's target is asserted from its own metadata (``libQnnSystem.so``'s
``QnnSystemContext_getBinaryInfo``): the emulator runs a v79 binary whatever SoC the
session names, so a successful run proves nothing about the target.
"""

from __future__ import annotations

import ctypes
import json
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from common.core.errors import EdgeforgeError, reported_error

EP_NAME = "QNNExecutionProvider"
#: Lines of a failed compile process's stderr quoted in the error.
LOG_TAIL_LINES = 6


@dataclass(frozen=True)
class Soc:
    """A Snapdragon SoC the HTP backend can compile for (QnnTypes.h ``socModel`` enum)."""

    name: str
    soc_model: int
    htp_arch: int


#: SoCs ``make qnn`` compiles for; the keys are what recipes and ``SOCS=`` name.
SOC_TABLE: dict[str, Soc] = {
    "SM8550": Soc("SM8550", 43, 73),
    "SM8650": Soc("SM8650", 57, 75),
    "SM8750": Soc("SM8750", 69, 79),
    "SM8850": Soc("SM8850", 87, 81),
}
DEFAULT_SOC = "SM8650"
#: VTCM the graphs are finalized for (MB) and the graph finalization optimisation level.
DEFAULT_VTCM_MB = 8
DEFAULT_OPT_MODE = 3
#: ``OPT_MODE=auto``: each graph finalized at these modes in turn, the next tried only when
#: the compiler runs out of memory finalizing (:func:`finalization_ran_out`). Measured:
#: Qwen2 blocks with q/k/v biases from hidden 576 fail at modes 2 and 3, compile at 1.
AUTO_OPT_MODE = "auto"
AUTO_OPT_MODES = (3, 1)


def soc_by_name(name: str) -> Soc:
    """The table entry for ``name`` (case-insensitive), or an error listing the table."""
    soc = SOC_TABLE.get(str(name).upper())
    if soc is None:
        supported = ", ".join(f"{s.name} ({s.soc_model}/v{s.htp_arch})" for s in SOC_TABLE.values())
        raise EdgeforgeError(f"SoC {name!r} is not supported; supported: {supported}")
    return soc


@cache
def _qnn_module() -> Any:
    """Import ``onnxruntime_qnn`` and register its plugin EP library (once per process)."""
    try:
        import onnxruntime_qnn
    except ImportError:
        raise EdgeforgeError(
            "onnxruntime-qnn is not installed; make qnn installs targets/qnn/requirements.txt"
        ) from None
    import onnxruntime as ort

    ort.register_execution_provider_library(EP_NAME, onnxruntime_qnn.get_library_path())
    return onnxruntime_qnn


def qnn_versions() -> dict[str, str]:
    """The wheel's version and the QAIRT/QNN SDK it bundles (recorded in manifests)."""
    import onnxruntime as ort

    info = _qnn_module().build_and_package_info
    return {
        "onnxruntime": ort.__version__,
        "onnxruntime-qnn": info.__version__,
        "qnn_sdk": info.qnn_version,
    }


def provider_options(
    soc: Soc, vtcm_mb: int = DEFAULT_VTCM_MB, opt_mode: int = DEFAULT_OPT_MODE
) -> dict[str, str]:
    """QNN EP options for compiling/running on ``soc``'s HTP. ``soc_model`` is always set:
    without it the backend targets v68, which no current phone has."""
    return {
        "backend_type": "htp",
        "soc_model": str(soc.soc_model),
        "htp_arch": str(soc.htp_arch),
        "vtcm_mb": str(vtcm_mb),
        "htp_graph_finalization_optimization_mode": str(opt_mode),
        # The QDQ graphs keep the residual stream in float (common.backends.qdq.float_nodes).
        "enable_htp_fp16_precision": "1",
    }


def strict_options(options: Mapping[str, str]) -> Any:
    """Session options that can only run on QNN: no CPU fallback, assignment recorded."""
    import onnxruntime as ort

    _qnn_module()
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise EdgeforgeError("onnxruntime-qnn is installed but exposes no QNN device")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    so.add_provider_for_devices(devices, dict(options))
    return so


def node_assignment(session: Any) -> dict[str, dict[str, int]]:
    """``{ep name: {op type: count}}`` as the session actually placed the nodes."""
    placed: dict[str, dict[str, int]] = {}
    for subgraph in session.get_provider_graph_assignment_info():
        ops = placed.setdefault(subgraph.ep_name, {})
        for node in subgraph.get_nodes():
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return placed


def assert_all_on_qnn(session: Any, source: str) -> dict[str, int]:
    """The op counts on QNN; raises naming the ops any other EP took."""
    placed = node_assignment(session)
    others = {ep: ops for ep, ops in placed.items() if ep != EP_NAME}
    if others or not placed.get(EP_NAME):
        raise EdgeforgeError(f"{source}: not every node runs on QNN HTP: {placed}")
    return placed[EP_NAME]


def rejected_ops(model: Path, options: Mapping[str, str]) -> dict[str, int]:
    """Which ops QNN would not take: a diagnostic session that *allows* CPU placement,
    used only to name the culprits after a strict session failed (never to run)."""
    import onnxruntime as ort

    so = strict_options(options)
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "0")
    try:
        session = ort.InferenceSession(str(model), sess_options=so, enable_fallback=0)
    except Exception:  # the EP itself failed; nothing more specific to report
        return {}
    placed = node_assignment(session)
    return {op: n for ep, ops in placed.items() if ep != EP_NAME for op, n in ops.items()}


def _qnn_rejection(model: Path, options: Mapping[str, str], exc: Exception) -> EdgeforgeError:
    """One line naming the ops QNN refused (or the backend's message when none is named)."""
    ops = rejected_ops(model, options)
    if ops:
        listed = ", ".join(f"{op} x{n}" for op, n in sorted(ops.items()))
        return EdgeforgeError(
            f"{model}: QNN HTP does not support these nodes (they would fall back to CPU, "
            f"which is disabled): {listed}"
        )
    text = " ".join(str(exc).split())
    hint = ""
    if "MEM_ALLOC" in text and options.get("htp_graph_finalization_optimization_mode") != "1":
        hint = (
            " (graph finalization at a lower optimization mode may succeed: OPT_MODE=1, or "
            "OPT_MODE=auto to lower it only for the graphs that need it)"
        )
    return EdgeforgeError(f"{model}: QNN HTP rejected the graph: {text}{hint}")


def strict_session(model: Path, options: Mapping[str, str]) -> Any:
    """A QNN-only session on ``model`` whose every node is asserted to be on QNN."""
    import onnxruntime as ort

    so = strict_options(options)
    try:
        session = ort.InferenceSession(str(model), sess_options=so, enable_fallback=0)
    except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
        raise _qnn_rejection(Path(model), options, exc) from None
    assert_all_on_qnn(session, str(model))
    return session


def finalization_ran_out(error: EdgeforgeError) -> bool:
    """Whether ``error`` is the HTP compiler running out of memory at graph finalization
    (``QNN_COMMON_ERROR_MEM_ALLOC``), which a lower optimization mode avoids."""
    return "QNN_COMMON_ERROR_MEM_ALLOC" in str(error)


@dataclass(frozen=True)
class Compiled:
    """A context binary, the optimization mode it was finalized at, and why a higher one
    was given up (None: the first mode tried)."""

    binary: Path
    opt_mode: int
    lowered_because: str | None


def compile_at_modes(
    model: Path, dest: Path, soc: Soc, vtcm_mb: int, modes: Sequence[int]
) -> Compiled:
    """:func:`compile_context` at the first of ``modes`` that finalizes: a later mode is
    tried only when the compiler ran out of memory at the one before; any other error,
    or the last mode's, is raised. The lowering is returned for the report, never
    silent."""
    lowered = None
    for i, mode in enumerate(modes):
        try:
            binary = compile_context(model, dest, provider_options(soc, vtcm_mb, mode))
        except EdgeforgeError as exc:
            if i == len(modes) - 1 or not finalization_ran_out(exc):
                raise
            lowered = f"OPT_MODE {mode} ran out of memory at graph finalization"
            continue
        return Compiled(binary, mode, lowered)
    raise EdgeforgeError(f"{model}: no optimization mode to compile at")


def compile_context(model: Path, dest: Path, options: Mapping[str, str]) -> Path:
    """Compile a QDQ ``model`` into an EPContext model ``dest`` plus its ``.bin`` (embed
    mode 0: the binary stays outside the protobuf, which caps at 2 GB). Returns the bin.

    In a fresh Python process, from the model's bytes: QNN numbers tensors with a
    per-process counter and onnxruntime names the compiled graph after a hash of the
    model's path, so a piece compiled in-process after others, or from another folder,
    came out with other bytes. From bytes in a process of its own the same piece gives
    the same ``.onnx`` and ``.bin`` every time (tested), and the compiler's memory is
    returned when the process ends."""
    command = [sys.executable, "-m", __name__, str(model), str(dest), json.dumps(dict(options))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        reported = reported_error(done.stderr)
        if reported is not None:
            raise EdgeforgeError(reported)
        how = f"exit {done.returncode}"
        if done.returncode < 0:
            how = f"killed by {signal.Signals(-done.returncode).name}"
        tail = " | ".join(done.stderr.strip().splitlines()[-LOG_TAIL_LINES:]) or "no output"
        raise EdgeforgeError(f"{model}: the QNN compiler process failed ({how}): {tail}")
    return context_bin_path(dest)


def _compile_here(model: Path, dest: Path, options: Mapping[str, str]) -> None:
    """:func:`compile_context`'s work, in the process it starts."""
    import onnxruntime as ort

    from common.export.onnx_files import data_file

    so = strict_options(options)
    if data_file(model).is_file():  # bytes carry no folder to resolve the data file in
        so.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(model.parent)
        )
    compiler = ort.ModelCompiler(
        so,
        model.read_bytes(),
        embed_compiled_data_into_model=False,
        flags=ort.OrtCompileApiFlags.ERROR_IF_NO_NODES_COMPILED,
    )
    try:
        compiler.compile_to_file(str(dest))
    except Exception as exc:
        raise _qnn_rejection(model, options, exc) from None


def context_bin_path(ctx_model: Path) -> Path:
    """The ``.bin`` an embed-mode-0 EPContext model points at (its ``ep_cache_context``)."""
    import onnx

    graph = onnx.load(str(ctx_model), load_external_data=False).graph
    nodes = [n for n in graph.node if n.op_type == "EPContext"]
    if len(nodes) != 1:
        raise EdgeforgeError(f"{ctx_model}: expected one EPContext node, found {len(nodes)}")
    attrs = {a.name: a for a in nodes[0].attribute}
    if attrs["embed_mode"].i != 0:
        raise EdgeforgeError(f"{ctx_model}: context binary is embedded (embed_mode != 0)")
    return Path(ctx_model).parent / attrs["ep_cache_context"].s.decode()


# -- context-binary metadata through libQnnSystem.so ------------------------------------


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32), ("patch", ctypes.c_uint32)]


class _GraphBlobInfo(ctypes.Structure):
    # QnnHtpSystemContext_GraphBlobInfo_t, v1 variant
    _fields_ = [
        ("version", ctypes.c_uint32),
        ("spill_fill", ctypes.c_uint64),
        ("vtcm_bytes", ctypes.c_uint32),
        ("optimization_level", ctypes.c_uint32),
    ]


class _GraphInfo(ctypes.Structure):
    # QnnSystemContext_GraphInfo_t: version tag, then the v3 variant of the union
    _fields_ = [
        ("version", ctypes.c_uint32),
        ("graph_name", ctypes.c_char_p),
        ("num_inputs", ctypes.c_uint32),
        ("inputs", ctypes.c_void_p),
        ("num_outputs", ctypes.c_uint32),
        ("outputs", ctypes.c_void_p),
        ("num_updateable", ctypes.c_uint32),
        ("updateable", ctypes.c_void_p),
        ("blob_info_size", ctypes.c_uint32),
        ("blob_info", ctypes.POINTER(_GraphBlobInfo)),
        ("start_op", ctypes.c_uint32),
        ("end_op", ctypes.c_uint32),
    ]


class _ContextBlobInfo(ctypes.Structure):
    # QnnHtpSystemContext_ContextBlobInfo_t: version, then v1 {uint32 dspArch}
    _fields_ = [("version", ctypes.c_uint32), ("dsp_arch", ctypes.c_uint32)]


class _BinaryInfoV3(ctypes.Structure):
    _fields_ = [
        ("backend_id", ctypes.c_uint32),
        ("build_id", ctypes.c_char_p),
        ("core_api", _Version),
        ("backend_api", _Version),
        ("soc_version", ctypes.c_char_p),
        ("context_blob_version", _Version),
        ("context_blob_size", ctypes.c_uint64),
        ("num_context_tensors", ctypes.c_uint32),
        ("context_tensors", ctypes.c_void_p),
        ("num_graphs", ctypes.c_uint32),
        ("graphs", ctypes.POINTER(_GraphInfo)),
        ("platform_info", ctypes.c_void_p),
        ("context_metadata_size", ctypes.c_uint32),
        ("context_metadata", ctypes.POINTER(_ContextBlobInfo)),
        ("soc_model", ctypes.c_uint32),
    ]


class _BinaryInfo(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("v3", _BinaryInfoV3)]


_CREATE = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.POINTER(ctypes.c_void_p))
_GET_INFO = ctypes.CFUNCTYPE(
    ctypes.c_uint64,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_uint64,
    ctypes.POINTER(ctypes.POINTER(_BinaryInfo)),
    ctypes.POINTER(ctypes.c_uint64),
)
_FREE = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p)


class _SystemInterface(ctypes.Structure):
    _fields_ = [
        ("backend_id", ctypes.c_uint32),
        ("provider_name", ctypes.c_char_p),
        ("api", _Version),
        ("create", _CREATE),
        ("get_binary_info", _GET_INFO),
        ("get_metadata", ctypes.c_void_p),
        ("free", _FREE),
    ]


@dataclass(frozen=True)
class BinaryInfo:
    """What a context binary says it was built for."""

    soc_model: int
    htp_arch: int
    vtcm_mb: int
    optimization_level: int
    graphs: tuple[str, ...]
    build_id: str


@cache
def _system_interface() -> _SystemInterface:
    lib_dir = Path(_qnn_module().get_library_path()).parent
    lib = ctypes.CDLL(str(lib_dir / "libQnnSystem.so"))
    providers = ctypes.POINTER(ctypes.POINTER(_SystemInterface))()
    count = ctypes.c_uint32()
    if lib.QnnSystemInterface_getProviders(ctypes.byref(providers), ctypes.byref(count)):
        raise EdgeforgeError("libQnnSystem.so: QnnSystemInterface_getProviders failed")
    interface = providers[0].contents
    if interface.api.major != 1:
        raise EdgeforgeError(f"libQnnSystem.so: system API {interface.api.major}.x is not 1.x")
    interface._lib = lib  # keep the library loaded as long as the table is used
    return interface


def read_binary_info(path: Path) -> BinaryInfo:
    """SoC model, HTP arch, VTCM size and graph names recorded in a context binary."""
    data = Path(path).read_bytes()
    api = _system_interface()
    handle = ctypes.c_void_p()
    if api.create(ctypes.byref(handle)):
        raise EdgeforgeError("libQnnSystem.so: QnnSystemContext_create failed")
    try:
        buffer = ctypes.create_string_buffer(data, len(data))
        info = ctypes.POINTER(_BinaryInfo)()
        size = ctypes.c_uint64()
        status = api.get_binary_info(
            handle, buffer, len(data), ctypes.byref(info), ctypes.byref(size)
        )
        if status or not info:
            raise EdgeforgeError(f"{path}: not a QNN context binary (getBinaryInfo {status})")
        if info.contents.version != 3:
            raise EdgeforgeError(f"{path}: binary info v{info.contents.version}, expected v3")
        v3 = info.contents.v3
        graphs = [v3.graphs[i] for i in range(v3.num_graphs)]
        if not v3.context_metadata or v3.context_metadata.contents.version != 1:
            raise EdgeforgeError(f"{path}: context binary has no HTP context info (dspArch)")
        if not graphs or any(g.version != 3 or not g.blob_info for g in graphs):
            raise EdgeforgeError(f"{path}: context binary has no v3 HTP graph info")
        if any(g.blob_info.contents.version != 1 for g in graphs):
            raise EdgeforgeError(f"{path}: unknown HTP graph info version")
        return BinaryInfo(
            soc_model=int(v3.soc_model),
            htp_arch=int(v3.context_metadata.contents.dsp_arch),
            vtcm_mb=int(graphs[0].blob_info.contents.vtcm_bytes) // 2**20,  # stored in bytes
            optimization_level=int(graphs[0].blob_info.contents.optimization_level),
            graphs=tuple(g.graph_name.decode() for g in graphs),
            build_id=(v3.build_id or b"").decode(),
        )
    finally:
        api.free(handle)


def check_binary_target(
    path: Path, soc: Soc, vtcm_mb: int = DEFAULT_VTCM_MB, opt_mode: int = DEFAULT_OPT_MODE
) -> BinaryInfo:
    """Read ``path``'s metadata and fail unless it targets ``soc`` with these options."""
    info = read_binary_info(path)
    got = (info.soc_model, info.htp_arch, info.vtcm_mb, info.optimization_level)
    want = (soc.soc_model, soc.htp_arch, vtcm_mb, opt_mode)
    if got != want:
        raise EdgeforgeError(
            f"{path}: built for socModel/arch/VTCM MB/opt level {got}, expected {soc.name} {want}"
        )
    return info


if __name__ == "__main__":  # compile_context's process: model, dest, options as JSON
    from common.core.errors import run_cli

    run_cli(lambda: _compile_here(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])))

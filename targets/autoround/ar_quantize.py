"""Run Intel AutoRound (the ``auto-round`` package) offline and fix what its exports get wrong.

The algorithm is AutoRound's own: this module only feeds it local calibration data, keeps it
off the network, and repairs one export defect before anything is verified:

* ``auto_gptq`` exports carry no ``block_name_to_quantize``. For a vision-language model the
  loader then also converts the float vision tower into empty quantized layers (NaN logits on
  image prompts); it is written from the blocks that were quantized.

GGUF export goes through the llama.cpp converter auto-round bundles; whether it can convert
the model with the installed ``gguf`` package is checked before tuning
(:func:`check_gguf_support`), and its auto-update (a download from GitHub) is kept off.

Model-free RTN (which writes block names transformers 5 no longer uses) and torch.compile
(20x slower on CPU) are switched off.

Given a checkpoint folder instead of a loaded model, AutoRound runs on its own disk-stream
path (:func:`streamed`): the model is a meta skeleton, only the embedding, final norm and
LM head are real, each decoder block is read from the safetensors files when its turn
comes, tuned on the previous (quantized) block's outputs as always, packed, and written
to the export's current shard before the next is read. The algorithm, its order and its
seed are those of the whole-model run; the exported bytes are identical (tested).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from common.core.errors import EdgeforgeError

#: Variables that keep every Hugging Face library (and auto-round's GGUF helper) off the net.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "AUTO_ROUND_GGUF_AUTO_UPDATE": "0",
}

_NETWORK_FAMILIES = (socket.AF_INET, socket.AF_INET6)

#: Text of the errors huggingface_hub / datasets / auto-round raise when offline mode (or the
#: socket guard) stops a download; auto-round wraps them in RuntimeError/ConnectionError.
_OFFLINE_MARKERS = (
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "on the Hub",
    "network issue",
    "offline mode",
)


class NetworkBlocked(OSError):
    """Raised inside the library when it opens an internet socket during quantization."""


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Set the offline variables and refuse internet sockets for the duration.

    The variables alone stop ``huggingface_hub``; auto-round also has plain ``requests``
    fallbacks (LLaVA json, COCO images, llama.cpp code), which the socket guard catches. Local
    (unix) sockets stay allowed; forked calibration workers inherit the guard.
    """
    saved_env = {key: os.environ.get(key) for key in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    original = socket.socket.connect

    def guarded(sock: socket.socket, address: Any) -> Any:
        if sock.family in _NETWORK_FAMILIES:
            raise NetworkBlocked(f"network access to {address!r} blocked")
        return original(sock, address)

    socket.socket.connect = guarded  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.socket.connect = original  # type: ignore[method-assign]
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _tried_network(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything in its cause chain) is a blocked hub or network access."""
    seen: BaseException | None = exc
    while seen is not None:
        text = f"{type(seen).__name__}: {seen}"
        if isinstance(seen, NetworkBlocked) or any(m in text for m in _OFFLINE_MARKERS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def window_loader(windows: torch.Tensor, batch_size: int) -> torch.utils.data.DataLoader:
    """Calibration token windows ``[n, seqlen]`` as the DataLoader AutoRound accepts.

    Handing AutoRound a loader (instead of a dataset name) is what keeps it from choosing
    its hub default (``NeelNanda/pile-10k``): the windows are exactly ours.
    """
    samples = [{"input_ids": window} for window in windows]
    return torch.utils.data.DataLoader(samples, batch_size=batch_size, shuffle=False)


def register_llava_file(path: Path) -> str:
    """Make AutoRound read a local LLaVA json (its registry is keyed by dataset name)."""
    from auto_round.compressors.mllm.dataset import MLLM_DATASET

    key = str(path)
    MLLM_DATASET[key] = MLLM_DATASET["liuhaotian/llava"]
    return key


#: Packages auto-round's GGUF writer imports (it tries a SentencePiece vocab first).
GGUF_MODULES = ("gguf", "sentencepiece")


def check_gguf_support(model_dir: Path, fmt: str) -> None:
    """Fail before tuning if auto-round's bundled llama.cpp converter cannot write ``fmt``.

    The converter is imported exactly as the export will import it (``LLAMA_CPP_ROOT``, if
    set, is honoured; the GitHub auto-update is off), so a model architecture it cannot
    convert with the installed ``gguf`` package is one clear line instead of a traceback
    after minutes of tuning.
    """
    import importlib.metadata
    import importlib.util

    missing = [name for name in GGUF_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise EdgeforgeError(
            f"FORMAT {fmt} needs the Python package(s) {', '.join(missing)}; run `make "
            "autoround-venv` (pins in targets/autoround/requirements.txt)"
        )
    from auto_round.export.export_to_gguf.llama_cpp_conversion import get_conversion

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = (config.get("architectures") or ["?"])[0]
    with offline():
        try:
            get_conversion(hparams=config, auto_update=False)
        except (NotImplementedError, ImportError) as exc:
            cause = exc.__cause__ or exc
            raise EdgeforgeError(
                f"FORMAT {fmt}: auto-round's bundled llama.cpp converter cannot convert {arch} "
                f"with gguf {importlib.metadata.version('gguf')} ({type(cause).__name__}: "
                f"{str(cause).splitlines()[0]}); point LLAMA_CPP_ROOT at a llama.cpp checkout "
                "whose converter supports it, or choose auto_round, auto_gptq or auto_awq"
            ) from None


#: Shard size of a streamed export: the shard writer holds a shard's packed tensors until it
#: is full (auto-round's default is 5 GB), so this bounds what the export keeps in memory.
STREAMED_SHARD_SIZE = "1GB"


@contextlib.contextmanager
def streamed() -> Iterator[None]:
    """auto-round's disk-stream mode, reading every tensor in float32.

    ``AR_DISK_STREAM_MODEL=1`` builds the model as a meta skeleton and materializes one
    block at a time from the checkpoint (``auto_round.utils.disk_stream_util``). It keeps
    each tensor's stored dtype, so a bf16 checkpoint would be tuned in bf16 (and fail
    beside the fp32 caches of ``amp=False``); the whole-model run tunes a float32 copy.
    Upcasting as each tensor is read gives exactly the weights that run sees.
    """
    from auto_round.utils import disk_stream_util

    index = disk_stream_util.SafetensorsIndex
    read_tensors = index.read_tensors

    def read_float32(self: Any, names: list[str], device: str = "cpu") -> dict[str, torch.Tensor]:
        tensors = read_tensors(self, names, device=device)
        return {n: t.float() if t.is_floating_point() else t for n, t in tensors.items()}

    saved = os.environ.get("AR_DISK_STREAM_MODEL")
    os.environ["AR_DISK_STREAM_MODEL"] = "1"
    index.read_tensors = read_float32  # type: ignore[method-assign]
    try:
        yield
    finally:
        index.read_tensors = read_tensors  # type: ignore[method-assign]
        if saved is None:
            os.environ.pop("AR_DISK_STREAM_MODEL", None)
        else:
            os.environ["AR_DISK_STREAM_MODEL"] = saved


def _release_autoround() -> None:
    """Drop auto-round's process-wide singletons: its model context keeps the (streamed:
    embedding and LM head, else whole) model alive after the run, 2.3 GiB at Qwen1.5-1.8B
    that the verification would carry; a next run creates them afresh anyway."""
    from auto_round.compressors.shard_writer import ShardWriter
    from auto_round.context.compress import CompressContext
    from auto_round.context.model import ModelContext

    from common.models.streaming import return_freed_memory

    CompressContext.reset_context()
    ModelContext.reset_context()
    ShardWriter.reset()
    gc.collect()
    return_freed_memory()  # the heap it freed, back to the OS before the verification


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the objects alive before the run out of every garbage collection during it.

    auto-round calls ``gc.collect()`` several times per block; each walked every object
    of this process (the tokenizer, transformers' import tables, ...), about a second a
    call: 17 of 42 seconds on a two-block model. Frozen, those objects are skipped; they
    stay alive anyway, and nothing auto-round creates is exempted.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_autoround(
    model: torch.nn.Module | Path,
    *,
    tokenizer: Any,
    processor: Any | None,
    dataset: Any,
    out_dir: Path,
    options: Any,
    extra: dict[str, Any],
) -> tuple[dict[str, Path], float]:
    """Tune and export; returns ``({format: exported dir}, tuning+export seconds)``.

    ``model`` is a loaded float32 model, or a safetensors checkpoint folder to stream
    block by block (:func:`streamed`). A streamed run tunes once per format: given
    several, auto-round keeps the whole tuned model in memory to pack it for each, while
    one format is packed and written block by block; the tuning is seeded, so every
    format holds the same rounding. ``dataset`` is a DataLoader of token windows or a
    registered local LLaVA json key; ``extra`` carries VL-only arguments
    (``extra_data_dir``, ``template``).
    """
    runs = [(options, out_dir)]
    if isinstance(model, Path) and len(options.formats) > 1:
        runs = [
            (dataclasses.replace(options, formats=(fmt,)), out_dir / fmt.replace(":", "-"))
            for fmt in options.formats
        ]
    exports: dict[str, Path] = {}
    seconds = 0.0
    for one, dest in runs:
        try:
            exported, took = _run_once(
                model, tokenizer=tokenizer, processor=processor, dataset=dataset,
                out_dir=dest, options=one, extra=extra,
            )  # fmt: skip
        finally:
            _release_autoround()
        exports.update(exported)
        seconds += took
    return exports, seconds


def _run_once(
    model: torch.nn.Module | Path,
    *,
    tokenizer: Any,
    processor: Any | None,
    dataset: Any,
    out_dir: Path,
    options: Any,
    extra: dict[str, Any],
) -> tuple[dict[str, Path], float]:
    """One AutoRound run writing every format of ``options`` (see :func:`run_autoround`)."""
    from auto_round import AutoRound

    kwargs: dict[str, Any] = {
        "tokenizer": tokenizer,
        "bits": options.bits,
        "group_size": options.group_size,
        "sym": options.sym,
        "dataset": dataset,
        "iters": options.iters,
        "nsamples": options.nsamples,
        "seqlen": options.seqlen,
        "batch_size": min(8, options.nsamples),
        "device_map": "cpu",
        "enable_torch_compile": False,
        "amp": False,  # tune in fp32: CPU bf16 autocast is slower here and rounds the weights
        "disable_model_free": True,
        "seed": options.seed,
        "trust_remote_code": False,  # auto-round's default is True; no step here runs remote code
        **extra,
    }
    if options.formats[0].startswith("gguf:"):  # the GGUF type is the scheme
        for key in ("bits", "group_size", "sym"):
            del kwargs[key]
        kwargs["scheme"] = options.formats[0].upper()
    if processor is not None:
        kwargs["processor"] = processor
        kwargs["quant_nontext_module"] = options.quant_nontext_module
    stream = isinstance(model, Path)
    start = time.perf_counter()
    with offline(), streamed() if stream else contextlib.nullcontext(), frozen_heap():
        try:
            compressor = AutoRound(str(model) if stream else model, **kwargs)
            _, folders = compressor.quantize_and_save(
                str(out_dir),
                format=",".join(options.formats),
                max_shard_size=STREAMED_SHARD_SIZE if stream else None,
            )
        except SystemExit as exc:  # auto-round calls sys.exit when no sample survives
            raise EdgeforgeError(
                f"auto-round found no usable calibration sample (exit {exc.code}); samples "
                f"shorter than SEQLEN={options.seqlen} tokens are dropped: lower SEQLEN or give "
                "longer samples"
            ) from None
        except NotImplementedError as exc:  # llama.cpp's tokenizer fingerprint check
            if "pre-tokenizer was not recognized" not in str(exc):
                raise
            raise EdgeforgeError(
                f"FORMAT {options.formats[0]}: llama.cpp's converter does not know this "
                "model's tokenizer (its BPE pre-tokenizer fingerprint is not in the bundled "
                "list), so the GGUF would tokenize wrongly; choose another FORMAT"
            ) from None
        except Exception as exc:
            if _tried_network(exc):
                raise EdgeforgeError(
                    f"auto-round tried to reach the network ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); this step runs offline: "
                    "calibrate on the project corpus or a local DATA file"
                ) from None
            raise
    seconds = time.perf_counter() - start
    if isinstance(folders, str | os.PathLike):  # one format: a single path, not a list
        folders = [folders]
    if len(folders) != len(options.formats):
        raise EdgeforgeError(
            f"auto-round wrote {len(folders)} export(s) for {len(options.formats)} format(s)"
        )
    return {
        fmt: Path(folder) for fmt, folder in zip(options.formats, folders, strict=True)
    }, seconds


def block_prefixes(block_names: list[str]) -> list[str]:
    """``model.layers.3`` → ``model.layers``: the block lists a loader matches layers by."""
    return sorted({name.rsplit(".", 1)[0] for name in block_names})


def fix_export_config(export_dir: Path, fmt: str, prefixes: list[str]) -> dict[str, Any]:
    """Repair ``config.json`` of one export in place; returns its final quantization_config."""
    config_path = export_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    quant = config.get("quantization_config")
    if not isinstance(quant, dict):
        raise EdgeforgeError(f"{config_path}: auto-round wrote no quantization_config")
    if fmt == "auto_gptq" and not quant.get("block_name_to_quantize"):
        quant["block_name_to_quantize"] = ",".join(prefixes)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return quant

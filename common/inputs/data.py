"""Text corpora: streaming record readers and token windows for calibration and evaluation.

A corpus is one or more files, or directories of them (read recursively, in sorted path
order, hidden files skipped):

* ``.jsonl.zst`` — Pile-style JSON lines compressed with zstd (the Pile's ``val.jsonl.zst``,
  the shipped ``data/web-bible`` splits); every line an object with a string ``"text"``.
* ``.jsonl`` — the same, uncompressed.
* ``.txt`` — plain UTF-8 text; each paragraph (lines up to a blank line) is one record,
  so a book-length file still becomes document-sized records with its line breaks kept.

Everything streams: a ``.zst`` file is decompressed chunk by chunk and read line by line,
and windows are cut from a running token buffer, so memory does not grow with the corpus
(a multi-GB Pile shard works as well as the shipped few MB).

Token windows are cut the same way for calibration and evaluation: documents are encoded
without special tokens and joined with the tokenizer's EOS id between them (when it has
one), and the stream is cut into consecutive non-overlapping windows of ``seq_len``.
Calibration takes a seeded reservoir sample of those windows; evaluation takes the first
ones, so the perplexity set is fixed by the corpus alone.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import zstandard

from common.core.errors import EdgeforgeError
from common.core.paths import REPO_ROOT
from common.core.progress import progress

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

#: The shipped World English Bible corpus (see data/SOURCE.md).
CORPUS_DIR = REPO_ROOT / "data" / "web-bible"
#: Calibration split: every book not held out.
CALIB_CORPUS = CORPUS_DIR / "calib.jsonl.zst"
#: Held-out evaluation split: whole books never seen in calibration.
EVAL_CORPUS = CORPUS_DIR / "eval.jsonl.zst"

#: Accepted file name endings, longest first so ``.jsonl.zst`` wins over ``.zst``.
SUFFIXES = (".jsonl.zst", ".jsonl", ".txt")

_READ_SIZE = 1 << 16  # compressed bytes fed to zstd per step
_ENCODE_BATCH = 64  # documents tokenized per call (the fast tokenizer batches in Rust)

PathArg = str | os.PathLike[str]


# --------------------------------------------------------------------------------------
# Files


def _suffix(path: Path) -> str | None:
    """The accepted ending of ``path``'s name, or None."""
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def _as_paths(paths: PathArg | Iterable[PathArg]) -> list[Path]:
    """One path or many, as a list: callers may pass a single file or directory."""
    if isinstance(paths, str | os.PathLike):
        return [Path(paths)]
    return [Path(p) for p in paths]


def corpus_files(paths: PathArg | Iterable[PathArg]) -> list[Path]:
    """The files a corpus argument names: files as given, directories expanded.

    Directories are searched recursively and their corpus files taken in sorted path order
    (other files, and hidden ones such as interrupted atomic writes, are ignored), so the
    same tree always gives the same stream.
    """
    files: list[Path] = []
    for path in _as_paths(paths):
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and _suffix(p)
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise EdgeforgeError(
                    f"{path}: directory holds no corpus files ({', '.join(SUFFIXES)})"
                )
            files.extend(found)
        elif path.is_file():
            if _suffix(path) is None:
                raise EdgeforgeError(
                    f"{path}: unknown corpus file type; accepted: {', '.join(SUFFIXES)} "
                    "or a directory of them"
                )
            files.append(path)
        else:
            raise EdgeforgeError(f"{path}: corpus file or directory not found")
    return files


class _ZstdStream(io.RawIOBase):
    """Decompressed bytes of a ``.zst`` file, produced a chunk at a time.

    zstandard's ``stream_reader`` silently ends early on a truncated file; this reader
    drives a decompressor object frame by frame instead, so it can tell a cut-off or
    non-zstd file from a complete one and say so. Memory is one input chunk and its
    decompressed output.
    """

    def __init__(self, fh: BinaryIO, path: Path) -> None:
        super().__init__()
        self._fh = fh
        self._path = path
        self._dctx = zstandard.ZstdDecompressor()
        self._frame: Any = None  # the decompressor of the frame being read, if any
        self._frames = 0
        self._chunk = b""
        self._offset = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the current decompressed chunk, decompressing more if needed."""
        while self._offset >= len(self._chunk):
            if self._done:
                return 0
            self._chunk = self._next_chunk()
            self._offset = 0
        size = min(len(buffer), len(self._chunk) - self._offset)
        buffer[:size] = self._chunk[self._offset : self._offset + size]
        self._offset += size
        return size

    def _invalid(self, why: str) -> EdgeforgeError:
        return EdgeforgeError(f"{self._path} is not a valid zstd stream: {why}")

    def _next_chunk(self) -> bytes:
        """Decompress the next input chunk; at end of input, check the last frame closed."""
        data = self._fh.read(_READ_SIZE)
        if not data:
            if self._frame is not None:
                raise self._invalid("truncated (the file ends inside a frame)")
            if self._frames == 0:
                raise self._invalid("empty file")
            self._done = True
            return b""
        out: list[bytes] = []
        try:
            while data:
                if self._frame is None:
                    self._frame = self._dctx.decompressobj()
                    self._frames += 1
                out.append(self._frame.decompress(data))
                if not self._frame.eof:
                    break
                data = self._frame.unused_data
                self._frame = None
        except zstandard.ZstdError as exc:
            raise self._invalid(str(exc)) from None
        return b"".join(out)


def _text_lines(path: Path, fh: BinaryIO) -> Iterator[str]:
    """Lines of ``path`` decoded as UTF-8, decompressing ``.zst`` on the fly."""
    if path.name.lower().endswith(".zst"):
        binary: BinaryIO | io.BufferedReader = io.BufferedReader(_ZstdStream(fh, path))
    else:
        binary = fh
    stream = io.TextIOWrapper(binary, encoding="utf-8", newline="\n")
    lineno = 0
    try:
        for lineno, line in enumerate(stream, 1):  # noqa: B007 - used in the error below
            yield line
    except UnicodeDecodeError:
        raise EdgeforgeError(f"{path}: not UTF-8 text (near line {lineno + 1})") from None


def _jsonl_records(path: Path, lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines stream; blank lines are skipped."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EdgeforgeError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise EdgeforgeError(
                f'{path}:{lineno}: record has no string "text" field; '
                'corpus lines must look like {"text": "..."}'
            )
        yield record


def _paragraph_records(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """One ``{"text": paragraph}`` per run of non-blank lines, inner line breaks kept."""
    paragraph: list[str] = []
    for line in lines:
        if line.strip():
            paragraph.append(line.rstrip("\r\n"))
        elif paragraph:
            yield {"text": "\n".join(paragraph)}
            paragraph = []
    if paragraph:
        yield {"text": "\n".join(paragraph)}


def _file_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of one corpus file, streamed."""
    with open(path, "rb") as fh:
        lines = _text_lines(path, fh)
        if path.name.lower().endswith(".txt"):
            yield from _paragraph_records(lines)
        else:
            yield from _jsonl_records(path, lines)


def iter_records(path: PathArg) -> Iterator[dict[str, Any]]:
    """Records (dicts with a string ``"text"``) of a corpus file or directory, streamed.

    A generator: files are opened only as the stream reaches them and read a chunk at a
    time, so a caller that stops early reads only what it used.
    """
    for file in corpus_files(path):
        yield from _file_records(file)


def iter_texts(paths: PathArg | Iterable[PathArg]) -> Iterator[str]:
    """The ``"text"`` of every record of every corpus path, in order, streamed."""
    for file in corpus_files(paths):
        for record in _file_records(file):
            yield record["text"]


# --------------------------------------------------------------------------------------
# Token windows


def _describe(paths: PathArg | Iterable[PathArg]) -> str:
    """A short name for a corpus argument, for error messages."""
    names = [str(p) for p in _as_paths(paths)]
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more)"


def _check_sizes(**sizes: int) -> None:
    """Window counts and lengths must be positive integers."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise EdgeforgeError(f"{name} must be a positive integer, got {value!r}")


def _token_docs(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase) -> Iterator[list[int]]:
    """Token ids of each non-empty document, without special tokens, in batches."""
    batch: list[str] = []
    for text in texts:
        if text:
            batch.append(text)
        if len(batch) >= _ENCODE_BATCH:
            yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            batch = []
    if batch:
        yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]


class _WindowStream:
    """Consecutive non-overlapping windows of the corpus token stream, plus counts.

    Documents are joined with the tokenizer's EOS id between them (none if it has no EOS).
    Only the tokens of the current document and the unfinished window are held.
    """

    def __init__(
        self, paths: PathArg | Iterable[PathArg], tokenizer: PreTrainedTokenizerBase, seq_len: int
    ) -> None:
        self.files = corpus_files(paths)  # resolve early: a bad path fails before any work
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.records = 0
        self.tokens = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        eos = self.tokenizer.eos_token_id
        separator = [eos] if eos is not None else []
        carry = np.empty(0, dtype=np.int64)
        texts = (text for file in self.files for text in self._counted(file))
        for ids in _token_docs(texts, self.tokenizer):
            doc = (separator + ids) if self.tokens else ids
            self.tokens += len(doc)
            buffer = np.concatenate([carry, np.asarray(doc, dtype=np.int64)])
            whole = len(buffer) // self.seq_len * self.seq_len
            for start in range(0, whole, self.seq_len):
                yield buffer[start : start + self.seq_len]
            carry = buffer[whole:]

    def _counted(self, file: Path) -> Iterator[str]:
        for record in _file_records(file):
            self.records += 1
            yield record["text"]

    def shortfall(self, wanted: int, what: str, corpus: str) -> EdgeforgeError:
        """The error for a corpus too small to give ``wanted`` windows."""
        if self.records == 0:
            return EdgeforgeError(f"{corpus}: corpus is empty (no records)")
        if self.tokens == 0:
            return EdgeforgeError(f"{corpus}: corpus has {self.records} records but no tokens")
        have = self.tokens // self.seq_len
        return EdgeforgeError(
            f"{corpus}: {self.records} records give {self.tokens} tokens = {have} windows of "
            f"{self.seq_len}, but {wanted} {what} were asked for; lower the count or seq_len, "
            "or use a bigger corpus"
        )


def _as_tensor(windows: list[np.ndarray]) -> torch.Tensor:
    """Stack windows into a ``[n, seq_len]`` int64 tensor."""
    import torch

    return torch.from_numpy(np.stack(windows).astype(np.int64, copy=False))


def sample_windows(
    paths: PathArg | Iterable[PathArg],
    tokenizer: PreTrainedTokenizerBase,
    num_samples: int,
    seq_len: int,
    seed: int,
) -> torch.Tensor:
    """``num_samples`` calibration windows of ``seq_len`` tokens, a seeded uniform sample.

    One pass of reservoir sampling (Algorithm R) over all windows of the corpus: memory is
    the reservoir plus the current document, whatever the corpus size, and every window
    has the same chance to be picked. The draw uses only ``random.Random(seed).random()``,
    whose sequence Python guarantees across versions, so the same corpus, tokenizer and
    seed give the same windows anywhere. Returned in stream order, ``[num_samples,
    seq_len]`` int64.
    """
    _check_sizes(num_samples=num_samples, seq_len=seq_len)
    stream = _WindowStream(paths, tokenizer, seq_len)
    rng = random.Random(seed)
    reservoir: list[tuple[int, np.ndarray]] = []
    seen = 0
    for window in progress(stream, desc="calibration windows", unit="win"):
        if seen < num_samples:
            reservoir.append((seen, window.copy()))
        else:
            slot = int(rng.random() * (seen + 1))
            if slot < num_samples:
                reservoir[slot] = (seen, window.copy())
        seen += 1
    if seen < num_samples:
        raise stream.shortfall(num_samples, "samples", _describe(paths))
    reservoir.sort(key=lambda item: item[0])
    return _as_tensor([window for _, window in reservoir])


def eval_windows(
    paths: PathArg | Iterable[PathArg],
    tokenizer: PreTrainedTokenizerBase,
    num_windows: int,
    seq_len: int,
) -> torch.Tensor:
    """The first ``num_windows`` windows of ``seq_len`` tokens: a fixed perplexity set.

    Reading stops as soon as they are complete. ``[num_windows, seq_len]`` int64.
    """
    _check_sizes(num_windows=num_windows, seq_len=seq_len)
    stream = _WindowStream(paths, tokenizer, seq_len)
    windows: list[np.ndarray] = []
    with progress(total=num_windows, desc="eval windows", unit="win") as bar:
        for window in stream:
            windows.append(window.copy())
            bar.update()
            if len(windows) == num_windows:
                break
    if len(windows) < num_windows:
        raise stream.shortfall(num_windows, "windows", _describe(paths))
    return _as_tensor(windows)

"""Corpus readers, token windows, the shipped World English Bible corpus and its generator.

The tokenizer is a real byte-level BPE trained here on a few KB of the shipped corpus and
wrapped in ``PreTrainedTokenizerFast``, so windows go through the same code path as a
Qwen tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from common.core.errors import EdgeforgeError
from common.inputs.data import (
    CALIB_CORPUS,
    CORPUS_DIR,
    EVAL_CORPUS,
    corpus_files,
    eval_windows,
    iter_records,
    iter_texts,
    sample_windows,
)
from data import make_corpus

EOS = "<|endoftext|>"

DOCS = [
    "In the beginning, God created the heavens and the earth.",
    "The earth was formless and empty.\nDarkness was on the surface of the deep.",
    "God said, “Let there be light,” and there was light.",
    "God saw the light, and saw that it was good.",
]


# --------------------------------------------------------------------------------------
# helpers


def write_jsonl(path: Path, records: list[dict], *, frames: int = 1) -> Path:
    """``records`` as JSON lines; ``.zst`` names are compressed, in ``frames`` zstd frames."""
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    if not path.name.endswith(".zst"):
        path.write_text("".join(lines), encoding="utf-8")
        return path
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    step = max(1, -(-len(lines) // frames))
    chunks = ["".join(lines[i : i + step]).encode() for i in range(0, len(lines), step)]
    path.write_bytes(b"".join(cctx.compress(chunk) for chunk in chunks))
    return path


def texts_of(path: Path) -> list[str]:
    return [r["text"] for r in iter_records(path)]


def error_of(call, *args, **kwargs) -> str:
    """The one-line message of the EdgeforgeError ``call`` raises."""
    with pytest.raises(EdgeforgeError) as info:
        result = call(*args, **kwargs)
        if isinstance(result, Iterator):
            list(result)
    message = str(info.value)
    assert "\n" not in message
    return message


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream_of(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> list[int]:
    """The token stream the window functions must cut: docs joined by EOS when there is one."""
    out: list[int] = []
    for i, doc in enumerate(docs):
        if i and tokenizer.eos_token_id is not None:
            out.append(tokenizer.eos_token_id)
        out.extend(encode(tokenizer, doc))
    return out


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A byte-level BPE (vocab 384) trained on the first ~16 KB of the calibration split."""
    sample: list[str] = []
    for text in iter_texts(CALIB_CORPUS):
        sample.append(text)
        if sum(map(len, sample)) > 16_000:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample, trainer)
    return tok


@pytest.fixture(scope="module")
def tokenizer(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)


@pytest.fixture(scope="module")
def tokenizer_no_eos(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=bpe)


@pytest.fixture
def docs_corpus(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])


# --------------------------------------------------------------------------------------
# record readers


def test_jsonl_zst_records_across_frames(tmp_path: Path) -> None:
    records = [{"text": f"doc {i} “quoted”", "meta": {"i": i}} for i in range(10)]
    path = write_jsonl(tmp_path / "c.jsonl.zst", records, frames=3)
    assert list(iter_records(path)) == records


def test_jsonl_records_skip_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b", "meta": {"x": 1}}\n', encoding="utf-8")
    assert list(iter_records(path)) == [{"text": "a"}, {"text": "b", "meta": {"x": 1}}]


def test_txt_paragraphs_are_records(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"line one\r\nline two\r\n\r\n\r\nsecond\n  \t\nthird\nend")
    assert texts_of(path) == ["line one\nline two", "second", "third\nend"]


def test_directory_is_read_recursively_in_sorted_order(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b"}])
    (tmp_path / "a.txt").write_text("a1\n\na2\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "c.jsonl.zst", [{"text": "c"}])
    (tmp_path / "README.md").write_text("not a corpus")
    (tmp_path / ".partial").mkdir()
    write_jsonl(tmp_path / ".partial" / "x.jsonl", [{"text": "hidden"}])
    assert [p.relative_to(tmp_path).as_posix() for p in corpus_files(tmp_path)] == [
        "a.txt",
        "b.jsonl",
        "sub/c.jsonl.zst",
    ]
    assert texts_of(tmp_path) == ["a1", "a2", "b", "c"]
    assert list(iter_texts([tmp_path / "b.jsonl", str(tmp_path / "a.txt")])) == ["b", "a1", "a2"]


def test_zst_is_streamed_not_loaded(tmp_path: Path) -> None:
    """A 24 MB (decompressed) corpus is read with a peak of well under 2 MB."""
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)
    path = tmp_path / "big.jsonl.zst"
    with open(path, "wb") as fh, zstandard.ZstdCompressor(level=1).stream_writer(fh) as out:
        for _ in range(2000):
            row = letters[rng.integers(0, len(letters), size=12_000, dtype=np.uint8)]
            out.write(b'{"text": "' + row.tobytes() + b'"}\n')
    assert path.stat().st_size > 10_000_000  # random letters: the file itself is big too

    records = iter_records(path)
    assert isinstance(records, Iterator)
    tracemalloc.start()
    try:
        count = chars = 0
        for record in records:
            count += 1
            chars += len(record["text"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (count, chars) == (2000, 24_000_000)
    assert peak < 2_000_000


# --------------------------------------------------------------------------------------
# bad input: one line naming the file (and line), never a traceback


def test_truncated_zst(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "g.jsonl.zst", [{"text": f"record {i}"} for i in range(500)])
    bad = tmp_path / "cut.jsonl.zst"
    bad.write_bytes(good.read_bytes()[:-20])
    message = error_of(iter_records, bad)
    assert message.startswith(f"{bad} is not a valid zstd stream: truncated")


def test_corrupt_zst(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "g.jsonl.zst", [{"text": f"record {i}"} for i in range(500)])
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "flipped.jsonl.zst"
    bad.write_bytes(bytes(data))
    assert error_of(iter_records, bad).startswith(f"{bad} is not a valid zstd stream: ")


@pytest.mark.parametrize("content", [b'{"text": "plain json, not zstd"}\n', b""])
def test_non_zstd_bytes_with_zst_name(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "plain.jsonl.zst"
    bad.write_bytes(content)
    assert error_of(iter_records, bad).startswith(f"{bad} is not a valid zstd stream: ")


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_invalid_json_line_names_file_and_line(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"c{suffix}"
    good = json.dumps({"text": "ok"}) + "\n"
    body = (good + '{"text": "unterminated\n' + good).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(body) if suffix.endswith("zst") else body)
    assert error_of(iter_records, path).startswith(f"{path}:2: invalid JSON")


@pytest.mark.parametrize("line", ['{"content": "x"}', '{"text": 5}', '["text"]'])
def test_record_without_text_field(tmp_path: Path, line: str) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n", encoding="utf-8")
    message = error_of(iter_records, path)
    assert message.startswith(f'{path}:2: record has no string "text" field')


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    assert error_of(iter_records, path) == f"{path}: not UTF-8 text (near line 1)"


def test_unknown_extension_lists_accepted(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    path.write_bytes(b"PAR1")
    message = error_of(iter_records, path)
    assert message.startswith(f"{path}: unknown corpus file type")
    assert ".jsonl.zst, .jsonl, .txt" in message


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    assert error_of(iter_records, missing) == f"{missing}: corpus file or directory not found"
    (tmp_path / "empty").mkdir()
    assert "holds no corpus files" in error_of(iter_texts, [tmp_path / "empty"])


def test_empty_corpus(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    message = error_of(sample_windows, empty, tokenizer, 1, 8, 0)
    assert message == f"{empty}: corpus is empty (no records)"
    assert error_of(eval_windows, [empty], tokenizer, 1, 8) == message
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": ""}])
    assert error_of(eval_windows, blank, tokenizer, 1, 8) == (
        f"{blank}: corpus has 2 records but no tokens"
    )


def test_too_few_tokens(docs_corpus: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    tokens = len(stream_of(tokenizer, DOCS))
    seq_len = tokens // 3
    message = error_of(sample_windows, docs_corpus, tokenizer, 4, seq_len, 0)
    assert message.startswith(
        f"{docs_corpus}: 4 records give {tokens} tokens = 3 windows of {seq_len}, "
        "but 4 samples were asked for"
    )
    assert "but 5 windows were asked for" in error_of(
        eval_windows, docs_corpus, tokenizer, 5, seq_len
    )


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_window_sizes_must_be_positive_integers(
    docs_corpus: Path, tokenizer: PreTrainedTokenizerFast, bad: object
) -> None:
    assert "num_windows must be a positive integer" in error_of(
        eval_windows, docs_corpus, tokenizer, bad, 4
    )
    assert "seq_len must be a positive integer" in error_of(
        sample_windows, docs_corpus, tokenizer, 2, bad, 0
    )


# --------------------------------------------------------------------------------------
# windows


def test_eval_windows_are_the_encoded_stream(
    docs_corpus: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    stream = stream_of(tokenizer, DOCS)
    assert stream.count(tokenizer.eos_token_id) == len(DOCS) - 1
    seq_len = 7
    count = len(stream) // seq_len
    windows = eval_windows(docs_corpus, tokenizer, count, seq_len)
    assert windows.dtype == torch.int64
    assert windows.shape == (count, seq_len)
    assert windows.flatten().tolist() == stream[: count * seq_len]
    first_two = eval_windows(docs_corpus, tokenizer, 2, seq_len)
    assert torch.equal(first_two, windows[:2])
    assert tokenizer.decode(windows[:3].flatten()).startswith("In the beginning")


def test_no_eos_means_plain_concatenation(
    docs_corpus: Path, tokenizer_no_eos: PreTrainedTokenizerFast
) -> None:
    assert tokenizer_no_eos.eos_token_id is None
    stream = stream_of(tokenizer_no_eos, DOCS)
    windows = eval_windows(docs_corpus, tokenizer_no_eos, len(stream) // 5, 5)
    assert windows.flatten().tolist() == stream[: windows.numel()]


def test_txt_windows_match_paragraph_encoding(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    stream = stream_of(tokenizer, DOCS)
    windows = eval_windows(path, tokenizer, len(stream) // 11, 11)
    assert windows.flatten().tolist() == stream[: windows.numel()]


def test_sample_windows_deterministic_and_in_stream_order(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    docs = [r["text"] for _, r in zip(range(12), iter_records(EVAL_CORPUS), strict=False)]
    corpus = write_jsonl(tmp_path / "c.jsonl.zst", [{"text": d} for d in docs])
    seq_len = 32
    stream = stream_of(tokenizer, docs)
    everything = eval_windows(corpus, tokenizer, len(stream) // seq_len, seq_len)
    assert len(everything) > 300
    first = sample_windows(corpus, tokenizer, 12, seq_len, seed=1234)
    again = sample_windows([corpus], tokenizer, 12, seq_len, seed=1234)
    other = sample_windows(corpus, tokenizer, 12, seq_len, seed=1235)
    assert first.shape == (12, seq_len) and first.dtype == torch.int64
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Every sample is a window of the stream, and samples come in stream order.
    rows = {tuple(w): i for i, w in enumerate(everything.tolist())}
    positions = [rows[tuple(w)] for w in first.tolist()]
    assert positions == sorted(positions) and len(set(positions)) == 12
    assert positions[-1] > len(everything) // 2  # the sample reaches past the start


def test_sample_windows_is_uniform(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    """Reservoir sampling: over many seeds every window is picked about equally often."""
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS * 3])
    seq_len = len(stream_of(tokenizer, DOCS * 3)) // 12
    windows = eval_windows(corpus, tokenizer, 12, seq_len)
    index = {tuple(w): i for i, w in enumerate(windows.tolist())}
    assert len(index) == len(windows)  # windows are distinct, so picks can be identified
    picks = np.zeros(len(windows), dtype=int)
    seeds, k = 150, 4
    for seed in range(seeds):
        sample = sample_windows(corpus, tokenizer, k, seq_len, seed)
        chosen = [index[tuple(w)] for w in sample.tolist()]
        assert chosen == sorted(chosen) and len(set(chosen)) == k
        picks[chosen] += 1
    expected = seeds * k / len(windows)  # 50 picks each; binomial sd ~5.8
    assert picks.sum() == seeds * k
    assert np.all(np.abs(picks - expected) < 0.4 * expected), picks


def test_all_windows_when_asked_for_all(
    docs_corpus: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    stream = stream_of(tokenizer, DOCS)
    count = len(stream) // 6
    sample = sample_windows(docs_corpus, tokenizer, count, 6, seed=7)
    assert sample.flatten().tolist() == stream[: count * 6]


# --------------------------------------------------------------------------------------
# the shipped corpus


@pytest.fixture(scope="module")
def stats() -> dict:
    return json.loads((CORPUS_DIR / "stats.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[dict]]:
    return {"calib": list(iter_records(CALIB_CORPUS)), "eval": list(iter_records(EVAL_CORPUS))}


def test_shipped_files_match_their_stats(stats: dict) -> None:
    assert stats["source"]["package"] == "sword-text-web"
    assert stats["source"]["package_version"] == "426.0-1"
    assert stats["source"]["license"] == "Public Domain"
    for part, path in (("calib", CALIB_CORPUS), ("eval", EVAL_CORPUS)):
        blob = path.read_bytes()
        assert len(blob) == stats[part]["bytes"]
        assert hashlib.sha256(blob).hexdigest() == stats[part]["sha256"]
    assert CALIB_CORPUS.stat().st_size + EVAL_CORPUS.stat().st_size < 5_000_000


def test_shipped_record_counts_and_split(stats: dict, shipped: dict[str, list[dict]]) -> None:
    calib, evaluation = shipped["calib"], shipped["eval"]
    assert (len(calib), len(evaluation)) == (1221, 157)
    for part, records in shipped.items():
        assert len(records) == stats[part]["records"]
        assert sum(len(r["text"]) for r in records) == stats[part]["chars"]
        assert all(r["text"] and set(r["meta"]) == {"book", "chapter"} for r in records)
    calib_books = {r["meta"]["book"] for r in calib}
    eval_books = {r["meta"]["book"] for r in evaluation}
    assert eval_books == set(make_corpus.HELD_OUT_BOOKS) == set(stats["held_out_books"])
    assert calib_books.isdisjoint(eval_books)
    assert len(calib_books) == 70
    calib_texts = {r["text"] for r in calib}
    assert not any(r["text"] in calib_texts for r in evaluation)
    eval_share = stats["eval"]["chars"] / (stats["eval"]["chars"] + stats["calib"]["chars"])
    assert 0.08 < eval_share < 0.12


def test_shipped_text_is_clean_verse_text(shipped: dict[str, list[dict]]) -> None:
    calib, evaluation = shipped["calib"], shipped["eval"]
    assert calib[0]["meta"] == {"book": "Gen", "chapter": 1}
    assert calib[0]["text"].startswith(
        "In the beginning, God created the heavens and the earth. The earth was formless"
    )
    assert calib[-1]["meta"] == {"book": "Rev", "chapter": 22}
    assert calib[-1]["text"].endswith(
        "The grace of the Lord Jesus Christ be with all the saints. Amen."
    )
    john3 = next(r["text"] for r in evaluation if r["meta"] == {"book": "John", "chapter": 3})
    assert "For God so loved the world, that he gave his only born Son" in john3
    everything = "".join(r["text"] for r in calib + evaluation)
    for leftover in ("<", ">", "&", "strong:", "\x00", "  "):
        assert leftover not in everything
    assert "Glossary" not in everything and "Preface" not in everything
    chapters = [(r["meta"]["book"], r["meta"]["chapter"]) for r in calib]
    assert chapters[:3] == [("Gen", 1), ("Gen", 2), ("Gen", 3)]


# --------------------------------------------------------------------------------------
# make_corpus: OSIS to text


def osis(fragment: str) -> str:
    return make_corpus.finish_text(make_corpus.osis_to_text(fragment, "test"))


def test_osis_notes_removed_without_gluing_words() -> None:
    fragment = (
        '<w lemma="strong:H0430">God</w><note placement="foot"><reference type="annotateRef">'
        "1:1 </reference>The Hebrew word rendered “God” is “Elohim”.</note><w>created</w> "
        'light<note type="crossReference">Gen 1:3</note>. “Lord<note>x</note>” said'
    )
    assert osis(fragment) == "God created light. “Lord” said"


def test_osis_titles_speakers_and_lines() -> None:
    fragment = (
        '<title>BOOK 1</title><title canonical="true" type="psalm">A Psalm by David.</title>'
        '<speaker>Beloved</speaker><lg sID="a"/><l sID="b"/>Yahweh is my shepherd;<l eID="b"/> '
        '<l sID="c"/>I shall lack nothing.<l eID="c"/><lg eID="a"/>'
    )
    assert osis(fragment) == "A Psalm by David.\nYahweh is my shepherd;\nI shall lack nothing."


def test_osis_matter_after_book_end_is_dropped() -> None:
    fragment = (
        'Amen. <chapter eID="Rev.22"/><div eID="p1" type="x-p"/> '
        '<div canonical="true" eID="b1" osisID="Rev" type="book"/> '
        '<div sID="g" type="glossary"/><title>Glossary</title> Abba is father.<div eID="g" '
        'type="glossary"/>'
    )
    assert osis(fragment) == "Amen."
    assert (
        osis(
            '<div sID="i" type="introduction"/>Intro text.<div eID="i" type="introduction"/>Verse.'
        )
        == "Verse."
    )


def test_osis_unterminated_note_is_an_error() -> None:
    with pytest.raises(EdgeforgeError, match="test: unterminated <note>"):
        make_corpus.osis_to_text("text<note>never closed", "test")


def test_make_corpus_rejects_what_it_cannot_read(tmp_path: Path) -> None:
    not_deb = tmp_path / "x.deb"
    not_deb.write_bytes(b"hello")
    assert (
        error_of(make_corpus.open_source, not_deb)
        == f"{not_deb}: not a .deb (no ar archive header)"
    )
    missing = tmp_path / "missing.deb"
    assert "apt-get download sword-text-web" in error_of(make_corpus.open_source, missing)
    assert "expected exactly one SWORD zText module" in error_of(
        make_corpus.find_module, make_corpus.open_source(tmp_path)
    )

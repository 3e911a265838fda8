"""Regenerate ``data/web-bible/`` from Debian's ``sword-text-web`` package.

The shipped corpus is the World English Bible (public domain) as Pile-style JSON lines,
one record per chapter, split by whole books into a calibration part and a held-out
evaluation part. This script is the only way those files are made, so anyone can check
them against the upstream package::

    apt-get download sword-text-web            # sword-text-web_426.0-1_all.deb
    python -m data.make_corpus sword-text-web_426.0-1_all.deb

``make corpus-check`` does both and compares the result with the shipped bytes.

It accepts the ``.deb`` itself or a directory it was extracted into (``dpkg-deb -x``), or
any SWORD library root holding the module. Only the standard library and ``zstandard``
are used, so regeneration needs nothing from the model stack.

The module is a SWORD ``zText`` module: per testament a ``.bzz`` file of concatenated
zlib blocks, a ``.bzs`` block index (12 bytes per block: offset, compressed size,
uncompressed size) and a ``.bzv`` verse index (10 bytes per slot: block, offset, size).
Slots follow SWORD's verse-key layout: slot 0 is the module header, slot 1 the testament
header, then for every book an introduction slot, and for every chapter a heading slot
followed by one slot per verse. Chapter headings carry OSIS ``<chapter sID=.../>``
markers; the layout is recovered from those markers, so no versification table has to be
copied in, and every step is checked (see :func:`chapter_layout`). Only verse slots are
kept: book introductions, the translators' preface, the glossary appended after
Revelation, section titles, speaker labels, footnotes and cross-references are dropped.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import io
import json
import re
import struct
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zstandard

from common.core.errors import CheckFailed, EdgeforgeError, run_cli
from common.core.records import write_bytes_atomic, write_json_atomic

#: Where the corpus goes by default: ``data/web-bible`` beside this script.
DEFAULT_OUT = Path(__file__).resolve().parent / "web-bible"

#: Whole books held out for evaluation (OSIS ids). One or two from each part of the canon
#: (law, history, wisdom, prophets, deuterocanon, gospels, letters), about 10% of the text,
#: chosen to have few verbatim parallels elsewhere: no Kings/Chronicles, no synoptic
#: gospel, no Esther (Greek Esther repeats it), so evaluation text is genuinely unseen.
HELD_OUT_BOOKS: tuple[str, ...] = (
    "Judg",
    "Ruth",
    "Job",
    "Hos",
    "Amos",
    "Tob",
    "Wis",
    "John",
    "Heb",
)

#: Books of the module left out, and why. The module's NRSVA versification has no slots
#: for the WEB's numbering of Greek Esther, so osis2mod interleaved its chapters (text of
#: chapter 5 sits between verses of chapter 4); its Hebrew core is in ``Esth`` anyway.
#: (Greek Daniel has no book at all in NRSVA: osis2mod put its first chapters into the
#: introduction slot of Hosea, which is dropped like every introduction.)
EXCLUDED_BOOKS: dict[str, str] = {
    "EsthGr": "chapters interleaved by osis2mod (WEB numbering does not fit NRSVA)",
}

#: zstd level of the shipped files; single-threaded so the same input gives the same bytes.
ZSTD_LEVEL = 19

#: Verses whose extracted text is known exactly: a wrong decoder or markup stripper fails
#: here instead of shipping garbage.
SPOT_CHECKS: dict[tuple[str, int, int], str] = {
    ("Gen", 1, 1): "In the beginning, God created the heavens and the earth.",
    ("John", 3, 16): (
        "For God so loved the world, that he gave his only born Son, that whoever believes "
        "in him should not perish, but have eternal life."
    ),
    ("Ps", 23, 1): "A Psalm by David.\nYahweh is my shepherd;\nI shall lack nothing.",
    ("Sir", 51, 0): "A Prayer of Jesus the son of Sirach.",
    ("Rev", 22, 21): "The grace of the Lord Jesus Christ be with all the saints. Amen.",
}

_BLOCK_ENTRY = struct.Struct("<III")  # .bzs: offset, compressed size, uncompressed size
_VERSE_ENTRY = struct.Struct("<IIH")  # .bzv: block number, offset in block, size
_TESTAMENTS = ("ot", "nt")

# --------------------------------------------------------------------------------------
# Reading the package


@dataclass(frozen=True)
class Source:
    """Files of the input, by POSIX path relative to its root, plus how to describe it."""

    label: str
    names: tuple[str, ...]
    read: Callable[[str], bytes]
    package: dict[str, str]


def read_ar(data: bytes, label: str) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (the container format of a ``.deb``)."""
    if not data.startswith(b"!<arch>\n"):
        raise EdgeforgeError(f"{label}: not a .deb (no ar archive header)")
    members: dict[str, bytes] = {}
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise EdgeforgeError(f"{label}: corrupt ar member header at byte {pos}") from None
        pos += 60
        members[name] = data[pos : pos + size]
        pos += size + (size % 2)
    return members


def open_tar(blob: bytes, name: str, label: str) -> tarfile.TarFile:
    """Open a ``.deb`` member tarball, whichever compression dpkg chose for it."""
    if name.endswith(".zst"):
        blob = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    try:
        return tarfile.open(fileobj=io.BytesIO(blob), mode="r:*")
    except tarfile.TarError as exc:
        raise EdgeforgeError(f"{label}: cannot read {name}: {exc}") from None


def tar_files(tar: tarfile.TarFile) -> dict[str, bytes]:
    """Regular files of a tarball, keyed by normalized relative POSIX path."""
    files: dict[str, bytes] = {}
    for member in tar.getmembers():
        if member.isfile():
            fh = tar.extractfile(member)
            if fh is not None:
                files[PurePosixPath(member.name).as_posix()] = fh.read()  # drops "./"
    return files


def parse_control(text: str) -> dict[str, str]:
    """``Package``, ``Version`` etc. from a Debian control file (continuation lines dropped)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line[0].isspace() and ":" in line:
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip()
    return fields


def source_from_deb(path: Path) -> Source:
    """All files of a ``.deb`` (a few MB), read into memory."""
    label = str(path)
    deb = path.read_bytes()
    members = read_ar(deb, label)
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    control_name = next((n for n in members if n.startswith("control.tar")), None)
    if data_name is None or control_name is None:
        raise EdgeforgeError(f"{label}: not a .deb (no data.tar/control.tar member)")
    files = tar_files(open_tar(members[data_name], data_name, label))
    control = tar_files(open_tar(members[control_name], control_name, label)).get("control")
    package = parse_control(control.decode("utf-8")) if control else {}
    package["sha256"] = hashlib.sha256(deb).hexdigest()
    package["file"] = path.name
    return Source(label, tuple(sorted(files)), files.__getitem__, package)


def source_from_dir(root: Path) -> Source:
    """Files under an extracted package or SWORD library root, read on demand."""
    names = tuple(sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()))
    return Source(str(root), names, lambda name: (root / name).read_bytes(), {})


def open_source(path: Path) -> Source:
    """The input named on the command line: a ``.deb`` or a directory."""
    if not path.exists():
        raise EdgeforgeError(
            f"{path}: no such file or directory; get it with "
            "'apt-get download sword-text-web' or pass the directory it was extracted into"
        )
    if path.is_dir():
        return source_from_dir(path)
    return source_from_deb(path)


# --------------------------------------------------------------------------------------
# The SWORD module


@dataclass(frozen=True)
class Module:
    """One zText module: its ``.conf`` fields and the three index/data files per testament."""

    name: str
    conf: dict[str, str]
    files: dict[str, bytes]


def parse_conf(text: str) -> tuple[str, dict[str, str]]:
    """Module name and ``Key=Value`` fields of a SWORD ``.conf`` (first value of a key wins)."""
    name = ""
    fields: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]") and not name:
            name = line[1:-1]
        elif "=" in line:
            key, value = line.split("=", 1)
            fields.setdefault(key.strip(), value.strip())
    return name, fields


def find_module(source: Source) -> Module:
    """The single zText module of ``source``, its conf checked for what this reader decodes."""
    confs = [n for n in source.names if n.endswith(".conf") and "/mods.d/" in f"/{n}"]
    modules = []
    for conf_name in confs:
        name, conf = parse_conf(source.read(conf_name).decode("utf-8"))
        if conf.get("ModDrv", "").lower() == "ztext":
            modules.append((conf_name, name, conf))
    if len(modules) != 1:
        found = ", ".join(m[1] for m in modules) or "none"
        raise EdgeforgeError(
            f"{source.label}: expected exactly one SWORD zText module under mods.d/, "
            f"found {found}; pass the sword-text-web .deb or its extracted directory"
        )
    conf_name, name, conf = modules[0]
    expected = {"CompressType": "ZIP", "SourceType": "OSIS", "Encoding": "UTF-8"}
    for key, want in expected.items():
        if conf.get(key, "").upper() != want.upper():
            raise EdgeforgeError(
                f"{source.label}: {conf_name}: {key}={conf.get(key)!r}, this reader "
                f"decodes only {key}={want}"
            )
    if not conf.get("DataPath"):
        raise EdgeforgeError(f"{source.label}: {conf_name} has no DataPath")
    data_dir = (PurePosixPath(conf_name).parent.parent / conf["DataPath"]).as_posix()
    files = {}
    for testament in _TESTAMENTS:
        for ext in ("bzs", "bzv", "bzz"):
            member = f"{data_dir}/{testament}.{ext}"
            if member not in source.names:
                raise EdgeforgeError(f"{source.label}: module {name} lacks {member}")
            files[f"{testament}.{ext}"] = source.read(member)
    return Module(name, conf, files)


def decode_slots(bzs: bytes, bzv: bytes, bzz: bytes, label: str) -> list[str]:
    """Every verse-index slot of one testament as UTF-8 OSIS text ('' for empty slots)."""
    if len(bzs) % _BLOCK_ENTRY.size or len(bzv) % _VERSE_ENTRY.size:
        raise EdgeforgeError(f"{label}: index sizes are not multiples of their entry sizes")
    blocks: list[bytes] = []
    for offset, csize, usize in _BLOCK_ENTRY.iter_unpack(bzs):
        try:
            block = zlib.decompress(bzz[offset : offset + csize])
        except zlib.error as exc:
            raise EdgeforgeError(f"{label}: block {len(blocks)} is not zlib data: {exc}") from None
        if len(block) != usize:
            raise EdgeforgeError(
                f"{label}: block {len(blocks)} inflates to {len(block)} bytes, index says {usize}"
            )
        blocks.append(block)
    slots: list[str] = []
    for index, (block, offset, size) in enumerate(_VERSE_ENTRY.iter_unpack(bzv)):
        if size == 0:
            slots.append("")
            continue
        if block >= len(blocks) or offset + size > len(blocks[block]):
            raise EdgeforgeError(f"{label}: verse slot {index} points outside block {block}")
        slots.append(blocks[block][offset : offset + size].decode("utf-8"))
    return slots


# --------------------------------------------------------------------------------------
# OSIS markup to plain text

_TAG = re.compile(r"<(/?)([A-Za-z]+)([^>]*?)(/?)>")
_ATTR = re.compile(r'([A-Za-z:]+)="([^"]*)"')
_NOTE = "\x00"  # where a footnote was: a space unless punctuation or a space is next to it
_NOTE_GAP = re.compile("^\x00|(?<=[\\s“‘(\\[—])\x00|\x00(?=[\\s,.;:!?’”)\\]—]|$)")
#: Elements whose content is not verse text: notes, non-canonical titles, speaker labels.
_DROP = frozenset({"note", "speaker", "title"})
#: Elements that start or end a line of text: paragraphs, poetry lines, list items.
_BREAK = frozenset({"div", "lb", "l", "lg", "list", "item", "p"})
#: Milestone ``<div sID/>``...``<div eID/>`` regions that are front or back matter.
_MATTER_DIVS = frozenset({"front", "introduction", "glossary", "colophon"})


def osis_to_text(fragment: str, where: str) -> str:
    """The verse text of one OSIS slot, with line breaks as ``\\n`` and notes as markers.

    Footnotes and cross-references (``note``), translators' section titles and speaker
    labels are dropped; canonical titles (Psalm superscriptions) are kept. Anything after
    the closing ``<div type="book"/>`` milestone (the glossary after Revelation) is not
    part of the book and is dropped too. The result still holds ``\\x00`` where a note was,
    resolved by :func:`finish_text` once neighbouring slots are joined.
    """
    out: list[str] = []
    drop: list[str] = []
    matter: set[str] = set()
    pos = 0
    for tag in _TAG.finditer(fragment):
        if not drop and not matter:
            out.append(fragment[pos : tag.start()])
        pos = tag.end()
        closing, name, attr_text, empty = tag.groups()
        attrs = dict(_ATTR.findall(attr_text))
        if drop:
            if name in _DROP and not empty:
                if closing:
                    drop.pop()
                else:
                    drop.append(name)
            continue
        kind = attrs.get("type", "")
        if name == "div" and kind in _MATTER_DIVS:
            if "sID" in attrs:
                matter.add(attrs["sID"])
            elif "eID" in attrs:
                matter.discard(attrs["eID"])
            else:
                raise EdgeforgeError(f"{where}: container <div type={kind!r}> in a verse")
            continue
        if matter:
            continue
        if name == "div" and kind == "book" and "eID" in attrs:
            pos = len(fragment)
            break
        if name in _DROP and not (name == "title" and attrs.get("canonical") == "true"):
            if not empty and not closing:
                drop.append(name)
                if name == "note":
                    out.append(_NOTE)
            continue
        if name in _BREAK or name == "title":
            out.append("\n")
    if drop or matter:
        raise EdgeforgeError(f"{where}: unterminated <{(drop or sorted(matter))[-1]}> in a verse")
    out.append(fragment[pos:])
    return html.unescape("".join(out))


def finish_text(raw: str) -> str:
    """Resolve note markers, collapse spaces inside lines and drop empty lines."""
    text = _NOTE_GAP.sub("", re.sub("\x00+", "\x00", raw)).replace(_NOTE, " ")
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


# --------------------------------------------------------------------------------------
# Chapters

_CHAPTER_START = re.compile(r"<chapter\b[^>]*\bsID=\"([^\"]+)\"[^>]*>")
_BOOK_START = re.compile(
    r"<div\b[^>]*\bsID=[^>]*\btype=\"book\"|<div\b[^>]*\btype=\"book\"[^>]*\bsID="
)
_CHAPTER_END = re.compile(r"<chapter\b[^>]*\beID=\"([^\"]+)\"")
_OSIS_CHAPTER = re.compile(r"^([1-4]?[A-Za-z]+)\.([1-9][0-9]*)$")


@dataclass(frozen=True)
class Chapter:
    """One chapter: OSIS book id, number, and its verses' raw text (``verses[v]`` is verse
    ``v``; ``verses[0]`` is what the heading slot holds besides titles, usually nothing)."""

    book: str
    number: int
    verses: tuple[str, ...]

    @property
    def text(self) -> str:
        """The chapter as one record: verses joined, notes resolved, lines kept."""
        return finish_text(" ".join(self.verses))


def _heading(slot: str, where: str) -> tuple[str, int, str] | None:
    """``(book, chapter, text)`` when ``slot`` is a chapter heading, else None.

    A heading holds exactly one ``<chapter sID>`` marker with no text before it. Text
    after it is the chapter's verse 0 (Sirach 51's "A Prayer of Jesus the son of Sirach."),
    kept; titles in it are dropped like everywhere else.
    """
    markers = list(_CHAPTER_START.finditer(slot))
    if len(markers) != 1 or finish_text(osis_to_text(slot[: markers[0].start()], where)):
        return None
    osis_id = markers[0].group(1)
    match = _OSIS_CHAPTER.match(osis_id)
    if match is None:
        raise EdgeforgeError(f"{where}: chapter marker {osis_id!r} is not Book.N")
    return match.group(1), int(match.group(2)), osis_to_text(slot[markers[0].end() :], where)


def chapter_layout(slots: Sequence[str], label: str, excluded: Iterable[str] = ()) -> list[Chapter]:
    """Chapters of one testament from its verse slots, with the verse-key layout checked.

    Chapter headings are slots with exactly one ``<chapter sID>`` marker and no text. A
    chapter's verses are the slots after its heading up to the next heading, or up to the
    next book's introduction slot (the one just before that book's chapter 1). Checked:
    chapters of a book are numbered 1, 2, 3...; a book never comes back; no verse slot
    starts a chapter or a book; a chapter's ``<chapter eID>`` end marker sits in its own
    verses (so no text was moved between chapters). Books in ``excluded`` are located (they
    bound their neighbours) but neither checked nor returned. Slots the versification has
    but the text lacks are empty and contribute nothing.
    """
    skip = set(excluded)
    headings = [
        (index, found)
        for index in range(2, len(slots))
        if (found := _heading(slots[index], f"{label} slot {index}")) is not None
    ]
    if not headings:
        raise EdgeforgeError(f"{label}: no chapter headings found; is this an OSIS Bible?")
    chapters: list[Chapter] = []
    previous: tuple[str, int] | None = None
    seen_books: set[str] = set()
    for pos, (index, (book, number, verse0)) in enumerate(headings):
        if pos + 1 < len(headings):
            next_index, (next_book, _, _) = headings[pos + 1]
            end = next_index if next_book == book else next_index - 1
        else:
            end = len(slots)
        in_order = (
            (number == previous[1] + 1)
            if previous and previous[0] == book
            else (number == 1 and book not in seen_books)
        )
        previous = (book, number)
        seen_books.add(book)
        if book in skip:
            continue
        if not in_order:
            raise EdgeforgeError(f"{label} slot {index}: {book}.{number} out of order")
        verses = [verse0]
        for i in range(index + 1, end):
            where = f"{label} {book}.{number}:{i - index}"
            if _CHAPTER_START.search(slots[i]) or _BOOK_START.search(slots[i]):
                raise EdgeforgeError(f"{where}: a verse slot starts a chapter or book")
            stray = [e for e in _CHAPTER_END.findall(slots[i]) if e != f"{book}.{number}"]
            if stray:
                raise EdgeforgeError(f"{where}: holds the end of chapter {stray[0]}")
            verses.append(osis_to_text(slots[i], where))
        chapters.append(Chapter(book, number, tuple(verses)))
    return chapters


def read_chapters(module: Module) -> list[Chapter]:
    """All chapters of the module in its canonical (versification) order."""
    chapters: list[Chapter] = []
    for testament in _TESTAMENTS:
        label = f"{module.name} {testament}"
        files = module.files
        slots = decode_slots(
            files[f"{testament}.bzs"], files[f"{testament}.bzv"], files[f"{testament}.bzz"], label
        )
        chapters.extend(chapter_layout(slots, label, EXCLUDED_BOOKS))
    books = [c.book for c in chapters if c.number == 1]
    if len(books) != len(set(books)):
        raise EdgeforgeError(f"{module.name}: a book appears in both testaments")
    return chapters


def verse_text(chapters: Sequence[Chapter], book: str, chapter: int, verse: int) -> str:
    """The finished text of one verse, for spot checks."""
    for item in chapters:
        if item.book == book and item.number == chapter:
            return finish_text(item.verses[verse])
    raise KeyError(f"{book}.{chapter}")


def check_spots(chapters: Sequence[Chapter]) -> None:
    """Fail unless every :data:`SPOT_CHECKS` verse comes out exactly as expected."""
    for (book, chapter, verse), want in SPOT_CHECKS.items():
        got = verse_text(chapters, book, chapter, verse)
        if got != want:
            raise CheckFailed(f"{book} {chapter}:{verse} decoded as {got!r}, expected {want!r}")


# --------------------------------------------------------------------------------------
# Records, split and files


def records(chapters: Iterable[Chapter]) -> Iterator[dict]:
    """Pile-style records, one per non-empty chapter."""
    for chapter in chapters:
        text = chapter.text
        if text:
            yield {"text": text, "meta": {"book": chapter.book, "chapter": chapter.number}}


def split(items: Iterable[dict], held_out: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """(calibration, evaluation): records of ``held_out`` books go to evaluation."""
    held = set(held_out)
    calib: list[dict] = []
    evaluation: list[dict] = []
    for record in items:
        (evaluation if record["meta"]["book"] in held else calib).append(record)
    return calib, evaluation


def jsonl_zst(items: Sequence[dict]) -> bytes:
    """Records as UTF-8 JSON lines in one zstd frame with checksum: deterministic bytes."""
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items).encode("utf-8")
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(body)


def describe(items: Sequence[dict], blob: bytes) -> dict:
    """Counts recorded in ``stats.json`` and ``SOURCE.md``."""
    books: list[str] = []
    for record in items:
        if record["meta"]["book"] not in books:
            books.append(record["meta"]["book"])
    return {
        "records": len(items),
        "chars": sum(len(r["text"]) for r in items),
        "books": books,
        "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }


def build(source: Source, out: Path, held_out: Sequence[str] = HELD_OUT_BOOKS) -> dict:
    """Decode, check, split and write the corpus; return the stats that were written."""
    module = find_module(source)
    chapters = read_chapters(module)
    check_spots(chapters)
    books = {c.book for c in chapters}
    unknown = sorted(set(held_out) - books)
    if unknown:
        raise EdgeforgeError(f"held-out books {unknown} are not in module {module.name}")
    calib, evaluation = split(records(chapters), held_out)
    blobs = {"calib.jsonl.zst": jsonl_zst(calib), "eval.jsonl.zst": jsonl_zst(evaluation)}
    stats = {
        "source": {
            "package": source.package.get("Package"),
            "package_version": source.package.get("Version"),
            "package_sha256": source.package.get("sha256"),
            "module": module.name,
            "module_version": module.conf.get("Version"),
            "versification": module.conf.get("Versification"),
            "license": module.conf.get("DistributionLicense"),
        },
        "zstd_level": ZSTD_LEVEL,
        "held_out_books": list(held_out),
        "calib": describe(calib, blobs["calib.jsonl.zst"]),
        "eval": describe(evaluation, blobs["eval.jsonl.zst"]),
    }
    for name, blob in blobs.items():
        write_bytes_atomic(out / name, blob)
    write_json_atomic(out / "stats.json", stats)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m data.make_corpus DEB_OR_DIR [--out DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="sword-text-web .deb or extracted directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    args = parser.parse_args(argv)
    stats = build(open_source(args.source), args.out)
    for book, why in EXCLUDED_BOOKS.items():
        print(f"left out {book}: {why}", file=sys.stderr)
    for part in ("calib", "eval"):
        s = stats[part]
        print(
            f"{args.out / (part + '.jsonl.zst')}: {s['records']} records, {s['chars']} chars, "
            f"{s['bytes']} bytes, {len(s['books'])} books"
        )
    return 0


if __name__ == "__main__":
    run_cli(main)

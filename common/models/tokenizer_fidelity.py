"""Tokenizer fidelity: every directory edgeforge writes tokenizes exactly like its source.

Why this is its own check: a model is only as right as the token ids it is fed, and the
ids come from however the *user* loads the tokenizer, not from our helpers. transformers
5.x picks the tokenizer class from ``config.json``'s ``model_type``, and some classes
rebuild the pipeline in code instead of reading ``tokenizer.json``: ``Qwen2Tokenizer``
always installs Qwen's pre-tokenizer regex and an NFC normalizer. SmolLM2's GPT-2-style
tokenizer copied byte for byte into a ``qwen2`` directory therefore encoded 3,000
characters of this repository's Python (the int8 module, as it then was) as 1,007 tokens
instead of 997 (``'Ċ', 'Ċ'`` became ``'ĊĊ'`` at token 35), and the same weights lost
~8 % perplexity on held-out English.

So each written directory is loaded with plain ``AutoTokenizer.from_pretrained`` and
compared with its source on a varied text set (prose, indented code, runs of spaces and
newlines, Unicode that NFC changes, digits, special-token strings, the held-out corpus,
the chat template applied to a conversation): same ids, same decoded text, same special
tokens and added vocabulary, same chat template. The first difference is named.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.core.errors import CheckFailed, EdgeforgeError

#: Files that make up a tokenizer (and its chat template) in a Hugging Face directory.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "qwen.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
)

#: The key that makes transformers keep ``tokenizer.json`` whole for a class with its own
#: ``__init__`` (``TokenizersBackend.convert_to_native_format``); no code is loaded by it.
KEEP_JSON_KEY = "trust_remote_code"

#: Texts every check encodes. Each one targets a way two pipelines part: newline and
#: space runs (pre-tokenizer regexes), digits (Qwen splits them one by one), combining
#: marks and ligatures (NFC), emoji ZWJ sequences (byte fallback), special-token strings
#: written inline (added-token matching), and ordinary prose and code.
FIDELITY_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. It wasn't me, they'd said; we'll see.",
    'def mean(xs: list[float]) -> float:\n    """Average."""\n\n\n    if not xs:\n'
    "\t\treturn 0.0\n    return sum(xs) / len(xs)  # two spaces before the comment\n",
    "a  b   c    d\n\nnew paragraph\n\n\n\nthree blank lines\r\n   indented\t\ttabs  \n",
    "In 2024 the model had 1,234,567 parameters; π ≈ 3.14159 and e^(iπ) + 1 = 0.",
    "Café naïve — e\u0301 vs é, Å vs A\u030a, ﬁ ligature, 東京と北京, 한국어, Ελληνικά, العربية.",
    "Emoji: 😀 👩\u200d👩\u200d👧 🇫🇷 and a non-breaking\u00a0space, zero-width\u200bjoiner.",
    "<|im_start|>user\nHello<|im_end|> <|endoftext|> </s> <s> [INST] plain text after.",
    "    ",
    "x",
)

#: The conversation rendered with the chat template, where the tokenizer has one.
CONVERSATION: tuple[dict[str, str], ...] = (
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?\n\nAnswer in one word."},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan?  (two spaces)"},
)

#: Held-out corpus records added to the fixed texts: real running English.
CORPUS_TEXTS = 4

_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class TokenizerCheck:
    """A passed comparison: what was compared, and how much."""

    reference: str
    candidate: str
    texts: int
    tokens: int

    def record(self) -> dict[str, Any]:
        """The entry every report and manifest carries under ``"tokenizer"``."""
        return {
            "tokenizer_identical": True,
            "texts": self.texts,
            "tokens": self.tokens,
            "reference": self.reference,
            "candidate": self.candidate,
        }


def describe(record: dict[str, Any]) -> str:
    """One line for a report.md: what the tokenizer check compared."""
    return (
        f"identical to the source's (`{record['reference']}`) under `AutoTokenizer`: "
        f"{record['texts']} texts, {record['tokens']} tokens"
    )


def fidelity_texts() -> list[str]:
    """The fixed texts plus the first held-out corpus records."""
    from common.inputs.data import EVAL_CORPUS, iter_texts

    texts = list(FIDELITY_TEXTS)
    for text in iter_texts([EVAL_CORPUS]):
        texts.append(text[:2000])
        if len(texts) == len(FIDELITY_TEXTS) + CORPUS_TEXTS:
            break
    return texts


def needs_remote_code(model_dir: Path) -> bool:
    """A tokenizer shipped as code (Qwen-7B's tiktoken one) loads only with remote code.

    That is the flag its users pass; every other tokenizer is loaded without it, because
    passing it changes how transformers reads ``tokenizer.json``.
    """
    config = Path(model_dir) / "tokenizer_config.json"
    if not config.is_file():
        return False
    try:
        return "auto_map" in json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise EdgeforgeError(f"{config}: not valid JSON ({exc})") from None


def _auto_tokenizer(path: Path, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained``, offline; a failure is one line naming ``path``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckFailed(f"{path}: AutoTokenizer cannot load it: {first}") from None


def load_as_user(model_dir: Path) -> Any:
    """``AutoTokenizer.from_pretrained(model_dir)`` exactly as a user calls it, offline."""
    model_dir = Path(model_dir)
    return _auto_tokenizer(model_dir, trust_remote_code=needs_remote_code(model_dir))


def load_gguf_tokenizer(gguf: Path) -> Any:
    """The tokenizer stored in a GGUF file, read as transformers' users read it."""
    gguf = Path(gguf)
    return _auto_tokenizer(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)


def _special_tokens(tokenizer: Any) -> dict[str, Any]:
    named = {attr: (getattr(tokenizer, attr, None), getattr(tokenizer, f"{attr}_id", None))
             for attr in _SPECIAL_ATTRS}  # fmt: skip
    added = {int(i): (str(t), bool(getattr(t, "special", False)))
             for i, t in tokenizer.added_tokens_decoder.items()}  # fmt: skip
    return {"special tokens": named, "added tokens": added, "vocabulary size": len(tokenizer)}


def _first_difference(a: Any, b: Any) -> str:
    """The first key whose values differ in two dicts, or the two values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted({*a, *b}, key=str):
            if a.get(key) != b.get(key):
                return f"{key!r}: {a.get(key)!r} vs {b.get(key)!r}"
    return f"{a!r} vs {b!r}"


def _first_token_difference(tokenizer_a: Any, a: list[int], tokenizer_b: Any, b: list[int]) -> str:
    """'token 35: 'Ċ' (id 198) vs 'ĊĊ' (id 378)', or where the shorter one ends."""
    for pos, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return (
                f"token {pos}: {tokenizer_a.convert_ids_to_tokens(x)!r} (id {x}) vs "
                f"{tokenizer_b.convert_ids_to_tokens(y)!r} (id {y})"
            )
    return f"the same first {min(len(a), len(b))} tokens, then {len(a)} vs {len(b)} in all"


def _chat_text(tokenizer: Any) -> str | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    return tokenizer.apply_chat_template(
        list(CONVERSATION), tokenize=False, add_generation_prompt=True
    )


def compare_tokenizers(
    reference: Any,
    candidate: Any,
    texts: Sequence[str],
    reference_name: str,
    candidate_name: str,
) -> TokenizerCheck:
    """Fail with the first difference between two loaded tokenizers; else what was compared.

    Compared: the ids of every text with the tokenizer's own special tokens (as a user's
    ``tokenizer(text)`` gives them) and their decoding; the chat template's text and the
    ids of a conversation rendered with it (encoded without extra special tokens, as a
    chat prompt is); the named special tokens and their ids, the added vocabulary and the
    vocabulary size.
    """

    def fail(what: str) -> CheckFailed:
        return CheckFailed(
            f"{candidate_name}: its tokenizer differs from the source's ({reference_name}): {what}"
        )

    template = getattr(reference, "chat_template", None)
    if template != getattr(candidate, "chat_template", None):
        raise fail("the chat template differs")
    cases = [(f"text {i} {text[:40]!r}", text, True) for i, text in enumerate(texts)]
    chat = _chat_text(reference)
    if chat is not None:
        if chat != _chat_text(candidate):
            raise fail("the chat template renders a conversation differently")
        cases.append(("the chat-templated conversation", chat, False))
    tokens = 0
    for label, text, special in cases:
        a = reference(text, add_special_tokens=special)["input_ids"]
        b = candidate(text, add_special_tokens=special)["input_ids"]
        if a != b:
            where = _first_token_difference(reference, a, candidate, b)
            raise fail(f"{label} encodes differently, first at {where}")
        if reference.decode(a) != candidate.decode(b):
            raise fail(f"{label} decodes differently")
        tokens += len(a)
    ours, theirs = _special_tokens(reference), _special_tokens(candidate)
    for key, value in ours.items():
        if value != theirs[key]:
            raise fail(f"{key} differ, first at {_first_difference(value, theirs[key])}")
    return TokenizerCheck(reference_name, candidate_name, len(cases), tokens)


def check_tokenizer_dir(
    reference: Path | Any,
    candidate_dir: Path,
    reference_name: str | None = None,
    candidate_name: str | None = None,
) -> TokenizerCheck:
    """Load ``candidate_dir`` as a user would and compare it with ``reference``.

    ``reference`` is the source's directory (loaded the same way) or an already loaded
    tokenizer (one read from a GGUF file, or built in code), then named by
    ``reference_name``. ``candidate_name`` names a directory still at its temporary path
    by the path it will have.
    """
    if isinstance(reference, (str, Path)):
        reference_name = reference_name or str(reference)
        reference = load_as_user(Path(reference))
    if reference_name is None:
        raise ValueError("reference_name is required for a loaded reference tokenizer")
    candidate = load_as_user(candidate_dir)
    return compare_tokenizers(
        reference,
        candidate,
        fidelity_texts(),
        reference_name,
        candidate_name or str(candidate_dir),
    )


def tokenizer_file_names(model_dir: Path) -> list[str]:
    """The tokenizer files present in ``model_dir``.

    A tokenizer shipped as code also needs the directory's Python files: its own module
    and the config's, which ``AutoTokenizer`` loads first.
    """
    model_dir = Path(model_dir)
    names = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if needs_remote_code(model_dir):
        names += sorted(path.name for path in model_dir.glob("*.py"))
    return names


def copy_tokenizer_files(src_dir: Path, dest_dir: Path) -> list[str]:
    """Make ``dest_dir``'s tokenizer exactly ``src_dir``'s; return the files' names.

    A byte-for-byte copy, not ``tokenizer.save_pretrained``: re-saving goes through the
    loaded class and drops what made the source load faithfully (see
    :func:`keep_tokenizer_json`). Tokenizer files in ``dest_dir`` that the source lacks
    (another writer's) are removed, so nothing else takes part in loading.
    """
    src_dir, dest_dir = Path(src_dir), Path(dest_dir)
    names = tokenizer_file_names(src_dir)
    if not names:
        raise EdgeforgeError(f"{src_dir}: no tokenizer files ({' / '.join(TOKENIZER_FILES)})")
    for stale in set(TOKENIZER_FILES) - set(names):
        (dest_dir / stale).unlink(missing_ok=True)
    for name in names:
        shutil.copyfile(src_dir / name, dest_dir / name)
    return names


def write_tokenizer_dir(src_dir: Path, dest_dir: Path) -> Path:
    """A new folder with ``src_dir``'s ``config.json`` and tokenizer files, no weights.

    ``config.json`` comes along because ``AutoTokenizer`` picks the tokenizer class from its
    ``model_type``: without it the folder would not load the way the model's does.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir()
    shutil.copyfile(Path(src_dir) / "config.json", dest_dir / "config.json")
    copy_tokenizer_files(src_dir, dest_dir)
    return dest_dir


def keep_tokenizer_json(model_dir: Path) -> None:
    """Make ``AutoTokenizer`` read this directory's ``tokenizer.json`` as written.

    Needed where the tokenizer moves into a checkpoint of another ``model_type`` whose
    tokenizer class rebuilds its pipeline in code (``qwen2``: ``Qwen2Tokenizer``, even
    when ``tokenizer_config.json`` names another class). transformers keeps the file's
    normalizer, pre-tokenizer and decoder only when ``tokenizer_config.json`` sets
    ``trust_remote_code``; no code is involved (the directory has none, and the model's
    own loading ignores the key). The fidelity check proves the result.
    """
    path = Path(model_dir) / "tokenizer_config.json"
    if not (Path(model_dir) / "tokenizer.json").is_file():
        raise EdgeforgeError(f"{model_dir}: no tokenizer.json to keep")
    config = json.loads(path.read_text()) if path.is_file() else {}
    config[KEEP_JSON_KEY] = True
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

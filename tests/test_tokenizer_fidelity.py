"""Every model directory we write tokenizes exactly like its source, loaded as users load it.

The SmolLM2 checks reproduce the defect this guards against: SmolLM2's tokenizer files,
byte-identical, in a ``qwen2`` directory, read by transformers through ``Qwen2Tokenizer``
(Qwen's pre-tokenizer and NFC normalizer), which split newlines and spaces differently.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from common.core.errors import CheckFailed, EdgeforgeError
from common.models.tokenizer_fidelity import (
    CONVERSATION,
    FIDELITY_TEXTS,
    KEEP_JSON_KEY,
    check_tokenizer_dir,
    copy_tokenizer_files,
    tokenizer_file_names,
    write_tokenizer_dir,
)
from tests.conftest import run_cli

#: Real code with indentation and blank lines: this file's own first 3,000 characters.
CODE_TEXT = Path(__file__).read_text()[:3000]
#: Relative perplexity difference allowed between two directories holding the same weights.
PPL_RTOL = 1e-4
#: "first at token 12: 'ĊĠĠĠ' (id 472) vs 'Ċ' (id 198)"
FIRST_TOKEN = re.compile(r"first at token \d+: '.+' \(id \d+\) vs '.+' \(id \d+\)")


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------ tiny models


@pytest.mark.parametrize("fixture", ["tiny_qwen2_dir", "tiny_qwen2_vl_dir", "tiny_qwen2_5_vl_dir"])
def test_tiny_model_records_an_identical_tokenizer(fixture: str, request) -> None:
    model_dir = request.getfixturevalue(fixture)
    record = json.loads((model_dir / "manifest.json").read_text())["checks"]["tokenizer"]
    assert record["tokenizer_identical"] is True
    assert record["reference"] == "the tokenizer built in code"
    assert record["candidate"] == str(model_dir)
    assert record["texts"] == len(FIDELITY_TEXTS) + 4 + 1  # fixed, corpus, chat
    assert record["tokens"] > 1000


def test_changed_merge_names_the_first_differing_token(
    tiny_qwen2_dir: Path, tmp_path: Path
) -> None:
    wrong = write_tokenizer_dir(tiny_qwen2_dir, tmp_path / "wrong")
    # Drop the first merge: every word that used it now splits into smaller pieces.
    _edit_json(wrong / "tokenizer.json", lambda t: t["model"]["merges"].pop(0))
    with pytest.raises(CheckFailed) as err:
        check_tokenizer_dir(tiny_qwen2_dir, wrong)
    message = str(err.value)
    assert message.startswith(f"{wrong}: its tokenizer differs from the source's ")
    assert FIRST_TOKEN.search(message), message


def test_changed_chat_template_and_special_tokens_fail(
    tiny_qwen2_dir: Path, tmp_path: Path
) -> None:
    template = write_tokenizer_dir(tiny_qwen2_dir, tmp_path / "template")
    path = template / "chat_template.jinja"
    path.write_text(path.read_text().replace("<|im_start|>", "<|im_start|> "))
    with pytest.raises(CheckFailed, match="the chat template differs"):
        check_tokenizer_dir(tiny_qwen2_dir, template)

    special = write_tokenizer_dir(tiny_qwen2_dir, tmp_path / "special")
    _edit_json(special / "tokenizer_config.json", lambda c: c.update(pad_token="<|im_start|>"))
    with pytest.raises(CheckFailed, match=r"special tokens differ, first at 'pad_token'"):
        check_tokenizer_dir(tiny_qwen2_dir, special)


def test_same_files_pass(tiny_qwen2_vl_dir: Path, tmp_path: Path) -> None:
    same = write_tokenizer_dir(tiny_qwen2_vl_dir, tmp_path / "same")
    record = check_tokenizer_dir(tiny_qwen2_vl_dir, same).record()
    assert record["tokenizer_identical"] is True and record["tokens"] > 1000


def test_copy_replaces_the_destination_tokenizer(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "special_tokens_map.json").write_text("{}")  # another writer's leftover
    (dest / "tokenizer.json").write_text("{}")
    names = copy_tokenizer_files(tiny_qwen2_dir, dest)
    assert not (dest / "special_tokens_map.json").exists()
    for name in names:
        assert (dest / name).read_bytes() == (tiny_qwen2_dir / name).read_bytes(), name
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EdgeforgeError, match="no tokenizer files"):
        copy_tokenizer_files(empty, dest)


def test_tokenizer_code_travels_with_a_remote_code_tokenizer(tmp_path: Path) -> None:
    """Qwen-7B's tokenizer is Python (``auto_map``): its modules are tokenizer files too."""
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}})
    )
    for name in ("qwen.tiktoken", "tokenization_qwen.py", "configuration_qwen.py"):
        (tmp_path / name).write_text("")
    assert tokenizer_file_names(tmp_path) == [
        "tokenizer_config.json",
        "qwen.tiktoken",
        "configuration_qwen.py",
        "tokenization_qwen.py",
    ]


def test_directory_built_before_the_check_is_rebuilt(tmp_path: Path) -> None:
    def build() -> str:
        result = run_cli("model", "--model", "tiny-qwen2", "--build-dir", str(tmp_path))
        assert result.returncode == 0, result.stderr
        return result.stderr

    build()
    manifest = tmp_path / "tiny-qwen2" / "model" / "manifest.json"
    _edit_json(manifest, lambda m: m.pop("checks"))
    assert "up to date" not in build()
    assert json.loads(manifest.read_text())["checks"]["tokenizer"]["tokenizer_identical"]
    assert "up to date" in build()


# ------------------------------------------------------------------ the real model


def _plain_perplexity(model_dir: Path, text: str) -> tuple[float, list[int]]:
    """Perplexity of ``text`` with nothing but transformers' Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        loss = model(ids, labels=ids).loss.item()
    return math.exp(loss), ids[0].tolist()


@pytest.mark.smollm2
def test_smollm2_directories_tokenize_identically(
    smollm2_dir: Path, smollm2_qwen2_dir: Path
) -> None:
    from transformers import AutoTokenizer

    llama = AutoTokenizer.from_pretrained(smollm2_dir)
    qwen2 = AutoTokenizer.from_pretrained(smollm2_qwen2_dir)
    for text in (*FIDELITY_TEXTS, CODE_TEXT):
        assert qwen2(text).input_ids == llama(text).input_ids, text[:60]
    chat = llama.apply_chat_template(list(CONVERSATION), tokenize=False)
    assert qwen2.apply_chat_template(list(CONVERSATION), tokenize=False) == chat
    assert qwen2.all_special_tokens == llama.all_special_tokens
    for model_dir, reference in ((smollm2_dir, "(GGUF)"), (smollm2_qwen2_dir, str(smollm2_dir))):
        record = json.loads((model_dir / "manifest.json").read_text())["checks"]["tokenizer"]
        assert record["tokenizer_identical"] is True and reference in record["reference"]


@pytest.mark.smollm2
def test_smollm2_plain_transformers_perplexity_agrees(
    smollm2_dir: Path, smollm2_qwen2_dir: Path
) -> None:
    from common.inputs.data import EVAL_CORPUS, iter_texts

    held_out = next(iter(iter_texts([EVAL_CORPUS])))[:3000]
    for text in (CODE_TEXT, held_out):
        ppl_llama, ids_llama = _plain_perplexity(smollm2_dir, text)
        ppl_qwen2, ids_qwen2 = _plain_perplexity(smollm2_qwen2_dir, text)
        assert ids_qwen2 == ids_llama
        assert abs(ppl_qwen2 - ppl_llama) / ppl_llama <= PPL_RTOL, (ppl_llama, ppl_qwen2)


@pytest.mark.smollm2
def test_qwen2_directory_without_the_key_is_caught(
    smollm2_dir: Path, smollm2_qwen2_dir: Path, tmp_path: Path
) -> None:
    """Without the key, transformers builds Qwen's pipeline: the check names the token."""
    broken = write_tokenizer_dir(smollm2_qwen2_dir, tmp_path / "broken")
    _edit_json(broken / "tokenizer_config.json", lambda c: c.pop(KEEP_JSON_KEY))
    with pytest.raises(CheckFailed) as err:
        check_tokenizer_dir(smollm2_dir, broken)
    assert FIRST_TOKEN.search(str(err.value)), str(err.value)
    assert "'Ċ'" in str(err.value)  # SmolLM2 keeps '\n' + indentation as one token; Qwen splits

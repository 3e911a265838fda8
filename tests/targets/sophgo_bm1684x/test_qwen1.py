"""Qwen1 (``qwen-7b``) on the SOPHGO ONNX route: the sophon-demo patch and the pieces.

The upstream ``modeling_qwen.py`` cannot be shipped, so the tests build tiny checkpoints
from ``tests/fixtures/qwen1`` in the layout of both upstream revisions the patches know (the
one sophon-demo's guide was written for, ``modeling_qwen.py``, and the later one the Hub
serves, ``modeling_qwen_latest.py``), with every region a patch edits kept verbatim,
deterministic weights and tiny-qwen2's tokenizer (a real ``tokenizers`` BPE: Qwen1's own
tokenizer needs ``tiktoken`` and a 150k-token vocabulary, and nothing here depends on which
BPE it is). The reference is always the *unpatched* model through its own remote code.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from common.core.errors import EdgeforgeError
from common.export.piece_export import (
    cosine,
    greedy_decode,
    onnx_runner,
    reference_greedy,
    reference_logits,
)
from common.models.qwen import QwenAdapter, load_qwen_model
from tests.conftest import QWEN1_FIXTURE, build_qwen1_checkpoint, import_target

FIXTURE = QWEN1_FIXTURE
SEQ_LEN = 32
NEW_TOKENS = 12
PROMPT = "What is the capital of France?"


qwen1 = import_target("sophgo-bm1684x", "qwen1")
sophgo_build = import_target("sophgo-bm1684x")


#: Fixture modeling file per upstream revision, and the patch that must fit it.
REVISIONS = {
    "guide": ("modeling_qwen.py", "qwen1-modeling_qwen.patch"),
    "latest": ("modeling_qwen_latest.py", "qwen1-modeling_qwen-latest.patch"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2_dir: Path) -> dict:
    root = tmp_path_factory.mktemp("qwen1")
    return {
        rev: build_qwen1_checkpoint(root / rev, tiny_qwen2_dir, REVISIONS[rev][0])
        for rev in REVISIONS
    }


@pytest.fixture(params=sorted(REVISIONS))
def revision(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def qwen1_dir(checkpoints: dict, revision: str) -> Path:
    """The tiny checkpoint of each upstream revision in turn."""
    return checkpoints[revision]


@pytest.fixture
def guide_dir(checkpoints: dict) -> Path:
    """The revision with ``registered_causal_mask`` (the buffer transformers 5 breaks)."""
    return checkpoints["guide"]


def test_adapter_reads_qwen1_dialect(guide_dir: Path) -> None:
    adapter = QwenAdapter(load_qwen_model(guide_dir))
    assert (adapter.head_dim, adapter.num_kv_heads, adapter.intermediate_size) == (16, 4, 128)
    assert adapter.num_layers == 2 and adapter.trained_context == 64
    layer = adapter.layers()[1]
    assert set(layer.linears) == {"qkv", "o", "gate", "up", "down"}
    assert layer.linear_names["gate"] == "transformer.h.1.mlp.w2"


def test_loader_restores_non_persistent_buffers(guide_dir: Path) -> None:
    """transformers 5 leaves remote-code buffers uninitialised; the loader rebuilds them."""
    model = load_qwen_model(guide_dir)
    mask = model.transformer.registered_causal_mask[0, 0]
    assert torch.equal(mask, torch.tril(torch.ones(64, 64, dtype=torch.bool)))
    logn = model.transformer.h[0].attn.logn_tensor.flatten()
    assert torch.all(logn[:64] == 1.0) and logn[64] == pytest.approx(math.log(65, 64))


#: Per revision, code the patch must remove (mask logic, torch.full divisor).
REMOVED = {
    "guide": ("/ torch.full(", "torch.where(causal_mask", "key_length - query_length"),
    "latest": ("torch.tril(",),
}


def test_remote_code_needing_a_missing_package(guide_dir: Path, tmp_path: Path) -> None:
    """Real Qwen1 code imports einops/tiktoken; a missing one is one line, not a traceback."""
    source = tmp_path / "needs-package"
    shutil.copytree(guide_dir, source)
    modeling = source / "modeling_qwen.py"
    modeling.write_text("import edgeforge_absent_pkg\n" + modeling.read_text())
    with pytest.raises(EdgeforgeError) as err:
        load_qwen_model(source)
    message = str(err.value)
    assert message.startswith(f"{source}: the remote code could not load it: ")
    assert "edgeforge_absent_pkg" in message and "\n" not in message


def test_patch_applies_every_edit(qwen1_dir: Path, revision: str, tmp_path: Path) -> None:
    dest = qwen1.patch_model_dir(qwen1_dir, tmp_path / "patched", SEQ_LEN)
    text = (dest / "modeling_qwen.py").read_text()
    assert "\nSUPPORT_TORCH2 = False\n" in text
    assert "attn_weights = attn_weights / (size_temp ** 0.5)" in text
    for gone in REMOVED[revision]:
        assert gone not in text, gone
    assert text.index("present = (key, value)") < text.index("if layer_past is not None:")
    config = json.loads((dest / "config.json").read_text())
    assert config["seq_length"] == config["max_position_embeddings"] == SEQ_LEN
    assert (dest / "model.safetensors").is_symlink()
    source = (qwen1_dir / "modeling_qwen.py").read_text()
    assert source == (FIXTURE / REVISIONS[revision][0]).read_text()  # the source is untouched
    record = json.loads((dest / qwen1.PATCH_RECORD).read_text())
    assert record["seq_len"] == SEQ_LEN and record["patch"] == REVISIONS[revision][1]


def test_patch_is_a_real_unified_diff(qwen1_dir: Path, revision: str, tmp_path: Path) -> None:
    """git's own patcher applies the same file to the same result as ours."""
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(qwen1_dir / "modeling_qwen.py", plain / "modeling_qwen.py")
    patch = qwen1.PATCH_DIR / REVISIONS[revision][1]
    subprocess.run(["git", "apply", "-p1", str(patch)], cwd=plain, check=True)
    ours = qwen1.patch_model_dir(qwen1_dir, tmp_path / "ours", SEQ_LEN)
    assert (plain / "modeling_qwen.py").read_text() == (ours / "modeling_qwen.py").read_text()


def test_mismatching_modeling_file_fails_cleanly(guide_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "edited"
    shutil.copytree(guide_dir, source)
    modeling = source / "modeling_qwen.py"
    modeling.write_text(modeling.read_text().replace("size_temp ** 0.5,", "size_temp**0.5,"))
    dest = tmp_path / "out" / "patched"
    dest.parent.mkdir()
    with pytest.raises(EdgeforgeError) as err:
        qwen1.patch_model_dir(source, dest, SEQ_LEN)
    message = str(err.value)
    assert message.startswith(f"{modeling}: not a modeling_qwen.py revision"), message
    assert "qwen1-modeling_qwen.patch hunk 2/4 (edits 2+3" in message
    assert "qwen1-modeling_qwen-latest.patch hunk 2/3 (edits 3+4" in message
    assert "size_temp**0.5" not in message and "does not match: expected `" in message
    assert "\n" not in message
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_already_patched_file_is_named(qwen1_dir: Path, tmp_path: Path) -> None:
    patched = qwen1.patch_model_dir(qwen1_dir, tmp_path / "once", SEQ_LEN)
    with pytest.raises(EdgeforgeError, match=r"modeling_qwen\.py: qwen1-.* hunk 1/. .*already"):
        qwen1.patch_model_dir(patched, tmp_path / "twice", SEQ_LEN)


@pytest.mark.parametrize("seq_len", [1, 65])
def test_seq_len_outside_trained_context(guide_dir: Path, tmp_path: Path, seq_len: int) -> None:
    with pytest.raises(EdgeforgeError, match=rf"SEQ_LEN={seq_len} is outside 2\.\.64.*config"):
        qwen1.patch_model_dir(guide_dir, tmp_path / "p", seq_len)
    assert not (tmp_path / "p").exists()


def test_llm_convert_route_is_refused(guide_dir: Path, tmp_path: Path) -> None:
    """Refused before any estimate or load ("not supported", not "too big"), one line."""
    from tests.conftest import assert_clean_error, run_python

    with pytest.raises(EdgeforgeError, match=r"ROUTE=llm_convert: Qwen1 builds only by ROUTE=onnx"):
        qwen1.check_route("llm_convert")
    qwen1.check_route("onnx")
    result = run_python(
        "targets/sophgo-bm1684x/build.py", "--model", "qwen-7b", "--model-path", str(guide_dir),
        "--build-dir", str(tmp_path), "--route", "llm_convert", "--max-memory", "1MB",
    )  # fmt: skip
    assert_clean_error(result, "ROUTE=llm_convert: Qwen1 builds only by ROUTE=onnx")
    assert not (tmp_path / "qwen-7b").exists()


def test_recipe_needs_model_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from common.core.recipes import load_recipe, resolve_model_dir

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    recipe = load_recipe("qwen-7b")
    assert recipe.model_type == "qwen" and recipe.trust_remote_code
    with pytest.raises(EdgeforgeError, match=r"Qwen/Qwen-7B-Chat not found.*MODEL_PATH=DIR"):
        resolve_model_dir(recipe, tmp_path, None)


def test_layerwise_export_equals_the_whole_model_export(qwen1_dir: Path, tmp_path: Path) -> None:
    """The pieces ``make sophgo`` exports one part at a time from the patched copy are the
    whole patched model's pieces, byte for byte."""
    streamed = qwen1.export_patched(qwen1_dir, SEQ_LEN, tmp_path / "layers")
    whole = QwenAdapter(load_qwen_model(tmp_path / "layers" / "patched-model"))
    pieces = qwen1.export_qwen1_pieces(whole, tmp_path / "whole", progress=False)
    assert [p.name for p in streamed] == [p.name for p in pieces]
    assert [p.inputs for p in streamed] == [p.inputs for p in pieces]
    for ours, theirs in zip(streamed, pieces, strict=True):
        assert ours.path.read_bytes() == theirs.path.read_bytes(), ours.name


def test_onnx_pieces_reproduce_unpatched_hf(qwen1_dir: Path, tmp_path: Path) -> None:
    """ONNX pieces of the patched model, chained by the shared host loop on onnxruntime,
    against the unpatched remote code: same greedy tokens, same logits at every step. The
    reference and the export are the calls ``make sophgo`` makes, each one part at a time;
    the reference equals the whole unpatched model's."""
    from common.analysis import layerwise_decode
    from common.analysis.eval import prompt_ids
    from common.analysis.layerwise import Parts
    from common.models.qwen import load_qwen_tokenizer
    from common.models.streaming import StreamedModel

    unpatched = StreamedModel(qwen1_dir, trust_remote_code=True)
    dims = qwen1.qwen1_dims(unpatched.adapter, SEQ_LEN)
    parts = Parts(unpatched.adapter, unpatched)
    pieces = qwen1.export_patched(qwen1_dir, SEQ_LEN, tmp_path)
    names = [p.name for p in pieces]
    assert names[:4] == ["embedding", "embedding_cache", "block_0", "block_cache_0"]
    assert len(pieces) == 2 * 2 + 5
    patched = json.loads((tmp_path / "patched-model" / "config.json").read_text())
    assert patched["seq_length"] == dims.seq_len == SEQ_LEN

    run = onnx_runner(tmp_path / "onnx")
    hidden = np.zeros((1, 1, 64), np.float32)
    history = np.zeros((1, SEQ_LEN, 4, 16), np.float32)
    mask = np.zeros((1, 1, 1, SEQ_LEN + 1), np.float32)
    inputs = {"input_states": hidden, "position_ids": np.ones((1, 1), np.int32),
              "attention_mask": mask, "history_k": history, "history_v": history}  # fmt: skip
    out = run("block_cache_0", inputs)
    assert [o.shape for o in out] == [(1, 1, 64), (1, 1, 4, 16), (1, 1, 4, 16)]  # edit 5

    ids = prompt_ids(load_qwen_tokenizer(qwen1_dir), PROMPT)
    logits: list[np.ndarray] = []
    tokens = greedy_decode(run, dims, ids[0].tolist(), NEW_TOKENS, logits)
    want = layerwise_decode.reference_greedy(parts, ids, NEW_TOKENS)
    assert len(want) == NEW_TOKENS and len(set(want)) > 2, want  # a non-degenerate check
    assert tokens == want
    hf = layerwise_decode.reference_logits(parts, ids, want)
    whole = load_qwen_model(qwen1_dir)
    assert want == reference_greedy(whole, ids, NEW_TOKENS)
    np.testing.assert_array_equal(hf, reference_logits(whole, ids, want))
    worst = min(cosine(a, b) for a, b in zip(logits, hf, strict=True))
    assert worst >= 0.99999, worst
    assert float(np.abs(np.stack(logits) - hf).max()) < 1e-3


#: A prompt whose 4 greedy tokens the 4-layer fixture picks by a float logit margin of at
#: least 0.48 (the default prompt's second token wins by 0.03, which bf16 flips).
WIDE_MARGIN_PROMPT = "What is two plus two?"


def test_make_sophgo_streams_qwen1_and_simulates_a_sampled_bmodel(
    tiny_qwen2_dir: Path, tmp_path: Path
) -> None:
    """``make sophgo MODEL=qwen-7b`` on a 4-layer tiny Qwen1 with ``VERIFY=sample``: read
    one part at a time (the layer-by-layer estimate is the one recorded), and the
    simulator loads a bmodel of the simulated nets only (embedding, heads, blocks 0, 2, 3)
    while the package ships every net."""
    from common.backends.tpu_mlir import Toolchain
    from common.models.streaming import StreamedModel
    from tests.conftest import REPO_ROOT, run_python

    model_dir = build_qwen1_checkpoint(tmp_path / "qwen1", tiny_qwen2_dir, num_hidden_layers=4)
    build = tmp_path / "build"
    result = run_python(
        "targets/sophgo-bm1684x/build.py", "--model", "qwen-7b", "--model-path", str(model_dir),
        "--build-dir", str(build), "--seq-len", str(SEQ_LEN), "--max-new-tokens", "4",
        "--verify", "sample", "--prompt", WIDE_MARGIN_PROMPT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    root = build / "qwen-7b" / "sophgo-bm1684x"
    report = json.loads((root / "bf16" / "report.json").read_text())
    assert report["passed"] is True
    assert report["greedy_match_tokens"] == report["greedy_total_tokens"] == 4
    verify = report["verify"]
    assert verify["mode"] == "sample" and verify["simulated_blocks"] == [0, 2, 3]
    heads = {"embedding", "embedding_cache", "lm_head", "greedy_head", "penalty_sample_head"}
    sampled = heads | {f"block{kind}_{i}" for kind in ("", "_cache") for i in (0, 2, 3)}
    assert set(verify["simulated_bmodel_nets"]) == sampled
    estimate = StreamedModel(model_dir, trust_remote_code=True)
    expected = sophgo_build.memory_estimate(estimate, [0, 2, 3]).to_json()
    assert report["resources"]["estimated_peak_bytes"] == expected

    toolchain = Toolchain(REPO_ROOT / ".venv-tpu-mlir")

    def nets(bmodel: Path) -> set[str]:
        info = toolchain.run("model_tool", ["--info", str(bmodel)], tmp_path, tmp_path / "i.log")
        return set(re.findall(r"net \d+: \[(\w+)\]", info))

    shipped = nets(root / "bf16" / f"qwen-7b_bf16_seq{SEQ_LEN}_1dev.bmodel")
    assert shipped == heads | {f"block{kind}_{i}" for kind in ("", "_cache") for i in range(4)}
    assert nets(root / "work-bf16" / "verify-bmodel" / "verify.bmodel") == sampled
    assert [p["name"] for p in report["pieces"] if p["cos"] is None] == ["block_1", "block_cache_1"]

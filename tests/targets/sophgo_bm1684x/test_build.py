"""``make sophgo`` end to end on tiny-qwen2, its input errors, and the checks it runs on the
simulated nets (exercised here against onnxruntime, where the answer is known)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.analysis.eval import prompt_ids
from common.backends.tpu_mlir import QUANTIZE, Toolchain
from common.export.piece_export import export_pieces, greedy_decode, onnx_runner, prefill_inputs
from common.models import get_adapter
from common.models.loading import load_model, load_tokenizer
from common.models.static_decoder import MASK_BLOCKED, piece_dims
from tests.conftest import (
    CliResult,
    assert_clean_error,
    assert_gates,
    assert_same_tokenizer,
    import_target,
    kill_after_entries,
    run_python,
)

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "targets" / "sophgo-bm1684x" / "build.py"
sophgo_verify = import_target("sophgo-bm1684x", "sophgo_verify")


def run_build(*args: str) -> CliResult:
    return run_python(str(SCRIPT), *args)


def test_unknown_mode_and_chip(session_build: Path) -> None:
    base = ("--model", "tiny-qwen2", "--build-dir", str(session_build))
    assert_clean_error(run_build(*base, "--mode", "int3"), "MODE=int3", "w4bf16")
    assert_clean_error(run_build(*base, "--chip", "bm1999"), "CHIP=bm1999", "bm1688")
    assert_clean_error(run_build(*base, "--route", "x"), "ROUTE=x", "llm_convert")
    assert_clean_error(run_build(*base, "--q-group-size", "-1"), "Q_GROUP_SIZE=-1")


def test_seq_len_too_short_for_the_check(session_build: Path, tiny_qwen2_dir: Path) -> None:
    result = run_build(
        "--model", "tiny-qwen2", "--build-dir", str(session_build), "--seq-len", "8",
        "--max-new-tokens", "32",
    )  # fmt: skip
    assert_clean_error(result, "SEQ_LEN=8 is too short", "max_new_tokens (32)")


def test_seq_len_beyond_rotary_range(session_build: Path, tiny_qwen2_dir: Path) -> None:
    limit = json.loads((tiny_qwen2_dir / "config.json").read_text())["max_position_embeddings"]
    result = run_build(
        "--model", "tiny-qwen2", "--build-dir", str(session_build), "--seq-len", str(limit + 1)
    )
    assert_clean_error(result, f"SEQ_LEN={limit + 1}", "max_position_embeddings")


def test_missing_toolchain(session_build: Path, tmp_path: Path) -> None:
    result = run_build(
        "--model", "tiny-qwen2", "--build-dir", str(session_build), "--venv", str(tmp_path)
    )
    assert_clean_error(result, "make sophgo-toolchain")


@pytest.fixture(scope="module")
def tiny_bf16(session_build: Path, tiny_qwen2_dir: Path) -> Path:
    """An uninterrupted bf16 build of tiny-qwen2 at SEQ 64; its package folder."""
    result = run_build(
        "--model", "tiny-qwen2", "--build-dir", str(session_build), "--seq-len", "64",
        "--max-new-tokens", "8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return session_build / "tiny-qwen2" / "sophgo-bm1684x" / "bf16"


def test_tiny_qwen2_bf16_package(tiny_bf16: Path, tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    out = tiny_bf16
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "bf16" and report["chip"] == "bm1684x"
    assert report["tpu_mlir_version"] == "1.30.2"
    assert len(report["pieces"]) == 2 * 2 + 5
    for piece in report["pieces"]:
        assert piece["cos"] >= 0.999, piece  # simulator vs onnxruntime
        # the tools' own checks: transform (top vs onnxruntime), deploy (tpu vs top; its
        # bmodel simulation is skipped: the cos above is that check, against the float model)
        assert len(piece["tool_cos"]) == 2 and min(piece["tool_cos"]) >= 0.999, piece
        assert len(piece["compile_seconds"]) == 2, piece
    # everything but the sampling head is scored on the inputs the greedy run produced
    assert {p["name"] for p in report["pieces"] if p["inputs"] == "example"} == {
        "penalty_sample_head"
    }
    assert report["greedy_match_tokens"] == report["greedy_total_tokens"] >= 1
    assert report["kv_decode_match_tokens"] == report["kv_decode_total_tokens"] == 8
    assert report["timings"]["compile pieces"] > 0
    # every decode step's logits (simulated bf16 bmodels) against HF's float logits
    assert report["decode_logits_cos_min"] >= 0.999
    assert (out / "tiny-qwen2_bf16_seq64_1dev.bmodel").stat().st_size > 0
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    plan = json.loads((out / "quant_plan.json").read_text())  # per linear, what the bmodel holds
    assert plan["scheme"]["name"] == "bf16" and len(plan["tensors"]) == 2 * 7 + 1
    assert {t["weight"]["dtype"] for t in plan["tensors"].values()} == {"bfloat16"}
    assert_same_tokenizer(report["tokenizer"], out, tiny_qwen2_dir)
    assert_gates(report, {"min_piece_cos", "greedy_prefill_match_tokens", "kv_decode_match_tokens"})
    assert report["passed"] is True
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["versions"]["tpu_mlir"] == "1.30.2"
    assert "tiny-qwen2_bf16_seq64_1dev.bmodel" in json.dumps(manifest["outputs"])
    assert "| block_cache_1 |" in (out / "report.md").read_text()
    info = Toolchain(REPO / ".venv-tpu-mlir").run(
        "model_tool", ["--info", str(out / "tiny-qwen2_bf16_seq64_1dev.bmodel")], tmp_path,
        tmp_path / "info.log",
    )  # fmt: skip
    for index, piece in enumerate(report["pieces"]):  # one net per piece, in order
        assert f"net {index}: [{piece['name']}]" in info
    assert info.count("kernel_module size") == 1  # the 5.6 MB kernel is stored once
    # What only this run needed is gone: the float ONNX pieces, and the combined bmodel moved
    # into the package rather than copied (each about 60 and 15 GB at 7B).
    work = out.parent / "work-bf16"
    assert not (work / "onnx").exists() and not list(work.glob("*.bmodel"))


def test_disk_estimate_matches_the_build(tiny_bf16: Path, tiny_qwen2_dir: Path) -> None:
    """The disk preflight's estimate against the files the tiny build wrote: its compiled
    pieces and its combined bmodel (kernel modules and all), within 5 %."""
    from common.models.streaming import StreamedModel

    sophgo_build = import_target("sophgo-bm1684x")
    estimate = sophgo_build.disk_estimate(StreamedModel(tiny_qwen2_dir), "bf16", 64, None, 0)
    compiled = tiny_bf16.parent / "compiled-bf16"
    written = {
        "compiled pieces": sum(p.stat().st_size for p in compiled.rglob("*.bmodel")),
        "combined bmodel": (tiny_bf16 / "tiny-qwen2_bf16_seq64_1dev.bmodel").stat().st_size,
    }
    for part, size in written.items():
        assert abs(estimate.parts[part] - size) <= 0.05 * size, (part, estimate.parts, size)


@pytest.fixture(scope="module")
def tiny_onnx(tiny_qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """tiny-qwen2's float pieces at SEQ 64 on onnxruntime, with its dims and a prompt."""
    model = load_model(tiny_qwen2_dir)
    adapter = get_adapter(model)
    out = tmp_path_factory.mktemp("tiny-onnx")
    export_pieces(adapter, 64, out, progress=False)
    prompt = prompt_ids(load_tokenizer(tiny_qwen2_dir), "What is the capital of France?")
    return onnx_runner(out), piece_dims(adapter, 64), prompt[0].tolist()


def test_teacher_forced_prefill_and_cached_decode_equal_the_decode_loop(tiny_onnx) -> None:
    """The two cheap checks reproduce ``greedy_decode`` (prefill + decode per token) exactly
    on the same runner: same tokens, and the decode from the prefill's cache is the same loop."""
    run, dims, prompt = tiny_onnx
    reference = greedy_decode(run, dims, prompt, 8)
    tokens, logits, cache_k, cache_v = sophgo_verify.prefill_greedy(run, dims, prompt, reference)
    assert tokens == reference and len(logits) == 8
    assert [int(np.argmax(row)) for row in logits] == reference
    assert len(cache_k) == dims.num_layers and cache_k[0].shape[1] == dims.seq_len
    decoded = sophgo_verify.kv_decode(run, dims, len(prompt), tokens[0], (cache_k, cache_v), 8)
    assert decoded == reference
    # a wrong continuation is caught at the first position it differs
    wrong = [*reference[:3], (reference[3] + 1) % dims.vocab_size, *reference[4:]]
    forced, *_ = sophgo_verify.prefill_greedy(run, dims, prompt, wrong)
    assert sophgo_verify.first_mismatch(forced, wrong) == 3


def test_scored_runner_scores_first_calls_on_live_rows(tiny_onnx) -> None:
    run, dims, prompt = tiny_onnx
    scored = sophgo_verify.ScoredRunner(run, run)
    sophgo_verify.prefill_greedy(scored, dims, prompt, [1, 2])
    assert scored.scores.keys() == {"embedding", *(f"block_{i}" for i in range(2)), "lm_head"}
    assert all(score == pytest.approx(1.0) for score in scored.scores.values())
    # padding rows (fully masked) are not scored; a difference in a live row is
    pre = prefill_inputs([5, 6, 7], 8)
    rows = sophgo_verify.live_rows(pre)
    assert rows is not None and rows[0].tolist() == [0, 1, 2] and rows[1] == 8
    want = np.ones((1, 8, 4), np.float32)
    padded = want.copy()
    padded[:, 3:] = -want[:, 3:]
    assert sophgo_verify.agreement(padded, want, rows) == pytest.approx(1.0)
    assert sophgo_verify.agreement(padded, want, None) < 0.0
    live = want.copy()
    live[:, 1] = -live[:, 1]
    assert sophgo_verify.agreement(live, want, rows) < 0.5
    assert sophgo_verify.agreement(np.array([[3]]), np.array([[3]]), None) == 1.0
    assert sophgo_verify.agreement(np.array([[3]]), np.array([[4]]), None) == 0.0
    assert pre["attention_mask"][0, 0, 5, 5] == MASK_BLOCKED


def test_verify_policy_samples_what_a_full_run_cannot_afford() -> None:
    """``VERIFY=auto`` simulates SmolLM2 in full (about 26 min at seq 256) and samples
    Qwen1.5-1.8B (about 5 h in full): its first, middle and last blocks, 4 decode steps."""
    policy = sophgo_verify.verify_policy
    smollm2 = policy("auto", 30, 3_200_000, 28_311_552, 256, 32, 32)
    assert smollm2.mode == "full" and smollm2.blocks == tuple(range(30))
    assert smollm2.estimated_seconds == smollm2.estimated_full_seconds < 2 * 3600
    qwen = policy("auto", 24, 50_343_936, 311_164_928, 256, 32, 32)
    assert qwen.mode == "sample" and qwen.blocks == (0, 12, 23) and qwen.decode_tokens == 4
    assert 4 * 3600 < qwen.estimated_full_seconds < 6 * 3600
    assert qwen.estimated_seconds < 3600 and "VERIFY=full runs it anyway" in qwen.reason
    forced = policy("full", 24, 50_343_936, 311_164_928, 256, 32, 32)
    assert forced.mode == "full" and forced.decode_tokens == 32
    assert policy("sample", 30, 3_200_000, 28_311_552, 256, 32, 32).blocks == (0, 14, 29)
    record = qwen.to_json()
    assert record["simulated_blocks"] == [0, 12, 23] and len(record["blocks_on_onnxruntime"]) == 21
    assert qwen.simulated("block_cache_12") and not qwen.simulated("block_5")
    assert qwen.simulated("lm_head") and qwen.simulated("embedding_cache")


def test_sampled_chain_simulates_and_scores_only_the_sampled_nets(tiny_onnx) -> None:
    """Blocks the policy leaves out run on the reference in the same chain and get no
    score (not a 1.0 from comparing the reference with itself)."""
    run, dims, prompt = tiny_onnx
    simulated: list[str] = []

    def simulator(name: str, inputs: dict) -> list[np.ndarray]:
        simulated.append(name)
        return run(name, inputs)

    policy = sophgo_verify.VerifyPolicy("sample", (1,), 2, 2, 0.0, 0.0, "test")
    chain = sophgo_verify.dispatch(policy, simulator, run)
    scored = sophgo_verify.ScoredRunner(chain, run, policy.simulated)
    reference = greedy_decode(run, dims, prompt, 4)
    tokens, *_ = sophgo_verify.prefill_greedy(scored, dims, prompt, reference)
    assert tokens == reference
    assert simulated == ["embedding", "block_1", *["lm_head"] * 4]
    assert scored.scores.keys() == {"embedding", "block_1", "lm_head"}


def test_every_mode_has_gates() -> None:
    """A mode without gates would fail with a KeyError after the compile and simulation."""
    sophgo_build = import_target("sophgo-bm1684x")
    for table in ("PIECE_GATE", "GREEDY_GATE", "VENDOR_LOGITS_GATE"):
        assert set(getattr(sophgo_build, table)) == set(QUANTIZE), table


def test_killed_build_continues_from_its_last_compiled_piece(
    tmp_path: Path, tiny_qwen2_dir: Path, tiny_bf16: Path
) -> None:
    """Kill a build (SIGKILL, no cleanup) once three pieces are compiled; the same command
    then compiles only the rest and gives the numbers of an uninterrupted build."""
    args = ["--model", "tiny-qwen2", "--model-path", str(tiny_qwen2_dir), "--build-dir",
            str(tmp_path), "--seq-len", "64", "--max-new-tokens", "8"]  # fmt: skip
    cache = tmp_path / "tiny-qwen2" / "sophgo-bm1684x" / "compiled-bf16"
    kept = kill_after_entries([str(SCRIPT), *args], cache)
    assert 3 <= len(kept) < 2 * 2 + 5, kept  # killed midway, complete entries only
    result = run_build(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "tiny-qwen2/sophgo-bm1684x/bf16/report.json").read_text())
    assert len(report["compiled_pieces_reused"]) >= 3
    assert "reused from an earlier run" in result.stderr
    assert kept <= {p.name for p in cache.iterdir()}  # the same entries served the rerun
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # dead temporaries gone
    # Each entry keeps its bmodel, MLIR and logs, not the tools' .npz weights and samples.
    assert all(len(list(e.glob("*.bmodel"))) == 1 for e in cache.iterdir())
    assert not list(cache.rglob("*.npz"))
    want = json.loads((tiny_bf16 / "report.json").read_text())  # uninterrupted, same inputs
    assert [(p["name"], p["cos"]) for p in report["pieces"]] == [
        (p["name"], p["cos"]) for p in want["pieces"]
    ]
    assert report["kv_decode_tokens"] == want["kv_decode_tokens"]

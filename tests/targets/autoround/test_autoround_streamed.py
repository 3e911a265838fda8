"""``make autoround`` block by block: the same result as the whole-model run, within a cap
its whole-model estimate exceeds.

AutoRound runs on its own disk-stream path (one decoder block read from the checkpoint at a
time), the float reference and the RTN baseline one layer at a time. On the tiny Qwen2 the
export is byte-identical to the whole-model run's and every number of the report equal; a
random qwen2 whose float32 weights are more than twice ``CAP`` builds under it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.core.memory import RUNTIME_BYTES, parse_size
from common.models.streaming import StreamedModel, float32_bytes, stored_bytes
from tests.conftest import (
    assert_clean_error,
    import_target,
    random_qwen2,
    run_python,
    run_python_peak,
)

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "targets" / "autoround" / "build.py"
ar_streamed = import_target("autoround", "ar_streamed")
ar_options = import_target("autoround", "ar_options")
ar_quantize = import_target("autoround", "ar_quantize")
#: A cap the whole-model run (three float32 copies) exceeds twice over; the block-by-block
#: run holds one block, AutoRound's working memory (about 0.9 GiB whatever the model) and
#: the runtime.
CAP = "2.3GB"
#: Any recipe of the model's architecture takes MODEL_PATH; this one is a qwen2.
RECIPE = "qwen1.5-1.8b"
#: Settings of the existing tiny-model runs, whose gates AutoRound passes.
FAST = ("--nsamples", "8", "--seqlen", "64", "--iters", "20", "--rtn-gate", "cosine")
#: For a random model: tuning steps only to run the path (its gates may go either way).
QUICK = ("--iters", "2", "--nsamples", "2", "--seqlen", "32", "--eval-windows", "1")
#: Report entries that depend on where and when the run happened, not on its result.
NOT_RESULTS = {"resources", "quantize_seconds", "tokenizer", "options"}


def _build(build_dir: Path, model: str, *args: str) -> dict:
    result = run_python(str(SCRIPT), "--model", model, "--build-dir", str(build_dir), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((build_dir / model / "autoround" / "report.json").read_text())


def _results(report: dict) -> dict:
    """The report without what differs between two runs of the same computation."""

    def strip(value: object) -> object:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in NOT_RESULTS}
        return value

    return strip(report)  # type: ignore[return-value]


def test_block_by_block_equals_the_whole_model_run(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    """Same export bytes, same numbers (float, RTN and AutoRound perplexity, logits and
    per-layer cosines): the algorithm, its order and its seed are unchanged."""
    whole = _build(tmp_path / "whole", "tiny-qwen2", *FAST, "--sequential", "0")
    streamed = _build(tmp_path / "streamed", "tiny-qwen2", *FAST)
    assert streamed["passed"]
    assert _results(streamed) == _results(whole)
    folder = Path("tiny-qwen2") / "autoround" / "auto_round"
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        got = (tmp_path / "streamed" / folder / name).read_bytes()
        assert got == (tmp_path / "whole" / folder / name).read_bytes(), name


def test_mode_follows_model_and_formats(tiny_qwen2_dir: Path, tiny_qwen2_vl_dir: Path) -> None:
    text, vl = StreamedModel(tiny_qwen2_dir), StreamedModel(tiny_qwen2_vl_dir)
    assert ar_streamed.whole_model_reason(text, ("auto_round", "auto_gptq")) is None
    assert "auto_awq" in ar_streamed.whole_model_reason(text, ("auto_round", "auto_awq"))
    assert "gguf:q4_0" in ar_streamed.whole_model_reason(text, ("gguf:q4_0",))
    assert "vision-language" in ar_streamed.whole_model_reason(vl, ("auto_round",))
    assert ar_streamed.check_mode(None, None, tiny_qwen2_dir)
    assert not ar_streamed.check_mode(None, False, tiny_qwen2_dir)
    assert not ar_streamed.check_mode("why", None, tiny_qwen2_dir)


def test_streamed_mode_reads_float32_and_is_undone(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    """Inside ``streamed()`` auto-round's reader upcasts (a bf16 checkpoint is tuned in
    float32, as the whole-model run tunes it); outside, it and the environment are as
    before."""
    import os

    import torch
    from auto_round.utils.disk_stream_util import SafetensorsIndex
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2, 2, dtype=torch.bfloat16)}, tmp_path / "model.safetensors")
    before = (SafetensorsIndex.read_tensors, os.environ.get("AR_DISK_STREAM_MODEL"))
    with ar_quantize.streamed():
        assert os.environ["AR_DISK_STREAM_MODEL"] == "1"
        assert SafetensorsIndex(str(tmp_path)).read_tensor("w").dtype == torch.float32
    assert (SafetensorsIndex.read_tensors, os.environ.get("AR_DISK_STREAM_MODEL")) == before
    assert SafetensorsIndex(str(tmp_path)).read_tensor("w").dtype == torch.bfloat16


def test_sequential_where_impossible_is_a_clean_error(
    session_build: Path, tiny_qwen2_dir: Path
) -> None:
    result = run_python(
        str(SCRIPT), "--model", "tiny-qwen2", "--build-dir", str(session_build),
        "--format", "auto_awq", "--sequential", "1",
    )  # fmt: skip
    assert_clean_error(result, "SEQUENTIAL=1 (block by block) is not possible", "auto_awq")


@pytest.fixture(scope="module")
def many_layers(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2_dir: Path) -> Path:
    return random_qwen2(tmp_path_factory.mktemp("many") / "model", tiny_qwen2_dir, layers=19)


def test_estimate_names_what_lowers_it(many_layers: Path, tmp_path: Path) -> None:
    """Over the cap, one line: the block-by-block estimate and the options that lower it,
    before anything is tuned or written."""
    result = run_python(
        str(SCRIPT), "--model", RECIPE, "--model-path", str(many_layers), "--build-dir",
        str(tmp_path), *QUICK, "--max-memory", "1GB",
    )  # fmt: skip
    assert_clean_error(
        result, "make autoround (one block at a time) needs about", "lower NSAMPLES (now 2)"
    )
    assert not (tmp_path / RECIPE / "autoround").exists()


def test_builds_block_by_block_within_the_cap(many_layers: Path, tmp_path: Path) -> None:
    """19 layers of 64 MiB (1.2 GiB in float32): the whole-model run's estimate is twice the
    cap, the block-by-block run's under it, and the step and everything it starts stay
    under the cap. (Weights of twice the cap themselves would mean 60 such blocks,
    ten minutes of tuning: AutoRound's fixed working set sets the cap's floor.)"""
    whole = 3 * float32_bytes(many_layers) + stored_bytes(many_layers) + RUNTIME_BYTES
    assert whole >= 2 * parse_size(CAP)
    result, tree_peak = run_python_peak(
        str(SCRIPT), "--model", RECIPE, "--model-path", str(many_layers), "--build-dir",
        str(tmp_path), *QUICK, "--max-memory", CAP,
    )  # fmt: skip
    assert result.returncode in (0, 1) and "Traceback" not in result.stderr, result.stderr[-3000:]
    report_path = tmp_path / RECIPE / "autoround" / "report.json"
    report = json.loads(report_path.read_text())
    estimate = report["resources"]["estimated_peak_bytes"]
    assert estimate["total"] <= parse_size(CAP)
    assert tree_peak <= parse_size(CAP), tree_peak
    assert report["per_format"]["auto_round"]["problems"] == []
    assert report["per_format"]["auto_round"]["quantized_layers"] == 19 * 7

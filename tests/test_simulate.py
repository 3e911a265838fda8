"""Fake-quant simulation: transforms keep the function, plans round where they say."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from common.analysis.eval import perplexity
from common.analysis.profiling import profile_document, profile_model
from common.analysis.quant_plan import PlanOptions, build_plan
from common.analysis.simulate import (
    apply_plan,
    evaluate,
    score_model,
    simulate_plan,
    transformed_model,
)
from common.core.errors import EdgeforgeError
from common.core.recipes import load_recipe
from common.inputs.data import CALIB_CORPUS, sample_windows
from common.models import get_adapter
from common.models.loading import load_model, load_tokenizer
from common.models.streaming import StreamedModel
from common.quant.int8 import dequantize, fake_quantize, quantize_weight, shadow_input_correction
from common.steps.profile_step import ProfileSettings, run_profile
from tests.conftest import assert_clean_error, assert_gates
from tests.test_profiling import run_profile_cli


@pytest.fixture(scope="module")
def windows(tiny_qwen2_dir: Path) -> torch.Tensor:
    return sample_windows([CALIB_CORPUS], load_tokenizer(tiny_qwen2_dir), 2, 32, seed=0)


def _logits(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=windows).logits


@pytest.mark.parametrize(
    "transforms",
    [
        {"online_hadamard": True},
        {"rotation": {"mode": "hadamard", "seed": 0}, "online_hadamard": True},
    ],
)
def test_transforms_keep_the_function(
    tiny_qwen2_dir: Path, windows: torch.Tensor, transforms: dict
) -> None:
    reference = _logits(load_model(tiny_qwen2_dir), windows)
    with transformed_model(tiny_qwen2_dir, transforms) as (model, _):
        got = _logits(model, windows)
        down = get_adapter(model).layers()[0].linears["down"]
        seen: list[torch.Tensor] = []
        handle = down.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        _logits(model, windows[:1])
        handle.remove()
    assert (got - reference).abs().max() < 1e-4
    assert seen  # the runtime transform ran


def _plan(model_dir: Path, windows: torch.Tensor, options: PlanOptions, transforms: dict) -> dict:
    with transformed_model(model_dir, transforms) as (model, _):
        stats = profile_model(model, windows).results()
    return build_plan(
        profile_document(stats, {"model": "t"}), options, name="t", transforms=transforms
    )


def test_inputs_land_on_the_planned_grid(tiny_qwen2_dir: Path, windows: torch.Tensor) -> None:
    plan = _plan(tiny_qwen2_dir, windows, PlanOptions(), {})
    model = load_model(tiny_qwen2_dir)
    adapter = get_adapter(model)
    handles = apply_plan(adapter, plan)
    layer = adapter.layers()[1]
    seen: list[torch.Tensor] = []
    handles.append(layer.linears["o"].register_forward_hook(lambda _m, a, _o: seen.append(a[0])))
    _logits(model, windows)
    scale = plan["tensors"][layer.linear_names["o"]]["input"]["scale"]
    levels = seen[0] / scale
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.abs().max() <= 128
    w = layer.linears["o"].weight
    q, s = quantize_weight(w)
    assert torch.allclose(w, dequantize(q, s), atol=1e-7)  # weights already on their grid
    for handle in handles:
        handle.remove()


def test_shadow_simulation_equals_int8_plus_shadow_op(
    tiny_qwen2_dir: Path, windows: torch.Tensor
) -> None:
    """A no-clip tensor in simulation computes device int8 + CPU correction."""
    plan = _plan(tiny_qwen2_dir, windows, PlanOptions(threshold=1.0), {})
    model = load_model(tiny_qwen2_dir)
    adapter = get_adapter(model)
    down = adapter.layers()[0].linears["down"]
    name = adapter.layers()[0].linear_names["down"]
    entry = plan["tensors"][name]["input"]
    assert entry["shadow"]
    x = torch.randn(5, down.in_features) * entry["range"]
    x[0, 0] = 50 * entry["range"]  # saturates on the device
    original = down.weight.detach().clone()
    handles = apply_plan(adapter, plan)
    with torch.no_grad():
        simulated = down(x)
    wq, ws = quantize_weight(original)
    device = fake_quantize(x, entry["scale"]) @ dequantize(wq, ws).T
    corrected = device + shadow_input_correction(x, entry["scale"], wq, ws)
    assert torch.allclose(simulated, corrected, atol=1e-4)
    assert not torch.allclose(simulated, device, atol=1e-2)
    for handle in handles:
        handle.remove()


def test_fp32_evaluation_matches_foundation(tiny_qwen2_dir: Path, windows: torch.Tensor) -> None:
    model = load_model(tiny_qwen2_dir)
    scores = evaluate(model, windows)
    assert scores["ppl"] == perplexity(model, windows, progress=False)["ppl"]
    again = simulate_plan(
        tiny_qwen2_dir,
        _plan(tiny_qwen2_dir, windows, PlanOptions(act_bits=16), {}),
        windows,
        scores["argmax"],
    )
    assert again["top1_agreement"] > 0.9
    assert abs(again["ppl"] / scores["ppl"] - 1) < 0.01


@pytest.mark.parametrize(
    "transforms", [{}, {"rotation": {"mode": "hadamard", "seed": 0}, "online_hadamard": True}]
)
def test_layerwise_scores_equal_whole_model_scores(
    tiny_qwen2_dir: Path, windows: torch.Tensor, transforms: dict
) -> None:
    """make simulate and make sweep score one part at a time: the same numbers, bit for
    bit, as the whole model transformed and fake-quantized in memory."""
    plan = _plan(tiny_qwen2_dir, windows, PlanOptions(), transforms)
    scores = {}
    for mode, streamed in (("whole", None), ("layers", StreamedModel(tiny_qwen2_dir))):
        fp32 = score_model(tiny_qwen2_dir, windows, streamed=streamed)
        quantized = score_model(
            tiny_qwen2_dir, windows, streamed=streamed, plan=plan, reference_argmax=fp32["argmax"]
        )
        scores[mode] = (fp32, quantized)
    for whole, layers in zip(scores["whole"], scores["layers"], strict=True):
        assert torch.equal(whole.pop("argmax"), layers.pop("argmax"))
        assert whole == layers
    assert scores["whole"][1]["ppl"] != scores["whole"][0]["ppl"]  # the plan did round


def test_plan_for_another_model_is_rejected(tiny_qwen2_dir: Path, windows: torch.Tensor) -> None:
    plan = _plan(tiny_qwen2_dir, windows, PlanOptions(), {})
    del plan["tensors"]["model.layers.1.mlp.down_proj"]
    with pytest.raises(EdgeforgeError, match=r"no entry for model\.layers\.1\.mlp\.down_proj"):
        apply_plan(get_adapter(load_model(tiny_qwen2_dir)), plan)


def test_simulate_cli_rejects_bad_threshold(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    build = tmp_path / "build"
    (build / "tiny-qwen2").mkdir(parents=True)
    (build / "tiny-qwen2" / "model").symlink_to(tiny_qwen2_dir)
    result = run_profile_cli(
        "simulate", "--model", "tiny-qwen2", "--build-dir", str(build), "--t=0"
    )
    assert_clean_error(result, "T")
    assert not (build / "tiny-qwen2" / "simulate").exists()


def _tiny_build(tmp_path: Path, tiny_qwen2_dir: Path) -> Path:
    build = tmp_path / "build"
    (build / "tiny-qwen2").mkdir(parents=True)
    (build / "tiny-qwen2" / "model").symlink_to(tiny_qwen2_dir)
    return build


def test_simulate_cli_writes_every_variant_and_gate(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    """End to end on the tiny model: the report has the issue's keys, the gates agree with
    the ratios, and a failed gate (random weights may fail some) exits 1 after writing."""
    build = _tiny_build(tmp_path, tiny_qwen2_dir)
    result = run_profile_cli(
        "simulate", "--model", "tiny-qwen2", "--build-dir", str(build), "--num-samples", "2",
        "--seq-len", "32", "--num-windows", "2", "--thresholds", "4,1e7",
    )  # fmt: skip
    out = build / "tiny-qwen2" / "simulate"
    report = json.loads((out / "report.json").read_text())
    ratio = report["ppl_ratio"]
    for key in ("fp32", "w8a16", "w8a8_clip_all", "w8a8_shadow", "w8a8_rotated_clip_all",
                "w8a8_rotated_online_down", "w8a8_best", "w8a8_npu_precision_map"):  # fmt: skip
        assert ratio[key] > 0, key
    assert ratio["fp32"] == 1.0
    assert_gates(
        report,
        {"w8a16", "shadow_beats_clip_all", "rotated_beats_clip_all",
         "online_down_beats_rotated", "w8a8_best"},
    )  # fmt: skip
    gates = {g["name"]: g for g in report["gates"]}
    assert gates["w8a16"]["passed"] == (ratio["w8a16"] <= 1.01)
    assert gates["rotated_beats_clip_all"]["passed"] == (
        ratio["w8a8_rotated_clip_all"] < ratio["w8a8_clip_all"]
    )
    assert gates["w8a8_best"]["passed"] == (ratio["w8a8_best"] <= 1.05)
    assert result.returncode == (0 if report["passed"] else 1)
    assert report["int8_output_cost"]["w8a8_clip_all"] == pytest.approx(
        ratio["w8a8_clip_all_int8_out"] / ratio["w8a8_clip_all"]
    )
    npu = json.loads((out / "plans" / "w8a8_npu_precision_map.json").read_text())["tensors"]
    assert npu["model.layers.0.self_attn.q_proj"]["input"]["dtype"] == "int16"
    assert npu["model.layers.0.self_attn.o_proj"]["output"]["dtype"] == "int8"
    assert report["w8a8_best_plan"]["name"] == report["sweep"]["chosen"]
    assert (out / "shadow_layers.json").is_file() and (out / "manifest.json").is_file()


def test_sweep_reads_an_existing_profile(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    build = _tiny_build(tmp_path, tiny_qwen2_dir)
    settings = ProfileSettings(
        corpus=str(CALIB_CORPUS), num_samples=2, seq_len=32, rotate="hadamard", online_down=True
    )
    profiled = run_profile(load_recipe("tiny-qwen2"), tiny_qwen2_dir, settings, build)
    assert profiled.name == "profile-hadamard-online-down"  # not the plain profile's folder
    args = ("sweep", "--model", "tiny-qwen2", "--build-dir", str(build), "--num-windows", "2",
            "--seq-len", "32", "--profile", str(profiled / "profile.json"))  # fmt: skip
    result = run_profile_cli(*args, "--thresholds", "2,1e7")
    assert result.returncode == 0, result.stderr
    out = build / "tiny-qwen2" / "sweep"
    report = json.loads((out / "report.json").read_text())
    assert report["transforms"] == settings.transforms  # candidates simulated as profiled
    rows = {r["name"]: r for r in report["sweep"]["rows"]}
    assert rows["down_int16"]["special_down_inputs"] == 2  # both layers' down_proj inputs
    assert "T=2" in rows  # T=1e7 is merged into it when their shadow sets are equal
    plan = json.loads((out / "plan.json").read_text())
    assert plan["name"] == report["sweep"]["chosen"]
    assert plan["transforms"] == settings.transforms
    decision = json.loads((out / "shadow_layers.json").read_text())
    assert decision["shadow_layers"] == plan["shadow_layers"]
    # Bad input: T <= 0 and a missing profile name the option; nothing is written.
    for extra, fragment in (
        (("--thresholds", "0"), "T"),
        (("--profile", str(tmp_path / "none.json")), "none.json"),
    ):
        shutil.rmtree(out, ignore_errors=True)
        assert_clean_error(run_profile_cli(*args, *extra), fragment)
        assert not out.exists()

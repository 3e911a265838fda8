"""Fake-quant simulation: transforms keep the function, plans round where they say."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.data import CALIB_CORPUS, sample_windows
from common.errors import EdgeforgeError
from common.eval import perplexity
from common.int8 import dequantize, fake_quantize, quantize_weight, shadow_input_correction
from common.models import get_adapter
from common.models.loading import load_model, load_tokenizer
from common.profiling import profile_document, profile_model
from common.quant_plan import PlanOptions, build_plan
from common.simulate import apply_plan, evaluate, simulate_plan, transformed_model
from tests.conftest import assert_clean_error
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

"""Profiling: streaming statistics, sequential == whole model, seed JSON, bad input."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from common.analysis.observers import exact_percentile
from common.analysis.profiling import (
    ActivationProfiler,
    load_profile,
    profile_document,
    profile_model,
    profile_sequential,
)
from common.analysis.simulate import transformed_model
from common.core.errors import EdgeforgeError
from common.core.memory import parse_size
from common.core.recipes import load_recipe
from common.inputs.data import CALIB_CORPUS, sample_windows
from common.models import get_adapter, iter_linears
from common.models.loading import load_model, load_tokenizer
from common.models.streaming import StreamedModel
from common.quant.transforms import Transforms
from common.steps.profile_step import ProfileSettings, profile_dir_name, run_profile
from tests.conftest import REPO_ROOT, CliResult, assert_clean_error, run_python


def run_profile_cli(*args: str) -> CliResult:
    return run_python("-m", "common.steps.profile_cli", *args)


def _windows(model_dir: Path, n: int, seq_len: int) -> torch.Tensor:
    return sample_windows([CALIB_CORPUS], load_tokenizer(model_dir), n, seq_len, seed=0)


def test_sequential_equals_whole_model_tiny(tiny_qwen2_dir: Path) -> None:
    windows = _windows(tiny_qwen2_dir, 3, 32)
    whole = profile_model(load_model(tiny_qwen2_dir), windows).results()
    sequential = profile_sequential(StreamedModel(tiny_qwen2_dir), windows).results()
    assert whole == sequential
    assert len(whole) == 2 * 7 + 1  # every decoder linear and the LM head


@pytest.mark.parametrize("fixture", ["tiny_qwen2_5_vl_dir", "tiny_qwen2_vl_dir"])
def test_sequential_equals_whole_model_vision_language(
    request: pytest.FixtureRequest, fixture: str
) -> None:
    """A Qwen-VL model on text calibration, one language layer at a time (M-RoPE's rows
    all counting the tokens), and rotated part by part: the whole model's statistics."""
    model_dir = request.getfixturevalue(fixture)
    windows = _windows(model_dir, 2, 32)
    whole = profile_model(load_model(model_dir), windows).results()
    assert whole == profile_sequential(StreamedModel(model_dir), windows).results()
    rotated, sequential = _transformed_profiles(
        model_dir, {"rotation": {"mode": "hadamard", "seed": 3}}, windows
    )
    assert rotated == sequential


@pytest.mark.parametrize(
    ("fixture", "transforms"),
    [("tiny_qwen2_5_vl_dir", {"rotation": {"mode": "hadamard", "seed": 3}}),
     ("tiny_qwen2_vl_dir", {})],
)  # fmt: skip
def test_sequential_image_calibration_equals_whole_model(
    request: pytest.FixtureRequest, fixture: str, transforms: dict
) -> None:
    """Image prompts beside the text windows, one part at a time (the vision tower read
    first for the pictures' tokens, then each language layer on the windows and the
    prompts), rotated or not: the whole model's statistics, vision linears included."""
    from common.steps.profile_step import vision_calibration

    model_dir = request.getfixturevalue(fixture)
    windows = _windows(model_dir, 2, 16)
    images = str(REPO_ROOT / "data" / "images")
    settings = ProfileSettings(corpus=str(CALIB_CORPUS), images=images, image_size=56)
    prompts = vision_calibration(model_dir, settings)[:2]
    assert len(prompts) == 2
    with transformed_model(model_dir, transforms) as (model, _):
        whole = profile_model(model, windows, vision_inputs=prompts).results()
    streamed = StreamedModel(model_dir)
    sequential = profile_sequential(
        streamed,
        windows,
        transforms=Transforms.of(streamed.adapter, transforms),
        vision_inputs=prompts,
    ).results()
    assert any(".visual." in name for name in whole)
    assert whole == sequential


def _transformed_profiles(model_dir: Path, transforms: dict, windows: torch.Tensor) -> tuple:
    """The whole transformed model's statistics and the streamed ones, each part
    transformed as it is read."""
    with transformed_model(model_dir, transforms) as (model, _):
        whole = profile_model(model, windows).results()
    streamed = StreamedModel(model_dir)
    resolved = Transforms.of(streamed.adapter, transforms)
    return whole, profile_sequential(streamed, windows, transforms=resolved).results()


@pytest.mark.parametrize(
    "transforms",
    [
        {"rotation": {"mode": "hadamard", "seed": 3}},
        {"rotation": {"mode": "orthogonal", "seed": 1}, "online_hadamard": True},
    ],
)
def test_sequential_transformed_equals_whole_model(
    tiny_qwen2_dir: Path, tmp_path: Path, transforms: dict
) -> None:
    """Rotation and online Hadamard applied part by part give the bits of the whole-model
    transform, on a tied model (tiny-qwen2: its head is read from the stored embedding and
    rotated as a head of its own) and an untied copy with a head of its own."""
    untied = tmp_path / "untied"
    model = load_model(tiny_qwen2_dir)
    model.config.tie_word_embeddings = False
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach() * 0.5 + 0.01)
    model.save_pretrained(untied)
    load_tokenizer(tiny_qwen2_dir).save_pretrained(untied)
    assert not StreamedModel(untied).adapter.tie_word_embeddings
    for model_dir in (tiny_qwen2_dir, untied):
        whole, sequential = _transformed_profiles(model_dir, transforms, _windows(model_dir, 2, 32))
        assert whole == sequential


def test_sequential_refuses_sliding_window_layers(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    """One full causal mask per layer would profile a sliding-window layer wrongly."""
    model_dir = tmp_path / "sliding"
    model_dir.mkdir()
    for path in tiny_qwen2_dir.iterdir():
        (model_dir / path.name).symlink_to(path)
    config = json.loads((tiny_qwen2_dir / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=16, max_window_layers=1)
    config.pop("layer_types", None)  # derived again from the sliding-window settings
    (model_dir / "config.json").unlink()
    (model_dir / "config.json").write_text(json.dumps(config))
    windows = _windows(tiny_qwen2_dir, 1, 32)
    with pytest.raises(EdgeforgeError, match="'sliding_attention' layers; layer-by-layer runs"):
        profile_sequential(StreamedModel(model_dir), windows)
    # by default make profile runs such a model whole, and says so in the profile
    settings = ProfileSettings(corpus=str(CALIB_CORPUS), num_samples=1, seq_len=32)
    out = run_profile(load_recipe("tiny-qwen2"), model_dir, settings, tmp_path / "build")
    doc = json.loads((out / "profile.json").read_text())
    assert doc["edgeforge"]["settings"]["sequential"] is False


def test_hooks_match_exact_statistics(tiny_qwen2_dir: Path) -> None:
    """Observed q_proj input/output against tensors captured independently."""
    model = load_model(tiny_qwen2_dir)
    adapter = get_adapter(model)
    layer = adapter.layers()[1]
    captured: dict[str, list[torch.Tensor]] = {"in": [], "out": []}

    def grab(_m, args, out):
        captured["in"].append(args[0].detach().clone())
        captured["out"].append(out.detach().clone() - layer.linears["q"].bias)

    handle = layer.linears["q"].register_forward_hook(grab)
    windows = _windows(tiny_qwen2_dir, 2, 48)
    stats = profile_model(model, windows, no_bias=True).results()[layer.linear_names["q"]]
    handle.remove()
    x, y = torch.cat(captured["in"], 1), torch.cat(captured["out"], 1)
    assert stats["input"]["max"] == float(x.max())
    assert stats["input"]["absmax"] == float(x.abs().max())
    assert stats["input"]["p999"] == pytest.approx(exact_percentile(x, 0.001), rel=0.01)
    assert stats["output"]["abs_p999"] == pytest.approx(exact_percentile(y.abs(), 0.001), rel=0.01)
    assert stats["output"]["mean"] == pytest.approx(float(y.double().mean()), abs=1e-6)
    assert stats["input"]["count"] == x.numel()


def test_memory_does_not_grow_with_tokens(tiny_qwen2_dir: Path) -> None:
    model = load_model(tiny_qwen2_dir)
    profiler = ActivationProfiler(get_adapter(model))

    def state_bytes() -> int:
        total = 0
        for obs in profiler.observers.values():
            for side in (obs.input, obs.output):
                total += side.histogram.counts.nbytes
                total += 0 if side.channel_absmax is None else side.channel_absmax.nbytes
        return total

    windows = _windows(tiny_qwen2_dir, 4, 32)
    with profiler.attached(), torch.inference_mode():
        model(input_ids=windows[:1])
        after_one = state_bytes()
        for w in windows[1:]:
            model(input_ids=w[None])
    assert state_bytes() == after_one


def test_seed_json_keys_and_extended_stats() -> None:
    stats = {
        "model.layers.0.mlp.down_proj": {
            "role": "down",
            "has_bias": False,
            "input": {"max": 3.0, "p999": 1.0, "mean": 0.1, "std": 0.5, "absmax": 4.0},
            "output": {"max": 2.0, "p999": 0.5, "mean": 0.0, "std": 0.2, "absmax": 2.0},
        }
    }
    doc = profile_document(stats, {"model": "m"})
    name = "model.layers.0.mlp.down_proj"
    assert doc["ori"][name] == {"input": 3.0, "output": 2.0}
    assert doc["top_0_1"][name] == {"input": 1.0, "output": 0.5}
    assert doc["all_stat"][name]["input"] == {"mean": 0.1, "std": 0.5}
    assert doc["edgeforge"]["stats"][name]["input"]["absmax"] == 4.0


def test_profile_cli_deterministic_and_complete(
    tmp_path: Path, session_build: Path, tiny_qwen2_dir: Path
) -> None:
    args = (
        "profile",
        "--model",
        "tiny-qwen2",
        "--build-dir",
        str(session_build),
        "--num-samples",
        "3",
        "--seq-len",
        "32",
        "--seed",
        "7",
    )
    out = session_build / "tiny-qwen2" / "profile"
    first = run_profile_cli(*args)
    assert first.returncode == 0, first.stderr
    snapshot = {
        p: (out / p).read_bytes()
        for p in ("profile.json", "channel_absmax.safetensors", "report.json", "input_ranges.png")
    }
    # The same settings in this process give the same bytes as the CLI's process, but for
    # the report's measured resources (memory and seconds are measurements, not results).
    settings = ProfileSettings(corpus=str(CALIB_CORPUS), num_samples=3, seq_len=32, seed=7)
    again = tmp_path / "again"
    run_profile(load_recipe("tiny-qwen2"), tiny_qwen2_dir, settings, again)
    for name, data in snapshot.items():
        got = (again / "tiny-qwen2" / "profile" / name).read_bytes()
        if name == "report.json":
            got, data = (json.loads(d) for d in (got, data))
            assert got.pop("resources")["peak_rss_bytes"] > 0
            assert data.pop("resources")["phases"][-1]["name"] == "package"
        assert got == data, name
    doc = json.loads(snapshot["profile.json"])
    assert set(doc) == {"ori", "top_0_1", "all_stat", "edgeforge"}
    for name in ("manifest.json", "report.md", "outlier_ratio.png", "channel_heatmap.png"):
        assert (out / name).is_file()
    assert load_profile(out / "profile.json", get_adapter(load_model(tiny_qwen2_dir)))


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 100000}, "num_samples=100000"),
        ({"corpus": "/nonexistent/corpus.jsonl"}, "dataset_path"),
        ({"corpus": str(REPO_ROOT / "pyproject.toml")}, "dataset_path"),
        ({"rotate": "hadamard", "r_path": "x.safetensors"}, "mutually exclusive"),
        ({"rotate": "bogus"}, "ROTATE=bogus: expected one of hadamard, orthogonal or none"),
        ({"sequential": False, "max_memory": 1024}, "SEQUENTIAL=1 (one layer at a time) needs"),
        ({"max_memory": 1024}, "over MAX_MEMORY=0.00 GiB; lower NUM_SAMPLES"),
    ],
)
def test_profile_bad_input(
    tmp_path: Path, tiny_qwen2_dir: Path, changes: dict, fragment: str
) -> None:
    settings = replace(
        ProfileSettings(corpus=str(CALIB_CORPUS), num_samples=2, seq_len=32), **changes
    )
    with pytest.raises(EdgeforgeError, match=re.escape(fragment)):
        run_profile(load_recipe("tiny-qwen2"), tiny_qwen2_dir, settings, tmp_path)
    assert not any(tmp_path.iterdir())


def test_profile_cli_bad_input_exits_2(tmp_path: Path) -> None:
    for extra, fragment in (
        (("--num-samples", "0"), "num_samples"),
        (("--max-memory", "lots"), "MAX_MEMORY"),
    ):
        result = run_profile_cli(
            "profile", "--model", "tiny-qwen2", "--build-dir", str(tmp_path), *extra
        )
        assert_clean_error(result, fragment)
    assert not (tmp_path / "tiny-qwen2" / "profile").exists()


def test_profile_for_another_model_is_rejected(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    doc = profile_document({}, {"model": "other"})
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(EdgeforgeError, match=r"lacks \d+ linear"):
        load_profile(tmp_path / "p.json", get_adapter(load_model(tiny_qwen2_dir)))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(EdgeforgeError, match="not an edgeforge profile"):
        load_profile(tmp_path / "bad.json")


def test_parse_size() -> None:
    assert parse_size("4GB") == 4 * 2**30
    assert parse_size("512m") == 512 * 2**20
    with pytest.raises(EdgeforgeError, match="MAX_MEMORY"):
        parse_size("-1GB")


@pytest.mark.smollm2
def test_sequential_equals_whole_model_smollm2(smollm2_dir: Path) -> None:
    windows = _windows(smollm2_dir, 2, 64)
    whole = profile_model(load_model(smollm2_dir), windows).results()
    assert profile_sequential(StreamedModel(smollm2_dir), windows).results() == whole
    whole, sequential = _transformed_profiles(
        smollm2_dir, {"rotation": {"mode": "hadamard", "seed": 42}}, windows
    )
    assert whole == sequential


def test_qnn_config_file_profiles_the_rotated_model(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    from common.quant.rotation import load_rotation

    model_config = {
        "model_type": "qwen2",
        "tokenizer_name": str(tiny_qwen2_dir),
        "model_name": str(tiny_qwen2_dir),
        "online_rotation": True,
        "random_rotate": True,
        "save_rotation": "R/rotation.safetensors",
    }
    config = {
        "profile_config": {
            "dataset_path": str(CALIB_CORPUS),
            "output_path": "scales.json",
            "num_samples": 2,
            "no_bias": True,
            "model_config": model_config,
        },
        "export_config": {
            "scale_file": "scales.json",
            "output_model": "out.pth",
            "quant_bias": False,
            "model_config": model_config,
        },
    }
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    result = run_profile_cli(
        "profile", "--model", "tiny-qwen2", "--build-dir", str(tmp_path / "build"),
        "--config-file", str(tmp_path / "cfg.json"), "--seq-len", "32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "scales.json").read_text())
    assert doc["edgeforge"]["transforms"]["rotation"]["mode"] == "hadamard"
    assert doc["edgeforge"]["settings"]["num_samples"] == 2
    rotation = load_rotation(tmp_path / "R" / "rotation.safetensors")
    assert rotation.hidden_size == 64


def test_image_calibration_profiles_the_vision_linears(
    tmp_path: Path, tiny_qwen2_vl_dir: Path, tiny_qwen2_dir: Path
) -> None:
    images = REPO_ROOT / "data" / "images"
    settings = ProfileSettings(
        corpus=str(CALIB_CORPUS), num_samples=1, seq_len=16, images=str(images), image_size=56
    )
    run_profile(load_recipe("tiny-qwen2-vl"), tiny_qwen2_vl_dir, settings, tmp_path)
    stats = load_profile(tmp_path / "tiny-qwen2-vl" / "profile" / "profile.json")["edgeforge"][
        "stats"
    ]
    adapter = get_adapter(load_model(tiny_qwen2_vl_dir))
    wanted = {name for name, _, _ in iter_linears(adapter, include_vision=True)}
    assert set(stats) == wanted and any(".visual." in name for name in stats)
    num_images = len([p for p in images.iterdir() if p.suffix == ".jpg"])
    for name, st in stats.items():
        if ".visual." in name:
            # Every image gives (56 / 14)² = 16 patches to each vision block linear.
            assert st["input"]["count"] % (16 * num_images) == 0, name
            assert st["input"]["absmax"] > 0, name
    for changes, model_dir, fragment in (
        ({"images": str(tmp_path / "none")}, tiny_qwen2_vl_dir, "--images"),
        ({"images": str(images)}, tiny_qwen2_dir, "--images"),
    ):
        with pytest.raises(EdgeforgeError, match=re.escape(fragment)):
            run_profile(
                load_recipe("tiny-qwen2"), model_dir, replace(settings, **changes), tmp_path / "x"
            )
        assert not (tmp_path / "x").exists()


def test_each_transform_has_its_own_profile_folder() -> None:
    """A rotated profile never overwrites the plain one (make qnn reads profile-hadamard)."""
    names = {
        profile_dir_name(),
        profile_dir_name("hadamard"),
        profile_dir_name("orthogonal"),
        profile_dir_name(r_path=True),
        profile_dir_name("hadamard", online_down=True),
    }
    assert names == {
        "profile",
        "profile-hadamard",
        "profile-orthogonal",
        "profile-r-path",
        "profile-hadamard-online-down",
    }
    settings = ProfileSettings(corpus="c", rotate="hadamard")
    assert settings.dir_name == "profile-hadamard"

"""Memory preflight (common/core/memory.py): caps, estimates and the one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.core.errors import EdgeforgeError
from common.core.memory import (
    GIB,
    RUNTIME_BYTES,
    Estimate,
    MemoryCap,
    available_bytes,
    parse_size,
    preflight,
)
from tests.conftest import assert_clean_error, run_python


def test_parse_size_units() -> None:
    assert parse_size("16GB") == 16 * GIB
    assert parse_size("1.5g") == int(1.5 * GIB)
    assert parse_size("2048") == 2048
    for bad in ("", "0", "lots", "-1GB", "4PB"):
        with pytest.raises(EdgeforgeError, match=r"^MAX_MEMORY: expected a size"):
            parse_size(bad)


def test_available_is_the_smaller_of_machine_and_cgroup(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  24000000 kB\nMemAvailable:  8000000 kB\n")
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    assert available_bytes(meminfo, cgroup) == 8_000_000 * 1024  # no cgroup files: machine
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("100\n")
    assert available_bytes(meminfo, cgroup) == 8_000_000 * 1024  # unlimited cgroup
    (cgroup / "memory.max").write_text(f"{3 * GIB}\n")
    (cgroup / "memory.current").write_text(f"{GIB}\n")
    assert available_bytes(meminfo, cgroup) == 2 * GIB
    assert available_bytes(tmp_path / "none", tmp_path / "none") is None


def test_preflight_names_estimate_cap_and_remedy() -> None:
    estimate = Estimate("make profile (whole model)", {"float32 model": 7 * GIB, "rotation": 0})
    assert estimate.total == 7 * GIB + RUNTIME_BYTES
    assert estimate.to_json()["float32 model"] == 7 * GIB
    preflight(estimate, None, "unused")  # no cap readable: nothing to check
    preflight(estimate, MemoryCap(8 * GIB, "MAX_MEMORY=8.00 GiB"), "unused")
    with pytest.raises(EdgeforgeError) as info:
        preflight(estimate, MemoryCap.resolve("6GB"), "SEQUENTIAL=1 needs about 2.00 GiB")
    message = str(info.value)
    assert message == (
        "make profile (whole model) needs about 7.75 GiB (float32 model 7.00 GiB, runtime "
        "0.75 GiB), over MAX_MEMORY=6.00 GiB; SEQUENTIAL=1 needs about 2.00 GiB"
    )
    assert "\n" not in message


def test_default_cap_is_what_is_available() -> None:
    cap = MemoryCap.resolve(None)
    now = available_bytes()
    assert cap is not None and now is not None
    assert abs(cap.bytes - now) < GIB  # read a moment apart, while other work runs
    assert "this machine has available (MAX_MEMORY)" in cap.source


@pytest.mark.parametrize(
    ("script", "model", "fragments"),
    [
        (
            "targets/cpu-fp32-rotated/build.py",
            "tiny-qwen2",
            ("make cpu (one layer at a time) needs about", "lower EVAL_WINDOWS"),
        ),
        (
            "targets/axera-ax650/build.py",
            "tiny-qwen2.5-vl",
            ("make axera (one layer at a time) needs about", "vision tower (2.5x its float32"),
        ),
        (
            "targets/axera-ax650/build.py",
            "tiny-qwen2",
            ("make axera (one layer at a time) needs about", "bf16 embedding table"),
        ),
    ],
)
def test_targets_stop_before_loading(
    script: str, model: str, fragments: tuple, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Over MAX_MEMORY, a target stops with one line naming its estimate, the cap and what
    lowers it, before it loads the model or writes an output. (The qnn, sophgo and autoround
    preflights are tested in their own tox envs.)"""
    request.getfixturevalue("tiny_qwen2_5_vl_dir" if "vl" in model else "tiny_qwen2_dir")
    build_dir = request.getfixturevalue("session_build")
    result = run_python(
        script, "--model", model, "--build-dir", str(build_dir), "--max-memory", "1MB"
    )
    assert_clean_error(result, *fragments, "over MAX_MEMORY=0.00 GiB")
    assert not (build_dir / model / script.split("/")[1]).exists()
    assert_clean_error(
        run_python(script, "--model", model, "--max-memory", "lots"),
        "MAX_MEMORY",
        "expected a size such as 16GB",
    )


@pytest.mark.parametrize(
    ("argv", "step", "remedy"),
    [
        (
            ("-m", "common.steps.cli", "eval"),
            "make eval (one layer at a time) needs about",
            "lower NUM_WINDOWS or SEQ_LEN",
        ),
        (
            ("-m", "common.steps.cli", "eval", "--sequential", "0"),
            "make eval (whole model) needs about",
            "set MAX_MEMORY to",
        ),
        (
            ("-m", "common.steps.profile_cli", "simulate"),
            "make simulate (one layer at a time) needs about",
            "lower NUM_WINDOWS, NUM_SAMPLES or SEQ_LEN",
        ),
        (
            ("-m", "common.steps.profile_cli", "simulate", "--sequential", "0"),
            "make simulate (whole model) needs about",
            "set MAX_MEMORY to",
        ),
    ],
)
def test_common_steps_stop_before_loading(
    argv: tuple[str, ...], step: str, remedy: str, tmp_path: Path, tiny_qwen2_dir: Path
) -> None:
    result = run_python(
        *argv, "--model", "tiny-qwen2", "--model-path", str(tiny_qwen2_dir),
        "--build-dir", str(tmp_path), "--max-memory", "1MB",
    )  # fmt: skip
    assert_clean_error(result, step, "over MAX_MEMORY=0.00 GiB", remedy)
    assert not list(tmp_path.rglob("report.json"))  # stopped before writing an output

"""Run's phases: order, timing, and the measured memory every report.json records."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from common.core.resources import CHILD_SAMPLE_SECONDS, resources_line
from common.steps.phases import Run
from tests.conftest import REPO_ROOT

MIB = 2**20

#: A fresh interpreter runs four phases: "export" touches 256 MiB, "compile" starts a child
#: (via a shell, as tools are) that touches 128 MiB and lives long enough to be sampled.
_SCRIPT = textwrap.dedent(
    """
    import json, shlex, subprocess, sys
    from common.steps.phases import Run

    run = Run("demo", ("resolve", "export", "compile", "package"))
    run.phase("resolve")
    run.phase("export")
    block = bytearray(256 * 2**20)
    block[::4096] = b"x" * len(block[::4096])
    del block
    run.phase("compile")
    code = "import time; b = bytearray(128 * 2**20); b[::4096] = b'x' * len(b[::4096]); " \\
           "time.sleep(1.5)"
    subprocess.run(f"{sys.executable} -c {shlex.quote(code)}", shell=True, check=True)
    run.phase("package")
    print(json.dumps({"during": run.resources(), "seconds": run.finish(),
                      "after": run.resources()}))
    """
)


@pytest.fixture(scope="module")
def records() -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout)


def test_phases_in_order_with_seconds(records: dict) -> None:
    during = records["during"]
    assert [p["name"] for p in during["phases"]] == ["resolve", "export", "compile", "package"]
    assert during["recorded_during"] == "package"
    assert all(p["seconds"] >= 0 for p in during["phases"])
    after = records["after"]
    assert after["recorded_during"] is None
    assert {p["name"]: p["seconds"] for p in after["phases"]} == records["seconds"]


def test_peak_rss_is_measured_and_monotone(records: dict) -> None:
    record = records["after"]
    peaks = [p["peak_rss_bytes"] for p in record["phases"]]
    assert peaks[0] > 0 and peaks == sorted(peaks), peaks
    assert record["peak_rss_bytes"] == max(peaks)
    # the 256 MiB touched in "export" show in its peak, not in "resolve"'s
    assert peaks[1] - peaks[0] >= 250 * MIB, peaks
    # a child's memory is its own: counted apart, not in this process's peak
    assert 128 * MIB <= record["children_peak_rss_bytes"] < peaks[1], record
    assert peaks[2] - peaks[1] < 64 * MIB, peaks


def test_peak_rss_is_this_process_not_its_parent() -> None:
    """Measured in a child of this (large) test process, the peak is the child's own."""
    code = "from common.steps.phases import peak_rss_bytes; print(peak_rss_bytes())"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert 0 < int(proc.stdout) < 200 * MIB


def test_sampler_thread_ends_with_its_run() -> None:
    run = Run("demo", ("resolve",))
    assert any(t.name == "child-rss" for t in threading.enumerate())
    del run
    gc.collect()
    time.sleep(3 * CHILD_SAMPLE_SECONDS)
    assert not any(t.name == "child-rss" for t in threading.enumerate())


def test_record_is_json_and_has_a_report_line(records: dict) -> None:
    line = resources_line(records["after"])
    assert line.startswith("\n**Resources:** peak RSS ") and line.endswith("\n")
    assert line.count("\n") == 2
    assert "largest child process: " in line and "export " in line


def test_undeclared_or_out_of_order_phase_is_a_programming_error() -> None:
    run = Run("demo", ("resolve", "export"))
    run.phase("export")
    with pytest.raises(ValueError, match="'resolve' after 'export'"):
        run.phase("resolve")
    with pytest.raises(ValueError, match="not declared"):
        run.phase("verify")

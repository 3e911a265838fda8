"""``make images-check``: each target step natively and in its image, compared file by file.

For every case below, the step runs twice from scratch, natively into
``build/images-check/native`` and with ``USE_DOCKER=1`` into ``build/images-check/docker``.
Both runs must end with the same exit code (a gate that fails natively must fail alike), every
file of the artifact directory must be byte-identical, except the files that describe the run
(manifests name paths, Python and the image; reports carry measured seconds and RSS), and
the reports' numbers must be equal once those measurements and the build paths are set
aside. Files whose bytes vary from build to build even natively (a case's ``by_report``:
tpu-mlir's bmodel holds its "create time" and, measured, a byte of a net's command stream
that two native builds also disagree on) must have the same size, are checked through the
report's numbers (the simulated bmodel against onnxruntime and HF: cosines, greedy tokens),
and the table says how many of their bytes differ, inside and outside the create time. It
prints a table with the times and the image sizes and exits 1 on any difference.
Standard library and ``common.core.records`` (itself standard library only, on
``PYTHONPATH``), so it runs with the host's ``python3``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.core.records import hash_tree

ROOT = Path(__file__).resolve().parent.parent
#: Files that describe a run rather than being its product; compared by their numbers only.
DESCRIBED = {"manifest.json", "report.json", "report.md"}


@dataclass(frozen=True)
class Case:
    """One make step on one model; ``output`` is its artifact folder under build/<model>/."""

    step: str
    model: str
    output: str
    #: Name patterns of files checked through the report (see the module doc and
    #: :func:`byte_differences`); the artifact folder must then hold a report.json.
    by_report: tuple[str, ...] = ()


CASES = (
    Case("cpu", "tiny-qwen2", "cpu-fp32-rotated"),
    Case("cpu", "smollm2-135m", "cpu-fp32-rotated"),
    Case("qnn", "tiny-qwen2", "qnn"),
    Case("autoround", "tiny-qwen2", "autoround"),
    Case("axera", "tiny-qwen2.5-vl", "axera-ax650"),
    Case("sophgo", "tiny-qwen2", "sophgo-bm1684x/bf16", by_report=("*.bmodel",)),
)
#: Cases of the issue that have no image yet, named in the table so the gap stays visible.
NOT_COVERED = ("axera's Pulsar2 compile (vendor image)",)
#: A C ``ctime()`` string, as tpu-mlir writes a bmodel's "create time": "Mon Dec  7 09:19:32 2026".
CTIME = re.compile(rb"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d{2}:\d{2}:\d{2} \d{4}")


def byte_differences(a: Path, b: Path) -> tuple[int, int] | None:
    """How many bytes of ``a`` and ``b`` differ inside the ctime strings both hold at the same
    offset (a build time) and outside them; None when their sizes differ."""
    data_a, data_b = a.read_bytes(), b.read_bytes()
    if len(data_a) != len(data_b):
        return None
    spans = {m.span() for m in CTIME.finditer(data_a)} & {m.span() for m in CTIME.finditer(data_b)}
    in_time = {i for start, end in spans for i in range(start, end) if data_a[i] != data_b[i]}
    differing = sum(x != y for x, y in zip(data_a, data_b, strict=True))
    return len(in_time), differing - len(in_time)


#: Report keys that hold measurements: peak RSS ("resources"), seconds per phase ("timings",
#: sophgo) and [calls, seconds per call] per simulated net ("simulator_calls", sophgo).
MEASURED = ("resources", "timings", "simulator_calls")


def without_measurements(value: Any) -> Any:
    """``value`` without what is measured, not computed: the keys of :data:`MEASURED` and
    ``*seconds`` keys."""
    if isinstance(value, dict):
        return {
            k: without_measurements(v)
            for k, v in value.items()
            if k not in MEASURED and not k.endswith("seconds")
        }
    if isinstance(value, list):
        return [without_measurements(v) for v in value]
    return value


def report_numbers(report: Path, build_dir: Path) -> Any:
    """A report.json's content with the build folder's path and the measurements removed."""
    return without_measurements(json.loads(report.read_text().replace(str(build_dir), "BUILD")))


def differences(
    native: Path,
    docker: Path,
    native_build: Path,
    docker_build: Path,
    by_report: tuple[str, ...] = (),
) -> tuple[list[str], list[str]]:
    """What differs between two artifact folders, empty when they agree (see module doc), and
    what differs in the files of ``by_report`` whose sizes and report agree (not failed)."""
    a, b = hash_tree(native), hash_tree(docker)
    found = [f"only in one run: {name}" for name in sorted(a.keys() ^ b.keys())]
    noted: list[str] = []
    for name in sorted(a.keys() & b.keys()):
        if Path(name).name == "report.json":
            if report_numbers(native / name, native_build) != report_numbers(
                docker / name, docker_build
            ):
                found.append(f"report numbers differ: {name}")
        elif Path(name).name in DESCRIBED or a[name] == b[name]:
            continue
        elif any(fnmatch.fnmatch(Path(name).name, p) for p in by_report):
            counts = byte_differences(native / name, docker / name)
            if counts is None:
                found.append(f"sizes differ: {name}")
            elif not any(Path(n).name == "report.json" for n in a):
                found.append(f"bytes differ and no report.json checks them: {name}")
            else:
                noted.append(
                    f"{name}: {sum(counts)} bytes differ, {counts[0]} in its create time; "
                    "report numbers equal"
                )
        else:
            found.append(f"bytes differ: {name}")
    return found, noted


def run_step(case: Case, build_dir: Path, docker: bool) -> tuple[int, float]:
    """``make <step> MODEL=<model> BUILD_DIR=<build_dir>`` from scratch; exit code, seconds."""
    shutil.rmtree(build_dir / case.model, ignore_errors=True)
    argv = ["make", "--no-print-directory", case.step, f"MODEL={case.model}"]
    argv += [f"BUILD_DIR={build_dir}"] + (["USE_DOCKER=1"] if docker else [])
    log = build_dir / f"{case.step}-{case.model}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as out:
        code = subprocess.run(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    return code, time.monotonic() - start


def image_size_mb(target: str) -> str:
    """The size of ``target``'s image in MB (docker/image.sh prints its tag)."""
    tag = subprocess.run(
        [str(ROOT / "docker" / "image.sh"), target], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    size = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Size}}", tag],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return f"{tag} {int(size) / 1e6:.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "images-check")
    steps = sorted({case.step for case in CASES})
    parser.add_argument(
        "--step",
        action="append",
        choices=steps,
        help="only the cases of this make step (repeatable; default: every case)",
    )
    args = parser.parse_args()
    build = args.build_dir.resolve()
    cases = [case for case in CASES if not args.step or case.step in args.step]
    rows, failed = [], False
    for case in cases:
        native_code, native_s = run_step(case, build / "native", docker=False)
        docker_code, docker_s = run_step(case, build / "docker", docker=True)
        found, noted = differences(
            build / "native" / case.model / case.output,
            build / "docker" / case.model / case.output,
            build / "native",
            build / "docker",
            case.by_report,
        )
        if native_code != docker_code:
            found.insert(0, f"exit {native_code} natively, {docker_code} in the container")
        failed |= bool(found)
        files = len(hash_tree(build / "native" / case.model / case.output))
        verdict = "; ".join(found) or "same bytes" + "".join(f" but {n}" for n in noted)
        rows.append(
            f"| make {case.step} MODEL={case.model} | {native_s:.0f} s | {docker_s:.0f} s "
            f"| {native_code} / {docker_code} | {files} | {verdict} |"
        )
    print("| case | native | container | exit | files | result |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    for gap in NOT_COVERED:
        print(f"| {gap} | | | | | not covered |")
    for target in dict.fromkeys("cpu" if c.step == "axera" else c.step for c in cases):
        print(f"image {target}: {image_size_mb(target)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

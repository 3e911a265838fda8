"""Containers end to end: the Debian base, the cpu and sophgo images, ``USE_DOCKER=1 make``.

Everything runs the way a user runs it (``make image-base``, ``make image TARGET=cpu``,
``make cpu USE_DOCKER=1``). The session starts a private Docker engine through
``docker/engine.sh`` when none answers and stops it again at the end; when no engine can run
here, every test that needs one is skipped with the engine script's reason, never passed.
The base tarball and the wheelhouse are cached under the checkout's build/docker/.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from common.core.records import hash_tree, sha256_file
from tests.conftest import REPO_ROOT, CliResult, assert_clean_error

ENGINE = REPO_ROOT / "docker" / "engine.sh"


def _load_images_check() -> ModuleType:
    """docker/images_check.py, whose comparison ``make images-check`` applies to every case."""
    spec = importlib.util.spec_from_file_location("images_check", ENGINE.parent / "images_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["images_check"] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


images_check = _load_images_check()


def run(*argv: str | Path, env: dict[str, str] | None = None) -> CliResult:
    """``argv`` from the repo root, stdin closed, output captured."""
    result = subprocess.run(
        [str(a) for a in argv],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    return CliResult(result.returncode, result.stdout, result.stderr)


def make(*args: str | Path) -> CliResult:
    """``make --no-print-directory <args>`` in the checkout."""
    return run("make", "--no-print-directory", *args)


@pytest.fixture(scope="session")
def engine() -> Iterator[None]:
    """A Docker engine for the session: the one running, or one started (and stopped) here."""
    if run(ENGINE, "status").returncode == 0:
        yield
        return
    started = run(ENGINE, "start")
    if started.returncode != 0:
        pytest.skip(f"no Docker engine can run here: {started.stderr.strip().splitlines()[-1]}")
    try:
        yield
    finally:
        stopped = run(ENGINE, "stop")
        assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="session")
def base_tag(engine: None) -> str:
    """``make image-base``: the tag of the imported base image."""
    result = make("image-base")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def cpu_tag(base_tag: str) -> str:
    """``make image TARGET=cpu``: the tag of the cpu image (built on the base)."""
    result = make("image", "TARGET=cpu")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def base_dir(tag: str) -> Path:
    """The cache folder (tarball + manifest.json) the base image ``tag`` was imported from."""
    (folder,) = [
        p.parent
        for p in REPO_ROOT.glob("build/docker/base/*/manifest.json")
        if tag == f"edgeforge/base:{json.loads(p.read_text())['tarball']['sha256'][:12]}"
    ]
    return folder


def base_manifest(tag: str) -> dict:
    """The manifest of the cached base tarball the image ``tag`` was imported from."""
    return json.loads((base_dir(tag) / "manifest.json").read_text())


def test_base_manifest_describes_the_tarball(base_tag: str) -> None:
    manifest = base_manifest(base_tag)
    tarball = base_dir(base_tag) / manifest["tarball"]["name"]
    assert sha256_file(tarball) == manifest["tarball"]["sha256"]
    assert manifest["pins"]["SUITE"] == "bookworm"
    assert manifest["packages"]["python3.11:amd64"].startswith("3.11.")
    for package in manifest["pins"]["INCLUDE"].split(","):
        assert any(name.split(":")[0] == package for name in manifest["packages"]), package


def test_base_tarball_is_reproducible(base_tag: str) -> None:
    """A rebuild from scratch gives the same tarball bytes (make image-base-check)."""
    result = make("image-base-check")
    assert result.returncode == 0, result.stdout + result.stderr
    sha = base_manifest(base_tag)["tarball"]["sha256"]
    assert f"rebuilt {sha}" in result.stdout


def test_cpu_image_runs_offline_python(cpu_tag: str) -> None:
    """The image's venv imports the pinned torch with no network at all."""
    code = "import importlib.metadata as m, torch; print(m.version('torch'))"
    python = ("/opt/edgeforge-venv/bin/python", "-c", code)
    result = run("docker", "run", "--rm", "--network", "none", cpu_tag, *python)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2.14.1"


def test_make_cpu_in_docker_same_bytes_as_native(cpu_tag: str, tmp_path: Path) -> None:
    """``USE_DOCKER=1 make cpu MODEL=tiny-qwen2`` gives the native run's files and numbers."""
    native, docker = tmp_path / "native", tmp_path / "docker"
    for build_dir, extra in ((native, ()), (docker, ("USE_DOCKER=1",))):
        result = make("cpu", "MODEL=tiny-qwen2", f"BUILD_DIR={build_dir}", *extra)
        assert result.returncode == 0, result.stderr
    out_native, out_docker = (d / "tiny-qwen2" / "cpu-fp32-rotated" for d in (native, docker))
    assert images_check.differences(out_native, out_docker, native, docker) == ([], [])
    compared = hash_tree(out_native).keys() - images_check.DESCRIBED
    assert {"model.mllm", "model/model.safetensors", "rotation.safetensors"} <= compared

    manifest = json.loads((out_docker / "manifest.json").read_text())
    image_id = run("docker", "image", "inspect", "--format", "{{.Id}}", cpu_tag).stdout.strip()
    assert manifest["container"] == {"image": cpu_tag, "id": image_id}
    assert json.loads((out_native / "manifest.json").read_text())["container"] is None
    owner = (os.getuid(), os.getgid())
    for path in [out_docker, *out_docker.rglob("*")]:
        assert (path.stat().st_uid, path.stat().st_gid) == owner, path


def test_failed_step_in_docker_leaves_nothing(cpu_tag: str, tmp_path: Path) -> None:
    """A step refused inside the container: one error line, no output, no temporaries."""
    result = make("cpu", "MODEL=tiny-qwen2", f"BUILD_DIR={tmp_path}", "USE_DOCKER=1",
                  "ROTATE_MODE=diagonal")  # fmt: skip
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert not (tmp_path / "tiny-qwen2" / "cpu-fp32-rotated").exists()
    assert not [p for p in tmp_path.rglob("*.tmp")]


@pytest.fixture(scope="session")
def sophgo_tag(cpu_tag: str) -> str:
    """``make image TARGET=sophgo``: the cpu image plus the tpu-mlir venv made in it."""
    result = make("image", "TARGET=sophgo")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.images_check
def test_sophgo_image_passes_the_toolchain_checks(sophgo_tag: str) -> None:
    """``make sophgo-toolchain USE_DOCKER=1`` re-runs setup_toolchain.py's checks on the
    image's venv as the caller, with no network: the tools start, ``python3`` on their PATH
    is the venv's, the undeclared modules import; nothing is installed (the stamp matches)."""
    result = make("sophgo-toolchain", "USE_DOCKER=1")
    assert result.returncode == 0, result.stderr
    assert "install skipped" in result.stdout
    assert "ok tpu_mlir: 1.30.2" in result.stdout
    assert "ok kernel_jit: cmake, make, c++ on PATH" in result.stdout
    assert "ok path: python3 on the tools' PATH resolves to /opt/tpu-mlir-venv" in result.stdout
    # The pins and the host's setup script that made the venv stay in the image, no pip
    # configuration, pip cache, wheel or .deb: pip had the wheelhouse only as environment
    # variables of the RUN, dpkg the packages in a temporary folder. (Wheels that packages
    # ship for seeding venvs are theirs: Debian's python3-venv, ensurepip, virtualenv.)
    shipped = ("/usr/share/python-wheels/*", "*/ensurepip/*", "*/virtualenv/seed/wheels/*")
    leftovers = (r"find / -xdev \( -name pip.conf -o -name '*.whl' -o -name '*.deb' \)"
                 + "".join(f" -not -path '{p}'" for p in shipped))  # fmt: skip
    script = "; ".join((
        "ls /opt/edgeforge-pins/sophgo/targets/sophgo-bm1684x",
        leftovers,
        "test ! -e /root/.cache/pip || echo /root/.cache/pip",
    ))  # fmt: skip
    listing = run("docker", "run", "--rm", "--network", "none", sophgo_tag, "sh", "-c", script)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split() == [
        "debian-packages.txt",
        "requirements-tpu-mlir.txt",
        "setup_toolchain.py",
    ]


@pytest.mark.images_check
def test_failed_sophgo_step_in_docker_leaves_nothing(sophgo_tag: str, tmp_path: Path) -> None:
    """A sophgo step refused inside its container: one error line, no output, no temporaries."""
    result = make("sophgo", "MODEL=tiny-qwen2", f"BUILD_DIR={tmp_path}", "USE_DOCKER=1",
                  "MODE=int3")  # fmt: skip
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert not (tmp_path / "tiny-qwen2" / "sophgo-bm1684x").exists()
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_llm_convert_route_is_refused_before_docker(tmp_path: Path) -> None:
    """The image holds the ROUTE=onnx venv only: one error line, before any image or engine."""
    result = make("sophgo", "MODEL=tiny-qwen2", f"BUILD_DIR={tmp_path}", "USE_DOCKER=1",
                  "ROUTE=llm_convert")  # fmt: skip
    assert_clean_error(result, "ROUTE=onnx venv only", "without USE_DOCKER")
    assert not list(tmp_path.iterdir())


def test_bmodel_byte_differences_count_the_create_time_apart(tmp_path: Path) -> None:
    """images_check's by-report rule: same size required; differing bytes counted, those of a
    ctime string at one offset in both (the bmodel's create time) apart from the rest."""
    head = b"\x10\x00B.2.2\x00"
    a, b, c, d = (tmp_path / n for n in "abcd")
    a.write_bytes(head + b"Mon Dec  7 09:19:32 2026" + b"\x01\x02")
    b.write_bytes(head + b"Tue Dec  8 10:00:01 2026" + b"\x01\x02")
    c.write_bytes(head + b"Tue Dec  8 10:00:01 2026" + b"\x01\x03")
    d.write_bytes(head + b"Tue Dec  8 10:00:01 2026" + b"\x01\x02\x00")
    assert images_check.byte_differences(a, a) == (0, 0)
    assert images_check.byte_differences(a, b) == (10, 0)
    assert images_check.byte_differences(a, c) == (10, 1)
    assert images_check.byte_differences(a, d) is None


def test_pulsar2_image_not_loaded_names_the_docker_load() -> None:
    """The Pulsar2 image is built on AXERA's vendor image, which no registry serves: named
    but not loaded, one error line with the docker load command, and no image built."""
    result = make("image", "TARGET=axera", "PULSAR2_IMAGE=pulsar2:0.0-not-loaded")
    assert_clean_error(
        result, "PULSAR2_IMAGE=pulsar2:0.0-not-loaded is not loaded",
        "docker load -i ax_pulsar2_0.0-not-loaded.tar.gz",
    )  # fmt: skip
    listed = run("docker", "images", "--format", "{{.Repository}}", "edgeforge/axera-pulsar2")
    assert listed.returncode == 0 and listed.stdout.strip() == ""


@pytest.mark.parametrize("target", ["", "pulsar2", "nope"])
def test_unknown_target_lists_the_targets_with_images(target: str) -> None:
    assert_clean_error(make("image", f"TARGET={target}"), "cpu qnn autoround axera sophgo")

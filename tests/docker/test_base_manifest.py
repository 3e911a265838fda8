"""docker/base_manifest.py on a small tarball: the package list comes from the tarball's own
dpkg status, and a rebuild from a mirror that moved on names the packages that changed."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "docker" / "base_manifest.py"
STATUS = """Package: libc6
Status: install ok installed
Architecture: amd64
Version: 2.36-9+deb12u9

Package: tzdata
Status: install ok installed
Architecture: all
Version: 2024a-0+deb12u1

Package: removed-one
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0
"""


def rootfs(path: Path, status: str) -> Path:
    """A tarball holding only ./var/lib/dpkg/status, as mmdebstrap's tarball names it."""
    data = status.encode()
    with tarfile.open(path, "w") as tar:
        member = tarfile.TarInfo("./var/lib/dpkg/status")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return path


def manifest(tmp_path: Path, name: str, status: str) -> Path:
    """``base_manifest.py write`` for a tarball with ``status``; the manifest's path."""
    pins = tmp_path / "base.env"
    pins.write_text("# pins\nSUITE=bookworm\nSOURCE_DATE_EPOCH=1747699200\n")
    out = tmp_path / f"{name}.json"
    argv = [sys.executable, SCRIPT, "write", rootfs(tmp_path / f"{name}.tar", status)]
    argv += ["--pins", pins, "--mmdebstrap-version", "mmdebstrap 1.3.5", "--out", out]
    subprocess.run([str(a) for a in argv], check=True)
    return out


def test_manifest_lists_installed_packages(tmp_path: Path) -> None:
    data = json.loads(manifest(tmp_path, "a", STATUS).read_text())
    assert data["packages"] == {"libc6:amd64": "2.36-9+deb12u9", "tzdata": "2024a-0+deb12u1"}
    assert data["pins"] == {"SUITE": "bookworm", "SOURCE_DATE_EPOCH": "1747699200"}
    assert data["tarball"]["name"] == "a.tar"
    assert len(data["tarball"]["sha256"]) == 64


def test_diff_names_the_packages_a_point_release_changed(tmp_path: Path) -> None:
    old = manifest(tmp_path, "old", STATUS)
    new = manifest(tmp_path, "new", STATUS.replace("2.36-9+deb12u9", "2.36-9+deb12u10"))
    same = subprocess.run(
        [sys.executable, SCRIPT, "diff", old, old], capture_output=True, text=True
    )
    assert same.returncode == 0, same.stdout
    moved = subprocess.run(
        [sys.executable, SCRIPT, "diff", old, new], capture_output=True, text=True
    )
    assert moved.returncode == 1
    assert "1 package(s) differ" in moved.stdout
    assert "libc6:amd64: 2.36-9+deb12u9 -> 2.36-9+deb12u10" in moved.stdout
    assert "tzdata" not in moved.stdout

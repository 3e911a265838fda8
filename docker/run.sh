#!/usr/bin/env bash
# Run one make step of a target inside that target's vendor-toolchain container.
#   docker/run.sh <target-folder> <make-step> [VAR=value ...]
# The image is built from targets/<target-folder>/Dockerfile and tagged with the hash of
# that Dockerfile and the pin files, so a changed toolchain pin gives a new image. The
# checkout is mounted at /work, build outputs land in the host's BUILD_DIR as usual, and
# the Hugging Face cache is mounted read-only for hub checkpoints.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: docker/run.sh <target-folder> <make-step> [VAR=value ...]" >&2
  exit 2
fi
target=$1; step=$2; shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
dockerfile="$root/targets/$target/Dockerfile"
if [ ! -f "$dockerfile" ]; then
  echo "error: $dockerfile does not exist; targets with a container: $(cd "$root/targets" && ls */Dockerfile 2>/dev/null | cut -d/ -f1 | tr '\n' ' ')" >&2
  exit 2
fi
if ! docker info >/dev/null 2>&1; then
  echo "error: USE_DOCKER=1 needs a running Docker engine ('docker info' failed); run natively instead, with the toolchain installed as the target's README says" >&2
  exit 2
fi
# The tag covers the Dockerfile and every pin file it may install (shared and the target's own).
tag="edgeforge-$target:$(cat "$dockerfile" "$root/requirements.txt" "$root/targets/$target"/requirements*.txt 2>/dev/null | sha256sum | cut -c1-12)"
docker image inspect "$tag" >/dev/null 2>&1 || docker build -f "$dockerfile" -t "$tag" "$root"
hf_cache=${HF_HOME:-$HOME/.cache/huggingface}
mounts=(-v "$root:/work" -w /work)
[ -d "$hf_cache" ] && mounts+=(-v "$hf_cache:/root/.cache/huggingface:ro")
[ -n "${MODEL_PATH:-}" ] && mounts+=(-v "$MODEL_PATH:$MODEL_PATH:ro")
exec docker run --rm "${mounts[@]}" "$tag" make "$step" USE_DOCKER= VENV=/opt/edgeforge-venv "$@"

#!/usr/bin/env bash
# Run one make step of a target inside that target's image (USE_DOCKER=1 make <step>).
#   docker/run.sh <target> <make-step> [VAR=value ...]
# docker/image.sh builds the image when missing (and the engine is started when none
# answers). The container has no network (--network none), runs as the calling user's uid
# and gid with every capability dropped, so outputs are owned by the caller, and sees the
# checkout, BUILD_DIR and MODEL_PATH at their host paths (manifests name the same paths as a
# native run). The image's tag and id go into the environment as EDGEFORGE_IMAGE and
# EDGEFORGE_IMAGE_ID, which every artifact manifest records (common/core/records.py).
# The caller's OpenBLAS variables (OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE, ...) go in as they
# are: they pick OpenBLAS's kernels, so numpy's products (tpu-mlir's compares, make sophgo's
# cosines) differ in their last bits without them (measured: README "Containers"). So does
# OMP_NUM_THREADS, when set: the step uses the threads the caller gave it, as natively.
# Targets map to images in docker/image.sh (sophgo-bm1684x: the sophgo image).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: docker/run.sh <target> <make-step> [VAR=value ...]" >&2
  exit 2
fi
target=$1; step=$2; shift 2
root=$(cd "$(dirname "$0")/.." && pwd)

# mount_at_host_path DIR [ro]: DIR visible in the container under the same absolute path.
mounts=()
mount_at_host_path() {
  local dir
  dir=$(cd "$1" && pwd)
  case $dir/ in "$root"/*) return 0 ;; esac  # already inside the mounted checkout
  mounts+=(-v "$dir:$dir${2:+:$2}")
}
mounts+=(-v "$root:$root")
# A git worktree keeps its repository elsewhere; git in the container needs it for the commit.
common_git=$(git -C "$root" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
[ -n "$common_git" ] && [ -d "$common_git" ] && mount_at_host_path "$common_git" ro
# BUILD_DIR and MODEL_PATH as make reads them: relative to the checkout.
host_path() { (cd "$root" && realpath -m "$1"); }
for arg in "$@"; do
  case $arg in
    BUILD_DIR=?*)
      mkdir -p "$(host_path "${arg#BUILD_DIR=}")"
      mount_at_host_path "$(host_path "${arg#BUILD_DIR=}")" ;;
    MODEL_PATH=?*)
      if [ ! -d "$(host_path "${arg#MODEL_PATH=}")" ]; then
        echo "error: MODEL_PATH=${arg#MODEL_PATH=} is not a directory" >&2
        exit 2
      fi
      mount_at_host_path "$(host_path "${arg#MODEL_PATH=}")" ro ;;
  esac
done
# The venv finds the checkout through edgeforge.pth, as natively (make venv); mounted read-only
# with this checkout's path, so make's venv step finds it right and writes nothing, which
# a non-root user could not do in /opt.
pth="$root/build/docker/edgeforge.pth"
mkdir -p "$(dirname "$pth")"
if ! echo "$root" | cmp -s - "$pth"; then
  echo "$root" >"$pth.$$.tmp" && mv "$pth.$$.tmp" "$pth"
fi
mounts+=(-v "$pth:/opt/edgeforge-venv/lib/python3.11/site-packages/edgeforge.pth:ro")
# The image (built when missing) once the arguments are known to be right.
tag=$("$root/docker/image.sh" "$target")
image_id=$(docker image inspect --format '{{.Id}}' "$tag")
hf_cache=${HF_HOME:-$HOME/.cache/huggingface}
env_args=(-e HOME=/tmp -e EDGEFORGE_IMAGE="$tag" -e EDGEFORGE_IMAGE_ID="$image_id"
  -e GIT_CONFIG_COUNT=1 -e GIT_CONFIG_KEY_0=safe.directory -e GIT_CONFIG_VALUE_0='*')
for name in $(compgen -e | grep -E '^(OPENBLAS_|OMP_NUM_THREADS$)' || true); do
  env_args+=(-e "$name")
done
if [ -d "$hf_cache" ]; then
  mount_at_host_path "$hf_cache" ro
  env_args+=(-e HF_HOME="$(cd "$hf_cache" && pwd)")
fi
# The image's venv stamps name their pin files' hashes, which the tag hashes too, so in the
# image they are current whatever the checkout's file times; make judges by time, and a
# checkout newer than the image (a fresh clone, a pull) would re-run pip into /opt, which a
# non-root caller cannot write ("rm: cannot remove ...: Permission denied"). -o: not that.
old_pins=()
for f in "$root"/requirements.txt "$root"/targets/*/requirements.txt; do old_pins+=(-o "${f#"$root"/}"); done
exec docker run --rm --network none --user "$(id -u):$(id -g)" --cap-drop ALL \
  --security-opt no-new-privileges "${mounts[@]}" "${env_args[@]}" -w "$root" "$tag" \
  make --no-print-directory "${old_pins[@]}" "$step" USE_DOCKER= VENV=/opt/edgeforge-venv "$@"

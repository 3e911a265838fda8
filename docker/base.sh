#!/usr/bin/env bash
# The base image, made from Debian's packages with mmdebstrap (no image registry).
#   docker/base.sh build   build (or reuse) the rootfs tarball and import it; prints the tag
#   docker/base.sh check   build the tarball once more from scratch and compare its sha256
# Pins: docker/base.env (suite, variant, packages, SOURCE_DATE_EPOCH). Packages come through
# the host's apt sources (APT_SOURCES: files, default every enabled sources file of the host),
# so a mirror or proxy the host uses works unchanged; nothing of them lands in the image.
# The tarball and its manifest (package list with versions, sha256, mmdebstrap version) lie in
# build/docker/base/<key>/, key = hash of the pins, the sources files and mmdebstrap's version:
# the same inputs reuse the tarball. The image is `edgeforge/base:<first 12 hex of sha256>`.
set -euo pipefail
usage() { echo "usage: docker/base.sh build|check" >&2; exit 2; }
[ $# -eq 1 ] || usage
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/docker/lib.sh"
pins="$root/docker/base.env"
read_pin() { sed -n "s/^$1=//p" "$pins"; }
suite=$(read_pin SUITE); variant=$(read_pin VARIANT); include=$(read_pin INCLUDE)
epoch=$(read_pin SOURCE_DATE_EPOCH)
if [ -z "$suite" ] || [ -z "$variant" ] || [ -z "$include" ] || [ -z "$epoch" ]; then
  echo "error: $pins must set SUITE, VARIANT, INCLUDE and SOURCE_DATE_EPOCH" >&2
  exit 2
fi
read -r -a sources <<<"${APT_SOURCES:-$(ls /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null | tr '\n' ' ')}"
if [ ${#sources[@]} -eq 0 ]; then
  echo "error: no apt sources file found (APT_SOURCES is empty and /etc/apt has none); run: make image-base APT_SOURCES=<file.sources or file.list>" >&2
  exit 2
fi
for f in "${sources[@]}"; do
  [ -f "$f" ] || { echo "error: APT_SOURCES names $f, which is not a file" >&2; exit 2; }
done
ensure_command mmdebstrap mmdebstrap
mmver=$(mmdebstrap --version)
key=$({ cat "$pins"; for f in "${sources[@]}"; do echo "$f"; cat "$f"; done; echo "$mmver"; } | sha256sum | cut -c1-16)
dir="$root/build/docker/base/$key"

# make_tarball DIR: mmdebstrap's tarball and manifest written into DIR (made by the caller).
# resolv.conf and hostname are copied from the host by mmdebstrap: removed, so the bytes
# do not depend on the machine (mmdebstrap(1), SOURCE_DATE_EPOCH).
make_tarball() {
  local out=$1 start=$SECONDS
  echo "image-base: mmdebstrap $suite ($variant + $include) from ${sources[*]}" >&2
  SOURCE_DATE_EPOCH=$epoch mmdebstrap --quiet --variant="$variant" --include="$include" \
    --customize-hook='rm "$1"/etc/resolv.conf "$1"/etc/hostname' \
    "$suite" "$out/base.tar" "${sources[@]}" >&2
  PYTHONPATH="$root" python3 "$root/docker/base_manifest.py" write "$out/base.tar" --pins "$pins" \
    --sources "${sources[@]}" --mmdebstrap-version "$mmver" --out "$out/manifest.json"
  echo "image-base: $(sha256sum "$out/base.tar" | cut -d' ' -f1) base.tar, $(du -m "$out/base.tar" | cut -f1) MB, $((SECONDS - start)) s" >&2
}

# A fresh temporary beside DIR, removed on any exit (a failed build leaves nothing half-written).
fresh_tmp() {
  mkdir -p "$(dirname "$dir")"
  tmp=$(mktemp -d "$dir.XXXXXX.tmp")
  trap 'rm -rf "$tmp"' EXIT
}

tarball_sha() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["tarball"]["sha256"])' "$1/manifest.json"; }

build() {
  if [ ! -f "$dir/manifest.json" ]; then
    fresh_tmp
    make_tarball "$tmp"
    rm -rf "$dir"
    mv "$tmp" "$dir"
  else
    echo "image-base: reusing $dir (same pins, apt sources and mmdebstrap)" >&2
  fi
  local tag sha
  sha=$(tarball_sha "$dir")
  tag="edgeforge/base:${sha:0:12}"
  "$root/docker/engine.sh" start
  if ! docker image inspect "$tag" >/dev/null 2>&1; then
    docker import --message "docker/base.sh: $suite tarball sha256 $sha" "$dir/base.tar" "$tag" >&2
  fi
  echo "$tag"
}

check() {
  [ -f "$dir/manifest.json" ] || build >/dev/null
  fresh_tmp
  make_tarball "$tmp"
  local old new
  old=$(tarball_sha "$dir"); new=$(tarball_sha "$tmp")
  echo "image-base-check: cached  $old  ($dir/base.tar)"
  echo "image-base-check: rebuilt $new"
  if [ "$old" = "$new" ]; then
    echo "image-base-check: same sha256: the base tarball is reproducible"
    return 0
  fi
  echo "error: the rebuilt base tarball differs from the cached one" >&2
  PYTHONPATH="$root" python3 "$root/docker/base_manifest.py" diff "$dir/manifest.json" "$tmp/manifest.json" ||
    echo "(same package versions: the difference is in the build itself; compare with diffoscope)"
  exit 1
}

case $1 in
  build) build ;;
  check) check ;;
  *) usage ;;
esac

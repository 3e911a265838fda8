#!/usr/bin/env bash
# Runs INSIDE `docker build` (the RUN step of targets/<t>/Dockerfile, which COPYs this script
# and the pin files in): installs pinned wheels from $WHEELS, the loopback URL at which
# docker/image.sh serves build/docker/wheelhouse for the length of the build, into
# /opt/edgeforge-venv (created when absent), and writes the stamp files the Makefile checks,
# so make installs nothing later. No wheel and no pip configuration is left in the layer.
#   WHEELS=<url> install_venv.sh <pin file>:<stamp prefix or ->:<deps|nodeps> ...
# A stamp is $VENV/.edgeforge-<prefix>-<first 16 hex of the pin file's sha256>, as make names it.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: WHEELS=<url> install_venv.sh <pin file>:<stamp prefix|->:<deps|nodeps> ..." >&2; exit 2; }
[ -n "${WHEELS:-}" ] || { echo "error: WHEELS (the wheelhouse URL) is not set; build images with docker/image.sh" >&2; exit 2; }
venv=/opt/edgeforge-venv
# PYTHON: the interpreter to make it from, where the image's python3 is not 3.11 (Pulsar2's).
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
for spec in "$@"; do
  IFS=: read -r file prefix deps <<<"$spec"
  flags=(--no-index --find-links "$WHEELS" --no-cache-dir --disable-pip-version-check --progress-bar off)
  [ "$deps" = nodeps ] && flags+=(--no-deps)
  "$venv/bin/python" -m pip install "${flags[@]}" -r "$file"
  if [ "$prefix" != - ]; then
    rm -f "$venv/.edgeforge-$prefix-"*
    touch "$venv/.edgeforge-$prefix-$(sha256sum "$file" | cut -c1-16)"
  fi
done

#!/usr/bin/env bash
# Runs INSIDE a container that docker/image.sh starts with --network none: installs pinned
# wheels from the read-only wheelhouse at /wheelhouse into /opt/edgeforge-venv (created when
# absent) and writes the stamp files the Makefile checks, so make installs nothing later.
#   install_venv.sh <pin file>:<stamp prefix or ->:<deps|nodeps> ...
# A stamp is $VENV/.edgeforge-<prefix>-<first 16 hex of the pin file's sha256>, as make names it.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: install_venv.sh <pin file>:<stamp prefix|->:<deps|nodeps> ..." >&2; exit 2; }
venv=/opt/edgeforge-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
for spec in "$@"; do
  IFS=: read -r file prefix deps <<<"$spec"
  flags=(--no-index --find-links /wheelhouse --no-cache-dir --disable-pip-version-check --progress-bar off)
  [ "$deps" = nodeps ] && flags+=(--no-deps)
  "$venv/bin/python" -m pip install "${flags[@]}" -r "$file"
  if [ "$prefix" != - ]; then
    rm -f "$venv/.edgeforge-$prefix-"*
    touch "$venv/.edgeforge-$prefix-$(sha256sum "$file" | cut -c1-16)"
  fi
done

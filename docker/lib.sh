# Shared by the docker/*.sh scripts (sourced, not run): installing a missing Debian tool.

# ensure_command CMD PACKAGE: CMD is on PATH afterwards, or the script exits with one
# `error:` line. A missing CMD is installed with apt-get only when we are root and have apt
# (a fresh machine may lack dockerd or mmdebstrap); the install is said on stderr.
ensure_command() {
  local cmd=$1 package=$2
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: $cmd is not installed; run: sudo apt-get install -y $package" >&2
    exit 2
  fi
  echo "docker: $cmd is missing; installing Debian's $package (apt-get install -y $package)" >&2
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package"; } >&2; then
    echo "error: apt-get install -y $package failed (output above); install it and run make again" >&2
    exit 2
  fi
}

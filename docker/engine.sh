#!/usr/bin/env bash
# The Docker engine the container steps use: start one when none answers, stop only that one.
#   docker/engine.sh start    an engine answers afterwards (starts a private dockerd if needed)
#   docker/engine.sh stop     stops the dockerd this script started, and no other
#   docker/engine.sh status   says whether an engine answers and whether it is ours
# The private dockerd runs with no bridge network and no iptables rules (--bridge=none
# --iptables=false): containers get no network of their own, image builds that need one use
# the host's (--network host), and nothing is added on the host's private address ranges.
# Its pid file and log lie in build/docker/ of this checkout. When dockerd is missing and we
# are root with apt, Debian's docker.io is installed first (a fresh machine may have only the
# docker client); otherwise one `error:` line says what to run.
set -euo pipefail
usage() { echo "usage: docker/engine.sh start|stop|status" >&2; exit 2; }
[ $# -eq 1 ] || usage
root=$(cd "$(dirname "$0")/.." && pwd)
state="$root/build/docker"
pidfile="$state/dockerd.pid"
log="$state/dockerd.log"
#: Seconds a starting dockerd gets to answer `docker info`.
wait_s=60

source "$root/docker/lib.sh"

answers() { docker info >/dev/null 2>&1; }
ours() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

start() {
  if answers; then
    ours && echo "engine: our dockerd (pid $(cat "$pidfile")) answers" >&2 \
      || echo "engine: a Docker engine answers (not started by this script; left alone)" >&2
    return 0
  fi
  ensure_command docker docker.io
  ensure_command dockerd docker.io
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: no Docker engine answers ('docker info' failed) and starting dockerd needs root; run: sudo docker/engine.sh start" >&2
    exit 2
  fi
  mkdir -p "$state"
  # setsid: the daemon outlives this script and the make or test that called it.
  setsid dockerd --bridge=none --iptables=false --ip6tables=false --pidfile "$pidfile" \
    >"$log" 2>&1 </dev/null &
  local pid=$! waited=0
  until answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "error: dockerd exited at start (log: $log: $(tail -n 1 "$log")); fix that, then run: docker/engine.sh start" >&2
      exit 2
    fi
    if [ "$waited" -ge "$wait_s" ]; then
      kill "$pid" 2>/dev/null || true
      echo "error: dockerd did not answer 'docker info' within ${wait_s}s (log: $log); stopped it; run: docker/engine.sh start" >&2
      exit 2
    fi
    sleep 1
    waited=$((waited + 1))
  done
  echo "engine: started dockerd (pid $pid, log $log) in ${waited}s" >&2
}

stop() {
  if ! ours; then
    rm -f "$pidfile"
    echo "engine: no dockerd started by this script runs; nothing stopped" >&2
    return 0
  fi
  local pid waited=0
  pid=$(cat "$pidfile")
  kill "$pid"
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$waited" -ge "$wait_s" ]; then
      echo "error: dockerd (pid $pid) did not stop within ${wait_s}s of SIGTERM; run: kill -9 $pid" >&2
      exit 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  rm -f "$pidfile"
  echo "engine: stopped dockerd (pid $pid)" >&2
}

status() {
  if ! answers; then
    echo "no engine answers"
    return 1
  fi
  ours && echo "running: our dockerd (pid $(cat "$pidfile"))" || echo "running: not started by docker/engine.sh"
}

case $1 in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac

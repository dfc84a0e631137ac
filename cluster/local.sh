#!/usr/bin/env bash
# A two-node Ray cluster on this machine, for trying `ray job submit` as on a real cluster.
#
#   cluster/local.sh up [WORKERS]   head + WORKERS worker nodes (default 1), token auth on
#   cluster/local.sh status         nodes and resources
#   cluster/local.sh down           stops every node it started
#
# Token authentication is on (RAY_AUTH_MODE=token) and the token lives in a 0600 file outside the
# repository (CARCLF_RAY_TOKEN_FILE, default ~/.config/carclf/ray_token). Nodes have distinct
# resources: the head {"head": 1}, worker i {"worker": 1, "worker_<i>": 1}, so jobs can be pinned
# and tests can see where tasks ran.
#
# Not everything stays on loopback, and Ray 2.60 has no flag for it: `ray start` turns
# --node-ip-address=127.0.0.1 into this host's reachable address (resolve_ip_for_localhost in
# ray/_private/services.py; only RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps a loopback node IP,
# and it refuses worker nodes). What listens where, seen with `ss -ltnp` on Ray 2.60:
#   127.0.0.1 only      the dashboard and job API (--dashboard-host), CARCLF_DASHBOARD_PORT
#   loopback + node IP  the Ray client server (HEAD_PORT + 7), the dashboard agent (base + 3)
#   node IP             the runtime-env agent (base + 6)
#   all interfaces      the GCS (CARCLF_HEAD_PORT), raylets, object managers, worker processes
# The token is what guards the ones outside loopback; on a machine that others can reach,
# firewall these ports as well.
#
# Its state (each node's session id, start.log and Ray temp dir) lives in a per-user directory,
# CARCLF_CLUSTER_DIR, default ${XDG_RUNTIME_DIR:-/tmp}/carclf-<uid>: created 0700, and refused
# (exit 2) when it is a symlink, not a directory, not the user's own, or open to group or
# others, since `down` kills the sessions it names. A session id is used only when it is
# digits, names a live session, and every process in that session is the user's own.
set -euo pipefail

RAY=${RAY:-"$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/ray"}
STATE=${CARCLF_CLUSTER_DIR:-${XDG_RUNTIME_DIR:-/tmp}/carclf-$(id -u)}
DEFAULT_TOKEN_DIR=$HOME/.config/carclf
TOKEN_FILE=${CARCLF_RAY_TOKEN_FILE:-$DEFAULT_TOKEN_DIR/ray_token}
HEAD_PORT=${CARCLF_HEAD_PORT:-6390}
DASHBOARD_PORT=${CARCLF_DASHBOARD_PORT:-8275}
HEAD_CPUS=${CARCLF_HEAD_CPUS:-1}
WORKER_CPUS=${CARCLF_WORKER_CPUS:-1}
# Worker processes of node i take ports WORKER_PORTS + 1000 i .. + 999; its other ports are
# HEAD_PORT + 10 i + 1..7. Pick both away from another Ray on this host (the test suite's).
WORKER_PORTS=${CARCLF_WORKER_PORTS:-20000}

export RAY_AUTH_MODE=token
# Serve's throughput-optimised mode and inline arguments up to 1 MiB, as in every Ray carclf
# starts (serve.front.SERVE_ENV).
export RAY_SERVE_THROUGHPUT_OPTIMIZED=${RAY_SERVE_THROUGHPUT_OPTIMIZED:-1}
export RAY_max_direct_call_object_size=${RAY_max_direct_call_object_size:-1048576}
# A job's entrypoint (`python -m jobs.pipeline …`) runs in the environment of the node that starts
# it: this checkout's venv comes first, as carclf would be installed in a real cluster's image.
PATH="$(dirname "$RAY"):$PATH"
export PATH
export RAY_AUTH_TOKEN_PATH="$TOKEN_FILE"

make_token() {
  local dir
  dir=$(dirname "$TOKEN_FILE")
  # Tighten only a directory that is carclf's own (this script makes it, or it is the default):
  # CARCLF_RAY_TOKEN_FILE=/tmp/x must not chmod /tmp, nor a home or project directory.
  if [ ! -d "$dir" ]; then
    mkdir -p "$dir"
    chmod 700 "$dir"
  elif [ "$dir" = "$DEFAULT_TOKEN_DIR" ]; then
    chmod 700 "$dir"
  fi
  if [ ! -s "$TOKEN_FILE" ]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' >"$TOKEN_FILE")
  fi
  chmod 600 "$TOKEN_FILE"
}

refuse() {
  echo "cluster/local.sh: $*" >&2
  exit 2
}

# The state directory, made private if it is new and checked in any case: another user who
# could write in it could plant a session id for `down` to kill or a symlink for a log to follow.
# MAKE=1 creates it; `down` only checks one that exists.
check_state() {
  local mode
  if [ "${1:-}" = make ] && [ ! -e "$STATE" ] && [ ! -L "$STATE" ]; then
    mkdir -p -- "$(dirname -- "$STATE")"
    mkdir -m 700 -- "$STATE" 2>/dev/null || true  # lost a race: what is there is checked below
  fi
  if [ -L "$STATE" ] || [ ! -d "$STATE" ]; then
    refuse "$STATE: the state directory is a symlink or not a directory; remove it or set CARCLF_CLUSTER_DIR"
  fi
  if [ "$(stat -c %u -- "$STATE")" != "$(id -u)" ]; then
    refuse "$STATE: the state directory is not yours (owner uid $(stat -c %u -- "$STATE")); set CARCLF_CLUSTER_DIR"
  fi
  mode=$(stat -c %a -- "$STATE")
  if (((8#$mode & 8#077) != 0)); then
    refuse "$STATE: the state directory is open to group or others (mode $mode); chmod 700 it"
  fi
}

# A file this script writes inside a node directory: never through a link planted there.
fresh_file() {
  if [ -L "$1" ] || { [ -e "$1" ] && [ ! -f "$1" ]; }; then
    refuse "$1: a symlink or not a regular file; remove it"
  fi
  rm -f -- "$1"
}

# The session id in file $1, printed when it names a live session of this user's own; nothing
# when that session has ended. Exit 2 for anything else: pkill -s 0 would be this shell's own
# session, 1 is init's, and a session with another user's process is not this cluster's.
session_of() {
  local sid others
  sid=$(head -c 32 -- "$1")
  if [[ ! $sid =~ ^[0-9]{1,10}$ ]] || ((10#$sid <= 1)); then
    refuse "$1: not a session id (digits, above 1): $(printf %q "$sid")"
  fi
  sid=$((10#$sid))
  if [ "$sid" = "$(ps -o sid= -p $$ | tr -d ' ')" ]; then
    refuse "$1: names this shell's own session $sid"
  fi
  if ! pgrep -s "$sid" >/dev/null; then
    return 0  # ended: nothing to stop
  fi
  others=$(comm -12 <(pgrep -s "$sid" | sort) <(pgrep -v -u "$(id -u)" | sort))
  if [ -n "$others" ]; then
    refuse "$1: session $sid has processes of another user ($(echo "$others" | head -n 3 | tr '\n' ' '))"
  fi
  echo "$sid"
}

# Each node gets its own temp dir and ports, so several raylets share one host, and its own
# session (setsid): every process Ray starts for the node stays in that session, whatever Ray
# renames it to, so `down` stops exactly this cluster.
start_node() {
  local name=$1 i=$2 base=$((HEAD_PORT + 10 * $2))
  shift 2
  if [ -L "$STATE/$name" ]; then
    refuse "$STATE/$name: a symlink; remove it"
  fi
  mkdir -p -- "$STATE/$name"
  fresh_file "$STATE/$name/start.log"
  fresh_file "$STATE/$name/sid"
  set -o noclobber  # created here, fresh: a file or link planted meanwhile is an error
  setsid "$RAY" start --node-ip-address=127.0.0.1 --temp-dir="$STATE/$name/tmp" \
    --disable-usage-stats --node-manager-port=$((base + 1)) --object-manager-port=$((base + 2)) \
    --dashboard-agent-listen-port=$((base + 3)) --dashboard-agent-grpc-port=$((base + 4)) \
    --metrics-export-port=$((base + 5)) --runtime-env-agent-port=$((base + 6)) \
    --min-worker-port=$((WORKER_PORTS + 1000 * i)) --max-worker-port=$((WORKER_PORTS + 1000 * i + 999)) \
    "$@" >"$STATE/$name/start.log" 2>&1 &
  echo $! >"$STATE/$name/sid"
  set +o noclobber
  wait $! || { cat "$STATE/$name/start.log" >&2; exit 1; }
}

up() {
  local workers=${1:-1}
  if [[ ! $workers =~ ^[0-9]{1,2}$ ]]; then
    refuse "WORKERS must be a number of worker nodes, not $(printf %q "$workers")"
  fi
  check_state make  # before the token and before any Ray starts
  make_token
  start_node head 0 --head --port="$HEAD_PORT" --dashboard-host=127.0.0.1 \
    --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port=$((HEAD_PORT + 7)) \
    --num-cpus="$HEAD_CPUS" --resources='{"head": 1}'
  for i in $(seq 1 "$workers"); do
    start_node "worker$i" "$i" --address="127.0.0.1:$HEAD_PORT" --num-cpus="$WORKER_CPUS" \
      --resources="{\"worker\": 1, \"worker_$i\": 1}"
  done
  cat <<MSG
Ray cluster up: head + $workers worker node(s), token auth on.
  dashboard:      http://127.0.0.1:$DASHBOARD_PORT
  job submission: export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
                  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN_FILE
                  ray job submit --working-dir . -- python -m jobs.pipeline --config jobs/configs/demo.yaml
  stop:           cluster/local.sh down
MSG
}

down() {
  # Not `ray stop`: it would stop every Ray on this host, another user's or a test's too.
  # Idempotent: nothing running (or no state at all) is success, not an error.
  local f signal sid sids=()
  if [ ! -e "$STATE" ] && [ ! -L "$STATE" ]; then
    echo "Ray cluster down."
    return 0
  fi
  check_state
  # Every session id is checked before any is signalled.
  for f in "$STATE"/*/sid; do
    if [ -L "$f" ] || [ -f "$f" ]; then
      if [ -L "$f" ]; then
        refuse "$f: a symlink, not a session id file"
      fi
      sid=$(session_of "$f")
      if [ -n "$sid" ]; then
        sids+=("$sid")
      fi
    fi
  done
  for signal in TERM KILL; do
    for sid in "${sids[@]}"; do
      pkill "-$signal" -s "$sid" -u "$(id -u)" 2>/dev/null || true  # 1: none left in it
    done
    if [ "$signal" = TERM ] && ((${#sids[@]} > 0)); then
      sleep 2
    fi
  done
  # Only the node directories this script made, in case CARCLF_CLUSTER_DIR holds other files.
  for f in "$STATE"/head "$STATE"/worker[0-9]*; do
    if [ -d "$f" ]; then
      rm -rf "$f"
    fi
  done
  if [ -d "$STATE" ]; then
    rmdir --ignore-fail-on-non-empty "$STATE"
  fi
  echo "Ray cluster down."
}

status() {
  "$RAY" status --address="127.0.0.1:$HEAD_PORT"
}

main() {
  case "${1:-}" in
    up) up "${2:-1}" ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up [WORKERS] | status | down" >&2; exit 2 ;;
  esac
}

# Sourced (tests call make_token and down on their own), only the functions are defined.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi

#!/usr/bin/env bash
# A Berth cluster of real processes on this machine: 3 metadata nodes, 3 storage nodes and
# 2 frontends on free loopback ports, with their data under DIR. Every process also serves its
# probes and metrics (/healthz, /readyz, /metrics) on a port of its own.
#
#   deploy/local/cluster.sh up DIR     start it, wait until it serves, print the frontends' URLs
#                                      and an administrator token, write DIR/cluster.env
#   deploy/local/cluster.sh down DIR   stop the processes `up` started (SIGTERM, then SIGKILL)
#
# DIR/cluster.env (shell syntax) holds BERTH_FRONTENDS (space-separated URLs),
# BERTH_ADMIN_USER, BERTH_ADMIN_TOKEN, and for each process BERTH_PID_<ROLE>_<N>,
# BERTH_CMD_<ROLE>_<N> (the command line that restarts it on its own data, in the foreground)
# and BERTH_HTTP_<ROLE>_<N> (the URL of its probes and metrics).
# The berth binary is $BERTH_BIN, or built with cargo (release) from this checkout.
set -euo pipefail

usage() { echo "usage: $0 up|down DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)

down() {
  [ -f "$dir/cluster.env" ] || { echo "no cluster.env in $dir" >&2; exit 1; }
  # shellcheck disable=SC1091
  . "$dir/cluster.env"
  pids=()
  for v in $(compgen -v BERTH_PID_); do pids+=("${!v}"); done
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 1 100); do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive -eq 0 ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  echo "stopped ${#pids[@]} processes"
}

if [ "$action" = down ]; then down; exit 0; fi
[ "$action" = up ] || usage
if [ -f "$dir/cluster.env" ]; then
  # shellcheck disable=SC1091
  . "$dir/cluster.env"
  for v in $(compgen -v BERTH_PID_); do
    if kill -0 "${!v}" 2>/dev/null; then echo "a cluster is already running from $dir (pid ${!v}); run down first" >&2; exit 1; fi
  done
fi

repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=deploy/berth-bin.sh
. "$repo/deploy/berth-bin.sh"

# Free loopback ports, all taken at once so that none is handed out twice.
read -r -a ports <<<"$(python3 - <<'PY'
import socket
socks = []
for _ in range(16):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks: s.close()
PY
)"
meta_addrs=(); for i in 0 1 2; do meta_addrs+=("127.0.0.1:${ports[$i]}"); done
storage_addrs=(); for i in 3 4 5; do storage_addrs+=("127.0.0.1:${ports[$i]}"); done
front_addrs=(); for i in 6 7; do front_addrs+=("127.0.0.1:${ports[$i]}"); done
# Ports 8 to 15: each process's probes and metrics, in the order the processes start.
http_next=8
meta_list=$(IFS=,; echo "${meta_addrs[*]}")
storage_list=$(IFS=,; echo "${storage_addrs[*]}")
admin_user=admin
admin_token=berth_cluster_$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')

# Eight processes share this machine's cores: one worker thread each (BERTH_THREADS to
# change it) spares them preempting one another; on a 2-core machine this serves manifest
# GETs about a quarter faster than a thread per core in every process.
threads=${BERTH_THREADS:-1}
mkdir -p "$dir/logs"
env_file=$dir/cluster.env.new
: >"$env_file"
# A start that fails part way stops what it started: nothing is left running without the
# cluster.env that `down` reads.
started=()
abandon() {
  for p in "${started[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}
trap abandon EXIT
start() { # ROLE N ARGS...
  local role=$1 n=$2; shift 2
  local upper; upper=$(echo "$role" | tr '[:lower:]' '[:upper:]')
  local http="127.0.0.1:${ports[$http_next]}"; http_next=$((http_next + 1))
  set -- "$1" --http-listen "$http" "${@:2}"
  setsid nohup "$bin" --threads "$threads" "$@" >"$dir/logs/$role$n.log" 2>&1 </dev/null &
  local pid=$!
  started+=("$pid")
  printf 'BERTH_PID_%s_%s=%s\n' "$upper" "$n" "$pid" >>"$env_file"
  printf 'BERTH_CMD_%s_%s=%q\n' "$upper" "$n" "$(printf '%q ' "$bin" --threads "$threads" "$@")" >>"$env_file"
  printf 'BERTH_HTTP_%s_%s=%q\n' "$upper" "$n" "http://$http" >>"$env_file"
}
wait_port() { # HOST:PORT
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on $1; see $dir/logs" >&2; exit 1
}

for i in 1 2 3; do
  start meta "$i" meta --id "$i" --listen "${meta_addrs[$((i-1))]}" --data-dir "$dir/meta$i"
done
for a in "${meta_addrs[@]}"; do wait_port "$a"; done
members=$(for i in 1 2 3; do printf '%s=%s,' "$i" "${meta_addrs[$((i-1))]}"; done); members=${members%,}
"$bin" admin cluster --meta "$members" init >/dev/null
for i in 1 2 3; do
  start storage "$i" storage --listen "${storage_addrs[$((i-1))]}" --meta "$meta_list" --data-dir "$dir/storage$i"
done
for a in "${storage_addrs[@]}"; do wait_port "$a"; done
# The frontends place blobs on the storage nodes registered with the metadata group: start
# them once all three have registered, so that the first pushes find every blob's owners.
registered=0
for _ in $(seq 1 200); do
  registered=$("$bin" admin cluster --meta "$meta_list" storage 2>/dev/null \
    | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["nodes"]))' 2>/dev/null || echo 0)
  [ "$registered" -ge 3 ] && break
  sleep 0.1
done
[ "$registered" -ge 3 ] || { echo "only $registered storage nodes registered; see $dir/logs" >&2; exit 1; }
for i in 1 2; do
  start frontend "$i" frontend --listen "${front_addrs[$((i-1))]}" --meta "$meta_list" \
    --name "frontend-$i" --bootstrap-admin "$admin_user:$admin_token"
done
urls=()
for a in "${front_addrs[@]}"; do
  wait_port "$a"
  # Serving: the API answers (401 asks for credentials).
  for _ in $(seq 1 200); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://$a/v2/" || true)
    [ "$code" = 401 ] && break
    sleep 0.05
  done
  urls+=("http://$a")
done
{
  printf 'BERTH_FRONTENDS=%q\n' "${urls[*]}"
  printf 'BERTH_ADMIN_USER=%q\n' "$admin_user"
  printf 'BERTH_ADMIN_TOKEN=%q\n' "$admin_token"
  printf 'BERTH_META=%q\n' "$meta_list"
  printf 'BERTH_STORAGE=%q\n' "$storage_list"
} >>"$env_file"
mv "$env_file" "$dir/cluster.env"
trap - EXIT
echo "berth cluster: 3 metadata, 3 storage, 2 frontend processes; data and logs in $dir"
for u in "${urls[@]}"; do echo "frontend: $u"; done
echo "administrator: $admin_user, token: $admin_token"
echo "environment: $dir/cluster.env"

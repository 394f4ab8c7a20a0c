#!/usr/bin/env bash
# Where a 3/3/2 cluster's work goes: one berth-loadtest scenario against a fresh cluster
# (deploy/local/cluster.sh), and for each process the CPU time, context switches and threads
# it spent per operation, then the gRPC calls each role served and the Raft proposals and
# commands per operation (from the processes' /metrics). A tool for finding what to make
# cheaper, not a benchmark of record (that is bench.sh): it runs no reference.
#
# Usage: loadtest/cluster-costs.sh [SCENARIO [berth-loadtest flags...]]
#        (default push-images; e.g. loadtest/cluster-costs.sh pull-images --images 200)
# An operation is the scenario's unit: images for push-images, pull-images and mixed,
# otherwise the first rate berth-loadtest reports. A warm-up run of the same scenario goes
# first (WARMUP=0 skips it). BERTH_THREADS applies as for cluster.sh. Builds the release
# binaries first, as bench.sh does. Linux only (reads /proc).
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=${1:-push-images}
[ $# -gt 0 ] && shift
cargo build --release --workspace --quiet
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release"

work=$(mktemp -d "${BENCH_DIR:-$PWD}/.costs.XXXXXX")
cleanup() {
  deploy/local/cluster.sh down "$work/cluster" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
BERTH_BIN="$target/berth" deploy/local/cluster.sh up "$work/cluster" >/dev/null
# shellcheck disable=SC1091
. "$work/cluster/cluster.env"

load() {
  "$target/berth-loadtest" "$scenario" --quiet --url "$(echo "$BERTH_FRONTENDS" | tr ' ' ',')" \
    --username "$BERTH_ADMIN_USER" --token "$BERTH_ADMIN_TOKEN" "$@"
}
# One line per process: NAME CPU_TICKS CONTEXT_SWITCHES THREADS, then its metrics' counters.
snapshot() {
  for v in $(compgen -v BERTH_PID_ | sort); do
    local pid=${!v} name=${v#BERTH_PID_} switches=0 s
    for t in /proc/"$pid"/task/*; do
      s=$(awk '/ctxt_switches/ {n += $2} END {print n + 0}' "$t/status" 2>/dev/null || echo 0)
      switches=$((switches + s))
    done
    echo "proc $name $(awk '{print $14 + $15}' /proc/"$pid"/stat) $switches $(find /proc/"$pid"/task -mindepth 1 -maxdepth 1 | wc -l)"
    local http="BERTH_HTTP_$name"
    curl -fsS "${!http}/metrics" 2>/dev/null \
      | grep -E '^(berth_grpc_requests_total|berth_raft_proposals_total|berth_raft_commands_total)' \
      | sed "s/^/metric $name /" || true
  done
}

[ "${WARMUP:-1}" = 0 ] || load "$@" >/dev/null
snapshot >"$work/before"
load --json "$work/run.json" "$@"
snapshot >"$work/after"
python3 - "$work/before" "$work/after" "$work/run.json" "$(getconf CLK_TCK)" <<'PY'
import collections, json, sys

def read(path):
    procs, metrics = {}, collections.defaultdict(float)
    for line in open(path):
        kind, rest = line.split(" ", 1)
        if kind == "proc":
            name, ticks, switches, threads = rest.split()
            procs[name] = (int(ticks), int(switches), int(threads))
        else:
            name, series = rest.split(" ", 1)
            key, value = series.rsplit(" ", 1)
            metrics[(name.split("_")[0], key)] += float(value)
    return procs, metrics

(p0, m0), (p1, m1) = read(sys.argv[1]), read(sys.argv[2])
result = json.load(open(sys.argv[3]))[0][0]
rates, seconds = result["rates"], result["seconds"]
unit = "images/s" if "images/s" in rates else next(k for k in rates if k != "MB/s")
ops = rates[unit] * seconds
tick_ms = 1000 / int(sys.argv[4])
name = unit.split("/")[0].rstrip("s")
print(f"\n{result['scenario']}: {ops:.0f} {unit.split('/')[0]} in {seconds:.1f} s ({rates[unit]:.1f} {unit}); per {name}:")
print(f"{'process':<12} {'CPU ms':>8} {'switches':>9} {'threads':>8}")
total = 0.0
for proc in sorted(p1):
    cpu = (p1[proc][0] - p0[proc][0]) * tick_ms / ops
    total += cpu
    print(f"{proc:<12} {cpu:8.2f} {(p1[proc][1] - p0[proc][1]) / ops:9.1f} {p1[proc][2]:8d}")
print(f"{'all':<12} {total:8.2f}")
print(f"\ncalls served and Raft work, per {name}:")
for (role, key) in sorted(m1):
    n = (m1[(role, key)] - m0.get((role, key), 0)) / ops
    if n >= 0.005:
        print(f"{role.lower():<9} {n:7.2f}  {key.replace('berth_grpc_requests_total', 'grpc')}")
PY

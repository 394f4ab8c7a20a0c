#!/usr/bin/env bash
# The benchmark of record: the CNCF distribution registry (Debian's docker-registry, 2.8) and
# `berth standalone`, side by side on loopback with data on the same disk, every scenario of
# berth-loadtest run against both with --compare (Berth first, so ratios read Berth ÷ reference);
# then the same against a 3/3/2 cluster of Berth processes (deploy/local/cluster.sh; CLUSTER=0
# skips it). Each table gives, besides rates and latencies, the CPU time the registry's
# processes (the cluster's eight together) and the load tool spent per operation in the timed
# parts: steadier than throughput on a shared machine, and a measure of how much of it each
# operation takes.
#
# Usage: loadtest/bench.sh [extra berth-loadtest flags...]   (e.g. --images 100 --duration 5)
# Needs: docker-registry (apt). Builds the release binaries first (set CARGO_TARGET_DIR as for
# the tests, e.g. ~/.cache/berth-target, to share their build).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
# Always build (a no-op when up to date), so the benchmark never runs stale binaries, and ask
# cargo where they are: CARGO_TARGET_DIR, a config file or ./target, whichever applies.
cargo build --release --workspace --quiet
target=$(release_dir)
command -v docker-registry >/dev/null || { echo "docker-registry is not installed (apt-get install docker-registry)"; exit 1; }

work=$(mktemp -d "${BENCH_DIR:-$PWD}/.bench.XXXXXX")
pids=()
# BENCH_KEEP=1 keeps the work directory (the registries' data and the cluster's logs).
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
  if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

ref_port=${REF_PORT:-5101}
berth_port=${BERTH_PORT:-5102}
cat > "$work/registry.yml" <<YAML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/reference
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$ref_port
validation:
  manifests:
    urls:
      allow: ['^https?://']
YAML
docker-registry serve "$work/registry.yml" >"$work/reference.log" 2>&1 &
ref_pid=$!; pids+=("$ref_pid")
# Berth authenticates every request (Docker token auth); the reference runs without auth.
bench_token="berth-bench-token-$$"
BERTH_LOG=warn "$target/berth" standalone --listen "127.0.0.1:$berth_port" --data-dir "$work/berth" \
  --bootstrap-admin "bench:$bench_token" >"$work/berth.log" 2>&1 &
berth_pid=$!; pids+=("$berth_pid")
for port in "$ref_port" "$berth_port"; do
  for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$port/v2/" && break; sleep 0.1; done
done

echo "reference: docker-registry $(docker-registry --version 2>/dev/null | awk '{print $NF}') pid $ref_pid, berth pid $berth_pid, data under $work"
"$target/berth-loadtest" limits --dir "$work" --quiet
echo "== standalone ÷ reference =="
"$target/berth-loadtest" "${SCENARIO:-all}" --quiet \
  --url "http://127.0.0.1:$berth_port" --pid "$berth_pid" --username bench --token "$bench_token" \
  --compare "http://127.0.0.1:$ref_port" --compare-pid "$ref_pid" \
  --json "${BENCH_JSON:-/dev/null}" "$@"

# The cluster row: a 3 metadata / 3 storage / 2 frontend cluster of processes on this machine
# (three fsynced copies of every blob on the one disk), its frontends sharing the load.
[ "${CLUSTER:-1}" = 0 ] && exit 0
kill "$berth_pid"
BERTH_BIN="$target/berth" deploy/local/cluster.sh up "$work/cluster" >/dev/null
cluster_down() { deploy/local/cluster.sh down "$work/cluster" >/dev/null || true; cleanup; }
trap cluster_down EXIT
# shellcheck disable=SC1091
. "$work/cluster/cluster.env"
# The cluster's CPU time is that of its eight processes together; its peak RSS, the sum of
# each one's peak.
cluster_pids=$(cluster_pids) || { echo "no BERTH_PID_* in $work/cluster/cluster.env" >&2; exit 1; }
echo "== cluster ÷ reference =="
"$target/berth-loadtest" "${SCENARIO:-all}" --quiet \
  --url "$(echo "$BERTH_FRONTENDS" | tr ' ' ',')" --username "$BERTH_ADMIN_USER" --token "$BERTH_ADMIN_TOKEN" \
  --pid "$cluster_pids" \
  --compare "http://127.0.0.1:$ref_port" --compare-pid "$ref_pid" \
  --json "${BENCH_CLUSTER_JSON:-/dev/null}" "$@"

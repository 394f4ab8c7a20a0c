#!/usr/bin/env bash
# Where a 3/3/2 cluster's work goes: one berth-loadtest scenario against a fresh cluster
# (deploy/local/cluster.sh), and for each process the CPU time, context switches and threads
# it spent per operation, then the gRPC calls each role served and the Raft proposals and
# commands per operation (from the processes' /metrics). A tool for finding what to make
# cheaper, not a benchmark of record (that is bench.sh): it runs no reference.
#
# Usage: loadtest/cluster-costs.sh [SCENARIO [berth-loadtest flags...]]
#        (e.g. loadtest/cluster-costs.sh pull-images --images 400)
# SCENARIO is one of berth-loadtest's (default push-images); the counts cover only its timed
# part (berth-loadtest --measure-hook runs this script to take them), not the pushes a pull
# scenario makes first. An operation is an image (push-images, pull-images), a request
# (manifest-get), an operation (mixed) or a MB (push-large, push-chunked, pull-large). A
# warm-up run of the same scenario goes first (WARMUP=0 skips it). Context switches are
# counted over the threads alive at both ends of the timed part (the blocking pool's idle
# threads exit after a while, taking their counts with them); CPU time covers every thread.
# BERTH_THREADS applies as for cluster.sh. Builds the release binaries first, as bench.sh
# does. Linux only (reads /proc).
# PROFILE=1 also samples every CPU through the timed part (perf record -a -e cpu-clock; needs
# perf, and root or kernel.perf_event_paranoid -1) and says where the machine's time went:
# each process's share of all samples (the load tool's, the kernel's own threads' and idle
# time's too, idle including interrupts taken while idle), how much of it was in the kernel
# and under which system calls (or network softirqs, page faults), and its hottest functions.
# The samples are kept in the work directory for perf report (the cluster's data is not).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh

# Per process of the cluster whose cluster.env is in $1: a line `proc NAME CPU_TICKS THREADS`,
# a line `thread NAME TID SWITCHES` per thread, then its metrics' counters as
# `metric NAME SERIES VALUE`.
snapshot() {
  # shellcheck disable=SC1091
  . "$1/cluster.env"
  for v in $(compgen -v BERTH_PID_ | sort); do
    local pid=${!v} name=${v#BERTH_PID_} t s
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "${name,,} (pid $pid) is not running; see $1/logs" >&2
      exit 1
    fi
    echo "proc $name $(awk '{print $14 + $15}' /proc/"$pid"/stat) $(find /proc/"$pid"/task -mindepth 1 -maxdepth 1 | wc -l)"
    for t in /proc/"$pid"/task/*; do
      s=$(awk '/ctxt_switches/ {n += $2} END {print n + 0}' "$t/status" 2>/dev/null) || s=
      if [ -n "$s" ]; then echo "thread $name ${t##*/} $s"; fi
    done
    local http="BERTH_HTTP_$name"
    curl -fsS "${!http}/metrics" 2>/dev/null \
      | grep -E '^(berth_grpc_requests_total|berth_raft_proposals_total|berth_raft_commands_total)' \
      | sed "s/^/metric $name /" || true
  done
}
# Stops the perf record that `--snapshot begin` started, if one runs, and waits for it to
# finish writing its samples (bounded: perf takes a while to write a busy machine's).
stop_perf() {
  local pidfile=$1/perf.pid pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  rm -f "$pidfile"
  kill -INT "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  echo "perf record (pid $pid) did not stop within a minute" >&2
}
# As berth-loadtest's --measure-hook: `cluster-costs.sh --snapshot begin|end`, with the work
# directory in COSTS_WORK.
if [ "${1:-}" = --snapshot ]; then
  if [ "$2" = begin ] && [ "${PROFILE:-0}" = 1 ]; then
    # The load tool is the hook's parent, or its shell's.
    tool=$PPID
    [ "$(cat /proc/$tool/comm)" = berth-loadtest ] || tool=$(awk '{print $4}' /proc/$tool/stat)
    echo "$tool" >"$COSTS_WORK/tool.pid"
    # cpu-clock samples time, so idle CPUs are sampled too (cycles stop when a CPU halts).
    perf record -a -g -e cpu-clock -F 999 -o "$COSTS_WORK/perf.data" >"$COSTS_WORK/perf.log" 2>&1 &
    echo $! >"$COSTS_WORK/perf.pid"
    # perf samples once it has opened its events and read every process's maps; its log
    # says so only at the end, so this waits a second and checks it is still there.
    sleep 1
    if ! kill -0 "$(cat "$COSTS_WORK/perf.pid")" 2>/dev/null; then
      echo "perf record failed (it needs root, or kernel.perf_event_paranoid -1):" >&2
      cat "$COSTS_WORK/perf.log" >&2
      rm -f "$COSTS_WORK/perf.pid"
      exit 1
    fi
  fi
  snapshot "$COSTS_WORK/cluster" >"$COSTS_WORK/$2"
  if [ "$2" = end ]; then stop_perf "$COSTS_WORK"; fi
  exit 0
fi

scenario=${1:-push-images}
[ $# -gt 0 ] && shift
case $scenario in
  push-images | pull-images | manifest-get | mixed | push-large | push-chunked | pull-large) ;;
  *) echo "cluster-costs.sh measures one scenario of berth-loadtest, not $scenario" >&2; exit 2 ;;
esac
# One timed part against the cluster: the snapshots bracket one part, and the counts are
# divided by that part's operations.
for a in "$@"; do
  case $a in
    --rounds* | --compare*) echo "cluster-costs.sh measures one round against the cluster only (no $a)" >&2; exit 2 ;;
  esac
done
if [ "${PROFILE:-0}" = 1 ] && ! command -v perf >/dev/null; then
  echo "PROFILE=1 needs perf (apt-get install linux-perf)" >&2
  exit 2
fi
cargo build --release --workspace --quiet
target=$(release_dir)

work=$(mktemp -d "${BENCH_DIR:-$PWD}/.costs.XXXXXX")
cleanup() {
  local rc=$?
  # A timed part that failed, or a run cut short, never reached `--snapshot end`.
  stop_perf "$work"
  deploy/local/cluster.sh down "$work/cluster" >/dev/null 2>&1 || true
  if [ "$rc" = 0 ] && [ ! -f "$work/perf.data" ]; then
    rm -rf "$work"
  elif [ "$rc" = 0 ]; then
    # The samples are what is worth keeping, not the blobs the run pushed.
    rm -rf "$work/cluster"
    echo "kept the samples: perf report -i $work/perf.data" >&2
  else
    echo "kept $work (the cluster's logs are in cluster/logs)" >&2
  fi
}
trap cleanup EXIT
# Interrupted, it still stops what it started (bash runs the EXIT trap on `exit`, not when a
# signal kills it).
trap 'exit 130' INT
trap 'exit 143' TERM
BERTH_BIN="$target/berth" deploy/local/cluster.sh up "$work/cluster" >/dev/null
# shellcheck disable=SC1091
. "$work/cluster/cluster.env"

load() {
  "$target/berth-loadtest" "$scenario" --quiet --url "$(echo "$BERTH_FRONTENDS" | tr ' ' ',')" \
    --username "$BERTH_ADMIN_USER" --token "$BERTH_ADMIN_TOKEN" "$@"
}
[ "${WARMUP:-1}" = 0 ] || load "$@" >/dev/null
# berth-loadtest runs the hook from here, the checkout's root.
export COSTS_WORK=$work
load --json "$work/run.json" --measure-hook "loadtest/cluster-costs.sh --snapshot" "$@"
python3 - "$work/begin" "$work/end" "$work/run.json" "$(getconf CLK_TCK)" <<'PY'
import collections, json, sys

def read(path):
    procs, threads, metrics = {}, {}, collections.defaultdict(float)
    for line in open(path):
        kind, rest = line.split(" ", 1)
        if kind == "proc":
            name, ticks, count = rest.split()
            procs[name] = (int(ticks), int(count))
        elif kind == "thread":
            name, tid, switches = rest.split()
            threads[(name, tid)] = int(switches)
        else:
            name, series = rest.split(" ", 1)
            key, value = series.rsplit(" ", 1)
            metrics[(name.split("_")[0], key)] += float(value)
    return procs, threads, metrics

(p0, t0, m0), (p1, t1, m1) = read(sys.argv[1]), read(sys.argv[2])
result = json.load(open(sys.argv[3]))[0][0]
rates, seconds = result["rates"], result["seconds"]
unit = next(u for u in ("images/s", "requests/s", "operations/s", "MB/s") if u in rates)
ops = rates.get(unit, 0) * seconds
if ops <= 0 or result.get("errors", 0) > 0:
    sys.exit(f"the run did nothing to measure by: {ops:.0f} {unit.split('/')[0]}, {result.get('errors', 0)} errors")
tick_ms = 1000 / int(sys.argv[4])
name = {"images/s": "image", "requests/s": "request", "operations/s": "operation", "MB/s": "MB"}[unit]
print(f"\n{result['scenario']}: {ops:.0f} {unit.split('/')[0]} in {seconds:.1f} s ({rates[unit]:.1f} {unit}); per {name}:")
print(f"{'process':<12} {'CPU ms':>8} {'switches':>9} {'threads':>8}")
total = 0.0
for proc in sorted(p1):
    cpu = (p1[proc][0] - p0[proc][0]) * tick_ms / ops
    switches = sum(n - t0[k] for k, n in t1.items() if k[0] == proc and k in t0) / ops
    total += cpu
    print(f"{proc:<12} {cpu:8.2f} {switches:9.1f} {p1[proc][1]:8d}")
print(f"{'all':<12} {total:8.2f}")
print(f"\ncalls served and Raft work, per {name}:")
for (role, key) in sorted(m1):
    n = (m1[(role, key)] - m0.get((role, key), 0)) / ops
    if n >= 0.005:
        print(f"{role.lower():<9} {n:7.2f}  {key.replace('berth_grpc_requests_total', 'grpc')}")
PY
[ -f "$work/perf.data" ] || exit 0
# Each sample as: pid, thread name, whether it was taken in the kernel, the system call (or
# softirq, page fault, interrupt) it was under, and the function it was in.
perf script -i "$work/perf.data" -F comm,pid,ip,sym 2>"$work/perf-script.log" | awk '
  /^[^\t]/ {
    if (pid != "") emit()
    comm = $1; pid = ""; n = 0; under = ""; leaf = "?"; kernel = 0
    for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) { pid = $i; break }
    next
  }
  NF >= 2 {
    n++
    if (under == "" && $2 ~ /^(__x64_sys_|handle_softirqs$|__do_softirq$|asm_exc_page_fault$|asm_common_interrupt$|asm_sysvec_)/) under = $2
    if (n == 1) { kernel = ($1 ~ /^ffff/); sub(/^[ \t]*[0-9a-f]+ /, ""); leaf = $0 }
  }
  function emit() { print pid, comm, kernel, (under == "" ? "elsewhere" : under), leaf }
  END { if (pid != "") emit() }' >"$work/samples" || {
  echo "perf script failed:" >&2
  cat "$work/perf-script.log" >&2
  exit 1
}
# The cluster's processes as PID=NAME, from the cluster.env sourced above.
procs=()
for v in $(compgen -v BERTH_PID_); do procs+=("${!v}=${v#BERTH_PID_}"); done
python3 - "$work/samples" "$(cat "$work/tool.pid")" "${procs[@]}" <<'PY'
import collections, re, sys

names = {"0": "idle", sys.argv[2]: "load tool"}
names.update(dict(p.lower().split("=", 1) for p in sys.argv[3:]))
# The kernel's own threads, by name (perf gives each sample's thread name).
KERNEL_THREADS = re.compile(r"(kworker|ksoftirqd|kswapd|kcompactd|khugepaged|kdamond|jbd2|rcu|migration|irq/|kthreadd|kblockd|writeback|ext4|scsi|nvme|virtio)")
total = collections.Counter()
kernel = collections.Counter()
under = collections.defaultdict(collections.Counter)
hot = collections.defaultdict(collections.Counter)
for line in open(sys.argv[1]):
    pid, comm, in_kernel, call, leaf = line.rstrip("\n").split(" ", 4)
    who = names.get(pid) or ("kernel threads" if KERNEL_THREADS.match(comm) else "other")
    total[who] += 1
    if in_kernel == "1":
        kernel[who] += 1
        under[who][call.replace("__x64_sys_", "")] += 1
    hot[who][leaf] += 1
n = sum(total.values())
if n == 0:
    sys.exit("perf took no samples (see perf.log in the work directory)")
print(f"\nwhere the machine's time went ({n} samples of every CPU):")
print(f"{'process':<14} {'share':>6} {'kernel':>7}  kernel time under (share of the process)")
for who, k in total.most_common():
    calls = ", ".join(f"{c} {100 * m / k:.0f}%" for c, m in under[who].most_common(4))
    print(f"{who:<14} {100 * k / n:5.1f}% {100 * kernel[who] / k:6.0f}%  {calls}")
print("\nhottest functions (share of the process):")
for who, k in total.most_common():
    if who == "idle":
        continue
    print(f"{who:<14} " + ", ".join(f"{f[:48]} {100 * m / k:.1f}%" for f, m in hot[who].most_common(5)))
PY

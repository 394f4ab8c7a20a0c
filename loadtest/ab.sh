#!/usr/bin/env bash
# Before/after numbers for a change to Berth: two or more builds of `berth` (or one build run
# under different environment variables) measured against fresh 3/3/2 clusters
# (deploy/local/cluster.sh) in interleaved rounds, each round in a rotated order, so that the
# drift of a shared machine's speed falls on every variant alike. A tool for judging a change,
# not a benchmark of record (that is bench.sh): it runs no reference.
#
# Usage: loadtest/ab.sh [--rounds N] [--scenario S] LABEL=BINARY[,VAR=VALUE...] ... [-- FLAGS]
#   e.g. loadtest/ab.sh --rounds 6 before=/tmp/berth.before after=target/release/berth
#        loadtest/ab.sh one=target/release/berth two=target/release/berth,BERTH_THREADS=2
#        loadtest/ab.sh a=/tmp/berth.a b=/tmp/berth.b -- --images 400 --workers 64
# VAR=VALUE pairs are set for cluster.sh and so for all eight processes of that variant's
# clusters; a value cannot hold a comma. FLAGS go to berth-loadtest and replace the default,
# --images 800; a run is one timed part against one fresh cluster, so --rounds and --compare
# are refused there (give --rounds to ab.sh). There is no warm-up run: every variant is
# measured from a cold start alike, so figures are comparable between variants, not with
# cluster-costs.sh's. Give a number of rounds that is a multiple of the number of variants
# for each variant to run first equally often.
# Each run prints its round, label, rate and the cluster's CPU milliseconds per operation
# (berth-loadtest's server_cpu_ms: the eight processes' user and system time over the timed
# part); the summary gives each label's medians and, for every label after the first, its
# paired difference from the first label in the same round (mean, and in how many rounds it
# was lower). CPU per operation moves far less between runs than throughput does on a shared
# machine. A run with errors, or whose processes' CPU could not be read, stops the script.
# Builds berth-loadtest (release) first; the binaries compared are taken as given (a relative
# path from the directory the script is started in).
set -euo pipefail
started_in=$PWD
cd "$(dirname "$0")/.."
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh

rounds=4
scenario=push-images
variants=()
flags=()
usage() {
  echo "ab.sh: $1 (see the usage at the top of loadtest/ab.sh)" >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case $1 in
    --rounds | --scenario)
      [ $# -ge 2 ] || usage "$1 takes a value"
      if [ "$1" = --rounds ]; then rounds=$2; else scenario=$2; fi
      shift 2
      ;;
    --) shift; flags=("$@"); break ;;
    -*) usage "unknown option $1" ;;
    *=*) variants+=("$1"); shift ;;
    *) usage "unexpected argument $1" ;;
  esac
done
for a in "${flags[@]}"; do
  case $a in
    --rounds* | --compare*) usage "a run is one timed part against one cluster: no $a among berth-loadtest's flags" ;;
    --url* | --pid* | --json* | --username* | --token*) usage "ab.sh sets $a itself" ;;
  esac
done
# The operation a scenario's rate and CPU are counted in.
case $scenario in
  push-images | pull-images) op=images per=image ;;
  manifest-get) op=requests per=request ;;
  mixed) op=operations per=operation ;;
  push-large | push-chunked | pull-large) op=MB per=MB ;;
  *) echo "ab.sh measures one scenario of berth-loadtest, not $scenario" >&2; exit 2 ;;
esac
if [ ${#variants[@]} -lt 2 ]; then
  echo "ab.sh compares two variants or more: LABEL=BINARY[,VAR=VALUE...]" >&2
  exit 2
fi
if ! [[ $rounds =~ ^[1-9][0-9]*$ ]]; then
  echo "ab.sh: --rounds takes a positive number, not $rounds" >&2
  exit 2
fi
[ ${#flags[@]} -gt 0 ] || flags=(--images 800)
labels=()
for i in "${!variants[@]}"; do
  v=${variants[$i]}
  label=${v%%=*} spec=${v#*=}
  bin=${spec%%,*}
  [[ $label =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] || usage "a label is letters, digits, '.', '_' or '-', not '$label'"
  [[ $bin = /* ]] || bin="$started_in/$bin"
  [ -f "$bin" ] && [ -x "$bin" ] || usage "$bin (of $label) is not an executable"
  if [ "$spec" != "${spec%%,*}" ]; then
    IFS=, read -r -a pairs <<<"${spec#*,}"
    for pair in "${pairs[@]}"; do
      [[ $pair =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage "$label's environment is VAR=VALUE pairs, not '$pair'"
    done
  fi
  for l in "${labels[@]}"; do
    [ "$l" != "$label" ] || usage "label $label given twice"
  done
  labels+=("$label")
  # Kept with the binary's absolute path.
  variants[$i]="$label=$bin${spec#"${spec%%,*}"}"
done

cargo build --release -p berth-loadtest --quiet
target=$(release_dir)

work=$(mktemp -d "${BENCH_DIR:-$PWD}/.ab.XXXXXX")
cluster=
cleanup() {
  local rc=$?
  if [ -n "$cluster" ]; then deploy/local/cluster.sh down "$cluster" >/dev/null 2>&1 || true; fi
  if [ "$rc" = 0 ]; then rm -rf "$work"; else echo "kept $work" >&2; fi
}
trap cleanup EXIT

n=${#variants[@]}
for r in $(seq 1 "$rounds"); do
  for k in $(seq 0 $((n - 1))); do
    v=${variants[$(((k + r - 1) % n))]}
    label=${v%%=*} spec=${v#*=}
    bin=${spec%%,*} env=()
    if [ "$spec" != "$bin" ]; then IFS=, read -r -a env <<<"${spec#*,}"; fi
    cluster="$work/cluster-$label-$r"
    if ! env "${env[@]}" BERTH_BIN="$bin" deploy/local/cluster.sh up "$cluster" >"$work/up-$label-$r.log" 2>&1; then
      echo "ab.sh: the cluster of $label did not start (round $r); see $work/up-$label-$r.log" >&2
      exit 1
    fi
    # shellcheck disable=SC1091
    . "$cluster/cluster.env"
    pids=$(cluster_pids) || { echo "ab.sh: no BERTH_PID_* in $cluster/cluster.env" >&2; exit 1; }
    out="$work/$label-$r.json"
    if ! "$target/berth-loadtest" "$scenario" --quiet --url "$(echo "$BERTH_FRONTENDS" | tr ' ' ',')" \
      --username "$BERTH_ADMIN_USER" --token "$BERTH_ADMIN_TOKEN" --pid "$pids" \
      --json "$out" "${flags[@]}" >/dev/null 2>"$work/$label-$r.err"; then
      echo "ab.sh: berth-loadtest failed against $label (round $r); see $work/$label-$r.err" >&2
      exit 1
    fi
    deploy/local/cluster.sh down "$cluster" >/dev/null 2>&1
    rm -rf "$cluster"
    cluster=
    python3 - "$out" "$r" "$label" "$op" "$per" <<'PY'
import json, sys
path, r, label, op, per = sys.argv[1:]
part = json.load(open(path))[-1][0]
unit = op + "/s"
rate = part["rates"][unit]
cpu = part["server_cpu_ms"].get(op)
cpu_s = "-" if cpu is None else f"{cpu:.2f}"
print(f"round {r} {label:>12}  {rate:10.2f} {unit}  {cpu_s:>8} server CPU ms/{per}  errors {part['errors']}")
if part["errors"] or cpu is None:
    why = f"{part['errors']} errors" if part["errors"] else "no CPU time read for the cluster's processes"
    sys.exit(f"ab.sh: the run of {label} in round {r} does not count: {why}")
PY
  done
done

python3 - "$work" "$rounds" "$op" "$per" "${labels[@]}" <<'PY'
import json, statistics, sys
work, rounds, op, per, labels = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
unit = op + "/s"
runs = {}
for label in labels:
    for r in range(1, rounds + 1):
        part = json.load(open(f"{work}/{label}-{r}.json"))[-1][0]
        runs[label, r] = (part["rates"][unit], part["server_cpu_ms"][op])
print(f"\n{'label':>12}  {'median ' + unit:>18}  {'median CPU ms/' + per:>20}  vs {labels[0]}, paired: CPU ms/{per} (lower in)  {unit}")
for label in labels:
    rates = [runs[label, r][0] for r in range(1, rounds + 1)]
    cpus = [runs[label, r][1] for r in range(1, rounds + 1)]
    line = f"{label:>12}  {statistics.median(rates):18.2f}  {statistics.median(cpus):20.2f}"
    if label != labels[0]:
        dc = [runs[label, r][1] - runs[labels[0], r][1] for r in range(1, rounds + 1)]
        dr = [runs[label, r][0] - runs[labels[0], r][0] for r in range(1, rounds + 1)]
        lower = sum(d < 0 for d in dc)
        line += f"  {statistics.mean(dc):+.2f} ({lower} of {rounds})  {statistics.mean(dr):+.2f}"
    print(line)
PY

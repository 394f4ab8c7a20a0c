# Functions the loadtest scripts share (bench.sh, cluster-costs.sh, ab.sh), sourced from the
# checkout's root.

# Where cargo puts release binaries: CARGO_TARGET_DIR, a config file or ./target, whichever
# applies.
release_dir() {
  echo "$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release"
}

# The pids of the cluster whose cluster.env was sourced last (its BERTH_PID_* variables),
# comma-separated as berth-loadtest's --pid takes them; fails when there are none.
cluster_pids() {
  local v pids=()
  for v in $(compgen -v BERTH_PID_); do pids+=("${!v}"); done
  [ ${#pids[@]} -gt 0 ] || return 1
  (IFS=,; echo "${pids[*]}")
}

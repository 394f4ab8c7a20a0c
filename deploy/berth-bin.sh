# Sourced by the deploy scripts: sets `bin` to the absolute path of the berth binary to use,
# $BERTH_BIN if set, else the release build of this checkout (built with cargo if needed).
# Needs `repo`, the checkout's root.
if [ -n "${BERTH_BIN:-}" ]; then
  bin=$BERTH_BIN
else
  (cd "$repo" && cargo build --release -p berth --quiet)
  target=$(cd "$repo" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  bin=$target/release/berth
fi
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
[ -x "$bin" ] || { echo "no berth binary at $bin" >&2; exit 1; }

# Sourced by scripts/bench-*.sh: the release build and dev token of ./scripts/demo.sh (in
# ./.keybound-dev unless KEYBOUND_DEV_DIR says otherwise), a work directory, and the
# background processes to stop on exit. Sets repo, dir, bin, keybound, work, pids, die.
# The caller sets `name` (for messages) first.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${KEYBOUND_DEV_DIR:-$repo/.keybound-dev}
bin=${CARGO_TARGET_DIR:-$repo/target}/release
keybound=$bin/keybound
die() { printf '%s: error: %s\n' "$name" "$*" >&2; exit 1; }
[ -x "$keybound" ] && [ -x "$bin/keybound-devserver" ] || die "run ./scripts/demo.sh first (release build)"
[ -f "$dir/env" ] || die "no dev token in $dir; run ./scripts/demo.sh first"
# shellcheck source=/dev/null
. "$dir/env"

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

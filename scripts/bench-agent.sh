#!/usr/bin/env bash
# scripts/bench-agent.sh [SECONDS] — the agent's benchmarks of issue #13, each a
# ratio measured in one interleaved run (never absolute times):
#   1. a GET through the gateway / the same GET sent directly with a cached token
#      (`keybound bench --gateway`), against the release dev-server;
#   2. agent proofs/s with the audit trail on / off (`keybound bench --agent
#      --audit-socket`), two agents on the same SoftHSM token.
# Run after ./scripts/demo.sh (it uses its release build and dev token, in
# ./.keybound-dev unless KEYBOUND_DEV_DIR says otherwise).
set -euo pipefail

name=bench-agent
seconds=${1:-20}
# shellcheck source=scripts/bench-env.sh
. "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"

# wait_for FILE PID WHAT: until FILE exists (a socket, or the server's address).
wait_for() {
  for _ in $(seq 200); do
    [ -e "$1" ] && [ -s "$1" -o -S "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || die "$3 exited"
    sleep 0.1
  done
  die "$3 did not start"
}

keys=$("$keybound" keys list --json)
for label in client-auth dpop audit; do
  grep -q "\"label\": \"$label\"" <<<"$keys" || "$keybound" keys generate --label "$label" >/dev/null
done
"$keybound" jwks --label client-auth >"$work/jwks.json"
"$bin/keybound-devserver" --port 0 --client-id 0oa-keybound-dev --jwks "$work/jwks.json" \
  >"$work/server.out" 2>"$work/server.log" &
pids+=($!)
for _ in $(seq 200); do
  base=$(sed -n 's/^listening on \(http:[^ ]*\).*/\1/p' "$work/server.out" | head -n 1)
  [ -n "$base" ] && break
  sleep 0.1
done
[ -n "${base:-}" ] || die "the dev-server did not report its address"

# agent NAME EXTRA: a config with the dev client and a route, plus EXTRA; starts
# `keybound serve` on $work/NAME.sock.
agent() {
  local name=$1 extra=$2 config=$work/$1.toml
  cat "$KEYBOUND_CONFIG" >"$config"
  cat >>"$config" <<EOF

[[client]]
name = "dev"
server = "okta"
token_endpoint = "$base/oauth2/v1/token"
client_id = "0oa-keybound-dev"
assertion_key = "client-auth"
dpop_key = "dpop"
scopes = ["okta.users.read"]
allowed_scopes = ["okta.users.read"]

[[route]]
name = "okta"
client = "dev"
upstream = "$base"
allow = ["GET /api/v1/users"]
$extra
[agent]
socket = "$work/$name.sock"
EOF
  KEYBOUND_CONFIG=$config "$keybound" serve >"$work/$name.out" 2>"$work/$name.log" &
  pids+=($!)
  wait_for "$work/$name.sock" "$!" "agent $name"
}

agent off ""
agent on "
[audit]
path = \"$work/audit.log\"
checkpoint_key = \"audit\"
"

printf '==> keybound bench --gateway okta (%s s)\n' "$seconds"
KEYBOUND_CONFIG=$work/off.toml "$keybound" bench --gateway okta --socket "$work/off.sock" \
  --path '/api/v1/users?limit=1' --seconds "$seconds"

printf '\n==> keybound bench --agent --audit-socket (%s s)\n' "$seconds"
KEYBOUND_CONFIG=$work/off.toml "$keybound" bench --agent --key dpop --socket "$work/off.sock" \
  --audit-socket "$work/on.sock" --seconds "$seconds"
"$keybound" audit verify --config "$work/on.toml" "$work/audit.log" | head -n 1 || true

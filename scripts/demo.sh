#!/usr/bin/env bash
# scripts/demo.sh [DIR] — Quickstart (1): install what is needed, build
# keybound, set up the SoftHSM2 development token in DIR (default:
# <repo>/.keybound-dev), then run keybound's main job against
# `keybound-devserver`, a strict Okta-like server on 127.0.0.1: a DPoP-bound
# access token through client_credentials + private_key_jwt, a paginated user
# list, one user, a profile update; then show that the same token sent as
# Bearer, or with a proof from another key, is refused. Finally openssl,
# knowing nothing of keybound, verifies an assertion and a proof.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${1:-$repo/.keybound-dev}

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }

step "Installing system packages and Rust if missing"
"$repo/scripts/install-deps.sh" softhsm build rust
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi

step "Building keybound and its dev-server (cargo build --release --locked --workspace)"
(cd "$repo" && cargo build --release --locked --workspace)
keybound=${CARGO_TARGET_DIR:-$repo/target}/release/keybound
devserver=${CARGO_TARGET_DIR:-$repo/target}/release/keybound-devserver

step "Setting up the SoftHSM2 development token in $dir"
KEYBOUND_BIN=$keybound "$repo/softhsm-setup/setup.sh" "$dir"
# shellcheck source=/dev/null
. "$dir/env"

work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

step "keybound keys list  (both keys generated on the token; policy verdict per key)"
"$keybound" keys list

step "keybound jwks --label client-auth  (the client's public key, to register with the server)"
# Only the assertion key is registered; the DPoP key is bound per token (cnf.jkt).
jwks=$("$keybound" jwks --label client-auth)
printf '%s\n' "$jwks" > "$work/jwks.json"
printf '%s\n' "$jwks"

step "keybound-devserver --port 0 --client-id 0oa-keybound-dev --jwks jwks.json &"
"$devserver" --port 0 --client-id 0oa-keybound-dev --jwks "$work/jwks.json" \
  >"$work/server.out" 2>"$work/server.log" &
server_pid=$!
base=
for _ in $(seq 100); do
  base=$(sed -n 's/^listening on \(http:[^ ]*\).*/\1/p' "$work/server.out" 2>/dev/null | head -n 1)
  [ -n "$base" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; die "dev-server exited"; }
  sleep 0.1
done
[ -n "$base" ] || die "dev-server did not report its address"
cat "$work/server.out"

config=$work/keybound.toml
cat "$KEYBOUND_CONFIG" > "$config"
cat >> "$config" <<CLIENT

[[client]]
name = "dev"
server = "okta"
token_endpoint = "$base/oauth2/v1/token"
client_id = "0oa-keybound-dev"
assertion_key = "client-auth"
dpop_key = "dpop"
scopes = ["okta.users.read", "okta.users.manage"]
allowed_scopes = ["okta.users.read", "okta.users.manage"]
CLIENT
export KEYBOUND_CONFIG=$config
printf '\nclient added to a copy of the dev config:\n'
sed -n '/\[\[client\]\]/,$p' "$config"

step "keybound token --check  (client_credentials + private_key_jwt + DPoP; the token is not printed)"
"$keybound" token --check

step "keybound call --paginate '$base/api/v1/users?limit=3'  (follows Link rel=\"next\")"
users=$("$keybound" call --paginate "$base/api/v1/users?limit=3")
printf '%s\n' "$users" | python3 -c '
import json, sys
for u in json.load(sys.stdin):
    p = u["profile"]
    print(u["id"], " ", p["firstName"], p["lastName"], " ", p["email"])'
id=$(printf '%s\n' "$users" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')

step "keybound call $base/api/v1/users/$id"
"$keybound" call "$base/api/v1/users/$id"

step "keybound call -d '{\"profile\":{\"firstName\":\"Ada (updated)\"}}' $base/api/v1/users/$id"
"$keybound" call -d '{"profile":{"firstName":"Ada (updated)"}}' "$base/api/v1/users/$id" |
  python3 -c 'import json,sys; print("firstName is now:", json.load(sys.stdin)["profile"]["firstName"])'

# expect_refusal WHAT CURL-ARGS...: the API must answer 401; show its reason.
expect_refusal() {
  local what=$1 code
  shift
  code=$(curl -sS -o "$work/refused.json" -D "$work/refused.headers" -w '%{http_code}' "$@")
  [ "$code" = 401 ] || die "$what was not refused (HTTP $code)"
  printf 'HTTP %s  %s\n' "$code" "$(grep -i '^www-authenticate:' "$work/refused.headers" | tr -d '\r')"
}

step "A stolen token is useless: the same token sent as Bearer is refused"
(
  umask 077
  "$keybound" token --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])' >"$work/token"
)
expect_refusal "a Bearer token" -H "Authorization: Bearer $(cat "$work/token")" \
  "$base/api/v1/users/$id"

step "... and so is the token with a DPoP proof from another key"
keys=$("$keybound" keys list --json)
grep -q '"label": "not-the-dpop-key"' <<<"$keys" ||
  "$keybound" keys generate --label not-the-dpop-key >/dev/null
other=$("$keybound" dpop --key not-the-dpop-key --method GET \
  --url "$base/api/v1/users/$id" --access-token-file "$work/token")
expect_refusal "a proof from another key" -H "Authorization: DPoP $(cat "$work/token")" \
  -H "DPoP: $other" "$base/api/v1/users/$id"

assertion=$("$keybound" assertion --key client-auth --client-id 0oa-keybound-dev \
  --audience "$base/oauth2/v1/token")
proof=$("$keybound" dpop --key dpop --method POST --url "$base/oauth2/v1/token?x=1#f")
printf '\na client assertion, decoded:\n'
printf '%s\n' "$assertion" | "$keybound" decode

step "Independent check: openssl verifies both signatures"
command -v python3 >/dev/null 2>&1 || die "python3 is needed for this check"
# python3 (standard library only) turns each candidate JWK into an SPKI PEM
# and the JWS r||s signature into a DER ECDSA-Sig-Value; openssl verifies.
# The assertion is checked against the published JWKS (by kid), the DPoP
# proof against the jwk in its own header.
JWKS=$jwks ASSERTION=$assertion PROOF=$proof python3 - "$work" <<'PY'
import base64, json, os, sys

work = sys.argv[1]
SPKI_P256 = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")

def b64u(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))

def der_int(b):
    b = b.lstrip(b"\0") or b"\0"
    if b[0] & 0x80:
        b = b"\0" + b
    return b"\x02" + bytes([len(b)]) + b

def write(name, data):
    with open(os.path.join(work, name), "wb") as f:
        f.write(data)

def prepare(name, jws, keys):
    header_b64, claims_b64, sig_b64 = jws.strip().split(".")
    header = json.loads(b64u(header_b64))
    if header.get("alg") != "ES256":
        sys.exit(f"{name}: this check handles ES256 only, got alg={header.get('alg')!r}")
    if keys is None:
        keys = [header["jwk"]]
    elif "kid" in header:
        keys = [k for k in keys if k.get("kid") == header["kid"]]
    keys = [k for k in keys if k.get("kty") == "EC" and k.get("crv") == "P-256"]
    if not keys:
        sys.exit(f"{name}: no P-256 key to verify with (kid={header.get('kid')!r})")
    for i, jwk in enumerate(keys):
        x, y = b64u(jwk["x"]), b64u(jwk["y"])
        assert len(x) == 32 and len(y) == 32, "P-256 coordinates are 32 bytes"
        pem = base64.encodebytes(SPKI_P256 + b"\x04" + x + y).decode()
        write(f"{name}.pub{i}.pem",
              f"-----BEGIN PUBLIC KEY-----\n{pem}-----END PUBLIC KEY-----\n".encode())
        print(f"{name}: candidate key kid={jwk.get('kid')} x={jwk['x']} y={jwk['y']}")
    sig = b64u(sig_b64)
    assert len(sig) == 64, f"ES256 signature is 64 bytes r||s, got {len(sig)}"
    body = der_int(sig[:32]) + der_int(sig[32:])
    write(f"{name}.sig.der", b"\x30" + bytes([len(body)]) + body)
    write(f"{name}.input", f"{header_b64}.{claims_b64}".encode())
    write(f"{name}.tampered", f"{header_b64}.{claims_b64}x".encode())

prepare("assertion", os.environ["ASSERTION"], json.loads(os.environ["JWKS"])["keys"])
prepare("dpop", os.environ["PROOF"], None)
PY

# verify NAME: succeeds when one candidate key verifies NAME's signature,
# and fails when the same key accepts a tampered signing input.
verify() {
  local name=$1 pem out
  for pem in "$work/$name".pub*.pem; do
    if out=$(openssl dgst -sha256 -verify "$pem" -signature "$work/$name.sig.der" \
      "$work/$name.input" 2>&1); then
      printf '%s\n' "$out"
      if openssl dgst -sha256 -verify "$pem" -signature "$work/$name.sig.der" \
        "$work/$name.tampered" >/dev/null 2>&1; then
        die "$name: openssl accepted a tampered signing input; the check is broken"
      fi
      return 0
    fi
  done
  die "$name: openssl could not verify the signature with any candidate key"
}
printf 'assertion (key from keybound jwks): '
verify assertion
printf 'DPoP proof (key from its jwk header): '
verify dpop
echo "(a tampered signing input is rejected by the same keys)"
echo "signature verified by openssl"

step "keybound serve with a gateway route and an audit trail (keybound keys generate --label audit)"
grep -q '"label": "audit"' <<<"$keys" ||
  "$keybound" keys generate --label audit >/dev/null
"$keybound" jwks --label audit >"$work/audit-jwks.json"
socket=$work/agent.sock
cat >>"$config" <<AGENT

[[route]]
name = "okta"
client = "dev"
upstream = "$base"
allow = ["GET /api/v1/users", "GET /api/v1/users/*"]

[audit]
path = "$work/audit.log"
checkpoint_key = "audit"
checkpoint_every = 10

[agent]
socket = "$socket"
AGENT
sed -n '/^\[\[route\]\]/,$p' "$config"
before=$(curl -sS "$base/dev/stats")
"$keybound" serve >"$work/agent.out" 2>"$work/agent.log" &
agent_pid=$!
stop_agent() {
  kill "$agent_pid" 2>/dev/null || true
  wait "$agent_pid" 2>/dev/null || true
}
trap 'stop_agent; cleanup' EXIT
for _ in $(seq 100); do
  [ -S "$socket" ] && break
  kill -0 "$agent_pid" 2>/dev/null || { cat "$work/agent.log" >&2; die "the agent exited"; }
  sleep 0.1
done
[ -S "$socket" ] || die "the agent did not open $socket"

step "curl --unix-socket agent.sock http://keybound/gw/okta/api/v1/users?limit=2  (no token on this side)"
curl -sS -D "$work/gw.headers" --unix-socket "$socket" \
  'http://keybound/gw/okta/api/v1/users?limit=2' | python3 -c '
import json, sys
for u in json.load(sys.stdin):
    print(u["id"], " ", u["profile"]["email"])'
grep -i '^link:' "$work/gw.headers" | tr -d '\r'

step "A write through the read-only route is refused by the agent (nothing is sent upstream)"
code=$(curl -sS -o "$work/gw.refused" -w '%{http_code}' --unix-socket "$socket" \
  -X POST -H 'Content-Type: application/json' -d '{"profile":{}}' \
  "http://keybound/gw/okta/api/v1/users/$id")
[ "$code" = 403 ] || die "a POST on the read-only route was not refused (HTTP $code)"
printf 'HTTP %s  %s\n' "$code" "$(cat "$work/gw.refused")"

step "keybound call, three times, through the agent: one token for all of them"
for _ in 1 2 3; do "$keybound" call "$base/api/v1/users/$id" >/dev/null; done
after=$(curl -sS "$base/dev/stats")
BEFORE=$before AFTER=$after python3 -c '
import json, os
b, a = json.loads(os.environ["BEFORE"]), json.loads(os.environ["AFTER"])
d = {k: a[k] - b[k] for k in a}
print("token requests (HTTP) %d, tokens issued %d, resource-server nonce challenges %d, API requests %d"
      % (d["token_requests"], d["tokens_issued"], d["rs_nonce_challenges"], d["api_requests"]))
assert d["tokens_issued"] == 1, d'

step "keybound audit verify --jwks audit-jwks.json audit.log  (the trail, checkpoints signed on the device)"
stop_agent
"$keybound" audit verify --jwks "$work/audit-jwks.json" "$work/audit.log"
printf 'events: '
python3 -c '
import collections, json, sys
print(dict(collections.Counter(json.loads(l)["event"] for l in open(sys.argv[1]))))' "$work/audit.log"
sed -i 's/"status":200/"status":201/' "$work/audit.log"
if "$keybound" audit verify --jwks "$work/audit-jwks.json" "$work/audit.log"; then
  die "audit verify accepted an edited trail"
fi
echo "(an edited line is named, exit status 1)"

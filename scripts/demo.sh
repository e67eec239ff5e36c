#!/usr/bin/env bash
# scripts/demo.sh [DIR] — Quickstart (1): install what is needed, build
# keybound, set up the SoftHSM2 development token in DIR (default:
# <repo>/.keybound-dev) and sign with it: the JWKS, a private_key_jwt client
# assertion (RFC 7523) and a DPoP proof (RFC 9449). Then openssl, knowing
# nothing of keybound, verifies the assertion against the published JWKS.
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

step "Building keybound (cargo build --release --locked)"
(cd "$repo" && cargo build --release --locked)
keybound=${CARGO_TARGET_DIR:-$repo/target}/release/keybound

step "Setting up the SoftHSM2 development token in $dir"
KEYBOUND_BIN=$keybound "$repo/softhsm-setup/setup.sh" "$dir"
# shellcheck source=/dev/null
. "$dir/env"

step "keybound jwks  (the public keys to register with the authorization server)"
jwks=$("$keybound" jwks)
printf '%s\n' "$jwks"

step "keybound assertion --key client-auth ...  (private_key_jwt, RFC 7523)"
assertion=$("$keybound" assertion --key client-auth --client-id 0oa-dev-client \
  --audience https://example.okta.com/oauth2/v1/token)
printf 'compact JWS:\n%s\n\ndecoded:\n' "$assertion"
printf '%s\n' "$assertion" | "$keybound" decode

step "keybound dpop --key dpop --method POST --url ...  (DPoP proof, RFC 9449)"
proof=$("$keybound" dpop --key dpop --method POST \
  --url 'https://example.okta.com/oauth2/v1/token?x=1#f')
printf 'compact JWS:\n%s\n\ndecoded (htu carries neither query nor fragment):\n' "$proof"
printf '%s\n' "$proof" | "$keybound" decode

step "Independent check: openssl verifies both signatures"
command -v python3 >/dev/null 2>&1 || die "python3 is needed for this check"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
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

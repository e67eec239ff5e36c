#!/usr/bin/env bash
# softhsm-setup/setup.sh [DIR] — a project-local SoftHSM2 development token
# with two ES256 keys, and a keybound config that uses it.
#
# DIR (default: <repo>/.keybound-dev, git-ignored) receives:
#   softhsm2.conf  SoftHSM2 config; tokens/ holds the token (0700)
#   keybound.toml  keybound config for the token (written only when missing)
#   user-pin       the development user PIN (0600)
#   env            `export` lines: source it to use the token
#
# Idempotent: an existing token, config and keys are kept.
# Set KEYBOUND_BIN to use a built keybound instead of `cargo build --release`.
set -euo pipefail

# DEVELOPMENT ONLY. These PINs protect nothing: they are in this file.
readonly DEV_SO_PIN=keybound-so-dev
readonly DEV_USER_PIN=keybound-dev-pin
readonly TOKEN_LABEL=keybound-dev
readonly KEY_LABELS=(client-auth dpop)

say() { printf 'setup: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${1:-$repo/.keybound-dev}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

"$repo/scripts/install-deps.sh" softhsm

module=
for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
  /usr/lib/*-linux-gnu*/softhsm/libsofthsm2.so; do
  if [ -f "$m" ]; then module=$m; break; fi
done
[ -n "$module" ] || die "libsofthsm2.so not found under /usr/lib; is softhsm2 installed?"

# Everything written from here on (token objects, PIN file) is private to
# the owner; cargo builds with the caller's umask.
orig_umask=$(umask)
umask 077

# SoftHSM2 configuration and token directory.
mkdir -p "$dir/tokens"
chmod 700 "$dir/tokens"
cat >"$dir/softhsm2.conf" <<EOF
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
EOF
export SOFTHSM2_CONF=$dir/softhsm2.conf

slots=$(softhsm2-util --show-slots 2>/dev/null) || die "softhsm2-util --show-slots failed (SOFTHSM2_CONF=$SOFTHSM2_CONF)"
if grep -Eq "^[[:space:]]*Label:[[:space:]]+${TOKEN_LABEL}[[:space:]]*\$" <<<"$slots"; then
  say "token '$TOKEN_LABEL' already exists in $dir/tokens: kept"
else
  say "initialising token '$TOKEN_LABEL' in $dir/tokens"
  softhsm2-util --init-token --free --label "$TOKEN_LABEL" \
    --so-pin "$DEV_SO_PIN" --pin "$DEV_USER_PIN" >&2
fi

# The user PIN, in a file only the owner can read (keybound refuses others).
if [ ! -f "$dir/user-pin" ]; then
  printf '%s\n' "$DEV_USER_PIN" >"$dir/user-pin"
fi
chmod 600 "$dir/user-pin"

if [ -f "$dir/keybound.toml" ]; then
  say "$dir/keybound.toml exists: kept"
else
  cat >"$dir/keybound.toml" <<EOF
# keybound config for the SoftHSM2 development token (softhsm-setup/setup.sh).
# Every key is documented in keybound.example.toml.
[token]
backend = "pkcs11"
module = "$module"
token_label = "$TOKEN_LABEL"
pin_file = "$dir/user-pin"
sessions = 2

[policy]
danger_allow_imported_keys = false
EOF
  say "wrote $dir/keybound.toml"
fi

cat >"$dir/env" <<EOF
# Source this file to use the keybound development token.
export SOFTHSM2_CONF=$(printf '%q' "$dir/softhsm2.conf")
export KEYBOUND_CONFIG=$(printf '%q' "$dir/keybound.toml")
# The config reads the PIN from pin_file. Without pin_file keybound reads
# \$KEYBOUND_PIN instead (development only):
# export KEYBOUND_PIN=$DEV_USER_PIN
EOF
export KEYBOUND_CONFIG=$dir/keybound.toml

# The keybound binary.
if [ -n "${KEYBOUND_BIN:-}" ]; then
  keybound=$KEYBOUND_BIN
else
  if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
  fi
  command -v cargo >/dev/null 2>&1 ||
    die "cargo not found: run scripts/install-deps.sh rust, or set KEYBOUND_BIN"
  say "building keybound (cargo build --release --locked)"
  (umask "$orig_umask" && cd "$repo" && cargo build --release --locked -q)
  keybound=${CARGO_TARGET_DIR:-$repo/target}/release/keybound
fi
[ -x "$keybound" ] || die "keybound binary not found or not executable: $keybound"

# The two ES256 keys, generated inside the token when absent.
listing=$("$keybound" keys list --json) || die "'keybound keys list --json' failed"
for label in "${KEY_LABELS[@]}"; do
  if grep -Eq "\"label\"[[:space:]]*:[[:space:]]*\"$label\"" <<<"$listing"; then
    say "key '$label' already exists: kept"
  else
    say "generating ES256 key '$label' inside the token"
    "$keybound" keys generate --label "$label" --alg ES256 >&2
  fi
done

cat >&2 <<EOF

setup: done. DEVELOPMENT ONLY credentials of this token:
  SO PIN:   $DEV_SO_PIN
  user PIN: $DEV_USER_PIN   (in $dir/user-pin, mode 0600)

To use the token in your shell:
EOF
sed -n 's/^export /  export /p' "$dir/env" >&2
printf '  # or: . %q\n\n' "$dir/env" >&2
"$keybound" keys list

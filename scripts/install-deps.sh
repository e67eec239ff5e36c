#!/usr/bin/env bash
# install-deps.sh [GROUP...] — install what keybound's scripts and tests need
# on Debian 12. Idempotent: when everything is there it changes nothing and
# does not touch the network.
#
# Groups (default: all):
#   softhsm  SoftHSM2, OpenSC (pkcs11-tool) and openssl: the dev token;
#            p11-kit (server) and p11-kit-modules (p11-kit-client.so): the
#            dev token forwarded over a socket
#            gnutls-bin (p11tool): tests/uris.rs resolves pkcs11: URIs with it
#   tpm      swtpm, tpm2-tools, tpm2-tss headers, tpm2-pkcs11: the TPM tests
#   build    C linker and libc headers for cargo, pkg-config and the tpm2-tss
#            headers (the default `tpm` feature links libtss2), TLS roots and
#            curl (crates.io, rustup), python3 (the demo's openssl check),
#            util-linux (setpriv, runuser: the tests' second uid)
#   rust     cargo with rustfmt and clippy, through rustup if cargo is absent
#   all      every group above
set -euo pipefail

# The toolchain installed when no cargo is found; keybound is built and
# tested with it (edition 2024).
RUST_TOOLCHAIN=${KEYBOUND_RUST_TOOLCHAIN:-1.95.0}

say() { printf 'install-deps: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Sets pkgs to the Debian packages of group $1.
packages_of() {
  case "$1" in
    softhsm) pkgs=(softhsm2 opensc openssl p11-kit p11-kit-modules gnutls-bin) ;;
    tpm) pkgs=(swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config libtpm2-pkcs11-1 libtpm2-pkcs11-tools) ;;
    build) pkgs=(gcc libc6-dev pkg-config libtss2-dev ca-certificates curl python3 util-linux) ;;
    rust) pkgs=() ;;
    *) die "unknown group '$1' (expected: softhsm, tpm, build, rust, all)" ;;
  esac
}

groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=(all)
expanded=()
for g in "${groups[@]}"; do
  if [ "$g" = all ]; then expanded+=(softhsm tpm build rust); else expanded+=("$g"); fi
done
want_rust=false
wanted=()
for g in "${expanded[@]}"; do
  [ "$g" = rust ] && want_rust=true
  packages_of "$g"
  wanted+=("${pkgs[@]}")
done

# `dpkg -s` also knows removed packages whose config files remain: only
# "install ok installed" counts.
installed() {
  local status
  status=$(dpkg -s "$1" 2>/dev/null) && grep -qx 'Status: install ok installed' <<<"$status"
}

missing=()
for p in "${wanted[@]}"; do
  installed "$p" || case " ${missing[*]} " in
    *" $p "*) ;;
    *) missing+=("$p") ;;
  esac
done

if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 ||
    die "apt-get not found; install these packages by hand: ${missing[*]}"
  if [ "$(id -u)" -eq 0 ]; then
    as_root=()
  elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
  else
    die "not root and no sudo; as root, run:
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y ${missing[*]}"
  fi
  say "installing: ${missing[*]}"
  "${as_root[@]}" apt-get update -q
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q "${missing[@]}"
else
  say "system packages: all present (${groups[*]})"
fi

if $want_rust; then
  if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    command -v curl >/dev/null 2>&1 || die "cargo is missing and so is curl; run: $0 build rust"
    say "cargo not found: installing Rust $RUST_TOOLCHAIN with rustup into $HOME/.cargo"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
      sh -s -- -y --no-modify-path --profile minimal \
        --default-toolchain "$RUST_TOOLCHAIN" -c rustfmt -c clippy
    say "Rust installed; in a new shell run: . \"\$HOME/.cargo/env\""
  else
    for c in rustfmt clippy; do
      if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
        command -v rustup >/dev/null 2>&1 ||
          die "cargo has no $c and there is no rustup to add it"
        say "adding the $c component"
        rustup component add "$c"
      fi
    done
  fi
fi

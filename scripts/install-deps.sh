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
#   yubihsm  Yubico's PKCS#11 module for the YubiHSM 2 (yubihsm-pkcs11,
#            libyubihsm2, libyubihsm-http2): on Debian 12 only in
#            bookworm-backports, so that suite is added (same mirror as the
#            system's bookworm entry) and only these packages come from it
#            (PKG/bookworm-backports; their dependencies stay from bookworm)
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
    yubihsm) pkgs=(yubihsm-pkcs11 libyubihsm2 libyubihsm-http2) ;;
    *) die "unknown group '$1' (expected: softhsm, tpm, build, rust, yubihsm, all)" ;;
  esac
}

groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=(all)
expanded=()
for g in "${groups[@]}"; do
  if [ "$g" = all ]; then expanded+=(softhsm tpm build rust yubihsm); else expanded+=("$g"); fi
done
want_rust=false
wanted=()
# Packages taken from bookworm-backports (the yubihsm group), installed with
# `-t bookworm-backports` so nothing else comes from that suite.
backports=()
for g in "${expanded[@]}"; do
  [ "$g" = rust ] && want_rust=true
  packages_of "$g"
  if [ "$g" = yubihsm ]; then backports+=("${pkgs[@]}"); else wanted+=("${pkgs[@]}"); fi
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
missing_bpo=()
for p in "${backports[@]}"; do
  installed "$p" || missing_bpo+=("$p")
done

# The Debian codename, e.g. bookworm.
codename() {
  (
    VERSION_CODENAME=
    # shellcheck source=/dev/null
    [ -r /etc/os-release ] && . /etc/os-release
    printf '%s' "$VERSION_CODENAME"
  )
}

# Whether an apt source (one-line or deb822) already names suite $1.
has_suite() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] && grep -Eqs "^[[:space:]]*deb[[:space:]].*[[:space:]]$1([[:space:]]|\$)" "$f" && return 0
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] && grep -Eqis "^Suites:.*[[:space:]]$1([[:space:]]|\$)" "$f" && return 0
  done
  return 1
}

# The mirror URI and keyring of the system's suite $1 entry, as "URI KEYRING"
# (KEYRING may be empty): from a deb822 stanza, else a one-line entry.
mirror_of() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    awk -v suite="$1" '
      function flush() {
        if (uri != "" && ok) { print uri, key; found = 1; exit }
        uri = ""; key = ""; ok = 0
      }
      /^[[:space:]]*$/ { flush(); next }
      tolower($1) == "uris:" { uri = $2 }
      tolower($1) == "signed-by:" { key = $2 }
      tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
      END { if (!found) flush() }
    ' "$f" | grep . && return 0
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    awk -v suite="$1" '
      $1 == "deb" {
        i = 2; key = ""
        if ($i ~ /^\[/) {
          for (; i <= NF; i++) {
            if ($i ~ /signed-by=/) { key = $i; sub(/.*signed-by=/, "", key); sub(/\].*/, "", key) }
            if ($i ~ /\]$/) { i++; break }
          }
        }
        if ($(i + 1) == suite) { print $i, key; exit }
      }
    ' "$f" | grep . && return 0
  done
  return 1
}

# The apt source for bookworm-backports, if no source names it yet.
add_backports() {
  has_suite bookworm-backports && return 0
  local found uri key file=/etc/apt/sources.list.d/keybound-bookworm-backports.sources
  found=$(mirror_of bookworm) ||
    die "no apt source for bookworm found to take the mirror from; add bookworm-backports by hand (https://backports.debian.org/Instructions/)"
  uri=${found%% *}
  key=${found#* }
  [ -n "$key" ] || key=/usr/share/keyrings/debian-archive-keyring.gpg
  say "adding the bookworm-backports suite from $uri ($file)"
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
    "$uri" "$key" | "${as_root[@]}" tee "$file" >/dev/null
}

if [ ${#missing[@]} -gt 0 ] || [ ${#missing_bpo[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 ||
    die "apt-get not found; install these packages by hand: ${missing[*]} ${missing_bpo[*]}"
  if [ "$(id -u)" -eq 0 ]; then
    as_root=()
  elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
  else
    die "not root and no sudo; as root, run:
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y ${missing[*]}
  (and from bookworm-backports: ${missing_bpo[*]})"
  fi
  # `PKG/bookworm-backports` takes exactly these packages from backports; their
  # dependencies (libcurl4, libssl3) stay from bookworm. (`-t bookworm-backports` would
  # prefer backports for the dependencies too: it pulls libcurl 8.14 on a fresh system.)
  bpo_install=("${missing_bpo[@]}")
  if [ ${#missing_bpo[@]} -gt 0 ] && [ "$(codename)" = bookworm ]; then
    add_backports
    bpo_install=("${missing_bpo[@]/%//bookworm-backports}")
  fi
  "${as_root[@]}" apt-get update -q
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing: ${missing[*]}"
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q "${missing[@]}"
  fi
  if [ ${#missing_bpo[@]} -gt 0 ]; then
    say "installing: ${bpo_install[*]}"
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q "${bpo_install[@]}"
  fi
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

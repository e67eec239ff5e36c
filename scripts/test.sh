#!/usr/bin/env bash
# scripts/test.sh — Quickstart (2): install what the tests need (SoftHSM2,
# swtpm, tpm2-tss, Rust with rustfmt and clippy), then run the whole suite
# the way CI does. Works from any directory.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

step() { printf '\n==> %s\n' "$*"; }

step "Installing system packages and Rust if missing"
./scripts/install-deps.sh
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

# The workspace: keybound (the product, at the root) and crates/keybound-devserver.
step "cargo clippy --workspace --all-targets --locked -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test --workspace --locked"
cargo test --workspace --locked

step "All checks passed"

#!/usr/bin/env bash
# scripts/bench-signers.sh [SECONDS] — the benchmarks of issue #14 (signer processes), in one
# period, each a ratio measured in one interleaved run (never absolute times):
#   1. `keybound bench`: the JWS pipeline through the signer processes / the raw rate of
#      the same processes signing inside themselves (SoftHSM ES256);
#   2. `keybound bench --agent` / two python-pkcs11 processes of one thread each signing
#      hand-built proofs (benches/python_pkcs11_dpop.py), python runs before and after;
#      with the agent's CPU per proof outside the device (the signer processes);
#   3. agent / raw on swtpm (a TPM: one signer process).
# Run after ./scripts/demo.sh (it uses its release build and dev token, in ./.keybound-dev
# unless KEYBOUND_DEV_DIR says otherwise). Installs python-pkcs11 into a venv there.
set -euo pipefail

name=bench-signers
seconds=${1:-10}
# shellcheck source=scripts/bench-env.sh
. "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"

wait_socket() {
  for _ in $(seq 300); do
    [ -S "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || die "$3 exited"
    sleep 0.1
  done
  die "$3 did not start"
}

"$keybound" keys list --json | grep -q '"label": "dpop"' || "$keybound" keys generate --label dpop >/dev/null

echo "==> 1. keybound bench --key dpop ($seconds s): pipeline through the signer processes / raw inside them"
"$keybound" bench --key dpop --seconds "$seconds"

echo
echo "==> 2. keybound bench --agent / two python-pkcs11 processes ($seconds s each side)"
venv=$dir/python-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import pkcs11' 2>/dev/null; then
  command -v python3 >/dev/null || die "python3 is needed"
  python3 -m venv "$venv" 2>/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null
    python3 -m venv "$venv"
  }
  "$venv/bin/pip" install -q python-pkcs11
fi
module=$(sed -n 's/^module = "\(.*\)"/\1/p' "$KEYBOUND_CONFIG")
token=$(sed -n 's/^token_label = "\(.*\)"/\1/p' "$KEYBOUND_CONFIG")
pin_file=$(sed -n 's/^pin_file = "\(.*\)"/\1/p' "$KEYBOUND_CONFIG")
python_run() {
  KEYBOUND_PIN=$(cat "$pin_file") "$venv/bin/python" "$repo/benches/python_pkcs11_dpop.py" \
    "$module" "$token" dpop 2 "$1" | sed -n 's/.*"proofs_per_s": \([0-9.]*\).*/\1/p'
}
"$keybound" serve --socket "$work/agent.sock" 2>"$work/agent.log" &
pids+=($!)
wait_socket "$work/agent.sock" "$!" "keybound serve"
half=$(awk -v s="$seconds" 'BEGIN { print s / 2 }')
py1=$(python_run "$half")
"$keybound" bench --agent --key dpop --socket "$work/agent.sock" --seconds "$seconds" --json >"$work/agent.json"
py2=$(python_run "$half")
python3 - "$work/agent.json" "$py1" "$py2" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); py = (float(sys.argv[2]) + float(sys.argv[3])) / 2
print(f"two python-pkcs11 processes  {py:10.0f} proofs/s   (before {float(sys.argv[2]):.0f}, after {float(sys.argv[3]):.0f})")
print(f"keybound agent               {r['pipeline_per_s']:10.0f} proofs/s   ({r['callers']} callers; raw in {r['sessions']} sessions {r['raw_per_s']:.0f} signs/s, agent / raw {r['ratio']:.3f})")
print(f"agent / python               {r['pipeline_per_s'] / py:.3f}")
c = r.get("cpu")
if c:
    print(f"CPU per proof: agent process (HTTP, JOSE, pipes) {c['agent_async_us']:.1f} µs; signer processes {c['agent_device_us']:.1f} µs; "
          f"raw signature inside a signer {c['raw_sign_us']:.1f} µs; load generator {c['client_us']:.1f} µs")
PY
kill "${pids[-1]}" 2>/dev/null || true

echo
echo "==> 3. agent / raw on swtpm ($seconds s)"
command -v swtpm >/dev/null || die "swtpm is not installed (scripts/install-deps.sh)"
mkdir -p "$work/tpm" "$work/keys"
# Two ports below the kernel's ephemeral range (a port picked from it, plus one, was
# often taken by a connection of an earlier run); another pair when swtpm cannot bind.
for _ in 1 2 3 4 5; do
  port=$((20000 + RANDOM % 10000))
  swtpm socket --tpm2 --tpmstate dir="$work/tpm" \
    --server type=tcp,port="$port",bindaddr=127.0.0.1 \
    --ctrl type=tcp,port=$((port + 1)),bindaddr=127.0.0.1 \
    --flags not-need-init,startup-clear >"$work/swtpm.log" 2>&1 &
  pids+=($!)
  sleep 1
  kill -0 "${pids[-1]}" 2>/dev/null && break
done
kill -0 "${pids[-1]}" 2>/dev/null || die "swtpm did not start: $(cat "$work/swtpm.log")"
chmod 700 "$work/keys"
cat >"$work/tpm.toml" <<TOML
[token]
backend = "tpm"
tcti = "swtpm:host=127.0.0.1,port=$port"
state_dir = "$work/keys"
TOML
export TSS2_LOG=all+none
"$keybound" --config "$work/tpm.toml" keys generate --label dpop >/dev/null
"$keybound" --config "$work/tpm.toml" serve --socket "$work/tpm.sock" 2>"$work/tpm-agent.log" &
pids+=($!)
wait_socket "$work/tpm.sock" "$!" "keybound serve (TPM)"
"$keybound" --config "$work/tpm.toml" bench --agent --key dpop --socket "$work/tpm.sock" --seconds "$seconds"

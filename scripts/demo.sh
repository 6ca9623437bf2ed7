#!/usr/bin/env bash
# Set up, then trade both bundled example models end to end: a seller daemon (mutual TLS,
# 128-bit CKKS) and a buyer that lists, tests on encrypted data, buys, verifies and runs
# the model; then an arbiter re-checks the buyer's evidence.
# Everything it writes goes to demo-run/ (seller.log there has the daemon's log).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
run=demo-run
rm -rf "$run" && mkdir -p "$run"

echo "== building the example models from scikit-learn's bundled datasets"
python examples/build.py --out "$run"
gimme-seller certs --out "$run/tls" >/dev/null

echo "== starting the seller daemon (compiles each model to an HE plan and self-tests it)"
gimme-seller serve --catalog "$run/catalog" --state "$run/seller" --tls-dir "$run/tls" \
  --listen 127.0.0.1:0 --port-file "$run/port" >"$run/seller.log" 2>&1 &
seller_pid=$!
trap 'kill "$seller_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  if [ -s "$run/port" ] && gimme-seller health --address "127.0.0.1:$(cat "$run/port")" \
       --tls-dir "$run/tls" >/dev/null 2>&1; then
    break
  fi
  if ! kill -0 "$seller_pid" 2>/dev/null; then
    echo "the seller daemon exited:"; cat "$run/seller.log"; exit 1
  fi
  sleep 0.5
done
gimme-seller health --address "127.0.0.1:$(cat "$run/port")" --tls-dir "$run/tls"

export GIMME_SELLER="127.0.0.1:$(cat "$run/port")" GIMME_TLS_DIR="$run/tls" GIMME_HOME="$run/buyer"
gimme-seller topup buyer 100 --state "$run/seller"
scripts/buyer_demo.sh "$run/data"

echo "== an arbiter re-checks the buyer's evidence for digits-mlp, under the seller's key"
gimme-arbiter verify "$(ls "$run"/buyer/trials/digits-mlp/*/evidence-*.zip)" \
  --seller-key "$(gimme-seller identity --state "$run/seller" 2>/dev/null)"

kill -TERM "$seller_pid"
wait "$seller_pid"
trap - EXIT
echo "== demo complete: both models traded and verified (PASS); seller log in $run/seller.log"

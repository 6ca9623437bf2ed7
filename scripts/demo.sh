#!/usr/bin/env bash
# Set up, then trade both bundled example models end to end: a seller daemon (mutual TLS,
# 128-bit CKKS) and a buyer that lists, tests on encrypted data, buys, verifies and runs
# the model; then an arbiter re-checks the buyer's evidence. The breast-cancer model is paid
# through an escrow daemon (released to the seller on the buyer's PASS), digits-mlp from the
# seller's prepaid ledger.
# Everything it writes goes to demo-run/ (seller.log and escrow.log there have the daemons' logs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
run=demo-run
rm -rf "$run" && mkdir -p "$run"

echo "== building the example models from scikit-learn's bundled datasets"
python examples/build.py --out "$run"
gimme-seller certs --out "$run/tls" >/dev/null

echo "== starting the escrow daemon (holds a trade's price until the buyer's PASS or a ruling)"
python -m escrow serve --state "$run/escrow" --tls-dir "$run/tls" --listen 127.0.0.1:0 \
  --port-file "$run/escrow.port" >"$run/escrow.log" 2>&1 &
escrow_pid=$!
trap 'kill "$escrow_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  [ -s "$run/escrow.port" ] && break
  if ! kill -0 "$escrow_pid" 2>/dev/null; then
    echo "the escrow daemon exited:"; cat "$run/escrow.log"; exit 1
  fi
  sleep 0.5
done
python -m escrow topup buyer 100 --state "$run/escrow"

echo "== starting the seller daemon (compiles each model to an HE plan and self-tests it)"
gimme-seller serve --catalog "$run/catalog" --state "$run/seller" --tls-dir "$run/tls" \
  --listen 127.0.0.1:0 --port-file "$run/port" \
  --trust-escrow "$(python -m escrow identity --state "$run/escrow" 2>/dev/null)" \
  >"$run/seller.log" 2>&1 &
seller_pid=$!
trap 'kill "$seller_pid" "$escrow_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do  # until every listing is listed or refused: the buyer trades both
  if [ -s "$run/port" ] && gimme-seller health --address "127.0.0.1:$(cat "$run/port")" \
       --tls-dir "$run/tls" --whole-catalog >/dev/null 2>&1; then
    break
  fi
  if ! kill -0 "$seller_pid" 2>/dev/null; then
    echo "the seller daemon exited:"; cat "$run/seller.log"; exit 1
  fi
  sleep 0.5
done
gimme-seller health --address "127.0.0.1:$(cat "$run/port")" --tls-dir "$run/tls" --whole-catalog

export GIMME_SELLER="127.0.0.1:$(cat "$run/port")" GIMME_TLS_DIR="$run/tls" GIMME_HOME="$run/buyer"
export GIMME_ESCROW="127.0.0.1:$(cat "$run/escrow.port")"
gimme-seller topup buyer 100 --state "$run/seller"
scripts/buyer_demo.sh "$run/data"

echo "== an arbiter re-checks the buyer's evidence for digits-mlp, under the seller's key"
gimme-arbiter verify "$(ls "$run"/buyer/trials/digits-mlp/*/evidence-*.zip)" \
  --seller-key "$(gimme-seller identity --state "$run/seller" 2>/dev/null)"

echo "== the escrow's accounts: breast-cancer-lr's price went to the seller on the buyer's PASS"
python -m escrow balances --state "$run/escrow"

kill -TERM "$seller_pid" "$escrow_pid"
wait "$seller_pid" "$escrow_pid"
trap - EXIT
echo "== demo complete: both models traded and verified (PASS); seller log in $run/seller.log"

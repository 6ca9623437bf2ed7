#!/usr/bin/env bash
# The buyer's half of the demo: list the seller's models, then test each example model on
# encrypted held-out rows, buy it (a Deep-Locked model, then its key), verify the delivery
# and run it.
# Usage: scripts/buyer_demo.sh DATA_DIR   (the seller address, TLS directory and buyer home
# come from GIMME_SELLER, GIMME_TLS_DIR and GIMME_HOME; with GIMME_ESCROW set, the
# breast-cancer model is paid through that escrow and released to the seller on PASS)
set -euo pipefail
data=${1:?usage: buyer_demo.sh DATA_DIR}
gimme-buyer models
for model in breast-cancer-lr digits-mlp; do
  stem=${model//-/_}
  echo "== trial of $model on the buyer's held-out rows (encrypted)"
  gimme-buyer trial "$model" --data "$data/${stem}_test.csv" --label-column y
  pay=()
  if [ "$model" = breast-cancer-lr ] && [ -n "${GIMME_ESCROW:-}" ]; then
    pay=(--escrow "$GIMME_ESCROW")
  fi
  echo "== buying $model${pay[*]:+ through the escrow}"
  gimme-buyer buy "$model" ${pay[@]+"${pay[@]}"}
  echo "== verifying the delivered $model against the commitment and the trial"
  gimme-buyer verify "$model" ${pay[@]+"${pay[@]}"}
  echo "== predicting with the bought $model (unlocked in memory only)"
  gimme-buyer run "$model" --data "$data/${stem}_test.csv" \
    --out "${GIMME_HOME:-$HOME/.gimme-buyer}/${stem}_predictions.csv"
done
echo "== buyer done: every model tested, bought, verified (PASS) and run"

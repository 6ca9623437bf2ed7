"""Steps 7-8 on the buyer's side: pay once (idempotent), receive the model."""

from __future__ import annotations

import uuid
from pathlib import Path

from rich.console import Console

from buyer_client.client import SellerClient
from buyer_client.trial import seller_key
from buyer_client.trust import open_delivery, open_offer, open_payment
from buyer_client.ui import Bars
from buyer_client.workspace import Workspace
from common.signing import sha256

REQUEST_ID_FILE = "purchase-request-id"
MAX_MODEL_BYTES = 2 << 30


def buy(client: SellerClient, workspace: Workspace, console: Console, model_id: str,
        trial_id: str | None = None) -> Path:
    folder = workspace.trial(model_id, trial_id)
    key = seller_key(client, workspace, console)
    offer = open_offer(folder.load_signed("offer"), key, model_id)
    # the request id is written before the call: a retry after a crash pays at most once
    if not folder.has(REQUEST_ID_FILE):
        folder.write(REQUEST_ID_FILE, uuid.uuid4().hex.encode())
    request_id = folder.read(REQUEST_ID_FILE).decode()
    signed_payment = client.purchase(offer.trial_id, request_id)
    folder.save_signed("payment", signed_payment)  # evidence, whatever it says
    payment = open_payment(signed_payment, key, offer)
    console.print(f"paid {payment.amount_cents / 100:.2f} for {model_id} (ledger "
                  f"{payment.ledger_txn_id[:12]}, balance {payment.balance_after_cents / 100:.2f})")
    cap = min(max(4 * offer.model_size, 16 << 20), MAX_MODEL_BYTES)
    with Bars(console) as bars:
        model, signed_record = client.deliver(offer.trial_id, cap,
                                              bars.transfer("download model", offer.model_size))
    open_delivery(signed_record, key, offer)
    folder.save_signed("delivery", signed_record)
    path = folder.write("model.onnx", model)
    same = sha256(model) == offer.model_commitment
    console.print(f"model saved to {path} ({len(model)} bytes); hash "
                  + ("matches the offer's commitment" if same else
                     "[red]DOES NOT match[/red] the offer's commitment")
                  + f"; run 'gimme-buyer verify {model_id}' for the full check")
    return path

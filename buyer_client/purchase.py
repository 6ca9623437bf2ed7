"""Steps 7-8 on the buyer's side, as a fair exchange: the Deep-Locked model first (useless
without its key), then the payment (idempotent), which releases the key."""

from __future__ import annotations

import uuid

from rich.console import Console

from buyer_client.client import SellerClient
from buyer_client.trial import seller_key
from buyer_client.ui import Bars
from buyer_client.workspace import TrialFolder, Workspace
from common.deeplock import key_id, unlock
from common.evidence import LOCKED_MODEL
from common.protocol import Offer
from common.signing import sha256
from common.trust import open_delivery, open_key_release, open_offer, open_payment
from common.wire import payment_from_payload

REQUEST_ID_FILE = "purchase-request-id"
MAX_MODEL_BYTES = 2 << 30


def fetch_locked(client: SellerClient, folder: TrialFolder, offer: Offer, key: bytes,
                 console: Console) -> bytes:
    """Download the locked model once; what came is kept as evidence before it is checked."""
    if folder.has(LOCKED_MODEL) and folder.has("delivery.json"):
        locked = folder.read(LOCKED_MODEL)
    else:
        cap = min(max(4 * offer.model_size, 16 << 20), MAX_MODEL_BYTES)
        with Bars(console) as bars:
            locked, signed_record = client.deliver(
                offer.trial_id, cap, bars.transfer("download locked model", offer.model_size))
        folder.save_signed("delivery", signed_record)
        folder.write(LOCKED_MODEL, locked)
    open_delivery(folder.load_signed("delivery"), key, offer, locked)
    return locked


def buy(client: SellerClient, workspace: Workspace, console: Console, model_id: str,
        trial_id: str | None = None, again: bool = False) -> None:
    """Buy the trial's model; a model already bought through another trial is bought
    again only when asked (`again`), and paying a paid trial again charges nothing."""
    folder = workspace.trial(model_id, trial_id)
    owned = workspace.bought_trial(model_id)
    if owned is not None and owned.trial_id != folder.trial_id and not again:
        console.print(f"you already own {model_id} (trial {owned.trial_id}, receipt "
                      f"{_receipt_id(owned)}): nothing was charged. 'gimme-buyer run "
                      f"{model_id}' uses it; pass --again to buy it again with trial "
                      f"{folder.trial_id}")
        return
    paid_before = folder.has("payment.json")
    key = seller_key(client, workspace, console)
    offer = open_offer(folder.load_signed("offer"), key, model_id)
    locked = fetch_locked(client, folder, offer, key, console)
    console.print(f"locked model received ({len(locked)} bytes); paying releases its key")
    # the request id is written before the call: a retry after a crash pays at most once
    if not folder.has(REQUEST_ID_FILE):
        folder.write(REQUEST_ID_FILE, uuid.uuid4().hex.encode())
    request_id = folder.read(REQUEST_ID_FILE).decode()
    signed_payment, signed_release = client.purchase(offer.trial_id, request_id)
    folder.save_signed("payment", signed_payment)  # evidence, whatever it says
    folder.save_signed("key-release", signed_release)
    payment = open_payment(signed_payment, key, offer)
    release = open_key_release(signed_release, key, offer, locked)
    folder.write_private("model.key", release.master_key.hex().encode())
    workspace.mark_bought(model_id, folder)
    if paid_before:  # the seller answered with the receipt it signed then
        console.print(f"already paid {payment.amount_cents / 100:.2f} for {model_id} (receipt "
                      f"{_receipt_id(folder)}): nothing was charged now; key "
                      f"{key_id(release.master_key)} released")
    else:
        console.print(f"paid {payment.amount_cents / 100:.2f} for {model_id} (receipt "
                      f"{_receipt_id(folder)}, balance "
                      f"{payment.balance_after_cents / 100:.2f}); key "
                      f"{key_id(release.master_key)} released")
    unlocked = unlock(locked, release.master_key)  # in memory only
    same = sha256(unlocked) == offer.model_commitment
    console.print("the released key opens the model into "
                  + ("exactly the committed model" if same else
                     "a model that [red]DOES NOT match[/red] the offer's commitment")
                  + f"; run 'gimme-buyer verify {model_id}' for the full check, "
                    f"'gimme-buyer run {model_id} --data ROWS' to use it")


def _receipt_id(folder: TrialFolder) -> str:
    """The ledger transaction of a trial's payment, as receipts are named to the user."""
    return payment_from_payload(folder.load_signed("payment").payload).ledger_txn_id[:12]

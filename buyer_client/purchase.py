"""Steps 7-8 on the buyer's side, as a fair exchange: the Deep-Locked model first, sealed
(no graph, no weights without its key), checked against the seller's signed delivery
record before anything is paid; then the payment (idempotent), which releases the key; then
the key must open the delivery into the committed model, or `buy` fails with the evidence."""

from __future__ import annotations

import uuid
from pathlib import Path

from rich.console import Console

from buyer_client.client import SellerClient
from buyer_client.trial import seller_key
from buyer_client.ui import Bars
from buyer_client.verify import verify_delivery
from buyer_client.workspace import TrialFolder, Workspace
from common.deeplock import key_id
from common.errors import BadInput, Refused
from common.evidence import LOCKED_MODEL, SEALED_MODEL, open_delivered_model
from common.protocol import Offer, Signed
from common.trust import open_delivery, open_key_release, open_offer, open_payment
from common.wire import payment_from_payload
from escrow.client import EscrowClient

REQUEST_ID_FILE = "purchase-request-id"
ESCROW_DEPOSIT_ID_FILE = "escrow-deposit-request-id"
ESCROW_RELEASE_ID_FILE = "escrow-release-request-id"
MAX_MODEL_BYTES = 2 << 30


def fetch_sealed(client: SellerClient, folder: TrialFolder, offer: Offer, key: bytes,
                 console: Console) -> bytes:
    """Download the sealed model once; what came is kept as evidence before it is checked
    against the signed delivery record (a mismatch: nothing is paid)."""
    if folder.has(SEALED_MODEL) and folder.has("delivery.json"):
        sealed = folder.read(SEALED_MODEL)
    else:
        cap = min(max(4 * offer.model_size, 16 << 20), MAX_MODEL_BYTES)
        with Bars(console) as bars:
            sealed, signed_record = client.deliver(
                offer.trial_id, cap, bars.transfer("download sealed model", offer.model_size))
        folder.save_signed("delivery", signed_record)
        folder.write(SEALED_MODEL, sealed)
    try:
        open_delivery(folder.load_signed("delivery"), key, offer, sealed)
    except Refused as exc:
        raise Refused(f"{exc.message}. Not paying: nothing was charged; the delivery and its "
                      f"record are kept as evidence in {folder.path}") from None
    return sealed


def buy(client: SellerClient, workspace: Workspace, console: Console, model_id: str,
        trial_id: str | None = None, again: bool = False,
        escrow: EscrowClient | None = None) -> None:
    """Buy the trial's model; a model already bought through another trial is bought
    again only when asked (`again`), and paying a paid trial again charges nothing. With
    `escrow`, the price is deposited there and the seller is paid by the deposit receipt."""
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
    sealed = fetch_sealed(client, folder, offer, key, console)
    console.print(f"sealed model received ({len(sealed)} bytes, as the seller's signed "
                  f"delivery record says); paying releases its key")
    request_id = _request_id(folder, REQUEST_ID_FILE)
    deposit = None if escrow is None else _deposit(escrow, folder, offer, console)
    signed_payment, signed_release = client.purchase(offer.trial_id, request_id, deposit)
    folder.save_signed("payment", signed_payment)  # evidence, whatever it says
    folder.save_signed("key-release", signed_release)
    payment = open_payment(signed_payment, key, offer)
    release = open_key_release(signed_release, key, offer, sealed)
    folder.write_private("model.key", release.master_key.hex().encode())
    workspace.mark_bought(model_id, folder)
    if paid_before:  # the seller answered with the receipt it signed then
        console.print(f"already paid {payment.amount_cents / 100:.2f} for {model_id} (receipt "
                      f"{_receipt_id(folder)}): nothing was charged now; key "
                      f"{key_id(release.master_key)} released")
    elif deposit is not None:
        console.print(f"paid {payment.amount_cents / 100:.2f} for {model_id} by the escrow "
                      f"deposit (receipt {_receipt_id(folder)}); key "
                      f"{key_id(release.master_key)} released")
    else:
        console.print(f"paid {payment.amount_cents / 100:.2f} for {model_id} (receipt "
                      f"{_receipt_id(folder)}, balance "
                      f"{payment.balance_after_cents / 100:.2f}); key "
                      f"{key_id(release.master_key)} released")
    opened = open_delivered_model(folder, key, offer)  # unlocked in memory only
    failed = [check for check in opened.checks if not check.ok]
    if failed or opened.locked is None:
        verdict = verify_delivery(workspace, console, model_id, folder.trial_id)
        raise Refused(f"the released key does not open the committed model "
                      f"({'; '.join(f'{c.name}: {c.detail}' for c in failed)}); evidence "
                      f"saved, 'gimme-arbiter verify {verdict.bundle} --seller-key "
                      f"{key.hex()}' rules on it")
    folder.write(LOCKED_MODEL, opened.locked)
    console.print(f"the released key opens the model into exactly the committed model; run "
                  f"'gimme-buyer verify {model_id}' for the full check, 'gimme-buyer run "
                  f"{model_id} --data ROWS' to use it")


def _request_id(folder: TrialFolder, name: str) -> str:
    """The trial's request id for `name`, written before its call: a retry after a crash
    pays at most once."""
    if not folder.has(name):
        folder.write(name, uuid.uuid4().hex.encode())
    return folder.read(name).decode()


def _deposit(escrow: EscrowClient, folder: TrialFolder, offer: Offer, console: Console
             ) -> Signed:
    """The trial's price held at the escrow, payable to the offer's seller key."""
    signed = escrow.deposit(offer.trial_id, _request_id(folder, ESCROW_DEPOSIT_ID_FILE),
                            offer.price_cents, offer.seller_public_key, offer.model_commitment)
    folder.save_signed("escrow-deposit", signed)  # evidence, whatever it says
    console.print(f"{offer.price_cents / 100:.2f} deposited at the escrow {escrow.address}; it "
                  f"goes to the seller when 'gimme-buyer verify {offer.model_id} --escrow "
                  f"{escrow.address}' passes, or back to you on an arbiter's SELLER AT FAULT")
    return signed


def release_on_pass(escrow: EscrowClient, folder: TrialFolder, console: Console,
                    passed: bool, bundle: Path) -> None:
    """The buyer's own PASS releases its deposit to the seller; a FAIL keeps it held."""
    if not folder.has("escrow-deposit.json"):
        raise BadInput(f"trial {folder.trial_id} was not paid through an escrow (no "
                       f"escrow-deposit.json): nothing to release")
    if not passed:
        console.print(f"the deposit stays held at the escrow. An arbiter rules on the "
                      f"evidence ('gimme-arbiter verify {bundle} --seller-key KEY --sign-with "
                      f"ARBITER_KEY'); 'gimme-escrow settle {folder.trial_id} --ruling FILE "
                      f"--escrow {escrow.address}' then refunds you if the seller is at fault")
        return
    signed = escrow.settle("Release", folder.trial_id,
                           _request_id(folder, ESCROW_RELEASE_ID_FILE), None)
    folder.save_signed("escrow-settlement", signed)
    console.print(f"PASS: the deposit for trial {folder.trial_id} is released to the seller")


def _receipt_id(folder: TrialFolder) -> str:
    """The ledger transaction of a trial's payment, as receipts are named to the user."""
    return payment_from_payload(folder.load_signed("payment").payload).ledger_txn_id[:12]

"""The escrow's signed records (deposit receipts, settlements) and the arbiter's signed
ruling: domain records, protobuf conversion (the only module that builds or reads
escrow_pb2 records) and the checks each reader makes, signature first."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gimme.v1 import escrow_pb2 as epb
from google.protobuf.message import DecodeError

from common.errors import BadInput, Refused
from common.protocol import Signed
from common.signing import fingerprint, verify

DEPOSIT = "gimme.v1.EscrowDeposit"
SETTLEMENT = "gimme.v1.EscrowSettlement"
RULING = "gimme.v1.ArbiterRuling"
RELEASED, REFUNDED = "released", "refunded"
BUYERS_PASS = "buyer's PASS"
# what each arbiter ruling does with a deposit (the names are common.arbiter's)
PAYS_SELLER = ("NO FAULT FOUND", "BUYER'S EVIDENCE REJECTED")
REFUNDS_BUYER = ("SELLER AT FAULT",)


@dataclass(frozen=True)
class Deposit:
    trial_id: str
    request_id: str
    buyer_id: str
    seller_public_key: bytes
    amount_cents: int
    model_commitment: bytes
    deposited_at: int


@dataclass(frozen=True)
class Settlement:
    trial_id: str
    request_id: str
    outcome: str  # RELEASED or REFUNDED
    payee: str
    amount_cents: int
    grounds: str
    settled_at: int


@dataclass(frozen=True)
class Ruling:
    trial_id: str
    ruling: str
    reason: str
    seller_public_key: bytes
    model_commitment: bytes
    bundle_sha256: bytes
    ruled_at: int


def seller_account(seller_public_key: bytes) -> str:
    """Where the escrow credits a seller: named by its signing key's fingerprint."""
    return f"seller:{fingerprint(seller_public_key)}"


def deposit_payload(d: Deposit) -> bytes:
    return epb.EscrowDeposit(
        trial_id=d.trial_id, request_id=d.request_id, buyer_id=d.buyer_id,
        seller_public_key=d.seller_public_key, amount_cents=d.amount_cents,
        model_commitment=d.model_commitment, deposited_at=d.deposited_at).SerializeToString()


def settlement_payload(s: Settlement) -> bytes:
    return epb.EscrowSettlement(
        trial_id=s.trial_id, request_id=s.request_id, outcome=s.outcome, payee=s.payee,
        amount_cents=s.amount_cents, grounds=s.grounds,
        settled_at=s.settled_at).SerializeToString()


def ruling_payload(r: Ruling) -> bytes:
    return epb.ArbiterRuling(
        trial_id=r.trial_id, ruling=r.ruling, reason=r.reason,
        seller_public_key=r.seller_public_key, model_commitment=r.model_commitment,
        bundle_sha256=r.bundle_sha256, ruled_at=r.ruled_at).SerializeToString()


def _opened(message: epb.EscrowDeposit | epb.EscrowSettlement | epb.ArbiterRuling,
            signed: Signed, kind: str, keys: Sequence[bytes], signer: str) -> None:
    """Parse `signed` into `message` if one of `keys` signed it (else Refused)."""
    if signed.kind != kind:
        raise Refused(f"expected a signed {kind}, got {signed.kind[:40]!r}")
    for key in keys:
        try:
            verify(key, kind, signed.payload, signed.signature, signer)
            break
        except Refused:
            continue
    else:
        raise Refused(f"the {kind.rsplit('.', 1)[-1]} is not signed by an {signer} key "
                      f"trusted here (altered, or signed by another key)")
    try:
        message.ParseFromString(signed.payload)
    except DecodeError as exc:
        raise BadInput(f"the signed {kind} does not parse: {exc}") from exc


def open_deposit(signed: Signed, escrow_keys: Sequence[bytes]) -> Deposit:
    m = epb.EscrowDeposit()
    _opened(m, signed, DEPOSIT, escrow_keys, "escrow")
    return Deposit(m.trial_id, m.request_id, m.buyer_id, m.seller_public_key, m.amount_cents,
                   m.model_commitment, m.deposited_at)


def open_settlement(signed: Signed, escrow_key: bytes) -> Settlement:
    m = epb.EscrowSettlement()
    _opened(m, signed, SETTLEMENT, [escrow_key], "escrow")
    return Settlement(m.trial_id, m.request_id, m.outcome, m.payee, m.amount_cents,
                      m.grounds, m.settled_at)


def open_ruling(signed: Signed, arbiter_keys: Sequence[bytes]) -> Ruling:
    if not arbiter_keys:
        raise Refused("this escrow trusts no arbiter, so it cannot act on a ruling; start it "
                      "with --trust-arbiter KEY ('gimme-arbiter identity --key FILE' prints it)")
    m = epb.ArbiterRuling()
    _opened(m, signed, RULING, arbiter_keys, "arbiter")
    return Ruling(m.trial_id, m.ruling, m.reason, m.seller_public_key, m.model_commitment,
                  m.bundle_sha256, m.ruled_at)


def ruling_verdict(signed: Signed) -> str:
    """What a ruling says, unchecked: only to pick the call (the escrow checks it)."""
    m = epb.ArbiterRuling()
    try:
        m.ParseFromString(signed.payload)
    except DecodeError as exc:
        raise BadInput(f"the ruling does not parse: {exc}") from exc
    return m.ruling

"""Checks of what the seller signed (by the buyer, and by an arbiter re-checking a bundle):
signature first, then parse, then compare with what the checker knows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.deeplock import KEY_BYTES, check_sealed
from common.errors import BadInput, Refused
from common.he import engine
from common.he.packing import FEATURE_PACKED, PACKINGS
from common.he.params import CkksParams
from common.protocol import (
    DELIVERY,
    KEY_RELEASE,
    OFFER,
    PAYMENT,
    RECEIPT,
    DeliveryRecord,
    KeyRelease,
    Offer,
    PaymentReceipt,
    Receipt,
    Signed,
)
from common.signing import sha256, verify
from common.tail import check_tail
from common.wire import (
    delivery_from_payload,
    key_release_from_payload,
    offer_from_payload,
    payment_from_payload,
    receipt_from_payload,
)


def _verified(signed: Signed, kind: str, seller_key: bytes) -> bytes:
    if signed.kind != kind:
        raise Refused(f"expected a signed {kind}, got {signed.kind!r}")
    verify(seller_key, kind, signed.payload, signed.signature)
    return signed.payload


def open_offer(signed: Signed, seller_key: bytes, model_id: str) -> Offer:
    offer = offer_from_payload(_verified(signed, OFFER, seller_key))
    if offer.seller_public_key != seller_key:
        raise Refused("the offer names a different seller key than the one that signed it")
    if offer.model_id != model_id:
        raise Refused(f"asked for {model_id!r} but the offer is for {offer.model_id!r}")
    _check_offer_shape(offer)
    return offer


MAX_SCORES = 4096


def _check_offer_shape(offer: Offer) -> None:
    """Refuse offers no honest seller makes, before anything is built from them."""
    problems = []
    if len(offer.model_commitment) != 32:
        problems.append("no SHA-256 model commitment")
    if not 0 < offer.tolerance < 1e6:
        problems.append(f"tolerance {offer.tolerance}")
    problems += _packing_problems(offer)
    if not offer.encoding.input_columns:
        problems.append("no input columns")
    offset, scale = np.array(offer.encoding.input_offset), np.array(offer.encoding.input_scale)
    if not (np.all(np.isfinite(offset)) and np.all(np.isfinite(scale)) and np.all(scale > 0)):
        problems.append("an input encoding that is not a finite offset and a positive scale "
                        "per column")
    if not 0 < offer.output.score_count <= MAX_SCORES:
        problems.append(f"{offer.output.score_count} result ciphertexts")
    if not 0 < offer.output.result_level <= offer.params.multiplicative_depth:
        problems.append(f"result level {offer.output.result_level} for depth "
                        f"{offer.params.multiplicative_depth}")
    model_scores = offer.output.score_count - offer.output.range_check
    if offer.output.class_labels and len(offer.output.class_labels) != model_scores:
        problems.append(f"{len(offer.output.class_labels)} class labels for "
                        f"{model_scores} scores")
    if offer.output.range_check and not 0 < offer.plan_tolerance < 1e6:
        problems.append(f"a range check with plan tolerance {offer.plan_tolerance}")
    try:
        check_tail(offer.output.tail)
    except BadInput as exc:
        problems.append(exc.message)
    if problems:
        raise Refused("the offer is malformed: " + "; ".join(problems))


MAX_ROTATION_KEYS = 128


def _packing_problems(offer: Offer) -> list[str]:
    encoding, slots = offer.encoding, offer.params.slots
    if encoding.packing not in PACKINGS:
        return [f"unknown packing {encoding.packing!r}"]
    problems = []
    period = encoding.period
    if (encoding.rows_per_ciphertext * period != slots or period & (period - 1)
            or (encoding.packing == FEATURE_PACKED and period < len(encoding.input_columns))):
        problems.append(f"{encoding.rows_per_ciphertext} rows of {period} entries per "
                        f"ciphertext with {slots} slots and {len(encoding.input_columns)} "
                        f"columns")
    indices = encoding.rotation_indices
    if encoding.packing == FEATURE_PACKED:
        if not 0 < len(indices) <= MAX_ROTATION_KEYS or not all(0 < i < slots for i in indices):
            problems.append(f"{len(indices)} rotation keys asked for (1..{MAX_ROTATION_KEYS} "
                            f"rotations within {slots} slots)")
    elif indices:
        problems.append("rotation keys asked for without feature packing")
    return problems


def check_security(params: CkksParams, policy_bits: int) -> int:
    """Re-derive the security level from the parameters; refuse below policy or claim."""
    params.check_shape()
    derived = engine.derive_security_bits(params)
    if derived < policy_bits:
        raise Refused(
            f"the seller's CKKS parameters ({params.describe()}, log2 Q = "
            f"{engine.log2_modulus(params):.0f}) give "
            f"{f'{derived}-bit' if derived else 'no standard'} security by the HE standard "
            f"(re-derived here, not taken from the offer); your policy requires "
            f"{policy_bits}-bit. Refusing the trial: nothing was encrypted or sent")
    if params.claimed_security_bits > derived:
        raise Refused(f"the offer claims {params.claimed_security_bits}-bit security but its "
                      f"parameters give {derived}-bit; refusing a seller that misstates it")
    return derived


def open_receipt(signed: Signed, seller_key: bytes, offer: Offer, offer_payload: bytes,
                 batch_index: int, rows: int, keys_sha256: bytes,
                 inputs: Sequence[bytes], results: Sequence[bytes]) -> Receipt:
    """A receipt must bind exactly this offer, batch, upload and these results."""
    receipt = receipt_from_payload(_verified(signed, RECEIPT, seller_key))
    expected = Receipt(
        trial_id=offer.trial_id, batch_index=batch_index, rows=rows,
        offer_sha256=sha256(offer_payload), model_commitment=offer.model_commitment,
        keys_sha256=keys_sha256, input_sha256=tuple(sha256(b) for b in inputs),
        result_sha256=tuple(sha256(r) for r in results), evaluated_at=receipt.evaluated_at)
    if receipt != expected:
        wrong = [f for f in expected.__dataclass_fields__
                 if getattr(receipt, f) != getattr(expected, f)]
        raise Refused(f"the seller's receipt does not match this trial ({', '.join(wrong)})")
    return receipt


def open_payment(signed: Signed, seller_key: bytes, offer: Offer) -> PaymentReceipt:
    payment = payment_from_payload(_verified(signed, PAYMENT, seller_key))
    if (payment.trial_id, payment.model_commitment) != (offer.trial_id, offer.model_commitment):
        raise Refused("the payment receipt is for another trial or model")
    if payment.amount_cents != offer.price_cents:
        raise Refused(f"charged {payment.amount_cents / 100:.2f}, but the offer's price was "
                      f"{offer.price_cents / 100:.2f}")
    return payment


def open_delivery(signed: Signed, seller_key: bytes, offer: Offer, sealed: bytes
                  ) -> DeliveryRecord:
    """Before payment: the seller's record must name these sealed bytes, be a seal of the
    locked model it declares, and name the offer's commitment (what is inside is checked
    once the key is released)."""
    record = delivery_from_payload(_verified(signed, DELIVERY, seller_key))
    if record.trial_id != offer.trial_id:
        raise Refused("the delivery record is for another trial")
    if record.sealed_sha256 != sha256(sealed) or record.sealed_size != len(sealed):
        raise Refused(f"the delivered bytes ({len(sealed)} bytes, sha256 "
                      f"{sha256(sealed).hex()[:16]}…) are not the ones the delivery record "
                      f"names ({record.sealed_size} bytes, sha256 "
                      f"{record.sealed_sha256.hex()[:16]}…)")
    if record.model_commitment != offer.model_commitment:
        raise Refused("the delivery record names another model than the offer committed to")
    check_sealed(sealed, record.locked_size)
    return record


def open_key_release(signed: Signed, seller_key: bytes, offer: Offer, sealed: bytes
                     ) -> KeyRelease:
    """The released key must be for this trial, these sealed bytes and the committed model
    (whether it really opens them is checked by opening them)."""
    release = key_release_from_payload(_verified(signed, KEY_RELEASE, seller_key))
    if release.trial_id != offer.trial_id:
        raise Refused("the key release is for another trial")
    if release.sealed_sha256 != sha256(sealed):
        raise Refused("the key release names another sealed model than the one delivered")
    if release.model_commitment != offer.model_commitment:
        raise Refused("the key release names another model than the offer committed to")
    if len(release.master_key) != KEY_BYTES:
        raise Refused(f"the released key has {len(release.master_key)} bytes, not {KEY_BYTES}")
    return release

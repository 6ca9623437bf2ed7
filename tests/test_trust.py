"""The buyer's checks on what the seller signs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from common.errors import Refused
from common.he.params import CkksParams, new_key_tag
from common.protocol import (
    OFFER,
    PAYMENT,
    RECEIPT,
    EncodingSpec,
    Estimate,
    Offer,
    OutputPolicy,
    OutputSpec,
    PaymentReceipt,
    Receipt,
    Signed,
)
from common.signing import Signer, sha256
from common.trust import open_offer, open_payment, open_receipt
from common.wire import offer_payload, payment_payload, receipt_payload

PARAMS = CkksParams(8192, 1, 36, 54, 1)


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return Signer.load_or_create(tmp_path / "id.key")[0]


def _output(scores: int, tail: tuple[str, ...], labels: tuple[str, ...], level: int,
            compared: str, label_output: str) -> OutputSpec:
    return OutputSpec(scores, tail, labels, level, compared, label_output, OutputPolicy(),
                      True, 1e-4)


def _offer(signer: Signer, **changes: object) -> Offer:
    offer = Offer(
        trial_id="t1", model_id="m", model_name="m", model_commitment=sha256(b"model"),
        model_size=5, params=PARAMS,
        encoding=EncodingSpec(("a", "b"), PARAMS.slots, (), ()),
        output=_output(2, ("softmax",), ("x", "y"), 1, "probabilities", ""),
        tolerance=0.01, price_cents=100, trial_rows_remaining=10, key_tag=new_key_tag(),
        buyer_id="alice", issued_at=1, seller_public_key=signer.public_key,
        estimate=Estimate("slot-per-sample", 1, 2, 3, 0.5, PARAMS.slots),
        trial_price_per_row_cents=1)
    return dataclasses.replace(offer, **changes)  # type: ignore[arg-type]


def _sign(signer: Signer, kind: str, payload: bytes) -> Signed:
    return Signed(kind, payload, signer.sign(kind, payload))


FEATURE_PACKED = EncodingSpec(("a", "b"), PARAMS.slots // 4, (), (), "feature-packed", 4,
                              (PARAMS.slots // 4, PARAMS.slots // 2))


@pytest.mark.parametrize("encoding", [None, FEATURE_PACKED])
def test_a_well_formed_offer_opens(signer: Signer, encoding: EncodingSpec | None) -> None:
    offer = _offer(signer, **({"encoding": encoding} if encoding else {}))
    assert open_offer(_sign(signer, OFFER, offer_payload(offer)), signer.public_key, "m") == offer


@pytest.mark.parametrize(("changes", "message"), [
    ({"tolerance": 0.0}, "tolerance 0.0"),
    ({"model_commitment": b"short"}, "no SHA-256 model commitment"),
    ({"encoding": EncodingSpec(("a",), 99, (), ())}, "99 rows of 1 entries per ciphertext"),
    ({"encoding": EncodingSpec(("a",), PARAMS.slots, (), (), "diagonal")}, "unknown packing"),
    ({"encoding": EncodingSpec(("a",), PARAMS.slots, (), (), rotation_indices=(1,))},
     "rotation keys asked for without feature packing"),
    ({"encoding": dataclasses.replace(FEATURE_PACKED, period=1, rows_per_ciphertext=PARAMS.slots)},
     "of 1 entries per ciphertext with 4096 slots and 2 columns"),
    ({"encoding": dataclasses.replace(FEATURE_PACKED, rotation_indices=(PARAMS.slots,))},
     "1 rotation keys asked for"),
    ({"encoding": dataclasses.replace(FEATURE_PACKED, rotation_indices=tuple(range(1, 200)))},
     "199 rotation keys asked for"),
    ({"encoding": EncodingSpec(("a", "b"), PARAMS.slots, (), (), input_offset=(0.0, 0.0),
                               input_scale=(1.0, 0.0))},
     "an input encoding that is not a finite offset and a positive scale per column"),
    ({"encoding": EncodingSpec(("a", "b"), PARAMS.slots, (), (),
                               input_offset=(0.0, float("nan")), input_scale=(1.0, 1.0))},
     "an input encoding that is not a finite offset"),
    ({"output": _output(2, ("exp",), (), 1, "p", "")}, "unknown output tail"),
    ({"output": _output(2, (), (), 5, "p", "")}, "result level 5 for depth 1"),
    ({"output": _output(3, (), ("x",), 1, "p", "")}, "1 class labels for 3 scores"),
])
def test_malformed_offers_are_refused(signer: Signer, changes: dict[str, object],
                                      message: str) -> None:
    offer = _offer(signer, **changes)
    with pytest.raises(Refused, match=message):
        open_offer(_sign(signer, OFFER, offer_payload(offer)), signer.public_key, "m")


def test_offers_from_another_key_or_for_another_model_are_refused(signer: Signer,
                                                                  tmp_path: Path) -> None:
    other = Signer.load_or_create(tmp_path / "other.key")[0]
    payload = offer_payload(_offer(signer))
    with pytest.raises(Refused, match="does not verify"):
        open_offer(_sign(other, OFFER, payload), signer.public_key, "m")
    with pytest.raises(Refused, match=r"expected a signed gimme\.v1\.Offer"):
        open_offer(_sign(signer, RECEIPT, payload), signer.public_key, "m")
    with pytest.raises(Refused, match="asked for 'n'"):
        open_offer(_sign(signer, OFFER, payload), signer.public_key, "n")


def test_receipts_must_bind_this_upload_and_these_results(signer: Signer) -> None:
    offer = _offer(signer)
    payload = offer_payload(offer)
    inputs, results = [b"ct0", b"ct1"], [b"r0", b"r1"]
    receipt = Receipt("t1", 0, 7, sha256(payload), offer.model_commitment, sha256(b"key"),
                      tuple(sha256(i) for i in inputs), tuple(sha256(r) for r in results), 5)
    signed = _sign(signer, RECEIPT, receipt_payload(receipt))
    assert open_receipt(signed, signer.public_key, offer, payload, 0, 7, sha256(b"key"),
                        inputs, results) == receipt
    with pytest.raises(Refused, match="result_sha256"):
        open_receipt(signed, signer.public_key, offer, payload, 0, 7, sha256(b"key"), inputs,
                     [b"r0", b"other"])
    with pytest.raises(Refused, match="rows"):
        open_receipt(signed, signer.public_key, offer, payload, 0, 8, sha256(b"key"), inputs,
                     results)


def test_overcharging_is_refused(signer: Signer) -> None:
    offer = _offer(signer)
    payment = PaymentReceipt("r", "t1", "m", "alice", 250, 0, "txn", offer.model_commitment, 1)
    with pytest.raises(Refused, match=r"charged 2\.50, but the offer's price was 1\.00"):
        open_payment(_sign(signer, PAYMENT, payment_payload(payment)), signer.public_key, offer)

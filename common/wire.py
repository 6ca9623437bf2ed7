"""Protobuf <-> domain conversion: the only module that builds or reads gimme_pb2 records
(the transfer framing in common.transfer aside). Both edges, the seller's servicer and
the buyer's client, go through here."""

from __future__ import annotations

import base64
import json

from gimme.v1 import gimme_pb2 as pb
from google.protobuf.message import DecodeError

from common.errors import BadInput
from common.he.params import CkksParams
from common.protocol import (
    DeliveryRecord,
    EncodingSpec,
    Estimate,
    KeyRelease,
    ModelListing,
    Offer,
    OutputPolicy,
    OutputSpec,
    PaymentReceipt,
    Progress,
    Receipt,
    Signed,
)


def _parse(message: pb.Offer | pb.Receipt | pb.PaymentReceipt | pb.DeliveryRecord
           | pb.KeyRelease,
           payload: bytes, what: str) -> None:
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise BadInput(f"the signed {what} does not parse: {exc}") from exc


# ----- envelopes -----

def envelope_to_pb(signed: Signed) -> pb.SignedEnvelope:
    return pb.SignedEnvelope(kind=signed.kind, payload=signed.payload, signature=signed.signature)


def envelope_from_pb(message: pb.SignedEnvelope) -> Signed:
    return Signed(message.kind, message.payload, message.signature)


def envelope_to_json(signed: Signed) -> str:
    """The form kept on disk and in evidence bundles."""
    return json.dumps({"kind": signed.kind,
                       "payload": base64.b64encode(signed.payload).decode(),
                       "signature": base64.b64encode(signed.signature).decode()}, indent=2)


def envelope_from_json(text: str | bytes, what: str) -> Signed:
    try:
        raw = json.loads(text)
        return Signed(str(raw["kind"]), base64.b64decode(raw["payload"], validate=True),
                      base64.b64decode(raw["signature"], validate=True))
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{what} is not a signed record (JSON with kind, payload and "
                       f"signature in base64): {exc}") from exc


# ----- parameters -----

def params_to_pb(params: CkksParams) -> pb.CkksParameters:
    return pb.CkksParameters(
        ring_dimension=params.ring_dimension,
        multiplicative_depth=params.multiplicative_depth,
        scaling_mod_bits=params.scaling_mod_bits,
        first_mod_bits=params.first_mod_bits,
        scaling_technique=params.scaling_technique,
        key_switching=params.key_switching,
        num_large_digits=params.num_large_digits,
        secret_key_distribution=params.secret_key_distribution,
        batch_size=params.slots,
        claimed_security_bits=params.claimed_security_bits,
    )


def params_from_pb(message: pb.CkksParameters) -> CkksParams:
    return CkksParams(
        ring_dimension=message.ring_dimension,
        multiplicative_depth=message.multiplicative_depth,
        scaling_mod_bits=message.scaling_mod_bits,
        first_mod_bits=message.first_mod_bits,
        num_large_digits=message.num_large_digits,
        scaling_technique=message.scaling_technique,
        key_switching=message.key_switching,
        secret_key_distribution=message.secret_key_distribution,
        claimed_security_bits=message.claimed_security_bits,
    )


# ----- offer -----

def offer_payload(offer: Offer) -> bytes:
    message = pb.Offer(
        trial_id=offer.trial_id,
        model_id=offer.model_id,
        model_name=offer.model_name,
        model_commitment=offer.model_commitment,
        model_size=offer.model_size,
        params=params_to_pb(offer.params),
        encoding=pb.EncodingSpec(
            packing=offer.encoding.packing,
            input_columns=offer.encoding.input_columns,
            rows_per_ciphertext=offer.encoding.rows_per_ciphertext,
            input_min=offer.encoding.input_min,
            input_max=offer.encoding.input_max,
            period=offer.encoding.period,
            rotation_indices=offer.encoding.rotation_indices,
            input_offset=offer.encoding.input_offset,
            input_scale=offer.encoding.input_scale,
        ),
        output=pb.OutputSpec(
            score_count=offer.output.score_count,
            tail=offer.output.tail,
            class_labels=offer.output.class_labels,
            result_level=offer.output.result_level,
            probability_output=offer.output.probability_output,
            label_output=offer.output.label_output,
            policy=pb.OutputPolicy(kind=offer.output.policy.kind,
                                   noise_std=offer.output.policy.noise_std,
                                   grid=offer.output.policy.grid),
            circuit_privacy=offer.output.circuit_privacy,
            flooding_std=offer.output.flooding_std,
            range_check=offer.output.range_check,
        ),
        tolerance=offer.tolerance,
        price_cents=offer.price_cents,
        trial_rows_remaining=offer.trial_rows_remaining,
        key_tag=offer.key_tag,
        buyer_id=offer.buyer_id,
        issued_at=offer.issued_at,
        seller_public_key=offer.seller_public_key,
        estimate=estimate_to_pb(offer.estimate),
        trial_price_per_row_cents=offer.trial_price_per_row_cents,
        plan_commitment=offer.plan_commitment,
        plan_tolerance=offer.plan_tolerance,
    )
    return message.SerializeToString(deterministic=True)


def offer_from_payload(payload: bytes) -> Offer:
    m = pb.Offer()
    _parse(m, payload, "offer")
    columns = tuple(m.encoding.input_columns)
    if len(m.encoding.input_min) != len(m.encoding.input_max) or len(
            m.encoding.input_min) not in (0, len(columns)):
        raise BadInput("the offer's input ranges do not match its columns")
    if len(m.encoding.input_offset) != len(m.encoding.input_scale) or len(
            m.encoding.input_offset) not in (0, len(columns)):
        raise BadInput("the offer's input encoding does not match its columns")
    return Offer(
        trial_id=m.trial_id,
        model_id=m.model_id,
        model_name=m.model_name,
        model_commitment=m.model_commitment,
        model_size=m.model_size,
        params=params_from_pb(m.params),
        encoding=EncodingSpec(
            input_columns=columns,
            rows_per_ciphertext=m.encoding.rows_per_ciphertext,
            input_min=tuple(m.encoding.input_min),
            input_max=tuple(m.encoding.input_max),
            packing=m.encoding.packing,
            period=m.encoding.period or 1,  # slot-per-sample offers may leave it unset
            rotation_indices=tuple(m.encoding.rotation_indices),
            input_offset=tuple(m.encoding.input_offset),
            input_scale=tuple(m.encoding.input_scale),
        ),
        output=OutputSpec(
            score_count=m.output.score_count,
            tail=tuple(m.output.tail),
            class_labels=tuple(m.output.class_labels),
            result_level=m.output.result_level,
            probability_output=m.output.probability_output,
            label_output=m.output.label_output,
            policy=OutputPolicy(m.output.policy.kind, m.output.policy.noise_std,
                                m.output.policy.grid),
            circuit_privacy=m.output.circuit_privacy,
            flooding_std=m.output.flooding_std,
            range_check=m.output.range_check,
        ),
        tolerance=m.tolerance,
        price_cents=m.price_cents,
        trial_rows_remaining=m.trial_rows_remaining,
        key_tag=m.key_tag,
        buyer_id=m.buyer_id,
        issued_at=m.issued_at,
        seller_public_key=m.seller_public_key,
        estimate=estimate_from_pb(m.estimate),
        trial_price_per_row_cents=m.trial_price_per_row_cents,
        plan_commitment=m.plan_commitment,
        plan_tolerance=m.plan_tolerance,
    )


def estimate_to_pb(e: Estimate) -> pb.Estimate:
    return pb.Estimate(packing=e.packing, key_bytes=e.key_bytes,
                       ciphertext_bytes=e.ciphertext_bytes, result_bytes=e.result_bytes,
                       evaluate_seconds=e.evaluate_seconds,
                       rows_per_ciphertext=e.rows_per_ciphertext, period=e.period,
                       setup_seconds=e.setup_seconds, encrypt_seconds=e.encrypt_seconds)


def estimate_from_pb(m: pb.Estimate) -> Estimate:
    return Estimate(m.packing, m.key_bytes, m.ciphertext_bytes, m.result_bytes,
                    m.evaluate_seconds, m.rows_per_ciphertext, m.period or 1,
                    m.setup_seconds, m.encrypt_seconds)


# ----- receipts -----

def receipt_payload(receipt: Receipt) -> bytes:
    return pb.Receipt(
        trial_id=receipt.trial_id,
        batch_index=receipt.batch_index,
        rows=receipt.rows,
        offer_sha256=receipt.offer_sha256,
        model_commitment=receipt.model_commitment,
        keys_sha256=receipt.keys_sha256,
        input_sha256=receipt.input_sha256,
        result_sha256=receipt.result_sha256,
        evaluated_at=receipt.evaluated_at,
    ).SerializeToString(deterministic=True)


def receipt_from_payload(payload: bytes) -> Receipt:
    m = pb.Receipt()
    _parse(m, payload, "receipt")
    return Receipt(m.trial_id, m.batch_index, m.rows, m.offer_sha256, m.model_commitment,
                   m.keys_sha256, tuple(m.input_sha256), tuple(m.result_sha256),
                   m.evaluated_at)


def payment_payload(receipt: PaymentReceipt) -> bytes:
    return pb.PaymentReceipt(
        request_id=receipt.request_id,
        trial_id=receipt.trial_id,
        model_id=receipt.model_id,
        buyer_id=receipt.buyer_id,
        amount_cents=receipt.amount_cents,
        balance_after_cents=receipt.balance_after_cents,
        ledger_txn_id=receipt.ledger_txn_id,
        model_commitment=receipt.model_commitment,
        paid_at=receipt.paid_at,
    ).SerializeToString(deterministic=True)


def payment_from_payload(payload: bytes) -> PaymentReceipt:
    m = pb.PaymentReceipt()
    _parse(m, payload, "payment receipt")
    return PaymentReceipt(m.request_id, m.trial_id, m.model_id, m.buyer_id, m.amount_cents,
                          m.balance_after_cents, m.ledger_txn_id, m.model_commitment,
                          m.paid_at)


def delivery_payload(record: DeliveryRecord) -> bytes:
    return pb.DeliveryRecord(
        trial_id=record.trial_id,
        model_id=record.model_id,
        locked_sha256=record.locked_sha256,
        locked_size=record.locked_size,
        delivered_at=record.delivered_at,
        model_commitment=record.model_commitment,
        sealed_sha256=record.sealed_sha256,
        sealed_size=record.sealed_size,
    ).SerializeToString(deterministic=True)


def delivery_from_payload(payload: bytes) -> DeliveryRecord:
    m = pb.DeliveryRecord()
    _parse(m, payload, "delivery record")
    return DeliveryRecord(m.trial_id, m.model_id, m.locked_sha256, m.locked_size,
                          m.delivered_at, m.model_commitment, m.sealed_sha256, m.sealed_size)


def key_release_payload(release: KeyRelease) -> bytes:
    return pb.KeyRelease(
        trial_id=release.trial_id,
        model_id=release.model_id,
        master_key=release.master_key,
        locked_sha256=release.locked_sha256,
        model_commitment=release.model_commitment,
        released_at=release.released_at,
        sealed_sha256=release.sealed_sha256,
        plan=release.plan,
    ).SerializeToString(deterministic=True)


def key_release_from_payload(payload: bytes) -> KeyRelease:
    m = pb.KeyRelease()
    _parse(m, payload, "key release")
    return KeyRelease(m.trial_id, m.model_id, m.master_key, m.locked_sha256,
                      m.model_commitment, m.released_at, m.sealed_sha256, m.plan)


# ----- catalog and progress -----

def listing_to_pb(listing: ModelListing) -> pb.ModelListing:
    return pb.ModelListing(
        model_id=listing.model_id,
        name=listing.name,
        description=listing.description,
        price_cents=listing.price_cents,
        trial_budget_rows=listing.trial_budget_rows,
        trial_rows_remaining=listing.trial_rows_remaining,
        input_columns=listing.input_columns,
        class_labels=listing.class_labels,
        model_commitment=listing.model_commitment,
        ring_dimension=listing.ring_dimension,
        multiplicative_depth=listing.multiplicative_depth,
        tolerance=listing.tolerance,
        approximation=listing.approximation,
        trial_price_per_row_cents=listing.trial_price_per_row_cents,
        extraction_risk=listing.extraction_risk,
        output_policy=listing.output_policy,
        estimates=[estimate_to_pb(e) for e in listing.estimates],
    )


def listing_from_pb(m: pb.ModelListing) -> ModelListing:
    return ModelListing(m.model_id, m.name, m.description, m.price_cents, m.trial_budget_rows,
                        m.trial_rows_remaining, tuple(m.input_columns), tuple(m.class_labels),
                        m.model_commitment, m.ring_dimension, m.multiplicative_depth,
                        m.tolerance, m.approximation, m.trial_price_per_row_cents,
                        m.extraction_risk, m.output_policy,
                        tuple(estimate_from_pb(e) for e in m.estimates))


def progress_to_pb(progress: Progress) -> pb.Progress:
    return pb.Progress(stage=progress.stage, done=progress.done, total=progress.total)


def progress_from_pb(m: pb.Progress) -> Progress:
    return Progress(m.stage, m.done, m.total)

"""Domain records of the trading protocol (what is offered, signed and delivered).

Plain dataclasses: business logic uses these, never protobuf messages
(common.wire converts at the edge).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.he.packing import SLOT_PER_SAMPLE, Packing
from common.he.params import CkksParams
from common.he.plan import FloatArray, encode_columns

OFFER = "gimme.v1.Offer"
RECEIPT = "gimme.v1.Receipt"
PAYMENT = "gimme.v1.PaymentReceipt"
DELIVERY = "gimme.v1.DeliveryRecord"
KEY_RELEASE = "gimme.v1.KeyRelease"


@dataclass(frozen=True)
class Signed:
    """A payload (serialized record of `kind`) with the seller's Ed25519 signature."""

    kind: str
    payload: bytes
    signature: bytes


@dataclass(frozen=True)
class EncodingSpec:
    input_columns: tuple[str, ...]
    rows_per_ciphertext: int
    input_min: tuple[float, ...]  # the declared input domain (empty for exact models)
    input_max: tuple[float, ...]
    packing: str = SLOT_PER_SAMPLE
    period: int = 1  # feature-packed: entries per row vector
    rotation_indices: tuple[int, ...] = ()  # feature-packed: rotation keys the buyer uploads
    # what is encrypted of column j: (x_j - input_offset[j]) * input_scale[j] (the plan's
    # input encoding, common.he.plan; empty: x_j itself)
    input_offset: tuple[float, ...] = ()
    input_scale: tuple[float, ...] = ()

    def layout(self) -> Packing:
        return Packing(self.packing, self.rows_per_ciphertext, self.period)

    def encoded(self, rows: FloatArray) -> FloatArray:
        """What the buyer encrypts of its (clipped) rows."""
        if not self.input_offset:
            return rows
        return encode_columns(rows, self.input_offset, self.input_scale)

    def decoded(self, values: FloatArray) -> FloatArray:
        """The rows that `encoded` turned into `values` (e.g. decrypted inputs)."""
        if not self.input_offset:
            return values
        rows: FloatArray = values / np.array(self.input_scale) + np.array(self.input_offset)
        return rows


@dataclass(frozen=True)
class OutputPolicy:
    kind: str = "full"  # "full", "noisy" or "rounded"
    noise_std: float = 0.0
    grid: float = 0.0


@dataclass(frozen=True)
class OutputSpec:
    score_count: int
    tail: tuple[str, ...]
    class_labels: tuple[str, ...]
    result_level: int
    probability_output: str
    label_output: str
    policy: OutputPolicy
    circuit_privacy: bool
    flooding_std: float
    range_check: bool = False  # the last result is the plan's range check (common.he.plan)


@dataclass(frozen=True)
class Estimate:
    """The seller's figures for one packing, from its self-test at listing time."""

    packing: str
    key_bytes: int  # every evaluation key the buyer uploads
    ciphertext_bytes: int  # one input ciphertext
    result_bytes: int  # one result ciphertext
    evaluate_seconds: float  # slot-per-sample: one batch; feature-packed: one ciphertext
    rows_per_ciphertext: int
    period: int = 1
    setup_seconds: float = 0.0  # once per trial: making and checking the keys
    encrypt_seconds: float = 0.0  # the buyer's side: one input ciphertext

    def layout(self) -> Packing:
        return Packing(self.packing, self.rows_per_ciphertext, self.period)


@dataclass(frozen=True)
class Offer:
    trial_id: str
    model_id: str
    model_name: str
    model_commitment: bytes
    model_size: int
    params: CkksParams
    encoding: EncodingSpec
    output: OutputSpec
    tolerance: float
    price_cents: int
    trial_rows_remaining: int
    key_tag: str
    buyer_id: str
    issued_at: int
    seller_public_key: bytes
    estimate: Estimate
    trial_price_per_row_cents: int
    plan_commitment: bytes = b""  # SHA-256 of the HE plan evaluated, disclosed on payment
    plan_tolerance: float = 0.0  # max |decrypted result - plan(rows)| per result


@dataclass(frozen=True)
class Receipt:
    trial_id: str
    batch_index: int
    rows: int
    offer_sha256: bytes
    model_commitment: bytes
    keys_sha256: bytes
    input_sha256: tuple[bytes, ...]
    result_sha256: tuple[bytes, ...]
    evaluated_at: int


@dataclass(frozen=True)
class PaymentReceipt:
    request_id: str
    trial_id: str
    model_id: str
    buyer_id: str
    amount_cents: int
    balance_after_cents: int
    ledger_txn_id: str
    model_commitment: bytes
    paid_at: int


@dataclass(frozen=True)
class DeliveryRecord:
    """The seller's word on what it delivered: sealed bytes (checked before payment) that
    the released key opens into the locked model, which unlocks into the commitment."""

    trial_id: str
    model_id: str
    locked_sha256: bytes
    locked_size: int
    delivered_at: int
    model_commitment: bytes
    sealed_sha256: bytes
    sealed_size: int


@dataclass(frozen=True)
class KeyRelease:
    trial_id: str
    model_id: str
    master_key: bytes
    locked_sha256: bytes
    model_commitment: bytes
    released_at: int
    sealed_sha256: bytes
    plan: bytes = b""  # the HE plan the trial evaluated (sha256 = the offer's plan_commitment)


@dataclass(frozen=True)
class ModelListing:
    model_id: str
    name: str
    description: str
    price_cents: int
    trial_budget_rows: int
    trial_rows_remaining: int
    input_columns: tuple[str, ...]
    class_labels: tuple[str, ...]
    model_commitment: bytes
    ring_dimension: int
    multiplicative_depth: int
    tolerance: float
    approximation: str
    trial_price_per_row_cents: int
    extraction_risk: str
    output_policy: str
    estimates: tuple[Estimate, ...]  # one per packing the seller offers


@dataclass(frozen=True)
class Progress:
    stage: str
    done: int
    total: int

"""A trade's evidence and the checks on it, shared by the buyer (`gimme-buyer verify`, on its
trial folder) and an arbiter (`gimme-arbiter verify`, on the bundle the buyer hands over).

Both read the same names:
    offer.json, receipt-B.json, payment.json, delivery.json, key-release.json   signed
    inputs/batch-B/ct-J.bin       the encrypted columns the buyer uploaded
    results/batch-B/score-I.bin   the encrypted results the seller returned
    rows.npz (X, y)               the rows the buyer says it encrypted
    scores.npy                    what the buyer says the results decrypt to
    model.sealed                  the delivered file: the Deep-Locked model, sealed
    model.locked.onnx             the Deep-Locked model from the opened seal (buyer's folder)
    secret.key                    the trial's CKKS secret key (in a bundle only)
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
from rich.table import Table

from common.deeplock import unlock, unseal
from common.errors import BadInput, GimmeError, NotFound, Refused
from common.he.plan import HEPlan, model_scores
from common.onnx_io import run_model
from common.protocol import OFFER, RECEIPT, Offer, Receipt, Signed
from common.signing import sha256, verify
from common.tabular import FloatArray
from common.tail import apply_tail, predicted_labels
from common.trust import open_delivery, open_key_release
from common.wire import envelope_from_json, key_release_from_payload, receipt_from_payload

SEALED_MODEL = "model.sealed"
LOCKED_MODEL = "model.locked.onnx"
ROWS = "rows.npz"
SCORES = "scores.npy"
SECRET_KEY = "secret.key"
MAX_BUNDLE_ENTRY = 4 << 30


def input_name(batch: int, index: int) -> str:
    return f"inputs/batch-{batch}/ct-{index}.bin"


def result_name(batch: int, score: int) -> str:
    return f"results/batch-{batch}/score-{score}.bin"


class EvidenceSource(Protocol):
    """Named files: a buyer's trial folder or an evidence bundle."""

    def read(self, name: str) -> bytes: ...

    def has(self, name: str) -> bool: ...

    def load_signed(self, name: str) -> Signed: ...

    def signed_names(self, prefix: str) -> list[str]: ...


class Bundle:
    """An evidence bundle (zip), read in place: nothing in it is extracted by its own name."""

    def __init__(self, path: Path) -> None:
        try:
            self.zip = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise BadInput(f"{path} is not an evidence bundle (a zip from 'gimme-buyer "
                           f"verify'): {exc}") from exc
        self.path = path
        self.names = set(self.zip.namelist())

    def read(self, name: str) -> bytes:
        if name not in self.names:
            raise NotFound(f"the bundle has no {name}")
        if self.zip.getinfo(name).file_size > MAX_BUNDLE_ENTRY:
            raise BadInput(f"{name} in the bundle declares more than {MAX_BUNDLE_ENTRY} bytes")
        return self.zip.read(name)

    def has(self, name: str) -> bool:
        return name in self.names

    def load_signed(self, name: str) -> Signed:
        return envelope_from_json(self.read(f"{name}.json"), f"{name}.json in the bundle")

    def signed_names(self, prefix: str) -> list[str]:
        return sorted(n[:-len(".json")] for n in self.names
                      if n.startswith(prefix) and n.endswith(".json") and "/" not in n)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def load_rows(source: EvidenceSource) -> tuple[FloatArray, tuple[str, ...]]:
    try:
        with np.load(io.BytesIO(source.read(ROWS)), allow_pickle=False) as data:
            return (np.asarray(data["X"], dtype=np.float64),
                    tuple(str(v) for v in data["y"]))
    except (ValueError, KeyError, OSError) as exc:
        raise BadInput(f"{ROWS} is not an .npz with arrays X and y: {exc}") from exc


def load_scores(source: EvidenceSource) -> FloatArray:
    try:
        scores: FloatArray = np.load(io.BytesIO(source.read(SCORES)), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise BadInput(f"{SCORES} is not a .npy array: {exc}") from exc
    return scores.astype(np.float64)


def check_receipts(source: EvidenceSource, key: bytes, offer: Offer
                   ) -> tuple[Check, list[Receipt]]:
    """Every receipt signed by the seller, for this offer, over the stored inputs and
    results; the batches in order."""
    name = "receipts signed and bound to inputs and results"
    batches = source.signed_names("receipt-")
    if not batches:
        return Check(name, False, "no receipts: the trial did not finish"), []
    offer_digest = sha256(source.load_signed("offer").payload)
    receipts = []
    for batch_name in batches:
        signed = source.load_signed(batch_name)
        try:
            verify(key, RECEIPT, signed.payload, signed.signature)
            receipt = receipt_from_payload(signed.payload)
            b = receipt.batch_index
            results = [sha256(source.read(result_name(b, i)))
                       for i in range(len(receipt.result_sha256))]
            inputs = [sha256(source.read(input_name(b, j)))
                      for j in range(len(receipt.input_sha256))]
        except GimmeError as exc:
            return Check(name, False, f"{batch_name}: {exc.message}"), []
        if (receipt.offer_sha256 != offer_digest or list(receipt.result_sha256) != results
                or list(receipt.input_sha256) != inputs):
            return Check(name, False, f"{batch_name} does not sign the stored offer, inputs "
                                      f"and results"), []
        receipts.append(receipt)
    receipts.sort(key=lambda r: r.batch_index)
    if [r.batch_index for r in receipts] != list(range(len(receipts))):
        return Check(name, False, f"batches {[r.batch_index for r in receipts]} are not "
                                  f"0..{len(receipts) - 1}"), []
    return Check(name, True, f"{len(receipts)} receipt(s), "
                             f"{sum(r.rows for r in receipts)} rows"), receipts


@dataclass(frozen=True)
class Opened:
    """The delivered model as the released key opens it, and the checks on the way."""

    records_ok: bool  # the seller's delivery record and key release are genuine
    model: bytes | None
    locked: bytes | None  # the Deep-Locked model inside the seal
    checks: list[Check]


def open_delivered_model(source: EvidenceSource, key: bytes, offer: Offer) -> Opened:
    """Open the sealed delivery with the released key and unlock it (in memory); compare
    it with the commitment. Unsigned or mismatched records are the holder's problem; a
    signed key that does not open the signed delivery into the committed model is the
    seller's (the last check)."""
    if not source.has(SEALED_MODEL):
        return Opened(False, None, None, [Check("model delivered", False,
                                                "no model: run 'gimme-buyer buy'")])
    sealed = source.read(SEALED_MODEL)
    try:
        record = open_delivery(source.load_signed("delivery"), key, offer, sealed)
    except GimmeError as exc:
        return Opened(False, None, None, [Check("delivery record signed for these bytes",
                                                False, exc.message)])
    delivered = Check("delivery record signed for these bytes", True,
                      f"{len(sealed)} sealed bytes")
    if not source.has("key-release.json"):
        return Opened(False, None, None, [delivered, Check("key released", False,
                                                           "not paid yet")])
    try:
        release = open_key_release(source.load_signed("key-release"), key, offer, sealed)
    except GimmeError as exc:
        return Opened(False, None, None, [delivered, Check("key released for this model",
                                                           False, exc.message)])
    released = Check("key released for this model", True, "signed by the seller")
    try:
        locked = unseal(sealed, release.master_key)
        if sha256(locked) != record.locked_sha256 or len(locked) != record.locked_size:
            raise Refused("the seal holds another locked model than the delivery record "
                          "names")
        model = unlock(locked, release.master_key)
    except GimmeError as exc:
        return Opened(True, None, None, [delivered, released,
                                         Check("key opens the model", False, exc.message)])
    digest = sha256(model)
    same = digest == offer.model_commitment and len(model) == offer.model_size
    return Opened(True, model, locked, [delivered, released, Check(
        "unlocked model is the committed one", same,
        f"{len(model)} bytes, sha256 {digest.hex()[:16]}… vs committed {offer.model_size} "
        f"bytes, {offer.model_commitment.hex()[:16]}…")])


@dataclass(frozen=True)
class Reproduction:
    """Step 9 on the opened model, in two questions with separate answers:
    (a) did the seller compute the plan it committed to on the buyer's rows (if not, the
        seller is at fault: nothing the buyer sends can make an honest evaluation differ
        from the plan by more than the signed plan tolerance, save values the offered CKKS
        parameters cannot hold, which are not judged);
    (b) how far the delivered model is from the trial: within the signed tolerance on rows
        inside the plan's guaranteed ranges (the seller's promise), only reported outside
        them, where the approximation promises nothing and the trial said so."""

    checks: list[Check]
    seller_fault: str | None  # why the seller is at fault, if it is
    max_error: float | None  # (b) on the rows inside the plan's ranges
    agreement: float | None
    outside: list[int]  # rows outside the plan's ranges (0-based)


def check_reproduction(source: EvidenceSource, offer: Offer, model: bytes, rows: FloatArray,
                       scores: FloatArray) -> Reproduction:
    """(a) and (b) above; call once open_delivered_model found the records genuine (the key
    release, which discloses the plan, is then the seller's)."""
    checks, fault, inside = _check_plan(source, offer, rows, scores)
    tested = model_scores(scores, offer.output.range_check)
    if inside.any():
        check, max_error, agreement = _compare(offer, model, rows[inside], tested[inside])
    else:
        check, max_error, agreement = Check(
            "delivered model reproduces the trial", True, "no tested row is inside the "
            "plan's ranges: the trial tested nothing the seller guarantees"), None, None
    checks.append(check)
    outside = np.flatnonzero(~inside).tolist()
    if outside:
        far, _error, _agreement = _compare(offer, model, rows[~inside], tested[~inside])
        checks.append(Check("delivered model outside the plan's ranges", True,
                            f"{far.detail} (not guaranteed there: not the seller's fault)"))
    if fault is None and not check.ok:
        fault = ("the results the seller signed during the trial were not computed by the "
                 "model it committed to and delivered")
    return Reproduction(checks, fault, max_error, agreement, outside)


def _check_plan(source: EvidenceSource, offer: Offer, rows: FloatArray, scores: FloatArray
                ) -> tuple[list[Check], str | None, npt.NDArray[np.bool_]]:
    """Question (a), and the rows inside the plan's ranges (every row when no plan can
    tell: an offer without a plan commitment, or a plan that is not the committed one)."""
    everywhere = np.ones(len(rows), dtype=bool)
    name = "seller computed the committed plan"
    if not offer.plan_commitment:
        return [Check(name, True, "the offer commits to no HE plan (an older seller): the "
                                  "model is compared with the trial on every row")], None, \
            everywhere
    disclosed = key_release_from_payload(source.load_signed("key-release").payload).plan
    try:
        if sha256(disclosed) != offer.plan_commitment:
            raise Refused("the plan disclosed on payment is not the one the offer committed "
                          "to")
        plan = HEPlan.from_bytes(disclosed)
        if (plan.input_count, plan.score_count, plan.range_check) != (
                len(offer.encoding.input_columns), offer.output.score_count,
                offer.output.range_check):
            raise Refused(f"the committed plan takes {plan.input_count} columns to "
                          f"{plan.score_count} results (range check: {plan.range_check}), "
                          f"not what the offer says")
        encoding = tuple(() if v is None else tuple(v.tolist())
                         for v in (plan.input_offset, plan.input_scale))
        if encoding != (offer.encoding.input_offset, offer.encoding.input_scale):
            raise Refused("the committed plan encodes its input columns otherwise than the "
                          "offer told the buyer to encrypt them")
    except GimmeError as exc:
        return [Check(name, False, exc.message)], exc.message, everywhere
    planned = plan.simulate(rows)
    if scores.shape != planned.shape:
        raise BadInput(f"{SCORES} holds {scores.shape} results, the trial's plan gives "
                       f"{planned.shape}")
    # beyond this the CKKS parameters cannot hold a result: its ciphertext, so the whole
    # batch, decrypts to noise whoever computed it
    bits = offer.params.first_mod_bits - offer.params.scaling_mod_bits - 1
    batch = np.arange(len(rows)) // offer.encoding.layout().slots
    unholdable = np.unique(batch[np.abs(planned).max(axis=1) >= 2.0 ** bits])
    judged = ~np.isin(batch, unholdable)
    deviation = np.abs(scores - planned).max(axis=1)
    wrong = np.flatnonzero(judged & (deviation > offer.plan_tolerance))
    worst = float(deviation[judged].max()) if judged.any() else 0.0
    detail = (f"max |decrypted - plan(rows)| = {worst:.3g} "
              f"{'>' if wrong.size else '<='} plan tolerance {offer.plan_tolerance:.3g} on "
              f"{int(judged.sum())} rows")
    if unholdable.size:
        detail += (f"; batches {unholdable.tolist()} not judged: the plan's results there "
                   f"reach 2^{bits}, more than the offered CKKS parameters hold")
    checks = [Check(name, not wrong.size, detail)]
    fault = (f"the results the seller signed are not the plan it committed to, computed on "
             f"the buyer's rows (rows {_rows(wrong.tolist())})" if wrong.size else None)
    excess = plan.range_excess(rows)
    inside = excess <= 1.0
    outside = np.flatnonzero(~inside)
    detail = f"{int(inside.sum())} of {len(rows)} rows inside"
    if outside.size:
        detail += (f"; {outside.size} outside (rows {_rows(outside.tolist())}; up to "
                   f"{float(excess.max()):.3g} x a range's half-width)")
        if plan.range_check:
            named = np.flatnonzero(scores[:, -1] > 1 + offer.plan_tolerance)
            detail += f", {np.isin(outside, named).sum()} of them named at trial time"
    checks.append(Check("rows inside the plan's guaranteed ranges", True, detail))
    return checks, fault, inside


def _rows(rows: list[int]) -> str:
    return ", ".join(str(r) for r in rows[:10]) + (", ..." if len(rows) > 10 else "")


def _compare(offer: Offer, model: bytes, rows: FloatArray, scores: FloatArray
             ) -> tuple[Check, float | None, float | None]:
    """The model (onnxruntime) on the tested rows against the decrypted trial results:
    (check, max error, top-1 agreement)."""
    name = "delivered model reproduces the trial"
    try:
        tested = apply_tail(scores, offer.output.tail)
        delivered = run_model(model, rows, offer.output.probability_output,
                              offer.output.class_labels)
    except GimmeError as exc:
        return Check(name, False, f"the delivered model does not run: {exc.message}"), None, None
    if delivered.shape != tested.shape:
        return (Check(name, False, f"delivered model outputs {delivered.shape}, the trial "
                                   f"had {tested.shape}"), None, None)
    max_error = float(np.max(np.abs(delivered - tested))) if len(rows) else 0.0
    ours, theirs = (predicted_labels(delivered, offer.output.class_labels),
                    predicted_labels(tested, offer.output.class_labels))
    agreement = (float(np.mean([a == b for a, b in zip(ours, theirs, strict=True)]))
                 if ours else 1.0)
    ok = max_error <= offer.tolerance
    return (Check(name, ok, f"max |f'(m) - f(m)| = {max_error:.3g} "
                            f"{'<=' if ok else '>'} tolerance {offer.tolerance:.3g}; top-1 "
                            f"agreement {agreement:.2%} on {len(rows)} rows"),
            max_error, agreement)


def checks_table(title: str, checks: list[Check]) -> Table:
    table = Table("check", "result", "detail", title=title)
    for check in checks:
        table.add_row(check.name, "[green]ok[/green]" if check.ok else "[red]FAIL[/red]",
                      check.detail)
    return table


def signer_of(signed_offer: Signed, candidates: list[bytes]) -> bytes:
    """The candidate key that signed the offer (signature first, then parse)."""
    for key in candidates:
        try:
            verify(key, OFFER, signed_offer.payload, signed_offer.signature)
        except Refused:
            continue
        return key
    raise Refused("the offer is not signed by any of the seller keys given")

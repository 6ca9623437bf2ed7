"""The seller's side of the protocol (steps 2, 4, 5, 7, 8), free of gRPC and OpenFHE.

Uploaded bytes are spooled to disk and handed to a throwaway worker process
(seller_server.worker); the gateway only checks sizes, digests and state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from common.deeplock import key_id, lock, new_master_key, seal
from common.errors import (
    BadInput,
    Exhausted,
    NotFound,
    Refused,
    Unavailable,
    WorkerFailed,
    WrongState,
)
from common.escrow import open_deposit
from common.he import engine
from common.he.packing import FEATURE_PACKED, SLOT_PER_SAMPLE, pack_plan
from common.he.params import new_key_tag, public_key_seed
from common.he.plan import HEPlan
from common.protocol import (
    DELIVERY,
    KEY_RELEASE,
    OFFER,
    PAYMENT,
    RECEIPT,
    DeliveryRecord,
    EncodingSpec,
    KeyRelease,
    ModelListing,
    Offer,
    PaymentReceipt,
    Progress,
    Receipt,
    Signed,
)
from common.signing import Signer, keys_digest, sha256
from common.wire import (
    delivery_payload,
    key_release_payload,
    offer_from_payload,
    offer_payload,
    payment_payload,
    receipt_from_payload,
    receipt_payload,
)
from seller_server import jobs
from seller_server.catalog import TOLERANCE_FACTOR, Listing, sale_key
from seller_server.compiler import compile_model
from seller_server.fingerprint import fingerprint
from seller_server.store import Store, TrialRow, budget_exhausted
from seller_server.worker import UNTRUSTED_STAGES, Capacity, WorkerSlots

log = logging.getLogger(__name__)
ProgressFn = Callable[[Progress], None]
MODELS_KEPT = 64  # trial copies kept in memory (the rest are rebuilt from their keys)


@dataclass(frozen=True)
class TrialModel:
    """What one trial tests and its buyer receives: the listed model or its fingerprinted
    copy, with the HE plan compiled from it."""

    model_bytes: bytes
    plan: HEPlan
    tolerance: float


@dataclass(frozen=True)
class Evaluation:
    results: list[bytes]
    receipt: Signed


def _charged_rows(listing: Listing, encoding: EncodingSpec, rows: int) -> int:
    """What a batch of `rows` rows costs in budget rows: every row its results can carry
    (Packing.charged_rows; seller_server.worker says why)."""
    return encoding.layout().charged_rows(rows, listing.plan.score_count)


class Seller:
    def __init__(self, listings: Sequence[Listing], store: Store, signer: Signer,
                 spool: Path, capacity: Capacity, security_bits: int,
                 escrow_keys: Sequence[bytes] = (), slots: WorkerSlots | None = None) -> None:
        # replaced, never changed in place, as listings are added (readers need no lock)
        self.listings = {listing.model_id: listing for listing in listings}
        self.loading: frozenset[str] = frozenset()  # model ids still compiling
        self._listings_lock = threading.Lock()
        self.escrow_keys = list(escrow_keys)  # escrows whose deposit receipts pay here
        self.store = store
        self.signer = signer
        self.spool = spool
        self.capacity = capacity
        self.security_bits = security_bits
        self._slots = slots or WorkerSlots(capacity.concurrent_evaluations)
        self._models: OrderedDict[str, TrialModel] = OrderedDict()  # recent trials' copies
        self._models_lock = threading.Lock()

    def _sign(self, kind: str, payload: bytes) -> Signed:
        return Signed(kind, payload, self.signer.sign(kind, payload))

    def add_listing(self, listing: Listing) -> None:
        """List one more model (the catalog lists each as soon as it is ready)."""
        with self._listings_lock:
            self.listings = {**self.listings, listing.model_id: listing}

    def listing(self, model_id: str) -> Listing:
        listing = self.listings.get(model_id)
        if listing is None:
            if model_id in self.loading:
                raise Unavailable(f"the seller is still loading model {model_id!r} (compiling "
                                  f"and self-testing it); retry in a few minutes")
            raise NotFound(f"no model {model_id!r}; 'gimme-buyer models' lists what is "
                           f"offered ({', '.join(sorted(self.listings))})")
        return listing

    # ----- catalog -----

    def list_models(self, buyer_id: str) -> list[ModelListing]:
        return [
            ModelListing(
                model_id=listing.model_id,
                name=listing.model_id,
                description=listing.spec.description,
                price_cents=listing.spec.price_cents,
                trial_budget_rows=listing.spec.trial_budget_rows,
                trial_rows_remaining=self._remaining(buyer_id, listing),
                input_columns=listing.spec.input_columns,
                class_labels=listing.tail.class_labels,
                model_commitment=listing.commitment,
                ring_dimension=listing.params.ring_dimension,
                multiplicative_depth=listing.params.multiplicative_depth,
                tolerance=listing.tolerance,
                approximation=listing.approximation,
                trial_price_per_row_cents=listing.spec.trial_price_per_row_cents,
                extraction_risk=listing.extraction_risk,
                output_policy=listing.describe_output(),
                estimates=listing.estimates(),
            )
            for listing in self.listings.values()
        ]

    def _remaining(self, buyer_id: str, listing: Listing) -> int:
        used = self.store.rows_used(buyer_id, listing.model_id)
        return max(listing.spec.trial_budget_rows - used, 0)

    # ----- step 2: the signed offer -----

    def open_trial(self, buyer_id: str, model_id: str, packing: str = SLOT_PER_SAMPLE
                   ) -> Signed:
        listing = self.listing(model_id)
        estimate = listing.estimate(packing)
        remaining = self._remaining(buyer_id, listing)
        if remaining == 0:
            raise Exhausted(f"trial budget for {model_id!r} is used up "
                            f"({listing.spec.trial_budget_rows} rows); buy the model for "
                            f"{listing.spec.price_cents / 100:.2f} or ask the seller for more")
        # None: the listed model (not fingerprinted, or no copy passed its check)
        key = sale_key(listing.copy_check, listing.fingerprint_strength)
        model = self._copy(listing, key)
        rotation_indices = (tuple(pack_plan(model.plan).rotation_indices(listing.params.slots))
                            if estimate.packing == FEATURE_PACKED else ())
        offer = Offer(
            trial_id=secrets.token_hex(12),
            model_id=model_id,
            model_name=listing.model_id,
            model_commitment=sha256(model.model_bytes),
            model_size=len(model.model_bytes),
            params=listing.params,
            encoding=listing.encoding(estimate, rotation_indices, model.plan),
            output=listing.output(),
            tolerance=model.tolerance,
            price_cents=listing.spec.price_cents,
            trial_rows_remaining=remaining,
            key_tag=new_key_tag(),
            buyer_id=buyer_id,
            issued_at=int(time.time()),
            seller_public_key=self.signer.public_key,
            estimate=estimate,
            trial_price_per_row_cents=listing.spec.trial_price_per_row_cents,
            # the plan itself is the seller's until paid for: its digest now, it on payment
            plan_commitment=sha256(model.plan.to_bytes()),
            plan_tolerance=listing.plan_tolerance,
        )
        signed = self._sign(OFFER, offer_payload(offer))
        self.store.add_trial(TrialRow(offer.trial_id, model_id, buyer_id, offer.key_tag,
                                      listing.commitment, offer.model_commitment,
                                      signed.payload, signed.signature, None))
        if key is not None:
            self.store.add_fingerprint(offer.trial_id, model_id, key,
                                       listing.fingerprint_strength)
        self._remember(offer.trial_id, model)
        log.info("trial %s opened: buyer %s, model %s (%s), %d rows left", offer.trial_id,
                 buyer_id, model_id, estimate.packing, remaining)
        return signed

    def _trial(self, buyer_id: str, trial_id: str) -> tuple[TrialRow, Listing]:
        """The trial and its listing, which must still be the model the offer committed to."""
        trial = self.store.trial(trial_id, buyer_id)
        listing = self.listing(trial.model_id)
        if listing.commitment != trial.base_commitment:
            raise WrongState(f"model {trial.model_id!r} has changed since trial {trial_id} was "
                             f"offered; open a new trial to test the current model")
        return trial, listing

    def _trial_to_evaluate(self, buyer_id: str, trial_id: str
                           ) -> tuple[TrialRow, Listing, EncodingSpec]:
        """`_trial` and its offer's encoding, whose packing the listing must still offer
        (its self-test figures size the keys); buying what was tested stays possible
        either way."""
        trial, listing = self._trial(buyer_id, trial_id)
        if self.store.paid(trial_id):
            raise WrongState(f"trial {trial_id} is paid (its model is bought): it takes no more "
                             f"keys or data; open a new trial to test again")
        encoding = offer_from_payload(trial.offer_payload).encoding
        if encoding.packing not in {estimate.packing for estimate in listing.estimates()}:
            raise WrongState(f"model {trial.model_id!r} is no longer offered "
                             f"{encoding.packing} (trial {trial_id}); open a new trial")
        return trial, listing, encoding

    # ----- step 4: keys -----

    def key_sizes(self, buyer_id: str, trial_id: str) -> dict[str, tuple[int, int | None]]:
        """The key objects this trial takes, in upload order: name -> (size cap, exact size
        where it is known). Rotation keys are sized by the offer's index count; the
        worker's byte template checks them exactly."""
        _trial, listing, encoding = self._trial_to_evaluate(buyer_id, trial_id)
        m = listing.measured
        sizes: dict[str, tuple[int, int | None]] = {
            "relin_key": (m.relin_key_bytes, m.relin_key_bytes),
            "public_key": (m.public_key_bytes, m.public_key_bytes)}
        indices = encoding.rotation_indices
        if indices:
            per_key = -(-m.packed_rotation_key_bytes // m.packed_rotation_keys)
            sizes["rotation_keys"] = (per_key * (len(indices) + 1), None)
        return sizes

    def accept_keys(self, buyer_id: str, trial_id: str, keys: dict[str, bytes]) -> bytes:
        """Check an uploaded key set in a worker and record its digest. Each upload is
        written to a directory of its own and checked there; only a set that passed moves
        to the directory named by its digest (seller_server.jobs), where evaluations open
        it; one that fails is deleted."""
        trial, listing, encoding = self._trial_to_evaluate(buyer_id, trial_id)
        digest = keys_digest(*keys.values())
        accepted = self._key_set(trial_id, digest, tuple(keys))
        upload = dataclasses.replace(accepted, directory=str(
            self._trial_dir(trial_id) / f"upload-{secrets.token_hex(8)}"))
        staging = Path(upload.directory)
        try:
            staging.mkdir()
            for name, data in keys.items():
                upload.path(name).write_bytes(data)
            with self._slots.trade():  # key checks are memory-heavy workers too
                jobs.run(jobs.CheckKeys(self._setup(trial, listing, encoding), upload,
                                        public_key_seed(trial_id, trial.key_tag).hex()),
                         limits=self.capacity.limits)
            directory = Path(accepted.directory)
            with contextlib.suppress(OSError):  # OSError: these very bytes were accepted
                staging.rename(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.store.set_keys(trial_id, digest)
        for old in directory.parent.glob("keys-*"):  # the sets it replaces
            if old != directory:
                shutil.rmtree(old, ignore_errors=True)
        log.info("trial %s: keys accepted (%s)", trial_id,
                 ", ".join(f"{name} {len(data)} bytes" for name, data in keys.items()))
        return digest

    def _key_set(self, trial_id: str, digest: bytes, names: tuple[str, ...]) -> jobs.KeySet:
        return jobs.KeySet(str(self._trial_dir(trial_id) / f"keys-{digest.hex()}"),
                           digest.hex(), names)

    def _setup(self, trial: TrialRow, listing: Listing, encoding: EncodingSpec
               ) -> jobs.TrialSetup:
        """What every worker job of this trial is told: parameters, plan, packing."""
        return jobs.TrialSetup(
            listing.params, self.security_bits,
            str(self._plan_file(self._trial_model(trial, listing).plan)), trial.key_tag,
            encoding.layout(), tuple(encoding.rotation_indices))

    # ----- steps 4-5: evaluation -----

    def batch_shape(self, buyer_id: str, trial_id: str, batch_index: int, rows: int
                    ) -> tuple[int, int]:
        """Check a batch before its upload; returns (ciphertext count, exact size of each)."""
        trial, listing, encoding = self._trial_to_evaluate(buyer_id, trial_id)
        if trial.keys_sha256 is None:
            raise WrongState(f"trial {trial_id}: no evaluation keys (not uploaded yet, or "
                             f"expired after the trial sat idle): upload them before data")
        if not 0 < rows <= listing.params.slots:
            raise BadInput(f"a batch holds 1..{listing.params.slots} rows, not {rows}")
        if batch_index > 10_000:
            raise BadInput(f"batch index {batch_index} is out of range")
        remaining = self._remaining(buyer_id, listing)
        charged = _charged_rows(listing, encoding, rows)
        if charged > remaining:
            raise budget_exhausted(listing.model_id, remaining, listing.spec.trial_budget_rows,
                                   charged, listing.spec.trial_price_per_row_cents)
        return (encoding.layout().ciphertexts(rows, len(listing.spec.input_columns)),
                listing.measured.ciphertext_bytes)

    def evaluate(self, buyer_id: str, trial_id: str, batch_index: int, rows: int,
                 inputs: Sequence[bytes], on_progress: ProgressFn,
                 cancel: threading.Event | None = None) -> Evaluation:
        """Charge, evaluate and sign one batch; its results are kept (`results`) until the
        trial's keys expire. Setting `cancel` (the buyer went away) kills the worker and
        refunds the rows."""
        trial, listing, encoding = self._trial_to_evaluate(buyer_id, trial_id)
        assert trial.keys_sha256 is not None
        self.store.reserve_rows(trial, batch_index, _charged_rows(listing, encoding, rows),
                                listing.spec.trial_budget_rows,
                                listing.spec.trial_price_per_row_cents)
        batch_dir = self._trial_dir(trial_id) / f"batch-{batch_index}"
        results_dir = self._results_dir(trial_id, batch_index)
        try:
            batch_dir.mkdir(parents=True, exist_ok=True)
            paths = []
            for index, blob in enumerate(inputs):
                path = batch_dir / f"in-{index}.bin"
                path.write_bytes(blob)
                paths.append(str(path))
            on_progress(Progress("queued", 0, 0))
            job = jobs.EvaluateBatch(
                self._setup(trial, listing, encoding),
                self._key_set(trial_id, trial.keys_sha256,
                              jobs.key_names(encoding.layout())),
                rows, listing.spec.circuit_privacy, listing.measured.flooding_std,
                listing.spec.output_policy.noise_std, tuple(paths), str(results_dir),
                self.capacity.workers_per_evaluation)
            with self._slots.trade():
                outcome = jobs.run(
                    job, limits=self.capacity.limits,
                    on_progress=lambda p: on_progress(Progress(
                        str(p.get("stage", "")), int(p.get("done", 0)), int(p.get("total", 0)))),
                    untrusted_stages=UNTRUSTED_STAGES, cancel=cancel)
            results = [Path(r["path"]).read_bytes() for r in outcome["results"]]
            receipt = Receipt(
                trial_id=trial_id,
                batch_index=batch_index,
                rows=rows,
                offer_sha256=sha256(trial.offer_payload),
                model_commitment=trial.model_commitment,
                keys_sha256=trial.keys_sha256,
                input_sha256=tuple(sha256(b) for b in inputs),
                result_sha256=tuple(sha256(r) for r in results),
                evaluated_at=int(time.time()),
            )
            signed = self._sign(RECEIPT, receipt_payload(receipt))
            self.store.finish_evaluation(trial_id, batch_index, signed)
        except BaseException:
            self.store.release_rows(trial, batch_index)
            shutil.rmtree(results_dir, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(batch_dir, ignore_errors=True)
        log.info("trial %s batch %d: %d rows evaluated in %.2fs", trial_id, batch_index, rows,
                 outcome["evaluate_seconds"])
        return Evaluation(results, signed)

    def results(self, buyer_id: str, trial_id: str, batch_index: int) -> Evaluation:
        """An evaluated batch's results and receipt again, for a buyer whose reply was lost."""
        self.store.trial(trial_id, buyer_id)  # the buyer's own trial, or NotFound
        receipt = self.store.receipt(trial_id, batch_index)
        directory = self._results_dir(trial_id, batch_index)
        if receipt is None or not directory.is_dir():
            raise NotFound(f"trial {trial_id} has no results for batch {batch_index}: it was "
                           f"not evaluated, was refunded, or its results expired; evaluate it "
                           f"(again)")
        count = len(receipt_from_payload(receipt.payload).result_sha256)
        return Evaluation([(directory / f"score-{i}.bin").read_bytes() for i in range(count)],
                          receipt)

    def results_sent(self, trial_id: str, batch_index: int) -> None:
        """The batch's results start going out to its buyer: no refund from now on."""
        self.store.results_sent(trial_id, batch_index)

    # ----- steps 7-8: payment and delivery -----

    def purchase(self, buyer_id: str, trial_id: str, request_id: str,
                 escrow_deposit: Signed | None = None) -> tuple[Signed, Signed]:
        """Payment (idempotent: from the prepaid ledger, or an escrow deposit) and, in
        return, the signed release of the Deep-Lock key."""
        if not 8 <= len(request_id) <= 64:
            raise BadInput("a purchase request id must be 8-64 characters (a fresh UUID works)")
        trial, listing = self._trial(buyer_id, trial_id)
        if escrow_deposit is not None:
            self._check_deposit(escrow_deposit, trial, listing.spec.price_cents)

        def sign_receipt(txn_id: str, balance_after: int) -> Signed:
            return self._sign(PAYMENT, payment_payload(PaymentReceipt(
                request_id=request_id, trial_id=trial_id, model_id=listing.model_id,
                buyer_id=buyer_id, amount_cents=listing.spec.price_cents,
                balance_after_cents=balance_after, ledger_txn_id=txn_id,
                model_commitment=trial.model_commitment, paid_at=int(time.time()))))

        signed = self.store.purchase(request_id, trial, listing.spec.price_cents, sign_receipt,
                                     escrow_deposit)
        shutil.rmtree(self.spool / "trials" / trial_id, ignore_errors=True)  # keys: done
        key = self.store.lock_key(trial_id, new_master_key)
        locked, sealed = self._sealed(trial, listing, key)
        plan = self._trial_model(trial, listing).plan.to_bytes()  # disclosed now it is paid
        release = self._sign(KEY_RELEASE, key_release_payload(KeyRelease(
            trial_id, listing.model_id, key, sha256(locked), trial.model_commitment,
            int(time.time()), sha256(sealed), plan)))
        log.info("trial %s paid: %s bought %s; key %s released", trial_id, buyer_id,
                 listing.model_id, key_id(key))
        return signed, release

    def _check_deposit(self, signed: Signed, trial: TrialRow, price_cents: int) -> None:
        """An escrow deposit pays for a trial only when an escrow this seller trusts signed
        that it holds at least the price for this trial, payable to this seller's key."""
        if not self.escrow_keys:
            raise Refused("this seller trusts no escrow: pay from your prepaid balance (buy "
                          "without --escrow), or ask the seller to serve with --trust-escrow")
        deposit = open_deposit(signed, self.escrow_keys)
        if (deposit.trial_id, deposit.seller_public_key, deposit.model_commitment) != (
                trial.trial_id, self.signer.public_key, trial.model_commitment):
            raise Refused("the escrow deposit is for another trial, seller or model: deposit "
                          "for this trial's offer")
        if deposit.amount_cents < price_cents:
            raise Exhausted(f"the escrow holds {deposit.amount_cents / 100:.2f} for this "
                            f"trial, the price is {price_cents / 100:.2f}")

    def deliver(self, buyer_id: str, trial_id: str) -> tuple[bytes, Signed]:
        """The trial's model, Deep-Locked and sealed: free to download once a batch was
        evaluated (without the key it is not even an ONNX file); payment releases the key."""
        trial, listing = self._trial(buyer_id, trial_id)
        if not self.store.paid(trial_id) and not self.store.evaluated_batches(trial_id):
            raise WrongState(f"trial {trial_id} has no evaluated batch yet: test the model "
                             f"first ('gimme-buyer trial {listing.model_id}')")
        locked, sealed = self._sealed(trial, listing,
                                      self.store.lock_key(trial_id, new_master_key))
        record = DeliveryRecord(trial_id, listing.model_id, sha256(locked), len(locked),
                                int(time.time()), trial.model_commitment, sha256(sealed),
                                len(sealed))
        signed = self._sign(DELIVERY, delivery_payload(record))
        self.store.record_delivery(trial_id, signed)
        log.info("trial %s: sealed model %s delivered", trial_id, listing.model_id)
        return sealed, signed

    def _sealed(self, trial: TrialRow, listing: Listing, key: bytes) -> tuple[bytes, bytes]:
        """(the locked model, the delivered file: it sealed), both fixed by the trial's key."""
        locked = self._locked(trial, listing, key)
        return locked, seal(locked, key)

    def _locked(self, trial: TrialRow, listing: Listing, key: bytes) -> bytes:
        return lock(self._trial_model(trial, listing).model_bytes, key)

    # ----- per-sale copies -----

    def _copy(self, listing: Listing, key: bytes | None) -> TrialModel:
        if key is None:
            return TrialModel(listing.model_bytes, listing.plan, listing.tolerance)
        copy = fingerprint(listing.model_bytes, key, listing.fingerprint_strength)
        compiled = compile_model(copy, listing.calibration, degrees=listing.degrees,
                                 domain=listing.domain)
        compiled = replace(compiled, plan=compiled.plan.with_range_check())
        if engine.levels_needed(compiled.plan) != listing.params.multiplicative_depth:
            raise WorkerFailed(f"the fingerprinted copy of {listing.model_id} compiled to "
                               f"another depth; list it with \"fingerprint\": false")
        return TrialModel(copy, compiled.plan,
                          max(listing.tolerance, TOLERANCE_FACTOR * compiled.approximation_error))

    def _remember(self, trial_id: str, model: TrialModel) -> None:
        with self._models_lock:
            self._models[trial_id] = model
            while len(self._models) > MODELS_KEPT:
                self._models.popitem(last=False)

    def _trial_model(self, trial: TrialRow, listing: Listing) -> TrialModel:
        """The trial's model, rebuilt from its fingerprint key when not in memory."""
        with self._models_lock:
            model = self._models.get(trial.trial_id)
        if model is None:
            mark = self.store.fingerprint(trial.trial_id)
            model = self._copy(listing, mark[0] if mark else None)
            if sha256(model.model_bytes) != trial.model_commitment:
                raise WorkerFailed(f"trial {trial.trial_id}: the rebuilt model does not match "
                                   f"its commitment")
            self._remember(trial.trial_id, model)
        return model

    # ----- files -----

    def expire_keys(self, max_age_seconds: float) -> int:
        """Delete the evaluation keys of unpaid trials idle for `max_age_seconds` (a paid
        trial's are deleted at purchase); their buyers upload keys again to go on. Kept
        results older than that go too, and batches whose results never went out are
        refunded."""
        expired = 0
        for directory in _idle(self.spool / "trials", max_age_seconds):
            shutil.rmtree(directory, ignore_errors=True)
            self.store.set_keys(directory.name, None)
            expired += 1
        if expired:
            log.info("expired the evaluation keys of %d idle trial(s)", expired)
        for directory in _idle(self.spool / "results", max_age_seconds):
            refunded = self.store.refund_unsent(directory.name)
            shutil.rmtree(directory, ignore_errors=True)
            if refunded:
                log.info("trial %s: refunded %d batch(es) whose results were never fetched",
                         directory.name, refunded)
        return expired

    def _results_dir(self, trial_id: str, batch_index: int) -> Path:
        return self.spool / "results" / trial_id / f"batch-{batch_index}"

    def _trial_dir(self, trial_id: str) -> Path:
        directory = self.spool / "trials" / trial_id
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def _plan_file(self, plan: HEPlan) -> Path:
        path = self.spool / "plans" / f"{plan.digest()}.plan"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_bytes(plan.to_bytes())
            tmp.replace(path)
        return path


def _idle(parent: Path, max_age_seconds: float) -> list[Path]:
    """The directories under `parent` whose newest file is older than `max_age_seconds`."""
    now = time.time()
    idle = []
    for directory in parent.glob("*"):
        files = [f for f in directory.rglob("*") if f.is_file()] or [directory]
        if now - max(f.stat().st_mtime for f in files) >= max_age_seconds:
            idle.append(directory)
    return idle

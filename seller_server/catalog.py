"""The seller's catalog: listing files -> compiled, parameterized, self-tested listings.

A catalog directory holds one `NAME.json` listing per model:

    {
      "name": "digits-mlp",                      # model id buyers use
      "description": "...",
      "model": "digits_mlp.onnx",                # relative to the listing file
      "calibration": "digits_calibration.csv",   # seller rows (.csv or .npz with X)
      "input_columns": ["pixel_0_0", ...],
      "price": "40.00",
      "trial_budget_rows": 2000,                 # k: rows a buyer may test
      "trial_price_per_row": "0.01",             # optional, default 0 (free trials)
      "activation_degree": null,                 # optional: fix the Chebyshev degree
      "max_error": 0.01,                         # optional: approximation error target
      "output_policy": {"kind": "noisy", "noise_std": 0.05},  # optional, default full
      "circuit_privacy": true,                   # optional, default true
      "flooding_bits": 4,                        # optional: noise = 2^bits x CKKS error
      "fingerprint": true,                       # optional: a marked copy per sale
      "feature_packing": true,                   # optional: also offer feature packing
      "extraction_criterion": "warn",            # optional: "warn" or "refuse"
      "criterion_factor": 10,                    # optional: c in criterion 1
      "input_domain": [0, 16]                    # optional: [low, high] for every column,
    }                                            # or one [low, high] per column

Offers of a model with approximated activations declare an input domain, to which buyers
clip their rows and on which the compiler guarantees every activation's range
(seller_server.compiler): the listing's `input_domain`, or else the calibration rows' range widened
by DOMAIN_MARGIN of its width on each side and rounded outward to two significant digits.
The calibration rows' exact extremes are the seller's data and never leave it; a buyer
learns each column's range only to about 5-10%.

Compiling and self-testing takes seconds to tens of minutes per model, so results are cached
in the state database under a key covering every input (model, listing, calibration, engine
version), and `serve` loads a catalog with `CatalogLoad`: cached listings at once, the others
each in a guarded worker process of its own (jobs.CompileListing, under serve's
--listing-timeout and --worker-memory-mb), several at once, each listed as soon as it is
ready; one that fails for any reason (refused by the compiler, a crash, a timeout, a memory
limit, an unexpected exception) is refused by name and costs no other listing.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import logging
import math
import queue
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

from common.deeplock import check_lockable
from common.errors import BadInput, GimmeError, Unavailable, Unsupported, WorkerFailed
from common.guarded import Json, Limits, ProgressFn
from common.he import engine
from common.he.packing import FEATURE_PACKED, SLOT_PER_SAMPLE
from common.he.params import CkksParams
from common.he.plan import APPROXIMATING_KINDS, HEPlan, model_scores
from common.onnx_io import load_model_file, parse_model, run_model
from common.protocol import EncodingSpec, Estimate, OutputPolicy, OutputSpec
from common.signing import sha256
from common.tabular import load_table
from common.tail import apply_tail, tail_lipschitz
from seller_server import jobs
from seller_server.compiler import CompiledModel, Tail, compile_model
from seller_server.fingerprint import fingerprint, new_key, weights
from seller_server.jobs import Measured
from seller_server.planner import choose_params
from seller_server.store import Store
from seller_server.worker import Capacity, WorkerSlots

log = logging.getLogger(__name__)

ENGINE_VERSION = "gimme-he-21"  # bump when compiled results would change
TOLERANCE_FACTOR = 3.0
TOLERANCE_FLOOR = 1e-4
_MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ListingSpec:
    path: Path
    model_id: str
    description: str
    model_path: Path
    calibration_path: Path
    input_columns: tuple[str, ...]
    price_cents: int
    trial_budget_rows: int
    trial_price_per_row_cents: int
    activation_degree: int | None
    max_error: float
    output_policy: OutputPolicy
    circuit_privacy: bool
    flooding_bits: int
    extraction_criterion: str
    criterion_factor: float
    fingerprint: bool
    # offer feature packing too: its rotation indices tell buyers the widest layer's size
    # (rounded up to a power of two) and which diagonals the weights fill
    feature_packing: bool = True
    input_domain: tuple[tuple[float, float], ...] | None = None  # per column (low, high)


@dataclass(frozen=True)
class Listing:
    spec: ListingSpec
    model_bytes: bytes
    commitment: bytes
    plan: HEPlan
    tail: Tail
    params: CkksParams
    tolerance: float
    input_min: tuple[float, ...]
    input_max: tuple[float, ...]
    approximation: str
    measured: Measured
    extraction_risk: str
    calibration: FloatArray  # the seller's rows (fingerprinted copies are compiled on them)
    fingerprint_strength: float  # 0: copies are not fingerprinted
    fingerprint_note: str  # the strength chosen and what it costs, or why there is none
    copy_check: CopyCheck | None  # what every sale's copy is checked on (None: unmarked)
    degrees: tuple[int, ...]  # Chebyshev degree of each approximated activation
    plan_tolerance: float  # max |decrypted result - plan(rows)| an offer guarantees
    domain: tuple[tuple[float, ...], tuple[float, ...]]  # the ranges the plan is compiled on

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    def encoding(self, estimate: Estimate, rotation_indices: tuple[int, ...], plan: HEPlan
                 ) -> EncodingSpec:
        """How a buyer encodes its rows for `plan` (this listing's, or a sale's copy's)."""
        offset, scale = plan.input_offset, plan.input_scale
        return EncodingSpec(self.spec.input_columns, estimate.rows_per_ciphertext,
                            self.input_min, self.input_max, estimate.packing, estimate.period,
                            rotation_indices,
                            tuple(offset.tolist()) if offset is not None else (),
                            tuple(scale.tolist()) if scale is not None else ())

    def estimates(self) -> tuple[Estimate, ...]:
        """One per packing this listing offers, from the self-test."""
        m = self.measured
        keys = m.relin_key_bytes + m.public_key_bytes
        offered = [Estimate(SLOT_PER_SAMPLE, keys, m.ciphertext_bytes, m.result_bytes,
                            m.evaluate_seconds, self.params.slots, 1, m.key_check_seconds,
                            m.encrypt_seconds)]
        if m.packed_period:
            offered.append(Estimate(FEATURE_PACKED, keys + m.packed_rotation_key_bytes,
                                    m.ciphertext_bytes, m.result_bytes,
                                    m.packed_evaluate_seconds,
                                    self.params.slots // m.packed_period, m.packed_period,
                                    m.key_check_seconds + m.packed_setup_seconds,
                                    m.encrypt_seconds))
        return tuple(offered)

    def estimate(self, packing: str) -> Estimate:
        for estimate in self.estimates():
            if estimate.packing == packing:
                return estimate
        offered = ", ".join(e.packing for e in self.estimates())
        raise BadInput(f"{self.model_id} is not offered {packing!r}; it is offered: {offered}")

    def describe_output(self) -> str:
        policy = self.spec.output_policy
        text = policy.kind + (f" (noise std {policy.noise_std:g})" if policy.noise_std else "")
        if self.spec.circuit_privacy:
            text += f"; circuit privacy (flooding std {self.measured.flooding_std:.1g})"
        return text

    def output(self) -> OutputSpec:
        return OutputSpec(self.plan.score_count, self.tail.ops, self.tail.class_labels,
                          engine.result_level(self.plan), self.tail.probability_output,
                          self.tail.label_output, self.spec.output_policy,
                          self.spec.circuit_privacy, self.measured.flooding_std,
                          self.plan.range_check)


def read_listing(path: Path) -> ListingSpec:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: not a readable JSON listing ({exc})") from exc
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: a listing is a JSON object")
    required = ("name", "model", "calibration", "input_columns", "price", "trial_budget_rows")
    missing = [k for k in required if k not in raw]
    if missing:
        raise BadInput(f"{path}: missing field(s) {missing}; a listing needs {list(required)}")
    model_id = str(raw["name"])
    if not _MODEL_ID.match(model_id):
        raise BadInput(f"{path}: name {model_id!r} must be lowercase letters, digits, '.', '-' "
                       f"or '_' (at most 64)")
    columns = raw["input_columns"]
    if not isinstance(columns, list) or not columns or len(set(columns)) != len(columns):
        raise BadInput(f"{path}: input_columns must be a non-empty list of distinct names")
    budget = raw["trial_budget_rows"]
    if not isinstance(budget, int) or budget < 1:
        raise BadInput(f"{path}: trial_budget_rows must be a positive integer")
    degree = raw.get("activation_degree")
    if degree is not None and (not isinstance(degree, int) or not 2 <= degree <= 64):
        raise BadInput(f"{path}: activation_degree must be an integer in [2, 64] or null")
    max_error = float(raw.get("max_error", 0.01))
    if not 0 < max_error < 1:
        raise BadInput(f"{path}: max_error must be in (0, 1)")
    flooding_bits = raw.get("flooding_bits", 4)
    if not isinstance(flooding_bits, int) or not 0 <= flooding_bits <= 20:
        raise BadInput(f"{path}: flooding_bits must be an integer in [0, 20]")
    criterion = raw.get("extraction_criterion", "warn")
    if criterion not in ("warn", "refuse"):
        raise BadInput(f"{path}: extraction_criterion must be 'warn' or 'refuse'")
    factor = float(raw.get("criterion_factor", 10))
    if factor < 1:
        raise BadInput(f"{path}: criterion_factor must be at least 1")
    base = path.parent
    return ListingSpec(
        path, model_id, str(raw.get("description", "")), base / raw["model"],
        base / raw["calibration"], tuple(str(c) for c in columns),
        _cents(path, "price", raw["price"]), budget,
        _cents(path, "trial_price_per_row", raw.get("trial_price_per_row", "0")), degree,
        max_error, _output_policy(path, raw.get("output_policy", {"kind": "full"})),
        bool(raw.get("circuit_privacy", True)), flooding_bits, criterion, factor,
        bool(raw.get("fingerprint", True)), bool(raw.get("feature_packing", True)),
        _input_domain(path, raw.get("input_domain"), len(columns)))


def _input_domain(path: Path, raw: object, columns: int
                  ) -> tuple[tuple[float, float], ...] | None:
    if raw is None:
        return None
    pairs: Any = [raw] * columns if isinstance(raw, list) and len(raw) == 2 and all(
        isinstance(v, int | float) for v in raw) else raw
    try:
        domain = tuple((float(low), float(high)) for low, high in pairs)
    except (TypeError, ValueError):
        domain = ()
    if len(domain) != columns or not all(
            np.isfinite(low) and np.isfinite(high) and low < high for low, high in domain):
        raise BadInput(f"{path}: input_domain must be [low, high] (every column) or a list "
                       f"of {columns} [low, high] pairs (one per input column), finite, "
                       f"low < high")
    return domain


DOMAIN_MARGIN = 0.05


def input_domain(spec: ListingSpec, rows: FloatArray) -> tuple[tuple[float, ...],
                                                               tuple[float, ...]]:
    """The (low, high) per column that offers declare: the listing's own, or the
    calibration range widened and rounded outward (see the module's docstring)."""
    if spec.input_domain is not None:
        return (tuple(low for low, _ in spec.input_domain),
                tuple(high for _, high in spec.input_domain))
    low, high = rows.min(axis=0), rows.max(axis=0)
    # a constant column is widened by its magnitude (or 1 for zero) instead of its width
    width = np.where(high > low, high - low, np.maximum(np.abs(high), 1.0))
    return (tuple(_two_digits(v, np.floor) for v in low - DOMAIN_MARGIN * width),
            tuple(_two_digits(v, np.ceil) for v in high + DOMAIN_MARGIN * width))


def _two_digits(value: float, rounding: Callable[[float], float]) -> float:
    """`value` rounded (down or up, by `rounding`) to two significant digits."""
    if value == 0:
        return 0.0
    step = 10.0 ** (np.floor(np.log10(abs(value))) - 1)
    return float(f"{rounding(value / step) * step:.2g}")  # -0.013, not -0.013000000000000001


def _cents(path: Path, field: str, value: object) -> int:
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise BadInput(f"{path}: {field} {value!r} is not a number") from None
    if amount < 0 or amount != amount.quantize(Decimal("0.01")):
        raise BadInput(f"{path}: {field} must be non-negative with at most 2 decimals")
    return int(amount * 100)


def _output_policy(path: Path, raw: object) -> OutputPolicy:
    if not isinstance(raw, dict) or raw.get("kind") not in ("full", "noisy", "rounded"):
        raise BadInput(f"{path}: output_policy must be {{\"kind\": \"full\"}} or "
                       f"{{\"kind\": \"noisy\", \"noise_std\": 0.05}}")
    if raw["kind"] == "rounded":
        raise BadInput(f"{path}: output policy 'rounded' cannot be computed on ciphertexts "
                       f"(a rounding staircase needs a polynomial of degree ~ 2*pi*range/"
                       f"grid); use 'noisy' with noise_std = grid/sqrt(12) for a similar "
                       f"loss of information. 'gimme-seller audit' compares both")
    noise = float(raw.get("noise_std", 0.0))
    if raw["kind"] == "noisy" and noise <= 0:
        raise BadInput(f"{path}: output policy 'noisy' needs a positive noise_std")
    return OutputPolicy(str(raw["kind"]), noise if raw["kind"] == "noisy" else 0.0, 0.0)


def read_model(spec: ListingSpec) -> bytes:
    """The listing's model as self-contained bytes (external data files read in from the
    catalog directory only)."""
    return load_model_file(spec.model_path, spec.path.parent)


LISTING_TIMEOUT = 900.0  # seconds one listing's compile and self-tests may take (serve's default)


@dataclass(frozen=True)
class ListingFiles:
    """The bytes of a listing's files, read once: what is hashed is what is compiled."""

    listing: bytes
    model: bytes  # self-contained (read_model): external data is hashed and compiled too
    calibration: bytes

    @classmethod
    def read(cls, spec: ListingSpec) -> ListingFiles:
        try:
            return cls(spec.path.read_bytes(), read_model(spec),
                       spec.calibration_path.read_bytes())
        except OSError as exc:
            raise BadInput(f"cannot read {exc.filename}: {exc.strerror}") from exc

    def cache_key(self, security_bits: int, insecure_ring: int) -> str:
        """The state database's key for this listing's compiled record: every input."""
        return hashlib.sha256(b"\0".join([
            ENGINE_VERSION.encode(), self.model, self.listing, self.calibration,
            str((security_bits, insecure_ring)).encode()])).hexdigest()


@dataclass(frozen=True)
class _Prepared:
    """What the gateway read of a listing queued to compile."""

    files: ListingFiles
    rows: FloatArray
    key: str


class CatalogLoad:
    """One catalog's loading. Cached listings are listed at once; every other listing is
    compiled and self-tested in a guarded worker of its own (jobs.CompileListing), in file
    order, up to `slots.compile_limit` at once, each within `listing_timeout` seconds.
    Whatever happens to one listing (its model is refused, its worker crashes, runs out of
    memory or of time, any unexpected exception) refuses that listing by name and no other.
    `on_listed` gets each listing as soon as it is ready and `on_settled` runs after each
    listing is listed or refused, both from the loader's threads."""

    def __init__(self, directory: Path, store: Store, *, security_bits: int,
                 insecure_ring: int = 0, capacity: Capacity,
                 listing_timeout: float = LISTING_TIMEOUT, slots: WorkerSlots | None = None,
                 on_listed: Callable[[Listing], None] | None = None,
                 on_settled: Callable[[], None] | None = None) -> None:
        self.directory = directory
        self.store = store
        self.security_bits = security_bits
        self.insecure_ring = insecure_ring
        self.capacity = capacity
        self.listing_timeout = listing_timeout
        self.slots = slots or WorkerSlots(capacity.concurrent_evaluations)
        self.on_listed = on_listed
        self.on_settled = on_settled
        self.listed: list[Listing] = []
        self.refused: list[str] = []  # "FILE: why"
        self._pending: dict[str, str] = {}  # file name -> model id, still loading
        self._lock = threading.Lock()

    def pending(self) -> list[str]:
        """The model ids still compiling (or waiting to)."""
        with self._lock:
            return sorted(self._pending.values())

    def run(self, cancel: threading.Event | None = None) -> tuple[list[Listing], list[str]]:
        """Load every listing; returns once each is listed or refused (or `cancel` is set:
        running compiles are then killed). Listings come back in file order."""
        cancel = cancel or threading.Event()
        paths = sorted(self.directory.glob("*.json"))
        if not paths:
            raise BadInput(f"no listings (*.json) in catalog {self.directory}")
        specs: list[ListingSpec] = []
        for path in paths:
            try:
                spec = read_listing(path)
            except GimmeError as exc:
                self._refuse(path.name, exc.message)
                continue
            if any(s.model_id == spec.model_id for s in specs):
                self._refuse(path.name, f"duplicate model name {spec.model_id!r}")
                continue
            specs.append(spec)
        with self._lock:
            self._pending = {spec.path.name: spec.model_id for spec in specs}
        queued: queue.Queue[tuple[ListingSpec, _Prepared]] = queue.Queue()
        for spec in specs:  # cached listings are listed at once, the others queue
            self._attempt(spec, cancel, functools.partial(self._cached, spec, queued))
        workers = [threading.Thread(target=self._compile_queued, args=(queued, cancel),
                                    daemon=True, name=f"catalog-{index}")
                   for index in range(min(self.slots.compile_limit, queued.qsize()))]
        for worker in workers:  # each compiles queued listings in file order, one at a time
            worker.start()
        for worker in workers:
            worker.join()
        order = {spec.model_id: index for index, spec in enumerate(specs)}
        with self._lock:
            self.listed.sort(key=lambda listing: order[listing.model_id])
            return list(self.listed), list(self.refused)

    def _attempt(self, spec: ListingSpec, cancel: threading.Event,
                 load: Callable[[], Listing | None]) -> None:
        """`load` the listing (None: not yet, it was queued); list what it returns, refuse
        the listing whatever goes wrong."""
        name = spec.path.name
        try:
            listing = load()
        except GimmeError as exc:
            if cancel.is_set():
                log.info("%s: not loaded (the daemon is stopping)", name)
                self._settle(name)
            else:
                self._refuse(name, exc.message)
            return
        except Exception as exc:  # one listing's surprise never stops the others
            log.exception("listing %s failed unexpectedly", name)
            self._refuse(name, f"unexpected {type(exc).__name__} while loading it: {exc}")
            return
        if listing is None:
            return
        with self._lock:
            self.listed.append(listing)
            self._pending.pop(name, None)
            still = sorted(self._pending.values())
        m = listing.measured
        log.info("listed %s: %s; %s; tolerance %.2g; self-test %.2fs, CKKS error %.2g, "
                 "flooding %.2g; extraction risk: %s; %s%s", listing.model_id,
                 listing.params.describe(), listing.approximation, listing.tolerance,
                 m.evaluate_seconds, m.computation_error, m.flooding_std,
                 listing.extraction_risk, listing.fingerprint_note,
                 f"; still compiling: {', '.join(still)}" if still else "")
        if self.on_listed is not None:
            self.on_listed(listing)
        self._settle(None)

    def _refuse(self, name: str, message: str) -> None:
        with self._lock:
            self.refused.append(f"{name}: {message}")
        log.error("refused listing %s: %s", name, message)
        self._settle(name)

    def _settle(self, name: str | None) -> None:
        if name is not None:
            with self._lock:
                self._pending.pop(name, None)
        if self.on_settled is not None:
            self.on_settled()

    def _cached(self, spec: ListingSpec, queued: queue.Queue[tuple[ListingSpec, _Prepared]]
                ) -> Listing | None:
        """The listing from its cached compile, or None once it is queued to compile."""
        files = ListingFiles.read(spec)
        rows = load_table(spec.calibration_path, spec.input_columns).rows
        key = files.cache_key(self.security_bits, self.insecure_ring)
        cached = self.store.compiled(key)
        if cached is not None:
            try:
                record = _record(cached)
                checked_plan(record)
            except (GimmeError, TypeError, ValueError) as exc:  # e.g. HEPlan.check refuses
                log.warning("%s: its cached compile is unusable (%s); compiling it again",
                            spec.path.name, exc.message if isinstance(exc, GimmeError)
                            else f"{type(exc).__name__}: {exc}")
            else:
                return listing_from_record(spec, files.model, rows, record)
        queued.put((spec, _Prepared(files, rows, key)))
        return None

    def _compile_queued(self, queued: queue.Queue[tuple[ListingSpec, _Prepared]],
                        cancel: threading.Event) -> None:
        while True:
            try:
                spec, prepared = queued.get_nowait()
            except queue.Empty:
                return
            self._attempt(spec, cancel, functools.partial(self._compiled, spec, prepared,
                                                          cancel))

    def _compiled(self, spec: ListingSpec, prepared: _Prepared, cancel: threading.Event
                  ) -> Listing:
        with self.slots.compile(cancel) as taken:
            if not taken:
                raise Unavailable("the daemon is stopping")
            log.info("compiling %s (%s) in a worker, at most %g s", spec.model_id,
                     spec.path.name, self.listing_timeout)
            record = self._compile(spec, prepared.key, cancel)
        for warning in record.warnings:
            log.warning("%s: %s", spec.model_id, warning)
        checked_plan(record)  # a record is cached only if it can be served
        self.store.save_compiled(prepared.key, json.dumps(jobs.to_json(record)).encode())
        return listing_from_record(spec, prepared.files.model, prepared.rows, record)

    def _compile(self, spec: ListingSpec, key: str, cancel: threading.Event
                 ) -> jobs.CompiledListing:
        stage = ["starting"]
        job = jobs.CompileListing(str(spec.path), key, self.security_bits, self.insecure_ring,
                                  self.capacity.limits, self.capacity.workers_per_evaluation)
        limits = Limits(memory_bytes=self.capacity.limits.memory_bytes,
                        timeout_s=self.listing_timeout)
        try:
            result = jobs.run(job, limits=limits, cancel=cancel,
                              on_progress=lambda p: stage.__setitem__(
                                  0, str(p.get("stage", stage[0]))))
        except WorkerFailed as exc:  # a crash, a resource kill, an unexpected exception
            message = exc.message
            if message.startswith("worker "):
                message = f"its compile {message}"
            if " while " not in message:
                message += f" while {stage[0]}"
            if "ran out of time" in message:
                message += " (serve's --listing-timeout)"
            elif "memory" in message:
                message += f" (serve's --worker-memory-mb is " \
                           f"{self.capacity.limits.memory_bytes >> 20})"
            raise WorkerFailed(message) from exc
        return jobs.job_from_json(jobs.CompiledListing, result)


def load_catalog(
    directory: Path, store: Store, *, security_bits: int, insecure_ring: int = 0,
    capacity: Capacity, listing_timeout: float = LISTING_TIMEOUT,
) -> tuple[list[Listing], list[str]]:
    """All listings in `directory` that compile; plus one message per refused listing
    (CatalogLoad, waited for)."""
    return CatalogLoad(directory, store, security_bits=security_bits,
                       insecure_ring=insecure_ring, capacity=capacity,
                       listing_timeout=listing_timeout).run()


def _record(payload: bytes) -> jobs.CompiledListing:
    try:
        return jobs.job_from_json(jobs.CompiledListing, json.loads(payload))
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"unreadable record ({type(exc).__name__}: {exc})") from exc


def checked_plan(record: jobs.CompiledListing) -> HEPlan:
    """The record's plan, checked (HEPlan.check: shapes chain, every weight and bias is
    finite), once every figure of the record is checked to be finite too."""
    figures = {"tolerance": record.tolerance, "plan_tolerance": record.plan_tolerance,
               "fingerprint_strength": record.fingerprint_strength,
               **dataclasses.asdict(record.measured)}
    bad = [name for name, value in figures.items() if not np.isfinite(value)]
    if bad:
        raise BadInput(f"the self-test measured non-finite {', '.join(bad)}: the listing's "
                       f"offers would mean nothing")
    try:
        data = base64.b64decode(record.plan, validate=True)
    except ValueError as exc:
        raise BadInput(f"unreadable HE plan: {exc}") from exc
    return HEPlan.from_bytes(data)


def listing_from_record(spec: ListingSpec, model_bytes: bytes, rows: FloatArray,
                        record: jobs.CompiledListing) -> Listing:
    """The served listing: the compiled record (checked_plan) with what the gateway knows
    of the listing."""
    plan = checked_plan(record)
    risk, safe = extraction_risk(spec, model_bytes, linear=not plan.stages)
    if not safe and spec.extraction_criterion == "refuse":
        raise BadInput(f"extraction criterion not met ({risk}); lower trial_budget_rows or "
                       f"set extraction_criterion to 'warn'")
    degrees = tuple(s.degree for s in plan.stages if s.kind in APPROXIMATING_KINDS)
    domain = input_domain(spec, rows)
    tail = Tail(record.tail_ops, record.class_labels, record.probability_output,
                record.label_output)
    strength = record.fingerprint_strength
    return Listing(
        spec=spec,
        model_bytes=model_bytes,
        commitment=sha256(model_bytes),
        plan=plan,
        tail=tail,
        params=record.params,
        tolerance=record.tolerance,
        # a domain matters only where activations are approximated
        input_min=domain[0] if degrees else (),
        input_max=domain[1] if degrees else (),
        approximation=record.approximation,
        measured=record.measured,
        extraction_risk=risk,
        calibration=rows,
        fingerprint_strength=strength,
        fingerprint_note=record.fingerprint_note,
        copy_check=CopyCheck.of(spec.model_id, model_bytes, rows, tail) if strength else None,
        degrees=degrees,
        plan_tolerance=record.plan_tolerance,
        domain=domain,
    )


def compile_listing(request: Json, report: ProgressFn) -> Json:
    """jobs.CompileListing, in its guarded worker: read the listing's files, check they
    are the ones the gateway hashed, compile and self-test."""
    job = jobs.job_from_json(jobs.CompileListing, request)
    report({"stage": "reading the listing"})
    spec = read_listing(Path(job.listing_path))
    files = ListingFiles.read(spec)
    if files.cache_key(job.security_bits, job.insecure_ring) != job.cache_key:
        raise BadInput("its files changed while it was being loaded; restart serve to list "
                       "the new version")
    check_lockable(files.model)  # sold models are delivered Deep-Locked: nothing in the clear
    rows = load_table(spec.calibration_path, spec.input_columns).rows
    return jobs.to_json(compile_and_test(spec, files.model, rows, job, report))


def plan_listing(spec: ListingSpec, model_bytes: bytes, rows: FloatArray,
                 security_bits: int, insecure_ring: int = 0
                 ) -> tuple[CompiledModel, CkksParams]:
    """What listing decides before anything is encrypted: the plan under the listing's
    settings (with its range check), or Unsupported where its error on the calibration
    rows misses max_error; and the CKKS parameters (bench/zoo.py plans models this way)."""
    compiled = compile_model(model_bytes, rows, degree=spec.activation_degree,
                             error_target=spec.max_error, domain=input_domain(spec, rows))
    if compiled.approximation_error > spec.max_error:
        fits = "; ".join(fit.describe() for fit in compiled.fits)
        raise Unsupported(
            f"the best plan's error on the calibration rows is "
            f"{compiled.approximation_error:.3g}, above the listing's max_error "
            f"{spec.max_error:g} ({fits}). To list it: set max_error to at least "
            f"{compiled.approximation_error:.2g} (buyers see the looser tolerance), narrow "
            f"input_domain to the rows the model is for, or use smooth activations (tanh, "
            f"sigmoid) or x*x")
    # offers name the rows that leave the plan's ranges (common.he.plan: guaranteed ranges)
    compiled = dataclasses.replace(compiled, plan=compiled.plan.with_range_check())
    compiled.plan.check()  # shapes chain, every weight and bias is finite
    largest = float(np.abs(compiled.plan.simulate(rows)).max())
    if compiled.fits:  # CKKS must hold every value a row of the offer's domain can produce;
        # exact plans declare no domain (their rows are not clipped): their rows size them
        largest = max(largest, compiled.value_bound)
    if not np.isfinite(largest):
        raise Unsupported(f"the plan's values on the calibration rows are not finite "
                          f"({largest}); check the model's constants")
    return compiled, choose_params(engine.levels_needed(compiled.plan), security_bits,
                                   largest, insecure_ring)


def compile_and_test(spec: ListingSpec, model_bytes: bytes, rows: FloatArray,
                     job: jobs.CompileListing, report: ProgressFn) -> jobs.CompiledListing:
    """The compiled, self-tested record of one listing (in CompileListing's worker: the
    self-tests run in workers of their own, under `job.limits`)."""
    report({"stage": "compiling"})
    compiled, params = plan_listing(spec, model_bytes, rows, job.security_bits,
                                    job.insecure_ring)
    test_rows = rows[: params.slots]
    decrypted, slots, packed, warnings = _self_test(spec, params, compiled.plan, test_rows,
                                                    job, report)
    reference = run_model(model_bytes, test_rows, compiled.tail.probability_output,
                          compiled.tail.class_labels)
    # the tolerances cover every packing offered
    range_check = compiled.plan.range_check
    he_error = max(float(np.abs(apply_tail(model_scores(results, range_check),
                                           compiled.tail.ops)
                                - reference[:len(results)]).max()) for results in decrypted)
    # how far a faithful evaluation lands from the plan: CKKS error plus the noise added
    planned = compiled.plan.simulate(test_rows)
    plan_error = max(float(np.abs(results - planned[:len(results)]).max())
                     for results in decrypted)
    tolerance = max(TOLERANCE_FACTOR * max(he_error, compiled.approximation_error),
                    TOLERANCE_FLOOR)
    plan_tolerance = max(TOLERANCE_FACTOR * plan_error, TOLERANCE_FLOOR)
    # results anywhere within the plan tolerance (what verify and the arbiter accept of the
    # seller's computation) must also pass the model check on any row, not only on
    # calibration rows whose outputs the tail flattens (confident softmax rows hide the
    # noise a buyer's uncertain row shows)
    lipschitz = tail_lipschitz(compiled.tail.ops)
    if lipschitz is not None:
        tolerance = max(tolerance, lipschitz * plan_tolerance + compiled.approximation_error)
    report({"stage": "sizing the fingerprint"})
    strength, note = _fingerprint(spec, model_bytes, rows, compiled.tail)
    if spec.fingerprint and not strength:  # for the seller's log: this worker's is not it
        warnings += (note,)
    return jobs.CompiledListing(
        plan=base64.b64encode(compiled.plan.to_bytes()).decode(),
        tail_ops=compiled.tail.ops,
        class_labels=compiled.tail.class_labels,
        probability_output=compiled.tail.probability_output,
        label_output=compiled.tail.label_output,
        params=params,
        tolerance=tolerance,
        plan_tolerance=plan_tolerance,
        approximation=compiled.approximation,
        measured=jobs.Measured.of(slots, packed, he_error),
        fingerprint_strength=strength,
        fingerprint_note=note,
        warnings=warnings,
    )


def _fingerprint(spec: ListingSpec, model_bytes: bytes, rows: FloatArray, tail: Tail
                 ) -> tuple[float, str]:
    if not spec.fingerprint:
        return 0.0, 'not fingerprinted (the listing says "fingerprint": false)'
    return fingerprint_strength(CopyCheck.of(spec.model_id, model_bytes, rows, tail))


FINGERPRINT_STRENGTHS = (0.05, 0.03, 0.02, 0.01, 0.005)
# a classifier's copy may change at most 0.25% of the predictions on jittered calibration
# rows, which keeps the accuracy cost under 0.5 points on held-out rows (bench/fingerprint.py
# measures it)
MAX_FINGERPRINT_DISAGREEMENT = 0.0025
# a regressor's copy: its mean squared change at most 0.25% of the variance of the listed
# model's predictions on those rows (R^2 >= 0.9975 against them, an RMS change of at most 5%
# of their spread), which costs at most ~0.25% of the R^2 on held-out labels when the
# change is unrelated to the residuals (bench/fingerprint.py measures it)
MAX_FINGERPRINT_VARIANCE = 0.0025
STRENGTH_TRIALS = 3  # throwaway keys each strength is tried with
SALE_KEYS = 4  # keys a sale's copy is drawn with before the sale gets the unmarked model
CHECK_ROWS = 2000  # at least this many jittered calibration rows


@dataclass(frozen=True)
class CopyCheck:
    """What a fingerprinted copy of a model is checked on: the seller's calibration rows,
    jittered to look like rows the model has not seen, and the listed model's outputs on
    them. A model with several outputs is a classifier (its prediction: the top output),
    one with one output a regressor."""

    model_id: str
    model_bytes: bytes
    tail: Tail
    rows: FloatArray
    original: FloatArray

    @classmethod
    def of(cls, model_id: str, model_bytes: bytes, calibration: FloatArray, tail: Tail
           ) -> CopyCheck:
        from seller_server.audit import surrogate_pool  # here: it imports scikit-learn (~1 s)

        rows = surrogate_pool(calibration, max(len(calibration), CHECK_ROWS), seed=0)
        return cls(model_id, model_bytes, tail, rows, run_model(
            model_bytes, rows, tail.probability_output, tail.class_labels))

    @property
    def regression(self) -> bool:
        return self.original.shape[1] == 1

    @property
    def limit(self) -> float:
        return MAX_FINGERPRINT_VARIANCE if self.regression else MAX_FINGERPRINT_DISAGREEMENT

    def cost(self, copy: bytes) -> float:
        """A classifier copy's share of changed predictions; a regressor copy's mean squared
        change over the variance of the listed model's predictions (1 - its R^2 against
        them)."""
        outputs = run_model(copy, self.rows, self.tail.probability_output,
                            self.tail.class_labels)
        if not self.regression:
            return float(np.mean(outputs.argmax(1) != self.original.argmax(1)))
        change = float(np.mean((outputs - self.original) ** 2))
        spread = float(np.var(self.original))
        return change / spread if spread > 0 else (0.0 if change == 0 else math.inf)

    def describe(self, cost: float) -> str:
        if self.regression:
            return (f"mean squared change {cost:.3%} of the predictions' variance (limit "
                    f"{self.limit:.2%})")
        return f"{cost:.2%} of predictions changed (limit {self.limit:.2%})"


def fingerprint_strength(check: CopyCheck) -> tuple[float, str]:
    """The strongest fingerprint whose copies cost at most the limit on the check's rows
    (the worst of a few throwaway keys), and a note saying what it costs; 0 and why, where
    even the weakest costs more (the model is then sold unmarked) or nothing is marked."""
    if not weights(onnx.load_model_from_string(check.model_bytes)):
        note = ("not fingerprinted: the model has no trained weight tensor of a layer "
                "(Gemm, MatMul, Conv) or linear model to mark")
        log.warning("%s: %s", check.model_id, note)
        return 0.0, note
    worst = 0.0
    for strength in FINGERPRINT_STRENGTHS:
        worst = max(check.cost(fingerprint(check.model_bytes, new_key(), strength))
                    for _ in range(STRENGTH_TRIALS))
        if worst <= check.limit:
            return strength, (f"fingerprint strength {strength:g} (worst of "
                              f"{STRENGTH_TRIALS} throwaway copies: {check.describe(worst)})")
    note = (f"not fingerprinted: at the weakest strength {FINGERPRINT_STRENGTHS[-1]:g} a copy "
            f"costs too much on jittered calibration rows ({check.describe(worst)}); its "
            f"copies are sold unmarked and cannot be traced")
    log.warning("%s: %s", check.model_id, note)
    return 0.0, note


def sale_key(check: CopyCheck | None, strength: float) -> bytes | None:
    """The fingerprint key of a new sale's copy: the first of SALE_KEYS fresh keys whose
    copy at `strength` costs at most the limit on the check's rows; None (the sale gets the
    listed model, unmarked) where the listing is not fingerprinted or every copy costs
    more."""
    if not strength or check is None:
        return None
    costs = []
    for _ in range(SALE_KEYS):
        key = new_key()
        costs.append(check.cost(fingerprint(check.model_bytes, key, strength)))
        if costs[-1] <= check.limit:
            return key
    log.warning("%s: this sale gets the unmarked model: its %d fingerprinted copies (strength "
                "%g) cost too much on jittered calibration rows (%s)", check.model_id,
                SALE_KEYS, strength, "; ".join(check.describe(cost) for cost in costs))
    return None


def _self_test(spec: ListingSpec, params: CkksParams, plan: HEPlan, rows: FloatArray,
               job: jobs.CompileListing, report: ProgressFn
               ) -> tuple[list[FloatArray], jobs.SlotsMeasured, jobs.PackedMeasured,
                          tuple[str, ...]]:
    """The decrypted finished results of each packing tested, the measurements, and what
    the seller's log should say. Feature packing is offered only where its own self-test
    passes."""
    with tempfile.TemporaryDirectory(prefix="gimme-selftest-") as tmp:
        plan_path, rows_path, out_path, packed_out_path = (
            Path(tmp) / n for n in ("plan", "rows.npz", "out.npy", "packed.npy"))
        plan_path.write_bytes(plan.to_bytes())
        np.savez(rows_path, rows=rows)
        report({"stage": "self-testing slot-per-sample"})
        try:
            slots = jobs.job_from_json(jobs.SlotsMeasured, jobs.run(jobs.SelfTest(
                params, job.security_bits, str(plan_path), str(rows_path), str(out_path),
                job.workers, spec.circuit_privacy, spec.flooding_bits,
                spec.output_policy.noise_std), limits=job.limits))
        except WorkerFailed as exc:  # e.g. "worker was killed by SIGABRT while evaluating"
            raise WorkerFailed(f"the slot-per-sample self-test {exc.message}") from exc
        packed = jobs.PackedMeasured()
        warnings: tuple[str, ...] = ()
        if spec.feature_packing:
            report({"stage": "self-testing feature packing"})
            try:
                packed = jobs.job_from_json(jobs.PackedMeasured, jobs.run(jobs.SelfTestPacked(
                    params, job.security_bits, str(plan_path), str(rows_path),
                    str(packed_out_path), job.workers, slots.flooding_std,
                    spec.output_policy.noise_std), limits=job.limits))
            except GimmeError as exc:
                warnings = (f"feature packing is not offered: its self-test failed "
                            f"({exc.message})",)
                log.warning("%s: %s", spec.model_id, warnings[0])
        return ([np.load(p) for p in (out_path, packed_out_path) if p.exists()], slots,
                packed, warnings)


def extraction_risk(spec: ListingSpec, model_bytes: bytes, linear: bool) -> tuple[str, bool]:
    """Criterion 1 of seed 000 §3.4 against k = the trial budget: a linear model with d
    features has d+1 unknowns per class, solvable from k >= d+1 exact outputs, so it needs
    d >= c (k+1); a network needs its parameter count >= c k. Returns (summary, met)."""
    k, c = spec.trial_budget_rows, spec.criterion_factor
    parameters = parameter_count(parse_model(model_bytes, "the model"))
    if linear:
        d = len(spec.input_columns)
        needed = int(c * (k + 1))
        met = d >= needed
        detail = (f"linear model with {d} features; k={k} trial rows "
                  f"{'<' if k + 1 <= d else '>='} {d + 1} unknowns per class; criterion 1 "
                  f"needs >= {needed} features")
    else:
        needed = int(c * k)
        met = parameters >= needed
        detail = (f"{parameters} parameters vs k={k} trial rows; criterion 1 needs >= "
                  f"{needed}")
    return (f"{'low' if met else 'HIGH'}: {detail}", met)


def parameter_count(model: onnx.ModelProto) -> int:
    """Trained numbers in the model: float initializers and ML operators' coefficients."""
    count = sum(numpy_helper.to_array(init).size for init in model.graph.initializer
                if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE))
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.FLOATS:
                count += len(attribute.floats)
    return int(count)

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

Compiling and self-testing takes seconds per model, so results are cached in the state
database under a key covering every input (model, listing, calibration, engine version).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import math
import re
import tempfile
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
from common.errors import BadInput, GimmeError, Unsupported
from common.guarded import run_guarded
from common.he import engine
from common.he.packing import FEATURE_PACKED, SLOT_PER_SAMPLE
from common.he.params import CkksParams
from common.he.plan import APPROXIMATING_KINDS, HEPlan, model_scores
from common.onnx_io import load_model_file, parse_model, run_model
from common.protocol import EncodingSpec, Estimate, OutputPolicy, OutputSpec
from common.signing import sha256
from common.tabular import load_table
from common.tail import apply_tail
from seller_server.audit import surrogate_pool
from seller_server.compiler import CompiledModel, Tail, compile_model
from seller_server.fingerprint import fingerprint, new_key, weights
from seller_server.planner import choose_params
from seller_server.store import Store
from seller_server.worker import Capacity

log = logging.getLogger(__name__)

ENGINE_VERSION = "gimme-he-17"  # bump when compiled results would change
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
class Measured:
    """What the encrypted self-test measured at listing time."""

    ciphertext_bytes: int
    relin_key_bytes: int
    public_key_bytes: int
    result_bytes: int
    evaluate_seconds: float
    key_check_seconds: float  # per trial: byte templates of the relinearization + public key
    encrypt_seconds: float  # one input ciphertext, on one core (the buyer's side)
    computation_error: float  # max |decrypted - plan| before finishing
    flooding_std: float
    he_error: float  # max |tail(finished result) - onnxruntime| on the compared output
    # feature packing (packed_period 0: not offered for this model)
    packed_period: int = 0
    packed_rotation_key_bytes: int = 0
    packed_rotation_keys: int = 0
    packed_setup_seconds: float = 0.0  # per trial: generating + checking the rotation keys
    packed_evaluate_seconds: float = 0.0  # one ciphertext, every worker busy


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

    def encoding(self, estimate: Estimate, rotation_indices: tuple[int, ...]) -> EncodingSpec:
        return EncodingSpec(self.spec.input_columns, estimate.rows_per_ciphertext,
                            self.input_min, self.input_max, estimate.packing, estimate.period,
                            rotation_indices)

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


def load_catalog(
    directory: Path, store: Store, *, security_bits: int, insecure_ring: int = 0,
    capacity: Capacity, on_model: Callable[[str, int, int], None] | None = None,
) -> tuple[list[Listing], list[str]]:
    """All listings in `directory` that compile; plus one message per refused model."""
    paths = sorted(directory.glob("*.json"))
    if not paths:
        raise BadInput(f"no listings (*.json) in catalog {directory}")
    listings: list[Listing] = []
    refused: list[str] = []
    for index, path in enumerate(paths):
        if on_model is not None:
            on_model(path.stem, index, len(paths))
        try:
            listing = load_listing(read_listing(path), store, security_bits, insecure_ring,
                                   capacity)
        except GimmeError as exc:
            refused.append(f"{path.name}: {exc.message}")
            log.error("refused listing %s: %s", path.name, exc.message)
            continue
        if any(existing.model_id == listing.model_id for existing in listings):
            refused.append(f"{path.name}: duplicate model name {listing.model_id!r}")
            continue
        listings.append(listing)
        m = listing.measured
        log.info("listed %s: %s; %s; tolerance %.2g; self-test %.2fs, CKKS error %.2g, "
                 "flooding %.2g; extraction risk: %s; %s", listing.model_id,
                 listing.params.describe(), listing.approximation, listing.tolerance,
                 m.evaluate_seconds, m.computation_error, m.flooding_std,
                 listing.extraction_risk, listing.fingerprint_note)
    return listings, refused


def read_model(spec: ListingSpec) -> bytes:
    """The listing's model as self-contained bytes (external data files read in from the
    catalog directory only)."""
    return load_model_file(spec.model_path, spec.path.parent)


def load_listing(spec: ListingSpec, store: Store, security_bits: int, insecure_ring: int,
                 capacity: Capacity) -> Listing:
    model_bytes = read_model(spec)
    try:
        calibration_bytes = spec.calibration_path.read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read {exc.filename}: {exc.strerror}") from exc
    check_lockable(model_bytes)  # sold models are delivered Deep-Locked: nothing in the clear
    rows = load_table(spec.calibration_path, spec.input_columns).rows
    key = hashlib.sha256(b"\0".join([
        ENGINE_VERSION.encode(), model_bytes, spec.path.read_bytes(), calibration_bytes,
        str((security_bits, insecure_ring)).encode()])).hexdigest()
    cached = store.compiled(key)
    if cached is None:
        record = _compile_and_test(spec, model_bytes, rows, security_bits, insecure_ring,
                                   capacity)
        store.save_compiled(key, json.dumps(record).encode())
    else:
        record = json.loads(cached)
    ops, labels, probability_output, label_output = record["tail"]
    plan = HEPlan.from_bytes(base64.b64decode(record["plan"]))
    risk, safe = extraction_risk(spec, model_bytes, linear=not plan.stages)
    if not safe and spec.extraction_criterion == "refuse":
        raise BadInput(f"extraction criterion not met ({risk}); lower trial_budget_rows or "
                       f"set extraction_criterion to 'warn'")
    degrees = tuple(s.degree for s in plan.stages if s.kind in APPROXIMATING_KINDS)
    domain = input_domain(spec, rows)
    tail = Tail(tuple(ops), tuple(labels), probability_output, label_output)
    strength = float(record["fingerprint_strength"])
    return Listing(
        spec=spec,
        model_bytes=model_bytes,
        commitment=sha256(model_bytes),
        plan=plan,
        tail=tail,
        params=CkksParams(**record["params"]),
        tolerance=float(record["tolerance"]),
        # a domain matters only where activations are approximated
        input_min=domain[0] if degrees else (),
        input_max=domain[1] if degrees else (),
        approximation=record["approximation"],
        measured=Measured(**record["measured"]),
        extraction_risk=risk,
        calibration=rows,
        fingerprint_strength=strength,
        fingerprint_note=str(record["fingerprint_note"]),
        copy_check=CopyCheck.of(spec.model_id, model_bytes, rows, tail) if strength else None,
        degrees=degrees,
        plan_tolerance=float(record["plan_tolerance"]),
        domain=domain,
    )


def compile_listing(spec: ListingSpec, model_bytes: bytes, rows: FloatArray,
                    security_bits: int, insecure_ring: int = 0
                    ) -> tuple[CompiledModel, CkksParams]:
    """What listing decides before anything is encrypted: the plan under the listing's
    settings (with its range check), or Unsupported where its error on the calibration
    rows misses max_error; and the CKKS parameters. (bench/zoo.py trades models this way.)"""
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
    largest = float(np.abs(compiled.plan.simulate(rows)).max())
    if compiled.fits:  # CKKS must hold every value a row of the offer's domain can produce;
        # exact plans declare no domain (their rows are not clipped): their rows size them
        largest = max(largest, compiled.value_bound)
    params = choose_params(engine.levels_needed(compiled.plan), security_bits, largest,
                           insecure_ring)
    return compiled, params


def _compile_and_test(spec: ListingSpec, model_bytes: bytes, rows: FloatArray,
                      security_bits: int, insecure_ring: int, capacity: Capacity
                      ) -> dict[str, Any]:
    compiled, params = compile_listing(spec, model_bytes, rows, security_bits, insecure_ring)
    test_rows = rows[: params.slots]
    decrypted, measured = _self_test(spec, params, security_bits, compiled.plan, test_rows,
                                     capacity)
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
    return {
        "plan": base64.b64encode(compiled.plan.to_bytes()).decode(),
        "tail": [list(compiled.tail.ops), list(compiled.tail.class_labels),
                 compiled.tail.probability_output, compiled.tail.label_output],
        "params": params.to_dict(),
        "tolerance": max(TOLERANCE_FACTOR * max(he_error, compiled.approximation_error),
                         TOLERANCE_FLOOR),
        "plan_tolerance": max(TOLERANCE_FACTOR * plan_error, TOLERANCE_FLOOR),
        "approximation": compiled.approximation,
        "measured": dataclasses.asdict(Measured(**measured, he_error=he_error)),
        **_fingerprint_record(spec, model_bytes, rows, compiled.tail),
    }


def _fingerprint_record(spec: ListingSpec, model_bytes: bytes, rows: FloatArray, tail: Tail
                        ) -> dict[str, Any]:
    if not spec.fingerprint:
        strength, note = 0.0, 'not fingerprinted (the listing says "fingerprint": false)'
    else:
        strength, note = fingerprint_strength(CopyCheck.of(spec.model_id, model_bytes, rows,
                                                           tail))
    return {"fingerprint_strength": strength, "fingerprint_note": note}


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


def _self_test(spec: ListingSpec, params: CkksParams, security_bits: int, plan: HEPlan,
               rows: FloatArray, capacity: Capacity) -> tuple[list[FloatArray], dict[str, Any]]:
    """The decrypted finished results of each packing tested, and the measurements. Feature
    packing is offered only where its own self-test passes."""
    with tempfile.TemporaryDirectory(prefix="gimme-selftest-") as tmp:
        plan_path, rows_path, out_path, packed_out_path = (
            Path(tmp) / n for n in ("plan", "rows.npz", "out.npy", "packed.npy"))
        plan_path.write_bytes(plan.to_bytes())
        np.savez(rows_path, rows=rows)
        request = {
            "params": params.to_dict(), "security_bits": security_bits,
            "plan_path": str(plan_path), "rows_path": str(rows_path),
            "out_path": str(out_path), "packed_out_path": str(packed_out_path),
            "workers": capacity.workers_per_evaluation,
            "circuit_privacy": spec.circuit_privacy, "flooding_bits": spec.flooding_bits,
            "policy_noise_std": spec.output_policy.noise_std}
        measured = run_guarded("seller_server.worker:self_test", request,
                               limits=capacity.limits)
        if not spec.feature_packing:
            return [np.load(out_path)], measured
        try:
            measured |= run_guarded("seller_server.worker:self_test_packed",
                                    request | {"flooding_std": measured["flooding_std"]},
                                    limits=capacity.limits)
        except GimmeError as exc:
            log.warning("%s: feature packing is not offered: its self-test failed (%s)",
                        spec.model_id, exc.message)
        return [np.load(p) for p in (out_path, packed_out_path) if p.exists()], measured


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

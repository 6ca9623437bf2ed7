"""The seller's catalog: listing files -> compiled, parameterized, self-tested listings.

A catalog directory holds one `NAME.json` listing per model:

    {
      "name": "digits-mlp",                      # model id buyers use
      "description": "...",
      "model": "digits_mlp.onnx",                # relative to the listing file
      "calibration": "digits_calibration.csv",   # seller rows: ranges + tolerance
      "input_columns": ["pixel_0", ...],
      "price": "40.00",
      "trial_budget_rows": 2000,
      "activation_degree": null,                 # optional: fix the Chebyshev degree
      "max_error": 0.01                          # optional: approximation error target
    }

Compiling and self-testing takes seconds per model, so results are cached in the state
database under a key covering every input (model, listing, calibration, engine version).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from common.errors import BadInput, GimmeError
from common.guarded import run_guarded
from common.he import engine
from common.he.params import CkksParams
from common.he.plan import HEPlan
from common.onnx_io import run_model
from common.protocol import EncodingSpec, Estimate, OutputSpec
from common.signing import sha256
from common.tabular import load_table
from common.tail import apply_tail
from seller_server.compiler import Tail, compile_model
from seller_server.planner import choose_params
from seller_server.store import Store
from seller_server.worker import Capacity

log = logging.getLogger(__name__)

ENGINE_VERSION = "gimme-he-4"  # bump when compiled results would change
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
    activation_degree: int | None
    max_error: float


@dataclass(frozen=True)
class ObjectSizes:
    ciphertext_bytes: int
    relin_key_bytes: int
    result_bytes: int


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
    sizes: ObjectSizes
    self_test_error: float
    self_test_seconds: float

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    def encoding(self) -> EncodingSpec:
        return EncodingSpec(self.spec.input_columns, self.params.slots, self.input_min,
                            self.input_max)

    def estimate(self) -> Estimate:
        return Estimate("slot-per-sample", self.sizes.relin_key_bytes,
                        self.sizes.ciphertext_bytes, self.sizes.result_bytes,
                        self.self_test_seconds)

    def output(self) -> OutputSpec:
        return OutputSpec(self.plan.score_count, self.tail.ops, self.tail.class_labels,
                          engine.result_level(self.plan), self.tail.probability_output,
                          self.tail.label_output)


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
    try:
        price = Decimal(str(raw["price"]))
    except InvalidOperation:
        raise BadInput(f"{path}: price {raw['price']!r} is not a number") from None
    if price < 0 or price != price.quantize(Decimal("0.01")):
        raise BadInput(f"{path}: price must be non-negative with at most 2 decimals")
    budget = raw["trial_budget_rows"]
    if not isinstance(budget, int) or budget < 1:
        raise BadInput(f"{path}: trial_budget_rows must be a positive integer")
    degree = raw.get("activation_degree")
    if degree is not None and (not isinstance(degree, int) or not 2 <= degree <= 64):
        raise BadInput(f"{path}: activation_degree must be an integer in [2, 64] or null")
    max_error = float(raw.get("max_error", 0.01))
    if not 0 < max_error < 1:
        raise BadInput(f"{path}: max_error must be in (0, 1)")
    base = path.parent
    return ListingSpec(path, model_id, str(raw.get("description", "")), base / raw["model"],
                       base / raw["calibration"], tuple(str(c) for c in columns),
                       int(price * 100), budget, degree, max_error)


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
        log.info("listed %s: %s; %s; tolerance %.2g; self-test %.2fs, error %.2g",
                 listing.model_id, listing.params.describe(), listing.approximation,
                 listing.tolerance, listing.self_test_seconds, listing.self_test_error)
    return listings, refused


def load_listing(spec: ListingSpec, store: Store, security_bits: int, insecure_ring: int,
                 capacity: Capacity) -> Listing:
    try:
        model_bytes = spec.model_path.read_bytes()
        calibration_bytes = spec.calibration_path.read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read {exc.filename}: {exc.strerror}") from exc
    rows = load_table(spec.calibration_path, spec.input_columns).rows
    key = hashlib.sha256(b"\0".join([
        ENGINE_VERSION.encode(), model_bytes, spec.path.read_bytes(), calibration_bytes,
        str((security_bits, insecure_ring)).encode()])).hexdigest()
    cached = store.compiled(key)
    if cached is not None:
        return _from_cache(spec, model_bytes, json.loads(cached))
    compiled = compile_model(model_bytes, rows, degree=spec.activation_degree,
                             error_target=spec.max_error)
    if compiled.approximation_error > spec.max_error:
        log.warning("%s: best approximation error %.3g exceeds max_error %.3g",
                    spec.model_id, compiled.approximation_error, spec.max_error)
    scores = compiled.plan.simulate(rows)
    params = choose_params(compiled.plan.depth(), security_bits, float(np.abs(scores).max()),
                           insecure_ring)
    test_rows = rows[: params.slots]
    decrypted, measured = _self_test(params, security_bits, compiled.plan, test_rows, capacity)
    reference = run_model(model_bytes, test_rows, compiled.tail.probability_output,
                          compiled.tail.class_labels)
    he_error = float(np.abs(apply_tail(decrypted, compiled.tail.ops) - reference).max())
    tolerance = max(TOLERANCE_FACTOR * max(he_error, compiled.approximation_error),
                    TOLERANCE_FLOOR)
    record = {
        "plan": base64.b64encode(compiled.plan.to_bytes()).decode(),
        "tail": [list(compiled.tail.ops), list(compiled.tail.class_labels),
                 compiled.tail.probability_output, compiled.tail.label_output],
        "params": params.to_dict(),
        "tolerance": tolerance,
        # ranges matter only where activations are approximated
        "input_min": rows.min(axis=0).tolist() if compiled.degree else [],
        "input_max": rows.max(axis=0).tolist() if compiled.degree else [],
        "approximation": compiled.approximation,
        "sizes": [measured["ciphertext_bytes"], measured["relin_key_bytes"],
                  measured["result_bytes"]],
        "self_test": [he_error, measured["evaluate_seconds"]],
    }
    store.save_compiled(key, json.dumps(record).encode())
    return _from_cache(spec, model_bytes, record)


def _self_test(params: CkksParams, security_bits: int, plan: HEPlan, rows: FloatArray,
               capacity: Capacity) -> tuple[FloatArray, dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="gimme-selftest-") as tmp:
        plan_path, rows_path, out_path = (Path(tmp) / n for n in ("plan", "rows.npz", "out.npy"))
        plan_path.write_bytes(plan.to_bytes())
        np.savez(rows_path, rows=rows)
        measured = run_guarded("seller_server.worker:self_test", {
            "params": params.to_dict(), "security_bits": security_bits,
            "plan_path": str(plan_path), "rows_path": str(rows_path),
            "out_path": str(out_path), "workers": capacity.workers_per_evaluation},
            limits=capacity.limits)
        return np.load(out_path), measured


def _from_cache(spec: ListingSpec, model_bytes: bytes, record: dict[str, Any]) -> Listing:
    ops, labels, probability_output, label_output = record["tail"]
    sizes = record["sizes"]
    return Listing(
        spec=spec,
        model_bytes=model_bytes,
        commitment=sha256(model_bytes),
        plan=HEPlan.from_bytes(base64.b64decode(record["plan"])),
        tail=Tail(tuple(ops), tuple(labels), probability_output, label_output),
        params=CkksParams(**record["params"]),
        tolerance=float(record["tolerance"]),
        input_min=tuple(record["input_min"]),
        input_max=tuple(record["input_max"]),
        approximation=record["approximation"],
        sizes=ObjectSizes(*sizes),
        self_test_error=float(record["self_test"][0]),
        self_test_seconds=float(record["self_test"][1]),
    )

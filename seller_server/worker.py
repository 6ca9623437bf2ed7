"""Evaluator jobs. Each runs in its own throwaway process (common.guarded), never in the
gateway: this is where untrusted OpenFHE bytes are checked and opened."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.guarded import Json, Limits, ProgressFn
from common.he import engine
from common.he.params import CkksParams, new_key_tag
from common.he.plan import HEPlan


@dataclass(frozen=True)
class Capacity:
    """How much of the machine evaluations may use."""

    limits: Limits = field(default_factory=Limits)  # per worker process
    workers_per_evaluation: int = field(default_factory=lambda: os.cpu_count() or 1)
    concurrent_evaluations: int = 2


# Stages during which a crash is the upload's fault (see run_guarded's untrusted_phase).
UNTRUSTED_STAGES = frozenset({"loading relinearization key", "loading ciphertexts",
                              "evaluating", "finishing"})


def _setup(request: Json) -> tuple[Any, HEPlan]:
    params = CkksParams(**request["params"])
    plan = HEPlan.from_bytes(Path(request["plan_path"]).read_bytes())
    return engine.build_context(params, int(request["security_bits"])), plan


def _evaluation_progress(report: ProgressFn) -> engine.ProgressFn:
    return lambda done, total: report({"stage": "evaluating", "done": done, "total": total})


def self_test(request: Json, report: ProgressFn) -> Json:
    """Encrypt calibration rows with throwaway keys, evaluate, finish as a trial would,
    decrypt: measures the real CKKS error, sizes the flooding noise, and records the exact
    size of every object a trial moves."""
    cc, plan = _setup(request)
    rows = np.load(request["rows_path"])["rows"]
    tag = new_key_tag()
    report({"stage": "generating keys"})
    secret, public = engine.generate_keys(cc, tag)
    report({"stage": "encrypting"})
    inputs = [engine.encrypt_vector(cc, public, column) for column in rows.T]
    start = time.perf_counter()
    scores = engine.evaluate(cc, plan, inputs, _evaluation_progress(report),
                             int(request["workers"]))
    seconds = time.perf_counter() - start
    raw = np.array([engine.decrypt_vector(cc, secret, ct, len(rows)) for ct in scores]).T
    computation_error = float(np.abs(raw - plan.simulate(rows)).max())
    flooding_std = (computation_error * 2.0 ** int(request["flooding_bits"])
                    if request["circuit_privacy"] else 0.0)
    finished = engine.finish(cc, scores, len(rows), public, _noise(request, flooding_std),
                             np.random.default_rng())
    decrypted = np.array([engine.decrypt_vector(cc, secret, ct, len(rows))
                          for ct in finished]).T
    np.save(request["out_path"], decrypted)
    return {
        "evaluate_seconds": seconds,
        "computation_error": computation_error,
        "flooding_std": flooding_std,
        "ciphertext_bytes": len(engine.ciphertext_bytes(inputs[0])),
        "relin_key_bytes": len(engine.serialize_relin_key(tag)),
        "public_key_bytes": len(engine.serialize(public)),
        "result_bytes": len(engine.ciphertext_bytes(finished[0])),
    }


def _noise(request: Json, flooding_std: float) -> float:
    """Standard deviation of the Gaussian noise added to every returned score."""
    return float(np.hypot(flooding_std, float(request["policy_noise_std"])))


def check_keys(request: Json, report: ProgressFn) -> Json:
    """Template-check uploaded keys (bytes only, nothing deserialized)."""
    cc, _plan = _setup(request)
    report({"stage": "building templates"})
    relin = engine.relin_key_template(cc, request["key_tag"])
    public = engine.public_key_template(cc, request["key_tag"])
    report({"stage": "checking uploads"})
    relin.check(Path(request["relin_key_path"]).read_bytes(), "relinearization key")
    public.check(Path(request["public_key_path"]).read_bytes(), "public key")
    return {}


def evaluate_batch(request: Json, report: ProgressFn) -> Json:
    """Check, open and evaluate one batch of uploaded ciphertexts; finish and write the
    results."""
    cc, plan = _setup(request)
    tag = request["key_tag"]
    report({"stage": "building templates"})
    relin_template = engine.relin_key_template(cc, tag)
    public_template = engine.public_key_template(cc, tag)
    gate = engine.CiphertextGate(cc, tag, level=0)
    report({"stage": "checking uploads"})
    relin_key = Path(request["relin_key_path"]).read_bytes()
    public_key = Path(request["public_key_path"]).read_bytes()
    relin_template.check(relin_key, "relinearization key")
    public_template.check(public_key, "public key")
    blobs = [Path(p).read_bytes() for p in request["ciphertext_paths"]]
    for index, blob in enumerate(blobs):
        gate.check(blob, f"ciphertext {index}")
    report({"stage": "loading relinearization key"})
    engine.load_relin_key(relin_key, relin_template)
    buyer_public = engine.load_public_key(public_key, public_template)
    report({"stage": "loading ciphertexts"})
    inputs = gate.load_all(blobs, "ciphertext", threads=int(request["workers"]))
    del blobs
    start = time.perf_counter()
    scores = engine.evaluate(cc, plan, inputs, _evaluation_progress(report),
                             int(request["workers"]))
    seconds = time.perf_counter() - start
    report({"stage": "finishing"})
    noise = _noise(request, float(request["flooding_std"]))
    finished = engine.finish(cc, scores, int(request["rows"]),
                             buyer_public if request["circuit_privacy"] or noise else None,
                             noise, np.random.default_rng())
    report({"stage": "writing results"})
    out_dir = Path(request["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for index, ct in enumerate(finished):
        data = engine.ciphertext_bytes(ct)
        path = out_dir / f"score-{index}.bin"
        path.write_bytes(data)
        results.append({"path": str(path), "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    return {"results": results, "evaluate_seconds": seconds}

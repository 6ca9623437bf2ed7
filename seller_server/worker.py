"""Evaluator jobs. Each runs in its own throwaway process (common.guarded), never in the
gateway: this is where untrusted OpenFHE bytes are checked and opened.

Why a buyer reads no more than it pays for (engine.finish, Packing.fold_period): a buyer
chooses every slot of its ciphertexts, real and imaginary parts, at any magnitude, and
the seller cannot see them; a 0/1 mask cannot be encoded exactly in CKKS, so it only
scales an unpaid slot by a tiny public factor that an amplified row undoes. Instead, the
result's first component is summed over a group of automorphisms (rotations by multiples
of a period, and conjugation) with exact integer arithmetic, and the buyer completes the
sum with keys it generates itself: whatever the inputs and keys were, the plaintext it
can decrypt is the trace of the result, one real number per class of slots equal modulo
the period, and the seller charges for every class (`Packing.charged_rows`). No buyer key
takes part in the fold, so crafted keys cannot undo it. What a class returns is a real
sum that the buyer can steer (e.g. the real part of the model at a complex point), never
more numbers than it paid for.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import BadInput
from common.guarded import Json, Limits, ProgressFn
from common.he import engine
from common.he.packing import FEATURE_PACKED, SLOT_PER_SAMPLE, PackedPlan, Packing, pack_plan
from common.he.params import new_key_tag
from common.he.plan import FloatArray, HEPlan
from common.signing import keys_digest
from seller_server.jobs import (
    KEY_OBJECTS,
    CheckKeys,
    EvaluateBatch,
    PackedMeasured,
    SelfTest,
    SelfTestPacked,
    SlotsMeasured,
    TrialSetup,
    job_from_json,
    to_json,
)


@dataclass(frozen=True)
class Capacity:
    """How much of the machine evaluations may use."""

    limits: Limits = field(default_factory=Limits)  # per worker process
    workers_per_evaluation: int = field(default_factory=lambda: os.cpu_count() or 1)
    concurrent_evaluations: int = 2


class WorkerSlots:
    """The memory-heavy worker jobs running at once: Capacity.concurrent_evaluations in all.
    A trade's job (key check, evaluation) takes any free slot; listing compiles take at most
    `compile_limit` of them, one less than all when there are two or more, so that the
    trades of the listings already served go on while others compile."""

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.compile_limit = max(1, self.total - 1)
        self._busy = 0
        self._compiling = 0
        self._changed = threading.Condition()

    @contextmanager
    def trade(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self._busy < self.total)
            self._busy += 1
        try:
            yield
        finally:
            self._release(compiling=0)

    @contextmanager
    def compile(self, cancel: threading.Event) -> Iterator[bool]:
        """A slot for one listing's compile; yields False (no slot taken) once `cancel`
        is set."""
        def free() -> bool:
            return self._busy < self.total and self._compiling < self.compile_limit

        with self._changed:
            while not free():
                if cancel.is_set():
                    break
                self._changed.wait(0.5)
            taken = not cancel.is_set() and free()
            if taken:
                self._busy += 1
                self._compiling += 1
        try:
            yield taken
        finally:
            if taken:
                self._release(compiling=1)

    def _release(self, compiling: int) -> None:
        with self._changed:
            self._busy -= 1
            self._compiling -= compiling
            self._changed.notify_all()


# Stages during which a crash is the upload's fault (see run_guarded's untrusted_phase).
UNTRUSTED_STAGES = frozenset({"loading relinearization key", "loading ciphertexts",
                              "evaluating", "finishing"})


def _setup(job: SelfTest | SelfTestPacked) -> tuple[Any, HEPlan]:
    plan = HEPlan.from_bytes(Path(job.plan_path).read_bytes())
    return engine.build_context(job.params, job.security_bits), plan


def _evaluation_progress(report: ProgressFn) -> engine.ProgressFn:
    return lambda done, total: report({"stage": "evaluating", "done": done, "total": total})


# Feature packing is offered only where its rotation keys stay within reason.
MAX_ROTATION_KEYS = 64


def self_test(request: Json, report: ProgressFn) -> Json:
    """Slot-per-sample (jobs.SelfTest): encrypt calibration rows with throwaway keys,
    evaluate, finish as a trial would, decrypt: measures the real CKKS error, sizes the
    flooding noise, and records the exact size of every object a trial moves and the
    evaluation time (jobs.SlotsMeasured)."""
    job = job_from_json(SelfTest, request)
    cc, plan = _setup(job)
    rows = np.load(job.rows_path)["rows"]
    report({"stage": "generating keys"})
    secret, public = engine.generate_keys(cc, new_key_tag())
    return to_json(_self_test_slots(job, report, cc, plan, rows, secret, public))


def self_test_packed(request: Json, report: ProgressFn) -> Json:
    """The same for feature packing (jobs.SelfTestPacked -> jobs.PackedMeasured, whose
    packed_period 0 says the model is not offered feature-packed)."""
    job = job_from_json(SelfTestPacked, request)
    cc, plan = _setup(job)
    packed = pack_plan(plan)
    slots = cc.GetRingDimension() // 2
    indices = packed.rotation_indices(slots) if packed.d <= slots else []
    if not 0 < len(indices) <= MAX_ROTATION_KEYS:
        return to_json(PackedMeasured())
    rows = plan.encoded(np.load(job.rows_path)["rows"])  # as the buyer encrypts them
    report({"stage": "generating keys"})
    secret, public = engine.generate_keys(cc, new_key_tag())
    noise = _noise(job.flooding_std, job.policy_noise_std)
    return to_json(_self_test_packed(job, report, cc, packed, indices, rows, secret, public,
                                     noise))


def _self_test_slots(job: SelfTest, report: ProgressFn, cc: Any, plan: HEPlan,
                     rows: FloatArray, secret: Any, public: Any) -> SlotsMeasured:
    tag = secret.GetKeyTag()
    layout = Packing(SLOT_PER_SAMPLE, cc.GetRingDimension() // 2)
    report({"stage": "encrypting"})
    start = time.perf_counter()
    inputs = [engine.encrypt_vector(cc, public, v) for v in layout.encode(plan.encoded(rows))]
    encrypt_seconds = (time.perf_counter() - start) / len(inputs)
    start = time.perf_counter()
    scores = engine.evaluate(cc, plan, inputs, _evaluation_progress(report), job.workers)
    seconds = time.perf_counter() - start
    raw = _decrypted(cc, secret, layout, scores, len(rows), len(scores))
    computation_error = float(np.abs(raw - plan.simulate(rows)).max())
    flooding_std = (computation_error * 2.0 ** job.flooding_bits
                    if job.circuit_privacy else 0.0)
    period = layout.fold_period(len(rows), len(scores))
    noise = _noise(flooding_std, job.policy_noise_std)
    finished = engine.finish(cc, scores, layout.masks(len(rows), len(scores)), public, noise,
                             np.random.default_rng(), period)
    np.save(job.out_path, _opened(cc, secret, layout, finished, len(rows), len(scores)))
    relin_key = engine.serialize_relin_key(tag)
    key_check_seconds = _timed(lambda: (engine.relin_key_template(cc, tag),
                                        engine.public_key_template(cc, tag)))
    engine.load_relin_key(relin_key)  # learning the template replaced it
    return SlotsMeasured(
        ciphertext_bytes=len(engine.ciphertext_bytes(inputs[0])),
        relin_key_bytes=len(relin_key),
        public_key_bytes=len(engine.public_key_bytes(public)),
        result_bytes=len(finished[0]),
        evaluate_seconds=seconds,
        key_check_seconds=key_check_seconds,
        encrypt_seconds=encrypt_seconds,
        computation_error=computation_error,
        flooding_std=flooding_std)


def _self_test_packed(job: SelfTestPacked, report: ProgressFn, cc: Any, packed: PackedPlan,
                      indices: list[int], rows: FloatArray, secret: Any, public: Any,
                      noise: float) -> PackedMeasured:
    workers = job.workers
    tag = secret.GetKeyTag()
    report({"stage": "feature-packed: generating rotation keys"})
    start = time.perf_counter()
    rotation_keys = engine.generate_rotation_keys(cc, secret, indices)
    # per trial: the buyer generates the keys, the seller checks them
    setup_seconds = time.perf_counter() - start + _timed(
        lambda: engine.rotation_key_template(cc, tag, indices))
    engine.load_rotation_keys(rotation_keys)  # learning the template replaced them
    layout = packed.layout(cc.GetRingDimension() // 2)
    # two ciphertexts per worker: each worker encodes the weights once per batch
    sample = rows[:max(1, min(len(rows), 2 * workers * layout.rows_per_ciphertext))]
    inputs = [engine.encrypt_vector(cc, public, v) for v in layout.encode(sample)]
    start = time.perf_counter()
    scores = engine.evaluate_packed(cc, packed, inputs, _evaluation_progress(report), workers)
    seconds = time.perf_counter() - start
    finished = engine.finish(cc, scores, layout.masks(len(sample), packed.scores), public,
                             noise, np.random.default_rng(),
                             layout.fold_period(len(sample), packed.scores))
    np.save(job.out_path, _opened(cc, secret, layout, finished, len(sample), packed.scores))
    return PackedMeasured(
        packed_period=packed.d,
        packed_rotation_key_bytes=len(rotation_keys),
        packed_rotation_keys=len(indices),
        packed_setup_seconds=setup_seconds,
        # per ciphertext with every worker busy (each takes one ciphertext at a time)
        packed_evaluate_seconds=seconds / (-(-len(inputs) // workers) * workers))


def _timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _decrypted(cc: Any, secret: Any, layout: Packing, scores: list[Any], rows: int,
               count: int) -> FloatArray:
    """The (rows, count) scores the buyer would read from `scores`."""
    return layout.decode([np.array(engine.decrypt_vector(cc, secret, ct, layout.slots))
                          for ct in scores], rows, count)


def _opened(cc: Any, secret: Any, layout: Packing, finished: list[bytes], rows: int,
            count: int) -> FloatArray:
    """The (rows, count) scores the buyer reads from `finish`'s results."""
    period = layout.fold_period(rows, count)
    return layout.decode([np.array(engine.open_result(
        cc, secret, engine.load_ciphertext(blob), period, layout.slots)) for blob in finished],
        rows, count)


def _noise(flooding_std: float, policy_noise_std: float) -> float:
    """Standard deviation of the Gaussian noise added to every returned score."""
    return float(np.hypot(flooding_std, policy_noise_std))


def _trial_setup(setup: TrialSetup) -> tuple[Any, HEPlan]:
    plan = HEPlan.from_bytes(Path(setup.plan_path).read_bytes())
    return engine.build_context(setup.params, setup.security_bits), plan


def check_keys(request: Json, report: ProgressFn) -> Json:
    """Template-check an uploaded key set (bytes only, nothing deserialized), and that the
    public key's uniform half is the one the offer derives (engine.public_key_is_seeded);
    evaluations later open only the set that passed, by its digest."""
    job = job_from_json(CheckKeys, request)
    cc, _plan = _trial_setup(job.setup)
    tag = job.setup.key_tag
    report({"stage": "building templates"})
    templates = {"relin_key": engine.relin_key_template(cc, tag),
                 "public_key": engine.public_key_template(cc, tag)}
    if "rotation_keys" in job.keys.names:
        templates["rotation_keys"] = engine.rotation_key_template(
            cc, tag, job.setup.rotation_indices)
    report({"stage": "checking uploads"})
    for name in job.keys.names:
        templates[name].check(job.keys.path(name).read_bytes(), KEY_OBJECTS[name])
    if not engine.public_key_is_seeded(cc, job.keys.path("public_key").read_bytes(),
                                       bytes.fromhex(job.public_key_seed)):
        raise BadInput("public key: its uniform half is not the one the offer derives (from "
                       "its trial id and key tag); generate the key pair for this offer with "
                       "gimme-buyer, which derives it")
    return {}


def evaluate_batch(request: Json, report: ProgressFn) -> Json:
    """Check, open and evaluate one batch of uploaded ciphertexts; finish and write the
    results."""
    job = job_from_json(EvaluateBatch, request)
    cc, plan = _trial_setup(job.setup)
    layout = job.setup.packing
    keys = {name: job.keys.path(name).read_bytes() for name in job.keys.names}
    if keys_digest(*keys.values()).hex() != job.keys.sha256:
        raise BadInput("the trial's key files are not the ones checked at upload; upload "
                       "the keys again")
    report({"stage": "building templates"})
    gate = engine.CiphertextGate(cc, job.setup.key_tag, level=0)
    report({"stage": "checking uploads"})
    blobs = [Path(p).read_bytes() for p in job.ciphertext_paths]
    for index, blob in enumerate(blobs):
        gate.check(blob, f"ciphertext {index}")
    report({"stage": "loading relinearization key"})
    engine.load_relin_key(keys["relin_key"])
    if "rotation_keys" in keys:
        engine.load_rotation_keys(keys["rotation_keys"])
    buyer_public = engine.load_public_key(keys["public_key"])
    report({"stage": "loading ciphertexts"})
    workers = job.workers
    inputs = gate.load_all(blobs, "ciphertext", threads=workers)
    del blobs, keys
    start = time.perf_counter()
    if layout.kind == FEATURE_PACKED:
        packed = pack_plan(plan)
        scores = engine.evaluate_packed(cc, packed, inputs, _evaluation_progress(report),
                                        workers)
        count = packed.scores
    else:
        scores = engine.evaluate(cc, plan, inputs, _evaluation_progress(report), workers)
        count = len(scores)
    seconds = time.perf_counter() - start
    report({"stage": "finishing"})
    noise = _noise(job.flooding_std, job.policy_noise_std)
    finished = engine.finish(cc, scores, layout.masks(job.rows, count),
                             buyer_public if job.circuit_privacy or noise else None,
                             noise, np.random.default_rng(), layout.fold_period(job.rows, count))
    report({"stage": "writing results"})
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for index, data in enumerate(finished):
        path = out_dir / f"score-{index}.bin"
        path.write_bytes(data)
        results.append({"path": str(path), "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    return {"results": results, "evaluate_seconds": seconds}

"""Benchmark the HE engine on the example models, against plaintext onnxruntime and TenSEAL
measured in the same run.

    python bench/run.py [--models digits-lr,digits-mlp,digits-cnn,cryptonets]
                        [--workers N] [--tenseal] [--json out.json]

Per model: key generation, encryption, upload bytes (input ciphertexts + relinearization
key), seller-side evaluation (template checks, loading, evaluation, result serialization),
download bytes, decryption, amortized ms per sample at the test-set size and at a full
batch (one batch costs the same however many slots are filled), max error vs plaintext,
top-1 agreement, and ratios to onnxruntime and (with --tenseal, an optional extra:
`pip install tenseal`) to TenSEAL evaluating the identical plan.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.guarded import worker_environment  # noqa: E402

# The evaluation runs in this process, so it gets a seller worker's environment (one
# OpenMP thread, the allocator settings), which only takes effect from process start.
if "GLIBC_TUNABLES" not in os.environ or os.environ.get("OMP_NUM_THREADS") != "1":
    os.execve(sys.executable, [sys.executable, *sys.argv], worker_environment())

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any, TypeVar  # noqa: E402

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from skl2onnx import to_onnx  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import MinMaxScaler  # noqa: E402

from common.he import engine  # noqa: E402
from common.he.packing import SLOT_PER_SAMPLE, Packing, pack_plan  # noqa: E402
from common.he.params import new_key_tag, public_key_seed  # noqa: E402
from common.he.plan import HEPlan, row_terms  # noqa: E402
from common.onnx_io import MAX_IR_VERSION, model_feed, run_model, session  # noqa: E402
from examples.datasets import digits  # noqa: E402
from seller_server.compiler import compile_model  # noqa: E402
from seller_server.planner import choose_params  # noqa: E402

FloatArray = npt.NDArray[np.float64]
MODELS_DIR = ROOT / "examples" / "models"
TENSEAL_MAX_TERMS = 20_000  # beyond this TenSEAL takes minutes: not run


@dataclass
class Row:
    model: str
    rows: int
    params: str
    keygen_s: float
    encrypt_s: float
    upload_mb: float
    relin_key_mb: float
    evaluate_s: float
    compute_s: float
    download_mb: float
    decrypt_s: float
    trial_s: float
    ms_per_sample: float
    ms_per_sample_full_batch: float
    max_error: float
    top1_agreement: float
    plaintext_us_per_sample: float
    ratio_to_plaintext: float
    packed_latency_s: float = 0.0  # one row, feature-packed: evaluation only
    packed_rotation_keys_mb: float = 0.0
    packed_rotations: int = 0
    packed_error: float = 0.0
    tenseal_s: float | None = None
    tenseal_packing: str = ""
    speedup_vs_tenseal: float | None = None


def _digits_lr() -> tuple[bytes, int]:
    x_train, _x_test, y_train, _y_test = digits(8)
    pipeline = make_pipeline(MinMaxScaler(), LogisticRegression(max_iter=3000))
    pipeline.fit(x_train, y_train)
    model = to_onnx(pipeline, x_train[:1].astype(np.float32),
                    options={id(pipeline.steps[-1][1]): {"zipmap": False}},
                    target_opset={"": 17, "ai.onnx.ml": 3})
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    return model.SerializeToString(), 8


MODELS: dict[str, Callable[[], tuple[bytes, int]]] = {
    "digits-lr": _digits_lr,
    "digits-mlp": lambda: ((MODELS_DIR / "digits_square_mlp.onnx").read_bytes(), 8),
    "digits-cnn": lambda: ((MODELS_DIR / "digits_cnn.onnx").read_bytes(), 8),
    "cryptonets": lambda: ((MODELS_DIR / "cryptonets.onnx").read_bytes(), 28),
}


T = TypeVar("T")


def _timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def bench_model(name: str, workers: int, with_tenseal: bool, console: Console) -> Row:
    model, side = MODELS[name]()
    x_train, x_test, _y_train, _y_test = digits(side)
    x_all = np.vstack([x_train, x_test])  # the whole dataset as the buyer's test set
    compiled = compile_model(model, x_train)
    plan = compiled.plan
    params = choose_params(engine.levels_needed(plan), 128,
                           float(np.abs(plan.simulate(x_train)).max()))
    rows = x_all[: params.slots]
    console.print(f"[bold]{name}[/bold]: {len(rows)} rows, {params.describe()}, "
                  f"{plan.scalar_multiplications()} scalar and "
                  f"{plan.ciphertext_multiplications()} ciphertext multiplications")
    cc = engine.build_context(params, 128)
    tag = new_key_tag()

    # buyer: keys and encryption
    # as the buyer's client does: the public key reseeded from the offer (a stand-in id)
    keygen_s, (secret, public) = _timed(
        lambda: engine.generate_keys(cc, tag, public_key_seed("0" * 24, tag)))
    relin_key = engine.serialize_relin_key(tag)
    layout = Packing(SLOT_PER_SAMPLE, cc.GetRingDimension() // 2)
    encrypt_s, inputs_bytes = _timed(lambda: [
        engine.ciphertext_bytes(engine.encrypt_vector(cc, public, vector))
        for vector in layout.encode(plan.encoded(rows))])

    # seller: check, load, evaluate, serialize (as the worker does)
    compute: list[float] = []

    def seller() -> list[bytes]:
        gate = engine.CiphertextGate(cc, tag, level=0)
        inputs = gate.load_all(inputs_bytes, "input", threads=workers)
        seconds, scores = _timed(
            lambda: engine.evaluate(cc, plan, inputs, lambda done, total: None, workers))
        compute.append(seconds)
        return engine.finish(cc, scores, layout.masks(len(rows), len(scores)), public, 0.0,
                             np.random.default_rng(), layout.fold_period(len(rows), len(scores)))

    evaluate_s, result_bytes = _timed(seller)

    # buyer: check and decrypt
    def decrypt() -> FloatArray:
        gate = engine.CiphertextGate(cc, tag, engine.result_level(plan))
        period = layout.fold_period(len(rows), len(result_bytes))
        return np.array([engine.open_result(cc, secret, gate.load(blob, "result"), period,
                                            len(rows)) for blob in result_bytes]).T

    decrypt_s, scores = _timed(decrypt)

    # plaintext onnxruntime on the same rows, in the same run
    reference = run_model(model, rows, compiled.tail.probability_output,
                          compiled.tail.class_labels)
    sess = session(model)
    feed = model_feed(sess, rows)
    repeats = 20
    plain_s, _ = _timed(lambda: [sess.run(None, feed) for _ in range(repeats)])
    plain_per_sample = plain_s / repeats / len(rows)
    from common.tail import apply_tail  # the compared output is after the tail

    ours = apply_tail(scores, compiled.tail.ops)
    agreement = float(np.mean(ours.argmax(1) == reference.argmax(1)))
    upload = sum(len(b) for b in inputs_bytes) + len(relin_key)
    row = Row(
        model=name, rows=len(rows), params=params.describe(), keygen_s=keygen_s,
        encrypt_s=encrypt_s, upload_mb=upload / 1e6, relin_key_mb=len(relin_key) / 1e6,
        evaluate_s=evaluate_s, compute_s=compute[0],
        download_mb=sum(len(b) for b in result_bytes) / 1e6,
        decrypt_s=decrypt_s, trial_s=keygen_s + encrypt_s + evaluate_s + decrypt_s,
        ms_per_sample=1e3 * evaluate_s / len(rows),
        ms_per_sample_full_batch=1e3 * evaluate_s / params.slots,
        max_error=float(np.abs(ours - reference).max()), top1_agreement=agreement,
        plaintext_us_per_sample=1e6 * plain_per_sample,
        ratio_to_plaintext=(evaluate_s / len(rows)) / plain_per_sample)
    _single_sample(cc, secret, public, plan, rows, row)
    if with_tenseal and plan.scalar_multiplications() <= TENSEAL_MAX_TERMS:
        row.tenseal_s, row.tenseal_packing = tenseal_best(plan, rows, params.ring_dimension)
        row.speedup_vs_tenseal = row.tenseal_s / row.compute_s
    return row


def _single_sample(cc: Any, secret: Any, public: Any, plan: HEPlan, rows: FloatArray,
                   row: Row) -> None:
    """Feature-packed latency of one row (its features in the slots of one ciphertext),
    with the weights already encoded."""
    packed = pack_plan(plan)
    slots = cc.GetRingDimension() // 2
    keys = engine.generate_rotation_keys(cc, secret, packed.rotation_indices(slots))
    [vector] = packed.layout(slots).encode(plan.encoded(rows[:1]))
    sample = engine.encrypt_vector(cc, public, vector)
    evaluator = engine.PackedEvaluator(cc, packed)
    evaluator.evaluate(sample)  # encodes the weights' plaintexts once, as at model load
    latency, scores = _timed(lambda: evaluator.evaluate(sample))
    got = packed.layout(slots).decode(
        [np.array(engine.decrypt_vector(cc, secret, scores, slots))], 1, packed.scores)[0]
    row.packed_latency_s = latency
    row.packed_rotation_keys_mb = len(keys) / 1e6
    row.packed_rotations = packed.rotations()
    row.packed_error = float(np.abs(got - plan.simulate(rows[:1])[0]).max())


def tenseal_best(plan: HEPlan, rows: FloatArray, ring: int) -> tuple[float, str]:
    """TenSEAL evaluating the identical plan (affine + square stages), slot-per-sample
    with one CKKS vector per column; its thread pool uses every core."""
    import tenseal as ts

    if any(stage.kind != "square" for stage in plan.stages):
        raise SystemExit("the TenSEAL comparison covers exact (square) plans only")
    depth = plan.depth()
    ctx = None
    for scale, outer in ((40, 60), (33, 50), (30, 45)):  # the most precise SEAL accepts
        try:
            ctx = ts.context(ts.SCHEME_TYPE.CKKS, ring,
                             coeff_mod_bit_sizes=[outer] + [scale] * depth + [outer])
        except ValueError:
            continue
        ctx.global_scale = 2.0**scale
        break
    if ctx is None:
        raise SystemExit(f"TenSEAL has no 128-bit parameters for depth {depth} at N={ring}")
    columns = [ts.ckks_vector(ctx, column.tolist()) for column in plan.encoded(rows).T]
    start = time.perf_counter()
    basis = list(columns)
    for stage in plan.stages:
        produced = []
        for unit in range(stage.units):
            u = _tenseal_sum(basis, *row_terms(stage.weights, unit)) + float(stage.bias[unit])
            produced.append(u.square())
        basis.extend(produced)
    for row in range(plan.score_count):
        _ = _tenseal_sum(basis, *row_terms(plan.output.weights, row)) + float(
            plan.output.bias[row])
    return time.perf_counter() - start, "slot-per-sample"


def _tenseal_sum(basis: list[Any], indices: npt.NDArray[np.int64], values: FloatArray) -> Any:
    total = basis[int(indices[0])] * float(values[0])
    for j, w in zip(indices[1:], values[1:], strict=True):
        total += basis[int(j)] * float(w)
    return total


FIGURES: list[tuple[str, Callable[[Row], str]]] = [
    ("test rows (one batch)", lambda r: str(r.rows)),
    ("CKKS parameters", lambda r: r.params),
    ("key generation s", lambda r: f"{r.keygen_s:.2f}"),
    ("encryption s", lambda r: f"{r.encrypt_s:.2f}"),
    ("upload MB (relin key)", lambda r: f"{r.upload_mb:.1f} ({r.relin_key_mb:.1f})"),
    ("seller evaluation s (all)", lambda r: f"{r.evaluate_s:.2f}"),
    ("  of which computing", lambda r: f"{r.compute_s:.2f}"),
    ("download MB", lambda r: f"{r.download_mb:.2f}"),
    ("decryption s", lambda r: f"{r.decrypt_s:.2f}"),
    ("trial s (keygen..decrypt)", lambda r: f"{r.trial_s:.2f}"),
    ("ms/sample (test set)", lambda r: f"{r.ms_per_sample:.3f}"),
    ("ms/sample (full batch)", lambda r: f"{r.ms_per_sample_full_batch:.3f}"),
    ("max |error| vs plaintext", lambda r: f"{r.max_error:.1e}"),
    ("top-1 agreement", lambda r: f"{r.top1_agreement:.2%}"),
    ("plaintext onnxruntime us/sample", lambda r: f"{r.plaintext_us_per_sample:.2f}"),
    ("HE / plaintext per sample", lambda r: f"{r.ratio_to_plaintext:,.0f}x"),
    ("1 row feature-packed: evaluation s", lambda r: f"{r.packed_latency_s:.3f}"),
    ("  rotations; rotation keys MB", lambda r: f"{r.packed_rotations}; "
                                               f"{r.packed_rotation_keys_mb:.0f}"),
    ("  max |error| vs the plan", lambda r: f"{r.packed_error:.1e}"),
    ("TenSEAL evaluation s", lambda r: f"{r.tenseal_s:.2f} ({r.tenseal_packing})"
     if r.tenseal_s is not None else "-"),
    ("TenSEAL / Gimme computing", lambda r: f"{r.speedup_vs_tenseal:.1f}x"
     if r.speedup_vs_tenseal is not None else "-"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tenseal", action="store_true", help="also run TenSEAL")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    console = Console()
    results = [bench_model(name, args.workers, args.tenseal, console)
               for name in args.models.split(",")]
    table = Table("", *(r.model for r in results),
                  title=f"Gimme HE engine, {args.workers} worker(s), 128-bit CKKS")
    for label, show in FIGURES:
        table.add_row(label, *(show(r) for r in results))
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()

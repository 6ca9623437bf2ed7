"""The model zoo: ordinary models a seller would list, each traded under encryption.

    python bench/zoo.py [--only NAME,...] [--rows 64] [--timeout 300] [--markdown]
                        [--json OUT.json] [--cache ~/.cache/gimme-zoo] [--list]

Every kind is a small builder: it trains a scikit-learn pipeline (exported with skl2onnx)
or a PyTorch model (exported with torch.onnx.export by bench/zoo_torch.py, run with the
PyTorch interpreter and cached) on a dataset bundled with scikit-learn, and returns the
ONNX bytes, the training rows (the seller's calibration rows) and held-out rows with their
labels (the buyer's test rows).

Each model then goes through what a listing and a trial do, in a child process of its own
(a crash or a hang is recorded, not fatal): Deep-Lock's check, `compile_model` with the
listing defaults of seller_server/catalog.py, 128-bit parameters from the planner, then on
up to --rows held-out rows (clipped to the offer's input domain when activations are
approximated, as the buyer does): keys, encryption, the real evaluation, the seller's
finish (circuit-privacy flooding at the listing default), the buyer's opening of the
folded result and the output tail, compared with onnxruntime on the same rows.

Outcomes: match (top-1 agreement >= 99% and max |error| <= the listing's max_error; for a
regression, max |error| within 1% of the held-out targets' spread), refused (listing it
failed, with the message: an operator the compiler cannot evaluate, or a plan whose error
on the calibration rows misses max_error), wrong (it was listed and ran, but missed on the
held-out rows: the figures say by how much and whether the plan alone already did), crash,
timeout, skipped (no torch and no cached export). The exit status is
0 whatever the outcomes (a measurement, not a test); nonzero only on an error of the
script itself. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

from common.guarded import worker_environment  # noqa: E402
from common.he.packing import FEATURE_PACKED, SLOT_PER_SAMPLE  # noqa: E402

if TYPE_CHECKING:
    from seller_server.catalog import ListingSpec

FloatArray = npt.NDArray[np.float64]
Split = tuple[FloatArray, FloatArray, npt.NDArray[Any], npt.NDArray[Any]]

DEFAULT_CACHE = Path.home() / ".cache" / "gimme-zoo"
TORCH_SCRIPT = Path(__file__).resolve().parent / "zoo_torch.py"
SECURITY_BITS = 128
MIN_AGREEMENT = 0.99
# a regression matches when its max |error| is within this share of the targets' spread
# (its listing's max_error is in target units, where catalog.py's default means little)
MAX_RELATIVE_ERROR = 0.01
OPSETS = {"": 17, "ai.onnx.ml": 3}
SEED = 0

MATCH, REFUSED, WRONG, CRASH, TIMEOUT, SKIPPED = (
    "match", "refused", "wrong", "crash", "timeout", "skipped")


# ---------------------------------------------------------------- kinds


@dataclass(frozen=True)
class Built:
    """What a builder hands over: the model and the rows a trial of it needs."""

    model: bytes
    calibration: FloatArray  # the training split: the seller's rows
    rows: FloatArray  # held-out rows: the buyer's
    labels: npt.NDArray[Any]  # their labels (classes) or targets (regression)


@dataclass(frozen=True)
class Kind:
    name: str
    source: str  # "sklearn" or "torch"
    dataset: str
    regression: bool
    expect: str  # MATCH, or REFUSED where the computation is discrete by nature
    description: str
    build: Callable[[Path, str], Built]  # (cache directory, torch interpreter or "")
    max_error: float | None = None  # the listing's, where not catalog.py's default
    # how the batch is encrypted: slot-per-sample, or feature-packed for models too wide
    # for a ciphertext per unit (the trial's planner would choose it)
    packing: str = SLOT_PER_SAMPLE


def split(dataset: str) -> Split:
    """70/30, stratified for classes, seed 0 (the digits split is examples/datasets.py's)."""
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris, load_wine
    from sklearn.model_selection import train_test_split

    from examples.datasets import digits

    if dataset == "digits":
        return digits(8)
    loaders = {"breast_cancer": load_breast_cancer, "wine": load_wine, "iris": load_iris,
               "diabetes": load_diabetes}
    data = loaders[dataset]()
    x = np.asarray(data.data, dtype=np.float64)
    y = np.asarray(data.target)
    stratify = None if dataset == "diabetes" else y
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=SEED, stratify=stratify)
    return x_train, x_test, y_train, y_test


def _sklearn(name: str, dataset: str, make: Callable[[], Any], expect: str,
             description: str, regression: bool = False,
             options: dict[str, Any] | None = None, max_error: float | None = None) -> Kind:
    """`options`: skl2onnx options of the pipeline's last step."""
    def build(_cache: Path, _torch: str) -> Built:
        from skl2onnx import to_onnx
        from sklearn.exceptions import ConvergenceWarning

        from common.onnx_io import MAX_IR_VERSION

        x_train, x_test, y_train, y_test = split(dataset)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            estimator = make().fit(x_train, y_train)
        last = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
        model = to_onnx(estimator, x_train[:1].astype(np.float32), target_opset=OPSETS,
                        options={id(last): options} if options else None)
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        return Built(model.SerializeToString(), x_train, x_test, y_test)

    return Kind(name, "sklearn", dataset, regression, expect, description, build, max_error)


def _torch(name: str, dataset: str, expect: str, description: str,
           max_error: float | None = None, packing: str = SLOT_PER_SAMPLE) -> Kind:
    def build(cache: Path, torch_python: str) -> Built:
        import onnx

        from common.onnx_io import MAX_IR_VERSION

        x_train, x_test, y_train, y_test = split(dataset)
        digest = hashlib.sha256(b"\0".join([
            TORCH_SCRIPT.read_bytes(), name.encode(), x_train.tobytes(),
            np.asarray(y_train, dtype=np.int64).tobytes()])).hexdigest()[:16]
        path = cache / f"{name}-{digest}.onnx"
        if not path.exists():
            if not torch_python:
                raise NoTorch(f"no PyTorch interpreter and no cached export {path.name}")
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="gimme-zoo-") as tmp:
                data = Path(tmp) / "train.npz"
                np.savez(data, x_train=x_train, y_train=np.asarray(y_train, dtype=np.int64))
                _stage("exporting with PyTorch")
                done = subprocess.run([torch_python, str(TORCH_SCRIPT), name, str(data),
                                       str(path)], capture_output=True, text=True,
                                      check=False)
            if done.returncode != 0 or not path.exists():
                lines = (done.stderr or done.stdout).strip().splitlines()
                raise ExportFailed(f"torch export failed: {lines[-1] if lines else done}")
        model = onnx.load_model_from_string(path.read_bytes())
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        return Built(model.SerializeToString(), x_train, x_test, y_test)

    return Kind(name, "torch", dataset, False, expect, description, build, max_error,
                packing)


class NoTorch(Exception):
    pass


class ExportFailed(Exception):
    pass


def _kinds() -> list[Kind]:
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler, PolynomialFeatures, StandardScaler
    from sklearn.svm import SVC, LinearSVC
    from sklearn.tree import DecisionTreeClassifier

    def mlp(activation: str) -> Callable[[], Any]:
        return lambda: make_pipeline(MinMaxScaler(), MLPClassifier(
            hidden_layer_sizes=(32,), activation=activation, alpha=0.1, max_iter=1500,
            random_state=SEED))

    return [
        _sklearn("logreg-std", "breast_cancer",
                 lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
                 MATCH, "StandardScaler + LogisticRegression (binary)"),
        _sklearn("logreg-minmax", "digits",
                 lambda: make_pipeline(MinMaxScaler(), LogisticRegression(max_iter=3000)),
                 MATCH, "MinMaxScaler + LogisticRegression (10 classes)"),
        _sklearn("logreg-wine", "wine",
                 lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
                 MATCH, "StandardScaler + LogisticRegression (3 classes)"),
        _sklearn("pca-logreg", "digits",
                 lambda: make_pipeline(StandardScaler(), PCA(n_components=20, random_state=SEED),
                                       LogisticRegression(max_iter=3000)),
                 MATCH, "StandardScaler + PCA(20) + LogisticRegression"),
        _sklearn("lda", "wine", LinearDiscriminantAnalysis, MATCH,
                 "LinearDiscriminantAnalysis"),
        _sklearn("linear-regression", "diabetes", LinearRegression, MATCH,
                 "LinearRegression", regression=True),
        _sklearn("ridge", "diabetes", lambda: make_pipeline(StandardScaler(), Ridge(alpha=1.0)),
                 MATCH, "StandardScaler + Ridge", regression=True),
        _sklearn("poly-ridge", "diabetes",
                 lambda: make_pipeline(StandardScaler(), PolynomialFeatures(2), Ridge(alpha=10.0)),
                 MATCH, "StandardScaler + PolynomialFeatures(2) + Ridge", regression=True),
        _sklearn("linear-svc", "breast_cancer",
                 lambda: make_pipeline(StandardScaler(), LinearSVC(random_state=SEED)),
                 # skl2onnx 1.20 fails on this pipeline ("Option 'zipmap' not in ...")
                 # unless some option of LinearSVC is given: its default, here
                 MATCH, "StandardScaler + LinearSVC", options={"nocl": False}),
        _sklearn("svc-linear", "breast_cancer",
                 lambda: make_pipeline(StandardScaler(), SVC(kernel="linear")),
                 MATCH, "StandardScaler + SVC(kernel=linear)"),
        _sklearn("svc-rbf", "breast_cancer",
                 lambda: make_pipeline(StandardScaler(), SVC(kernel="rbf")),
                 MATCH, "StandardScaler + SVC(kernel=rbf)"),
        _sklearn("mlp-tanh", "digits", mlp("tanh"), MATCH,
                 "MinMaxScaler + MLPClassifier 64-32-10 tanh"),
        _sklearn("mlp-relu", "digits", mlp("relu"), MATCH,
                 "MinMaxScaler + MLPClassifier 64-32-10 relu"),
        _sklearn("mlp-logistic", "digits", mlp("logistic"), MATCH,
                 "MinMaxScaler + MLPClassifier 64-32-10 logistic"),
        _sklearn("mlp-relu-binary", "breast_cancer",
                 lambda: make_pipeline(StandardScaler(), MLPClassifier(
                     hidden_layer_sizes=(16,), alpha=0.1, max_iter=2000, random_state=SEED)),
                 MATCH, "StandardScaler + MLPClassifier 30-16-1 relu (binary)"),
        _sklearn("mlp-regressor", "diabetes",
                 lambda: make_pipeline(StandardScaler(), MLPRegressor(
                     hidden_layer_sizes=(32,), learning_rate_init=0.01, max_iter=3000,
                     random_state=SEED)),
                 MATCH, "StandardScaler + MLPRegressor 10-32-1 relu (max_error 3, in "
                 "target units: 1% of the targets' spread)", regression=True, max_error=3.0),
        _sklearn("gaussian-nb", "wine", GaussianNB, MATCH, "GaussianNB"),
        # a tree's thresholds are smoothed steps: rows near one get a blend of both
        # branches, so its listing needs a looser max_error (the buyer sees it)
        _sklearn("decision-tree", "breast_cancer",
                 lambda: DecisionTreeClassifier(max_depth=4, random_state=SEED),
                 MATCH, "DecisionTreeClassifier (depth 4), max_error 0.5", max_error=0.5),
        _sklearn("random-forest", "breast_cancer",
                 lambda: RandomForestClassifier(n_estimators=10, max_depth=4, random_state=SEED),
                 MATCH, "RandomForestClassifier (10 trees, depth 4), max_error 0.3",
                 max_error=0.3),
        _sklearn("gradient-boosting", "breast_cancer",
                 lambda: GradientBoostingClassifier(n_estimators=20, max_depth=3,
                                                    random_state=SEED),
                 MATCH, "GradientBoostingClassifier (20 trees, depth 3), max_error 0.5",
                 max_error=0.5),
        _sklearn("knn", "breast_cancer",
                 lambda: make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=5)),
                 REFUSED, "StandardScaler + KNeighborsClassifier(5)"),
        _torch("torch-relu-mlp", "digits", MATCH, "MLP 64-32-10 ReLU (x/16 inside)"),
        _torch("torch-square-mlp", "digits", MATCH, "MLP 64-32-10 x*x (x/16 inside)"),
        _torch("torch-relu-cnn-avgpool", "digits", MATCH,
               "8x8 conv 3x3 (4 maps) + ReLU + AvgPool 2 + dense 10, feature-packed",
               packing=FEATURE_PACKED),
        # max pooling is 2 rounds of |a - b| and a ReLU: max_error 0.3 on the logits (up
        # to ~18), as examples/build.py lists digits-relu-cnn (0.01 needs depth ~31)
        _torch("torch-relu-cnn-maxpool", "digits", MATCH,
               "8x8 conv 3x3 (4 maps) + ReLU + MaxPool 2 + dense 10, max_error 0.3, "
               "feature-packed", max_error=0.3, packing=FEATURE_PACKED),
        _torch("torch-tanh-mlp-norm", "breast_cancer", MATCH,
               "(x - mean) / std inside, MLP 30-16-2 tanh"),
        _torch("torch-residual-relu", "digits", MATCH,
               "MLP 64-32, residual block relu(x + W relu(W x)), dense 10"),
        _torch("torch-layernorm-mlp", "digits", MATCH,
               "MLP 64-32 + LayerNorm + ReLU + dense 10"),
    ]


# ---------------------------------------------------------------- one model (child side)


@dataclass
class Result:
    name: str
    source: str
    dataset: str
    expect: str
    outcome: str = CRASH
    detail: str = ""
    rows: int = 0
    agreement: float | None = None  # top-1 agreement with onnxruntime (classification)
    max_error: float | None = None  # max |HE - onnxruntime| on the compared output
    relative_error: float | None = None  # regression: max_error / spread of the targets
    plan_agreement: float | None = None  # the plan in float64 (no CKKS), for diagnosis
    plan_error: float | None = None
    accuracy: float | None = None  # plaintext model vs labels (R^2 for a regression)
    approximation: str = ""
    calibration_error: float | None = None  # the compiler's, on the calibration rows
    params: str = ""  # the CKKS parameters chosen
    depth: int = 0
    ring: int = 0
    compile_s: float = 0.0
    evaluate_s: float = 0.0  # one batch (the cost is the same for 1 row or a full one)
    slots: int = 0
    packing: str = ""
    batch_rows: int = 0  # rows a full batch holds: N/2, or one packed ciphertext's
    features: int = 0
    input_ciphertexts: int = 0  # of one batch: one per feature, or one packed
    ciphertext_bytes: int = 0
    relin_key_bytes: int = 0
    rotation_key_bytes: int = 0  # feature-packed only
    computation_error: float = 0.0  # max |decrypted - plan| before the seller's finish
    flooding_std: float = 0.0  # circuit privacy's noise, from computation_error
    clipped_values: int = 0
    outside_ranges: int = 0  # rows leaving the plan's calibrated activation ranges
    seconds: float = 0.0  # the child's wall time
    finished: bool = False  # False: what a child had measured when it was stopped

    @property
    def ms_per_row(self) -> float | None:  # at a full batch
        return (1e3 * self.evaluate_s / self.batch_rows if self.batch_rows and self.evaluate_s
                else None)

    @property
    def upload_bytes(self) -> int:  # input ciphertexts of one batch (keys aside)
        return self.input_ciphertexts * self.ciphertext_bytes

    @property
    def bytes_per_row(self) -> float | None:  # at a full batch
        return (self.upload_bytes / self.batch_rows if self.batch_rows and self.ciphertext_bytes
                else None)

    @property
    def as_expected(self) -> bool:
        return self.outcome == MATCH or (self.outcome == REFUSED and self.expect == REFUSED)


def _stage(text: str) -> None:
    print(f"stage: {text}", file=sys.stderr, flush=True)


def run_kind(kind: Kind, rows: int, cache: Path, torch_python: str, workers: int,
             save: Callable[[Result], None]) -> Result:
    """Build, list and trade one model; never raises for the model's own failures.
    `save` keeps the figures measured so far (for a time limit that stops it)."""
    from common.errors import GimmeError

    result = Result(kind.name, kind.source, kind.dataset, kind.expect)
    _stage("building")
    try:
        built = kind.build(cache, torch_python)
    except NoTorch as exc:
        result.outcome, result.detail = SKIPPED, str(exc)
        return result
    except ExportFailed as exc:
        result.outcome, result.detail = CRASH, str(exc)
        return result
    try:
        _trade(kind, built, rows, workers, result, save)
    except GimmeError as exc:  # Unsupported, BadInput: the listing is refused
        result.outcome, result.detail = REFUSED, shorten(exc.message)
    return result


def _trade(kind: Kind, built: Built, rows: int, workers: int, result: Result,
           save: Callable[[Result], None]) -> None:
    from common.deeplock import check_lockable
    from common.he import engine
    from common.he.packing import Packing, pack_plan
    from common.he.params import new_key_tag
    from common.he.plan import APPROXIMATING_KINDS, model_scores
    from common.onnx_io import run_model
    from common.tail import apply_tail, predicted_labels
    from seller_server.catalog import input_domain, plan_listing

    spec = _listing_defaults(built.calibration.shape[1])
    if kind.max_error is not None:
        spec = dataclasses.replace(spec, max_error=kind.max_error)
    check_lockable(built.model)  # load_listing's first check
    _stage("compiling")
    start = time.perf_counter()
    compiled, params = plan_listing(spec, built.model, built.calibration, SECURITY_BITS)
    result.compile_s = time.perf_counter() - start  # with the planner's choice
    plan = compiled.plan
    result.approximation = compiled.approximation
    result.calibration_error = compiled.approximation_error
    result.params = params.describe()
    result.depth, result.ring, result.slots = (params.multiplicative_depth,
                                               params.ring_dimension, params.slots)
    result.features = plan.input_count
    packed = pack_plan(plan) if kind.packing == FEATURE_PACKED else None
    layout = packed.layout(params.slots) if packed else Packing(SLOT_PER_SAMPLE, params.slots)
    result.packing, result.batch_rows = layout.kind, layout.rows_per_ciphertext
    save(result)
    tail = compiled.tail
    test = built.rows[:min(rows, result.batch_rows)]
    if any(s.kind in APPROXIMATING_KINDS for s in plan.stages):  # offers declare a domain
        low, high = input_domain(spec, built.calibration)
        clipped = np.clip(test, np.array(low), np.array(high))
        result.clipped_values = int(np.count_nonzero(clipped != test))
        test = clipped
    result.rows = len(test)
    result.outside_ranges = int(np.count_nonzero(plan.range_excess(test) > 1.0))
    reference = run_model(built.model, test, tail.probability_output, tail.class_labels)
    labels = built.labels[:len(test)]
    planned = apply_tail(model_scores(plan.simulate(test), plan.range_check), tail.ops)

    _stage(f"encrypting ({params.describe()})")
    cc = engine.build_context(params, SECURITY_BITS)
    tag = new_key_tag()
    secret, public = engine.generate_keys(cc, tag)
    result.relin_key_bytes = len(engine.serialize_relin_key(tag))
    if packed:
        result.rotation_key_bytes = len(engine.generate_rotation_keys(
            cc, secret, packed.rotation_indices(params.slots)))
    inputs = [engine.encrypt_vector(cc, public, v) for v in layout.encode(plan.encoded(test))]
    result.input_ciphertexts = len(inputs)
    result.ciphertext_bytes = len(engine.ciphertext_bytes(inputs[0]))
    save(result)
    _stage("evaluating")
    start = time.perf_counter()
    scores = (engine.evaluate_packed(cc, packed, inputs, lambda done, total: None, workers)
              if packed else engine.evaluate(cc, plan, inputs, lambda done, total: None,
                                             workers))
    result.evaluate_s = time.perf_counter() - start
    save(result)
    _stage("finishing and opening")
    count = packed.scores if packed else len(scores)
    raw = layout.decode([np.array(engine.decrypt_vector(cc, secret, ct, params.slots))
                         for ct in scores], len(test), count)
    computation_error = float(np.abs(raw - plan.simulate(test)).max())
    flooding_std = (computation_error * 2.0 ** spec.flooding_bits
                    if spec.circuit_privacy else 0.0)
    result.computation_error, result.flooding_std = computation_error, flooding_std
    period = layout.fold_period(len(test), count)
    finished = engine.finish(cc, scores, layout.masks(len(test), count), public, flooding_std,
                             np.random.default_rng(SEED), period)
    opened = layout.decode([np.array(engine.open_result(
        cc, secret, engine.load_ciphertext(blob), period, params.slots)) for blob in finished],
        len(test), count)
    ours = apply_tail(model_scores(opened, plan.range_check), tail.ops)

    result.max_error = float(np.abs(ours - reference).max())
    result.plan_error = float(np.abs(planned - reference).max())
    if kind.regression:
        spread = float(np.ptp(built.labels)) or 1.0
        result.relative_error = result.max_error / spread
        predicted = reference[:, 0]
        truth = np.asarray(labels, dtype=np.float64)
        result.accuracy = 1.0 - float(np.sum((truth - predicted) ** 2)
                                      / np.sum((truth - truth.mean()) ** 2))
        met = result.relative_error <= MAX_RELATIVE_ERROR
        missed = (f"max err {result.relative_error:.2%} of the spread > "
                  f"{MAX_RELATIVE_ERROR:.0%}")
    else:
        expected = predicted_labels(reference, tail.class_labels)
        result.agreement = _agreement(predicted_labels(ours, tail.class_labels), expected)
        result.plan_agreement = _agreement(predicted_labels(planned, tail.class_labels),
                                           expected)
        result.accuracy = _agreement(expected, [str(v) for v in labels])
        met = result.agreement >= MIN_AGREEMENT and result.max_error <= spec.max_error
        missed = ", ".join(
            ([f"top-1 {result.agreement:.1%} < {MIN_AGREEMENT:.0%} (plan alone "
              f"{result.plan_agreement:.1%})"] if result.agreement < MIN_AGREEMENT else [])
            + ([f"max err {result.max_error:.2g} > {spec.max_error:g}"]
               if result.max_error > spec.max_error else []))
    result.outcome = MATCH if met else WRONG
    if not met:
        outside = (f"; {result.outside_ranges}/{len(test)} rows out of the calibrated ranges"
                   if result.outside_ranges else "")
        result.detail = (f"{missed}; plan alone {result.plan_error:.2g} (calibration rows "
                         f"{compiled.approximation_error:.2g}); CKKS {computation_error:.1g}, "
                         f"flooding σ {flooding_std:.1g}{outside}")


def _agreement(ours: Sequence[str], theirs: Sequence[str]) -> float:
    return float(np.mean([a == b for a, b in zip(ours, theirs, strict=True)])) if theirs \
        else 1.0


def _listing_defaults(columns: int) -> ListingSpec:
    """A ListingSpec with every optional field at catalog.py's default (read from a
    minimal listing file, so the defaults are the catalog's own)."""
    from seller_server.catalog import read_listing

    with tempfile.TemporaryDirectory(prefix="gimme-zoo-") as tmp:
        path = Path(tmp) / "zoo.json"
        path.write_text(json.dumps({
            "name": "zoo", "model": "zoo.onnx", "calibration": "zoo.csv",
            "input_columns": [f"x{i}" for i in range(columns)], "price": "1.00",
            "trial_budget_rows": 1000}))
        return read_listing(path)


REPLACEMENTS = (
    (re.compile(r" cannot be evaluated under encryption by this engine"), " unsupported"),
    (re.compile(r" cannot be evaluated under encryption"), " impossible under HE"),
    (re.compile(r"node '[^']*': operator "), ""),
    (re.compile(r"the best plan's error on the calibration rows is (\S+), above the listing's "
                r"max_error (\S+) \((.*?): degree (\d+), error.*"),
     r"approximation error \1 > max_error \2 on the calibration rows (\3: degree \4)"),
    (re.compile(r"; it has no bounded range, use a bounded activation in the model instead"),
     " (unbounded)"),
    (re.compile(r"node '([^']*)' \(([A-Za-z]+)\)"), r"\2"),
)
MAX_DETAIL = 110


def shorten(message: str) -> str:
    text = message
    for pattern, replacement in REPLACEMENTS:
        text = pattern.sub(replacement, text)
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL - 1] + "…"


# ---------------------------------------------------------------- the parent


def torch_interpreter(explicit: str | None) -> str:
    """The PyTorch interpreter: --torch-python, else .venv-torch next to this checkout or
    next to the running venv (a worktree run with the main checkout's venv)."""
    if explicit is not None:
        return explicit if Path(explicit).exists() else ""
    for base in (ROOT, Path(sys.prefix).resolve().parent):
        candidate = base / ".venv-torch" / "bin" / "python"
        if candidate.exists():
            return str(candidate)
    return ""


@dataclass
class Child:
    stages: list[str] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)


def run_child(kind: Kind, args: argparse.Namespace, torch_python: str) -> Result:
    """`kind` in a child process of its own, killed (with everything it started) at the
    time limit."""
    with tempfile.TemporaryDirectory(prefix="gimme-zoo-") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", kind.name,
                   "--result", str(out), "--rows", str(args.rows), "--cache", str(args.cache),
                   "--workers", str(args.workers), "--memory-gb", str(args.memory_gb),
                   "--torch-python", torch_python]
        env = worker_environment()
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), str(ROOT / "protos"), env.get("PYTHONPATH", "")) if p)
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        child = Child()
        reader = threading.Thread(target=_read_stderr, args=(proc, child, args.verbose),
                                  daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own group only
            proc.wait()
            reader.join(timeout=5)
        seconds = time.perf_counter() - start
        stage = child.stages[-1] if child.stages else "starting"
        result = (Result(**json.loads(out.read_text())) if out.exists()
                  else Result(kind.name, kind.source, kind.dataset, kind.expect))
        if not result.finished:
            if timed_out:
                result.outcome = TIMEOUT
                result.detail = f"over {args.timeout:g} s while {stage}"
            else:
                code = proc.returncode
                how = (f"killed by {signal.Signals(-code).name}" if code < 0
                       else f"exit status {code}")
                last = child.tail[-1] if child.tail else ""
                result.outcome = CRASH
                result.detail = shorten(f"{how} while {stage}" + (f": {last}" if last else ""))
        result.seconds = seconds
        return result


def _read_stderr(proc: subprocess.Popen[str], child: Child, verbose: bool) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        line = line.rstrip()
        if line.startswith("stage: "):
            child.stages.append(line[len("stage: "):])
        elif line:
            child.tail.append(line)
            del child.tail[:-20]
        if verbose or line.startswith("stage: "):
            print(f"    {line}", file=sys.stderr, flush=True)


def child_main(args: argparse.Namespace) -> int:
    limit = int(args.memory_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    kind = {k.name: k for k in _kinds()}[args.child]
    path = Path(args.result)

    def save(result: Result) -> None:
        partial = path.with_suffix(".part")
        partial.write_text(json.dumps(dataclasses.asdict(result)))
        os.replace(partial, path)

    result = Result(kind.name, kind.source, kind.dataset, kind.expect)
    try:
        result = run_kind(kind, args.rows, args.cache, args.torch_python or "", args.workers,
                          save)
    except Exception as exc:  # a crash of the compiler or engine, recorded as such
        import traceback

        traceback.print_exc()
        if path.exists():  # keep what was measured before it
            result = Result(**json.loads(path.read_text()))
        result.outcome, result.detail = CRASH, shorten(f"{type(exc).__name__}: {exc}")
    result.finished = True
    save(result)
    return 0


# ---------------------------------------------------------------- the table

COLUMNS = ("model", "data", "outcome", "top-1", "max err", "depth", "N", "compile s",
           "eval s", "ms/row", "input MB", "KB/row", "detail")


def _cells(r: Result) -> list[str]:
    def fmt(value: float | None, spec: str) -> str:
        return "" if value is None else format(value, spec)

    ran = r.outcome in (MATCH, WRONG)
    timed = r.evaluate_s > 0  # evaluated (maybe stopped later)
    error = (f"{r.relative_error:.2%}" if r.relative_error is not None
             else fmt(r.max_error, ".1e"))
    outcome = r.outcome + ("" if r.as_expected or r.outcome == SKIPPED else " ✗")
    if r.outcome == REFUSED and r.expect == REFUSED:
        outcome = "refused (expected)"
    elif r.outcome == SKIPPED:
        outcome = "skipped (no torch)"
    detail = r.detail or (r.approximation if r.outcome == MATCH else "")
    return [
        r.name, r.dataset, outcome, fmt(r.agreement, ".1%") if ran else "",
        error if ran else "", str(r.depth) if r.depth else "",
        (f"2^{r.ring.bit_length() - 1}" + (" packed" if r.packing == FEATURE_PACKED else ""))
        if r.ring else "",
        _figure(r.compile_s) if r.compile_s else "",
        _figure(r.evaluate_s) if timed else "", _figure(r.ms_per_row) if timed else "",
        f"{r.upload_bytes / 1e6:.0f}" if r.ciphertext_bytes else "",
        fmt(None if r.bytes_per_row is None else r.bytes_per_row / 1e3, ".1f"),
        detail,
    ]


def _figure(value: float | None) -> str:
    """Three significant digits at most, no exponent: 0.0123, 1.23, 123."""
    if value is None:
        return ""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}" if value >= 0.001 else f"{value:.1e}"


def summary(results: Sequence[Result]) -> str:
    count = {o: sum(r.outcome == o for r in results) for o in
             (MATCH, WRONG, CRASH, TIMEOUT, SKIPPED)}
    expected = sum(r.outcome == REFUSED and r.expect == REFUSED for r in results)
    unexpected = sum(r.outcome == REFUSED and r.expect != REFUSED for r in results)
    failures = unexpected + count[WRONG] + count[CRASH] + count[TIMEOUT]
    return (f"{len(results)} models: {count[MATCH]} match, {expected} refused as expected, "
            f"{failures} failures ({unexpected} refused, {count[WRONG]} wrong, "
            f"{count[CRASH]} crash, {count[TIMEOUT]} timeout)"
            + (f", {count[SKIPPED]} skipped" if count[SKIPPED] else ""))


NOTES = ("top-1: agreement with onnxruntime on the held-out rows; max err: max |HE - "
         "onnxruntime| on the compared output (a regression: relative to the targets' "
         "spread); N: the ring (packed: feature-packed, rows strided in one ciphertext, "
         "rotation keys extra); eval s: one batch (N/2 rows, or one packed ciphertext's: a "
         "part-filled batch costs the same); ms/row and KB/row: at a full batch; input MB: "
         "the input ciphertexts of one batch (keys aside); ✗: not the outcome expected")


def markdown(results: Sequence[Result]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |")
    return "\n".join([*lines, "", summary(results) + ".", "", NOTES + "."])


def print_table(results: Sequence[Result], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*COLUMNS, title=title)
    styles = {MATCH: "green", REFUSED: "yellow", WRONG: "red", CRASH: "red", TIMEOUT: "red",
              SKIPPED: "dim"}
    for r in results:
        table.add_row(*_cells(r), style=None if r.as_expected or r.outcome == SKIPPED
                      else styles[r.outcome])
    console = Console(width=max(Console().width, 200))
    console.print(table)
    console.print(summary(results))
    console.print(NOTES, style="dim")


# ---------------------------------------------------------------- command line


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="The model-kind conformance table: ordinary scikit-learn and PyTorch "
                    "models, each compiled, listed at 128-bit and evaluated under "
                    "encryption on held-out rows. Exit status 0 whatever the outcomes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", metavar="NAME,...", help="run these kinds only (see --list)")
    p.add_argument("--list", action="store_true", help="list the kinds and exit")
    p.add_argument("--rows", type=_positive(int), default=64,
                   help="held-out rows per model (at most N/2)")
    p.add_argument("--timeout", type=_positive(float), default=300.0,
                   help="seconds per model (build, export, compile and evaluation)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help="directory of cached PyTorch exports")
    p.add_argument("--torch-python", default=None,
                   help="interpreter with torch and onnxscript; if not given, .venv-torch "
                        "next to the checkout or the running venv; without one, torch kinds "
                        "with no cached export are skipped")
    p.add_argument("--workers", type=_positive(int), default=1,
                   help="processes per evaluation")
    p.add_argument("--memory-gb", type=_positive(float), default=6.0,
                   help="address-space limit per model's process")
    p.add_argument("--verbose", action="store_true", help="echo every child's stderr")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.child:
        return child_main(args)
    kinds = _kinds()
    if args.list:
        for k in kinds:
            print(f"{k.name:24} {k.source:8} {k.dataset:14} expect {k.expect:8} "
                  f"{k.description}")
        return 0
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        known = {k.name: k for k in kinds}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise SystemExit(f"zoo.py: unknown kind(s) {unknown}; --list shows them")
        kinds = [known[n] for n in wanted]
    torch_python = torch_interpreter(args.torch_python)
    if not torch_python and any(k.source == "torch" for k in kinds):
        print("no PyTorch interpreter: torch kinds run only from cached exports",
              file=sys.stderr)
    started = time.perf_counter()
    results = []
    for index, kind in enumerate(kinds, 1):
        print(f"[{index}/{len(kinds)}] {kind.name}", file=sys.stderr, flush=True)
        result = run_child(kind, args, torch_python)
        print(f"    -> {result.outcome} ({result.seconds:.1f} s) {result.detail}",
              file=sys.stderr, flush=True)
        results.append(result)
    wall = time.perf_counter() - started
    print(f"zoo: {len(kinds)} models in {wall:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    if args.markdown:
        print(markdown(results))
    else:
        print_table(results, f"Gimme model zoo: {SECURITY_BITS}-bit CKKS, {args.rows} "
                             f"held-out rows, {args.workers} worker(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

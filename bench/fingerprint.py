"""Fingerprint experiments: accuracy cost, attribution, and robustness to the attacks a
reseller would try (fine-tuning on 10% of the data for a few epochs, 30% pruning, and
moving hidden units without changing the function: permuted, negated, rescaled, split,
padded with dummies).

    python bench/fingerprint.py [--sales 100] [--leaks 10] [--copies-only] [--json out.json]

For the scikit-learn examples (breast-cancer logistic regression, digits MLP with tanh,
and the same MLP with ReLU), each of `--sales` sales gets its own fingerprinted copy at
the strength the catalog would choose, drawn and checked as a sale's copy is
(catalog.sale_key); `--leaks` of them leak, are attacked, and are traced against every
sale's key. A model trained independently on the same data (another seed) checks false
attribution. Fine-tuning is plain mini-batch SGD on the cross-entropy, 5 epochs.

A second table (alone with --copies-only) measures what the buyer's copy of a model with
its own preprocessing (scalers, a normalization layer) is worth on held-out rows: the
listed model's accuracy (R^2 for the ridge regression), and the mean and worst of
`--sales` copies made as sales make them now, and as they were made before issue 11 (the
baseline: every float constant of 8+ values moved, the strength search's weakest strength
returned when none met the limit, and no check of a sale's copy).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper
from rich.console import Console
from rich.table import Table
from skl2onnx import to_onnx
from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.onnx_io import MAX_IR_VERSION, run_model, session
from examples.datasets import digits
from seller_server.audit import surrogate_pool
from seller_server.catalog import (
    FINGERPRINT_STRENGTHS,
    MAX_FINGERPRINT_DISAGREEMENT,
    STRENGTH_TRIALS,
    CopyCheck,
    fingerprint_strength,
    sale_key,
)
from seller_server.compiler import Tail, compile_model
from seller_server.fingerprint import MIN_WEIGHTS, fingerprint, new_key, trace, weights

FloatArray = npt.NDArray[np.float64]
Z_THRESHOLD = 6.0


@dataclass
class Result:
    model: str
    strength: float
    weights: int
    accuracy_original: float
    accuracy_cost_pp: float  # mean over sales, percentage points
    attack: str
    attacked_accuracy: float
    true_z: float  # mean over leaks
    correct: float  # share of leaks attributed to the right sale (z >= threshold)
    false_attribution: float  # share of (leak, other sale) pairs over the threshold
    unrelated_max_z: float  # best z of an independently trained model


def _export(pipeline: Pipeline, x: FloatArray, divide: bool = False) -> bytes:
    """The pipeline in ONNX; `divide`: its StandardScaler as Sub and Div nodes with constant
    tensors (skl2onnx's option "div"), instead of a Scaler operator."""
    options: dict[int, dict[str, str | bool]] = {}
    if hasattr(pipeline.steps[-1][1], "predict_proba"):
        options[id(pipeline.steps[-1][1])] = {"zipmap": False}
    if divide:
        options[id(pipeline.steps[0][1])] = {"div": "div"}
    model = to_onnx(pipeline, x[:1].astype(np.float32), options=options,
                    target_opset={"": 17, "ai.onnx.ml": 3})
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    return bytes(model.SerializeToString())


def _attr(node: onnx.NodeProto, name: str) -> FloatArray:
    attribute = next(a for a in node.attribute if a.name == name)
    return np.asarray(helper.get_attribute_value(attribute), dtype=np.float64)


def _scaled(model: onnx.ModelProto, x: FloatArray) -> FloatArray:
    """The preprocessed rows the first trained layer sees (whatever scaler precedes it)."""
    first = next(n for n in model.graph.node if n.op_type in ("MatMul", "LinearClassifier"))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(first.input[0],
                                                            onnx.TensorProto.FLOAT, None))
    sess = session(probe.SerializeToString())
    values = sess.run([first.input[0]], {sess.get_inputs()[0].name: x.astype(np.float32)})
    return np.asarray(values[0], dtype=np.float64)


def fine_tune(model_bytes: bytes, x: FloatArray, y: npt.NDArray[np.int64], epochs: int = 5,
              rate: float = 0.05) -> bytes:
    """SGD on the cross-entropy of the exported LR or one-hidden-layer tanh/ReLU MLP."""
    model = onnx.load_model_from_string(model_bytes)
    inputs = _scaled(model, x)
    rng = np.random.default_rng(0)
    inits = {i.name: i for i in model.graph.initializer}
    linear = next((n for n in model.graph.node if n.op_type == "LinearClassifier"), None)
    if linear is not None:
        classes = len(_attr(linear, "intercepts"))
        w = _attr(linear, "coefficients").reshape(classes, -1)
        b = _attr(linear, "intercepts")
        for _ in range(epochs):
            for batch in np.array_split(rng.permutation(len(x)), max(len(x) // 16, 1)):
                z = inputs[batch] @ w.T + b
                p = 1 / (1 + np.exp(-z))  # LOGISTIC post-transform, one-vs-rest
                target = np.eye(classes)[y[batch]]
                grad = (p - target) / len(batch)
                w -= rate * grad.T @ inputs[batch]
                b -= rate * grad.sum(0)
        for attribute in linear.attribute:
            if attribute.name == "coefficients":
                attribute.floats[:] = w.reshape(-1).tolist()
            if attribute.name == "intercepts":
                attribute.floats[:] = b.tolist()
        return model.SerializeToString()
    w1, b1 = (numpy_helper.to_array(inits[n]).astype(np.float64)
              for n in ("coefficient", "intercepts"))
    w2, b2 = (numpy_helper.to_array(inits[n]).astype(np.float64)
              for n in ("coefficient1", "intercepts1"))
    b1, b2 = b1.reshape(-1), b2.reshape(-1)
    relu = any(n.op_type == "Relu" for n in model.graph.node)
    for _ in range(epochs):
        for batch in np.array_split(rng.permutation(len(x)), max(len(x) // 16, 1)):
            pre = inputs[batch] @ w1 + b1
            h = np.maximum(pre, 0) if relu else np.tanh(pre)
            z = h @ w2 + b2
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            dz = (p - np.eye(w2.shape[1])[y[batch]]) / len(batch)
            dh = dz @ w2.T * ((pre > 0) if relu else (1 - h * h))
            w2 -= rate * h.T @ dz
            b2 -= rate * dz.sum(0)
            w1 -= rate * inputs[batch].T @ dh
            b1 -= rate * dh.sum(0)
    for name, value in (("coefficient", w1), ("intercepts", b1), ("coefficient1", w2),
                        ("intercepts1", b2)):
        original = numpy_helper.to_array(inits[name])
        inits[name].CopyFrom(numpy_helper.from_array(
            value.reshape(original.shape).astype(original.dtype), name))
    return model.SerializeToString()


def prune(model_bytes: bytes, share: float = 0.3) -> bytes:
    """Zero the smallest `share` of every weight tensor (and ML coefficient list); the
    preprocessing constants are left alone (zeroing them would cut input columns)."""
    model = onnx.load_model_from_string(model_bytes)
    trained = weights(model)
    for init in model.graph.initializer:
        values = numpy_helper.to_array(init)
        if init.name in trained:
            cut = np.quantile(np.abs(values), share)
            init.CopyFrom(numpy_helper.from_array(
                np.where(np.abs(values) < cut, 0, values).astype(values.dtype), init.name))
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.name == "coefficients":
                values = np.asarray(attribute.floats)
                cut = np.quantile(np.abs(values), share)
                attribute.floats[:] = np.where(np.abs(values) < cut, 0, values).tolist()
    return model.SerializeToString()


def move_units(model_bytes: bytes, flip: bool = False, rescale: bool = False, splits: int = 0,
               dummies: int = 0, seed: int = 0) -> bytes:
    """The same function with every hidden weight of the MLP in another place: units
    shuffled; half of them negated (`flip`; tanh is odd: incoming weights, bias and outgoing
    row all flip); each scaled by c = e^U(-3, 3) (`rescale`; ReLU is positively homogeneous:
    incoming weights and bias times c, outgoing row over c); `splits` units split in two
    that share the outgoing row; `dummies` extra units with zero outgoing rows."""
    model = onnx.load_model_from_string(model_bytes)
    inits = {i.name: i for i in model.graph.initializer}
    w1, b1, w2 = (numpy_helper.to_array(inits[n]).astype(np.float64)
                  for n in ("coefficient", "intercepts", "coefficient1"))
    rng = np.random.default_rng(seed)
    gains = rng.choice([-1.0, 1.0], size=w1.shape[1]) if flip else np.ones(w1.shape[1])
    if rescale:
        gains *= np.exp(rng.uniform(-3, 3, w1.shape[1]))
    w1, b1, w2 = w1 * gains, b1 * gains, w2 / gains[:, None]
    share = rng.uniform(0.2, 0.8, (splits, 1))
    w1 = np.concatenate([w1, w1[:, :splits]], axis=1)
    b1 = np.concatenate([b1, b1[:, :splits]], axis=1)
    w2 = np.concatenate([w2[:splits] * share, w2[splits:], w2[:splits] * (1 - share)])
    order = rng.permutation(w1.shape[1])
    w1, b1, w2 = w1[:, order], b1[:, order], w2[order]
    w1 = np.concatenate([w1, rng.normal(0, w1.std(), (w1.shape[0], dummies))], axis=1)
    b1 = np.concatenate([b1, rng.normal(0, b1.std(), (1, dummies))], axis=1)
    w2 = np.concatenate([w2, np.zeros((dummies, w2.shape[1]))])
    for name, value in (("coefficient", w1), ("intercepts", b1), ("coefficient1", w2)):
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return model.SerializeToString()


def accuracy(model_bytes: bytes, x: FloatArray, y: npt.NDArray[np.int64], output: str) -> float:
    return float(np.mean(run_model(model_bytes, x, output, []).argmax(1) == y))


def experiment(name: str, build: Callable[[int], tuple[bytes, FloatArray, FloatArray,
                                                        npt.NDArray[np.int64],
                                                        npt.NDArray[np.int64]]],
               sales: int, leaks: int, console: Console) -> list[Result]:
    original, x_train, x_test, y_train, y_test = build(0)
    unrelated = build(1)[0]
    tail = compile_model(original, x_train, degree=8).tail
    output = tail.probability_output
    check = CopyCheck.of(name, original, x_train, tail)
    strength, _note = fingerprint_strength(check)
    if not strength:
        raise SystemExit(f"{name} is not fingerprinted: {_note}")
    drawn = {f"sale-{i}": sale_key(check, strength) for i in range(sales)}
    keys = {sale: key for sale, key in drawn.items() if key is not None}  # the marked sales
    copies = {sale: fingerprint(original, key, strength) if key else original
              for sale, key in drawn.items()}
    base_accuracy = accuracy(original, x_test, y_test, output)
    cost = float(np.mean([base_accuracy - accuracy(c, x_test, y_test, output)
                          for c in copies.values()])) * 100
    rng = np.random.default_rng(0)
    tenth = rng.choice(len(x_train), size=len(x_train) // 10, replace=False)
    attacks: dict[str, Callable[[bytes], bytes]] = {
        "none": lambda m: m,
        "fine-tune 10% x 5 epochs": lambda m: fine_tune(m, x_train[tenth], y_train[tenth]),
        "prune 30%": prune,
    }
    # function-preserving moves of hidden units (the logistic regression has none)
    if name == "digits-mlp":  # tanh: odd
        attacks["permute + flip units"] = lambda m: move_units(m, flip=True)
        attacks["permute + flip + 8 dummy units"] = lambda m: move_units(m, flip=True,
                                                                         dummies=8)
    if name == "digits-mlp-relu":  # ReLU: positively homogeneous
        attacks["permute + rescale + split 4 units"] = lambda m: move_units(
            m, rescale=True, splits=4)
    unrelated_z = trace(unrelated, original, keys)[0].z
    leaked = list(keys)[:leaks]
    results = []
    for attack_name, attack_fn in attacks.items():
        true_z, correct, false, attacked_accuracy = [], 0, 0, []
        for sale in leaked:
            attacked = attack_fn(copies[sale])
            attacked_accuracy.append(accuracy(attacked, x_test, y_test, output))
            matches = trace(attacked, original, keys)
            true_z.append(next(m.z for m in matches if m.sale == sale))
            correct += matches[0].sale == sale and matches[0].z >= Z_THRESHOLD
            false += sum(1 for m in matches if m.sale != sale and m.z >= Z_THRESHOLD)
        results.append(Result(
            name, strength, sum(v.size for v in _weights(original)), base_accuracy, cost,
            attack_name, float(np.mean(attacked_accuracy)), float(np.mean(true_z)),
            correct / len(leaked), false / (len(leaked) * (sales - 1)), unrelated_z))
        console.print(f"{name}: {attack_name} done")
    return results


def _weights(model_bytes: bytes) -> list[FloatArray]:
    from seller_server.fingerprint import weights

    return list(weights(onnx.load_model_from_string(model_bytes)).values())


def breast_cancer(seed: int) -> tuple[bytes, FloatArray, FloatArray, npt.NDArray[np.int64],
                                      npt.NDArray[np.int64]]:
    data = load_breast_cancer()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.3, random_state=0, stratify=data.target)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(
        max_iter=2000, C=1.0 / (1 + seed))).fit(x_train, y_train)
    return _export(pipeline, x_train), x_train, x_test, y_train, y_test


def digits_mlp(seed: int, activation: str = "tanh") -> tuple[
        bytes, FloatArray, FloatArray, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    x_train, x_test, y_train, y_test = digits(8)
    pipeline = make_pipeline(MinMaxScaler(), MLPClassifier(
        (32,), activation=activation, alpha=0.1, max_iter=1500, random_state=seed)
    ).fit(x_train, y_train)
    return _export(pipeline, x_train), x_train, x_test, y_train, y_test


# ----- the buyer's copy of a model with its own preprocessing -----

Copies = tuple[bytes, FloatArray, FloatArray, FloatArray]  # model, x_train, x_test, y_test


@dataclass
class CopyResult:
    model: str
    metric: str  # accuracy, or R^2 for a regression
    listed: float
    strength: float
    copy_mean: float  # over the sales' copies
    copy_worst: float
    unmarked: int  # sales that got the listed model (no copy passed its check)
    baseline_strength: float  # before issue 11
    baseline_mean: float
    baseline_worst: float


def _split(x: FloatArray, y: FloatArray) -> list[FloatArray]:
    return list(train_test_split(x, y, test_size=0.3, random_state=0))


def cancer_scaled_lr(scaler: MinMaxScaler | StandardScaler) -> Copies:
    data = load_breast_cancer()
    x_train, x_test, y_train, y_test = _split(data.data, data.target)
    pipeline = make_pipeline(scaler, LogisticRegression(max_iter=5000)).fit(x_train, y_train)
    divide = isinstance(scaler, StandardScaler)
    return _export(pipeline, x_train, divide), x_train, x_test, y_test


def wine_minmax_mlp() -> Copies:
    data = load_wine()
    x_train, x_test, y_train, y_test = _split(data.data, data.target)
    pipeline = make_pipeline(MinMaxScaler(), MLPClassifier(
        (16,), max_iter=3000, random_state=0)).fit(x_train, y_train)
    return _export(pipeline, x_train), x_train, x_test, y_test


def wine_normalized_mlp() -> Copies:
    """A network that standardizes its own inputs, as PyTorch exports `(x - mean) / std`
    buffers in front of its first Linear layer: Sub and Div by constant tensors, then Gemm,
    ReLU, Gemm."""
    data = load_wine()
    x_train, x_test, y_train, y_test = _split(data.data, data.target)
    mean, std = x_train.mean(0), x_train.std(0)
    mlp = MLPClassifier((16,), max_iter=3000, random_state=0).fit((x_train - mean) / std,
                                                                  y_train)
    (w1, w2), (b1, b2) = mlp.coefs_, mlp.intercepts_
    tensors = {"mean": mean, "std": std, "w1": w1.T, "b1": b1, "w2": w2.T, "b2": b2}
    graph = helper.make_graph(
        [helper.make_node("Sub", ["x", "mean"], ["centered"]),
         helper.make_node("Div", ["centered", "std"], ["normalized"]),
         helper.make_node("Gemm", ["normalized", "w1", "b1"], ["hidden"], transB=1),
         helper.make_node("Relu", ["hidden"], ["activations"]),
         helper.make_node("Gemm", ["activations", "w2", "b2"], ["logits"], transB=1)],
        "normalized-mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, x_train.shape[1]])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(value.astype(np.float32), name)
         for name, value in tensors.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    return model.SerializeToString(), x_train, x_test, y_test


def diabetes_ridge() -> Copies:
    data = load_diabetes(scaled=False)  # raw columns: age, sex, bmi, blood pressure, ...
    x_train, x_test, y_train, y_test = _split(data.data, data.target)
    pipeline = make_pipeline(StandardScaler(), Ridge(1.0)).fit(x_train, y_train)
    return _export(pipeline, x_train, divide=True), x_train, x_test, y_test


def bundled_digits_mlp() -> Copies:
    model, x_train, x_test, _y_train, y_test = digits_mlp(0)
    return model, x_train, x_test, y_test.astype(np.float64)


def _baseline_copy(model_bytes: bytes, key: bytes, strength: float) -> bytes:
    """A copy as sales made them before issue 11: every float initializer and coefficient
    list of MIN_WEIGHTS values or more moved by strength x its std x +-1."""
    model = onnx.load_model_from_string(model_bytes)
    rng = np.random.default_rng(list(key))

    def moved(values: FloatArray) -> FloatArray:
        scale = float(values.std()) or float(np.abs(values).max()) or 1.0
        result: FloatArray = values + strength * scale * rng.choice([-1.0, 1.0], values.shape)
        return result
    for init in model.graph.initializer:
        values = numpy_helper.to_array(init)
        if (init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
                and values.size >= MIN_WEIGHTS):
            init.CopyFrom(numpy_helper.from_array(
                moved(values.astype(np.float64)).astype(values.dtype), init.name))
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.name == "coefficients" and len(attribute.floats) >= MIN_WEIGHTS:
                attribute.floats[:] = moved(np.asarray(attribute.floats)).tolist()
    return model.SerializeToString()


def _baseline_strength(model_bytes: bytes, rows: FloatArray, tail: Tail) -> float:
    """The strength search before issue 11 (on `_baseline_copy`): the weakest strength
    when none met the limit; one output: rows moved by more than 1% counted as changed."""
    rows = surrogate_pool(rows, max(len(rows), 2000), seed=0)
    original = run_model(model_bytes, rows, tail.probability_output, tail.class_labels)
    for strength in FINGERPRINT_STRENGTHS:
        changed = 0.0
        for _ in range(STRENGTH_TRIALS):
            outputs = run_model(_baseline_copy(model_bytes, new_key(), strength), rows,
                                tail.probability_output, tail.class_labels)
            if outputs.shape[1] > 1:
                moved = np.mean(outputs.argmax(1) != original.argmax(1))
            else:
                moved = np.mean(np.abs(outputs - original) > 0.01 * np.abs(original))
            changed = max(changed, float(moved))
        if changed <= MAX_FINGERPRINT_DISAGREEMENT:
            return strength
    return FINGERPRINT_STRENGTHS[-1]


def copies_experiment(name: str, build: Callable[[], Copies], sales: int) -> CopyResult:
    model, x_train, x_test, y_test = build()
    tail = compile_model(model, x_train, degree=8).tail

    def score(copy: bytes) -> float:
        outputs = run_model(copy, x_test, tail.probability_output, tail.class_labels)
        if outputs.shape[1] > 1:
            return float(np.mean(outputs.argmax(1) == y_test))
        return float(1 - np.mean((outputs[:, 0] - y_test) ** 2) / np.var(y_test))

    check = CopyCheck.of(name, model, x_train, tail)
    strength, _note = fingerprint_strength(check)
    keys = [sale_key(check, strength) for _ in range(sales)]
    now = [score(fingerprint(model, key, strength) if key else model) for key in keys]
    baseline = _baseline_strength(model, x_train, tail)
    before = [score(_baseline_copy(model, new_key(), baseline)) for _ in range(sales)]
    return CopyResult(name, "R2" if check.regression else "accuracy", score(model), strength,
                      float(np.mean(now)), min(now), sum(key is None for key in keys),
                      baseline, float(np.mean(before)), min(before))


COPY_MODELS: dict[str, Callable[[], Copies]] = {
    "cancer-minmax-lr": lambda: cancer_scaled_lr(MinMaxScaler()),  # Mul, Add constants
    "cancer-standard-lr": lambda: cancer_scaled_lr(StandardScaler()),  # Sub, Div constants
    "wine-minmax-mlp": wine_minmax_mlp,  # MinMaxScaler + MLP 13-16-3 (ReLU)
    "wine-normalized-mlp": wine_normalized_mlp,  # (x - mean) / std, Gemm, ReLU, Gemm
    "diabetes-standard-ridge": diabetes_ridge,  # StandardScaler (Sub, Div) + ridge; R^2
    "digits-mlp": bundled_digits_mlp,  # the bundled example: MinMaxScaler + MLP 64-32-10
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sales", type=int, default=100)
    parser.add_argument("--leaks", type=int, default=10)
    parser.add_argument("--copies-only", action="store_true",
                        help="only the table of buyers' copies of preprocessing pipelines")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    console = Console()
    results: list[Result] = []
    if not args.copies_only:
        results = [
            *experiment("breast-cancer-lr", breast_cancer, args.sales, args.leaks, console),
            *experiment("digits-mlp", digits_mlp, args.sales, args.leaks, console),
            *experiment("digits-mlp-relu", lambda seed: digits_mlp(seed, "relu"),
                        args.sales, args.leaks, console)]
        table = Table("model", "strength", "weights", "accuracy", "cost (pp)", "attack",
                      "accuracy after", "true z", "traced", "false attribution",
                      "unrelated model z",
                      title=f"fingerprints: {args.sales} sales, {args.leaks} leaks, "
                            f"threshold z >= {Z_THRESHOLD}")
        for r in results:
            table.add_row(r.model, f"{r.strength:g}", str(r.weights),
                          f"{r.accuracy_original:.1%}", f"{r.accuracy_cost_pp:.2f}", r.attack,
                          f"{r.attacked_accuracy:.1%}", f"{r.true_z:.1f}", f"{r.correct:.0%}",
                          f"{r.false_attribution:.2%}", f"{r.unrelated_max_z:.1f}")
        console.print(table)
    copies = [copies_experiment(name, build, args.sales) for name, build in COPY_MODELS.items()]
    table = Table("model", "metric", "listed", "strength", "copies: mean", "worst", "unmarked",
                  "before: strength", "mean", "worst",
                  title=f"the buyer's copy on held-out rows, {args.sales} sales (before: "
                        f"the rule before issue 11)")
    for c in copies:
        table.add_row(c.model, c.metric, f"{c.listed:.4f}", f"{c.strength:g}",
                      f"{c.copy_mean:.4f}", f"{c.copy_worst:.4f}", str(c.unmarked),
                      f"{c.baseline_strength:g}", f"{c.baseline_mean:.4f}",
                      f"{c.baseline_worst:.4f}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"tracing": [asdict(r) for r in results],
                                         "copies": [asdict(c) for c in copies]}, indent=2))


if __name__ == "__main__":
    main()

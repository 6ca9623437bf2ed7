"""Fingerprint experiments: accuracy cost, attribution, and robustness to the attacks a
reseller would try (fine-tuning on 10% of the data for a few epochs, 30% pruning, and
moving hidden units without changing the function: permuted, negated, rescaled, split,
padded with dummies).

    python bench/fingerprint.py [--sales 100] [--leaks 10] [--json out.json]

For the scikit-learn examples (breast-cancer logistic regression, digits MLP with tanh,
and the same MLP with ReLU), each of `--sales` sales gets its own fingerprinted copy at
the strength the catalog would choose; `--leaks` of them leak, are attacked, and are
traced against every sale's key. A model trained independently on the same data (another
seed) checks false attribution. Fine-tuning is plain mini-batch SGD on the cross-entropy,
5 epochs.
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
from sklearn.datasets import load_breast_cancer
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.onnx_io import MAX_IR_VERSION, run_model, session
from examples.datasets import digits
from seller_server.catalog import fingerprint_strength
from seller_server.compiler import compile_model
from seller_server.fingerprint import fingerprint, new_key, trace

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


def _export(pipeline: Pipeline, x: FloatArray) -> bytes:
    model = to_onnx(pipeline, x[:1].astype(np.float32),
                    options={id(pipeline.steps[-1][1]): {"zipmap": False}},
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
    """Zero the smallest `share` of every weight tensor (and ML coefficient list)."""
    model = onnx.load_model_from_string(model_bytes)
    for init in model.graph.initializer:
        values = numpy_helper.to_array(init)
        if values.size >= 8 and values.dtype.kind == "f":
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
    strength = fingerprint_strength(original, x_train, tail)
    keys = {f"sale-{i}": new_key() for i in range(sales)}
    copies = {sale: fingerprint(original, key, strength) for sale, key in keys.items()}
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
    leaked = list(copies)[:leaks]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sales", type=int, default=100)
    parser.add_argument("--leaks", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    console = Console()
    results = [*experiment("breast-cancer-lr", breast_cancer, args.sales, args.leaks, console),
               *experiment("digits-mlp", digits_mlp, args.sales, args.leaks, console),
               *experiment("digits-mlp-relu", lambda seed: digits_mlp(seed, "relu"),
                           args.sales, args.leaks, console)]
    table = Table("model", "strength", "weights", "accuracy", "cost (pp)", "attack",
                  "accuracy after", "true z", "traced", "false attribution",
                  "unrelated model z", title=f"fingerprints: {args.sales} sales, "
                                             f"{args.leaks} leaks, threshold z >= {Z_THRESHOLD}")
    for r in results:
        table.add_row(r.model, f"{r.strength:g}", str(r.weights), f"{r.accuracy_original:.1%}",
                      f"{r.accuracy_cost_pp:.2f}", r.attack, f"{r.attacked_accuracy:.1%}",
                      f"{r.true_z:.1f}", f"{r.correct:.0%}", f"{r.false_attribution:.2%}",
                      f"{r.unrelated_max_z:.1f}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()

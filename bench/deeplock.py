"""Deep-Lock experiments (seed 003) on our examples: accuracy with the right and with wrong
keys, the fine-tuning attack against retraining from scratch, and the cost of unlocking
at model load against plain onnxruntime load + inference.

    python bench/deeplock.py [--wrong-keys 100] [--epochs 30] [--json out.json]

Fine-tuning: an attacker holds the locked model, unlocks it with a wrong key (or uses it
as is: the same weights) and trains every parameter, the input scaler included, on 10% of
the training rows with mini-batch Adam (batch 16) on the cross-entropy. The
baseline trains the same architecture from scratch on the same rows with the same
optimizer (scaler fitted on those rows, Glorot-initialised weights). Both are averaged over
`--runs` keys / seeds.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper
from rich.console import Console
from rich.table import Table
from sklearn.exceptions import ConvergenceWarning

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import itertools

from bench.fingerprint import breast_cancer, digits_mlp
from common.deeplock import lock, new_master_key, unlock
from common.onnx_io import MAX_IR_VERSION, session
from examples.build import TORCH_MODELS
from examples.datasets import digits

FloatArray = npt.NDArray[np.float64]
Labels = npt.NDArray[np.int64]
Split = tuple[bytes, FloatArray, FloatArray, Labels, Labels]
MODELS_DIR = Path(__file__).resolve().parent.parent / "examples" / "models"


def _predict(model_bytes: bytes, x: FloatArray) -> FloatArray:
    """The model's class scores (its first float output of one row per sample)."""
    sess = session(model_bytes)
    first = sess.get_inputs()[0]
    dims = first.shape[1:]
    shape = [-1, *dims] if dims and all(isinstance(d, int) for d in dims) else [len(x), -1]
    outputs = sess.run(None, {first.name: x.astype(np.float32).reshape(shape)})
    for value in outputs:
        array = np.asarray(value)
        if array.dtype.kind == "f" and array.ndim == 2:
            return array.astype(np.float64)
    raise ValueError("the model has no float score output")


def _accuracy(model_bytes: bytes, x: FloatArray, y: Labels) -> float:
    return float(np.mean(_predict(model_bytes, x).argmax(1) == y))


def _torch_example(stem: str, side: int) -> Split:
    x_train, x_test, y_train, y_test = digits(side)
    return (MODELS_DIR / f"{stem}.onnx").read_bytes(), x_train, x_test, y_train, y_test


def examples() -> dict[str, Callable[[], Split]]:
    found: dict[str, Callable[[], Split]] = {
        "breast-cancer-lr": lambda: breast_cancer(0), "digits-mlp": lambda: digits_mlp(0)}
    for name, (stem, side, _price, _description) in TORCH_MODELS.items():
        found[name] = functools.partial(_torch_example, stem, side)
    return found


# ----- 1. accuracy -----

@dataclass
class AccuracyRow:
    model: str
    parameters: int
    chance: float  # share of the most frequent test class
    original: float
    right_key_identical: bool
    wrong_mean: float
    wrong_sd: float
    wrong_min: float
    wrong_max: float
    locked_finite: float  # share of wrong-key runs whose scores are all finite


def accuracy_experiment(name: str, split: Split, wrong_keys: int) -> AccuracyRow:
    model, _x_train, x_test, _y_train, y_test = split
    key = new_master_key()
    locked = lock(model, key)
    accuracies, finite = [], 0
    for _ in range(wrong_keys):
        scores = _predict(unlock(locked, new_master_key()), x_test)
        finite += bool(np.all(np.isfinite(scores)))
        accuracies.append(float(np.mean(np.nan_to_num(scores, nan=-np.inf).argmax(1)
                                        == y_test)))
    parameters = sum(numpy_helper.to_array(i).size for i in
                     onnx.load_model_from_string(model).graph.initializer) + sum(
        len(a.floats) for n in onnx.load_model_from_string(model).graph.node
        for a in n.attribute)
    return AccuracyRow(name, parameters, float(np.bincount(y_test).max() / len(y_test)),
                       _accuracy(model, x_test, y_test), unlock(locked, key) == model,
                       float(np.mean(accuracies)), float(np.std(accuracies)),
                       float(np.min(accuracies)), float(np.max(accuracies)),
                       finite / wrong_keys)


# ----- 2. fine-tuning attack -----

class Network:
    """The scikit-learn examples as numpy: a per-feature affine scaler (x * scale + shift),
    then logistic regression (one-vs-rest sigmoids) or a tanh MLP with softmax, every
    parameter trainable."""

    def __init__(self, params: dict[str, FloatArray], kind: str) -> None:
        self.params, self.kind = params, kind
        self.moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
        self.steps = 0

    @classmethod
    def from_onnx(cls, model_bytes: bytes) -> Network:
        model = onnx.load_model_from_string(model_bytes)
        attrs = {(n.op_type, a.name): np.array(helper.get_attribute_value(a), dtype=np.float64)
                 for n in model.graph.node for a in n.attribute
                 if a.type == onnx.AttributeProto.FLOATS}
        if ("LinearClassifier", "coefficients") in attrs:  # Scaler: (x - offset) * scale
            scale, b = attrs[("Scaler", "scale")], attrs[("LinearClassifier", "intercepts")]
            return cls({"scale": scale, "shift": -attrs[("Scaler", "offset")] * scale,
                        "w1": attrs[("LinearClassifier", "coefficients")].reshape(
                            len(b), -1).T, "b1": b}, "lr")
        inits = {i.name: numpy_helper.to_array(i).astype(np.float64)
                 for i in model.graph.initializer}
        return cls({"scale": inits["Mu_Mulcst"], "shift": inits["Ad_Addcst"],
                    "w1": inits["coefficient"], "b1": inits["intercepts"].reshape(-1),
                    "w2": inits["coefficient1"], "b2": inits["intercepts1"].reshape(-1)},
                   "mlp")

    @classmethod
    def from_scratch(cls, like: Network, x: FloatArray, seed: int) -> Network:
        rng = np.random.default_rng(seed)
        p = like.params
        if like.kind == "lr":  # StandardScaler
            centre, spread = x.mean(0), x.std(0)
        else:  # MinMaxScaler
            centre, spread = x.min(0), x.max(0) - x.min(0)
        scale = 1 / np.where(spread > 0, spread, 1)
        params = {"scale": scale, "shift": -centre * scale}
        for w, b in (("w1", "b1"), ("w2", "b2")):
            if w in p:
                limit = np.sqrt(6 / sum(p[w].shape)) if like.kind == "mlp" else 0.0
                params[w] = rng.uniform(-limit, limit, p[w].shape)
                params[b] = np.zeros_like(p[b])
        return cls(params, like.kind)

    def _forward(self, x: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
        p = self.params
        s = x * p["scale"] + p["shift"]
        if self.kind == "lr":
            z = s @ p["w1"] + p["b1"]
            return s, z, 1 / (1 + np.exp(-np.clip(z, -60, 60)))
        h = np.tanh(s @ p["w1"] + p["b1"])
        z = h @ p["w2"] + p["b2"]
        e = np.exp(z - z.max(1, keepdims=True))
        return s, h, e / e.sum(1, keepdims=True)

    def accuracy(self, x: FloatArray, y: Labels) -> float:
        return float(np.mean(self._forward(x)[2].argmax(1) == y))

    def epoch(self, x: FloatArray, y: Labels, rng: np.random.Generator, rate: float) -> None:
        p = self.params
        for batch in np.array_split(rng.permutation(len(x)), max(len(x) // 16, 1)):
            xb = x[batch]
            s, hidden, out = self._forward(xb)
            d_out = (out - np.eye(out.shape[1])[y[batch]]) / len(batch)
            grads: dict[str, FloatArray] = {}
            if self.kind == "lr":
                grads["w1"], grads["b1"] = s.T @ d_out, d_out.sum(0)
                d_s = d_out @ p["w1"].T
            else:
                grads["w2"], grads["b2"] = hidden.T @ d_out, d_out.sum(0)
                d_h = d_out @ p["w2"].T * (1 - hidden * hidden)
                grads["w1"], grads["b1"] = s.T @ d_h, d_h.sum(0)
                d_s = d_h @ p["w1"].T
            grads["scale"], grads["shift"] = (d_s * xb).sum(0), d_s.sum(0)
            self.steps += 1
            for name, grad in grads.items():  # Adam
                first, second = self.moments[name]
                first[...] = 0.9 * first + 0.1 * grad
                second[...] = 0.999 * second + 0.001 * grad * grad
                p[name] -= rate * (first / (1 - 0.9 ** self.steps)) / (
                    np.sqrt(second / (1 - 0.999 ** self.steps)) + 1e-8)


@dataclass
class FineTuneRow:
    model: str
    original: float
    rows: int
    epochs: list[int] = field(default_factory=list)
    locked_fine_tuned: list[float] = field(default_factory=list)
    scratch: list[float] = field(default_factory=list)


def fine_tune_experiment(name: str, split: Split, epochs: int, runs: int,
                         rate: float) -> FineTuneRow:
    model, x_train, x_test, y_train, y_test = split
    original = Network.from_onnx(model)
    assert np.mean(original._forward(x_test)[2].argmax(1)
                   == _predict(model, x_test).argmax(1)) > 0.99  # numpy twin == ONNX model
    tenth = np.random.default_rng(0).choice(len(x_train), len(x_train) // 10, replace=False)
    x, y = x_train[tenth], y_train[tenth]
    row = FineTuneRow(name, original.accuracy(x_test, y_test), len(tenth))
    curves: dict[str, list[list[float]]] = {"locked": [], "scratch": []}
    for run in range(runs):
        starts = {"locked": Network.from_onnx(unlock(lock(model, new_master_key()),
                                                     new_master_key())),
                  "scratch": Network.from_scratch(original, x, seed=run)}
        for arm, net in starts.items():
            rng = np.random.default_rng(run)
            curve = [net.accuracy(x_test, y_test)]
            for _ in range(epochs):
                net.epoch(x, y, rng, rate)
                curve.append(net.accuracy(x_test, y_test))
            curves[arm].append(curve)
    row.epochs = list(range(epochs + 1))
    row.locked_fine_tuned = [float(v) for v in np.mean(curves["locked"], axis=0)]
    row.scratch = [float(v) for v in np.mean(curves["scratch"], axis=0)]
    return row


# ----- 3. unlock cost at model load -----

@dataclass
class CostRow:
    model: str
    megabytes: float
    rows: int
    plain_ms: float  # onnxruntime session from bytes + inference
    unlock_ms: float
    locked_ms: float  # unlock + session + inference
    ratio: float


def _synthetic_mlp(widths: list[int]) -> bytes:
    """A wide float MLP with random weights, to see how unlocking scales with size."""
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        inits += [numpy_helper.from_array(rng.normal(0, a ** -0.5, (a, b)).astype(np.float32),
                                          f"w{i}"),
                  numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Tanh", [f"a{i}"], [f"h{i}"])]
        current = f"h{i}"
    graph = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info(
        "x", onnx.TensorProto.FLOAT, [None, widths[0]])], [helper.make_tensor_value_info(
            current, onnx.TensorProto.FLOAT, [None, widths[-1]])], inits)
    return bytes(helper.make_model(graph, ir_version=MAX_IR_VERSION, opset_imports=[
        helper.make_opsetid("", 17)]).SerializeToString())


def cost_experiment(name: str, model: bytes, x: FloatArray, repeats: int) -> CostRow:
    key = new_master_key()
    locked = lock(model, key)
    plain, unlocking, total = [], [], []
    for _ in range(repeats):
        tick = time.perf_counter()
        _predict(model, x)
        plain.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        opened = unlock(locked, key)
        unlocked = time.perf_counter()
        _predict(opened, x)
        unlocking.append(unlocked - tick)
        total.append(time.perf_counter() - tick)
    plain_ms, locked_ms = 1e3 * statistics.median(plain), 1e3 * statistics.median(total)
    return CostRow(name, len(model) / 1e6, len(x), plain_ms, 1e3 * statistics.median(unlocking),
                   locked_ms, locked_ms / plain_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wrong-keys", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--runs", type=int, default=5, help="keys / seeds per fine-tune arm")
    parser.add_argument("--rate", type=float, default=0.01, help="Adam learning rate")
    parser.add_argument("--repeats", type=int, default=20, help="timings per cost figure")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    console = Console()
    splits = {name: build() for name, build in examples().items()}

    accuracy_rows = [accuracy_experiment(n, s, args.wrong_keys) for n, s in splits.items()]
    table = Table("model", "parameters", "majority class", "original", "right key",
                  f"{args.wrong_keys} wrong keys: mean ± sd", "min", "max", "finite",
                  title="accuracy of a Deep-Locked model")
    for a in accuracy_rows:
        table.add_row(a.model, str(a.parameters), f"{a.chance:.1%}", f"{a.original:.1%}",
                      "bit-identical" if a.right_key_identical else "DIFFERS",
                      f"{a.wrong_mean:.1%} ± {a.wrong_sd:.1%}", f"{a.wrong_min:.1%}",
                      f"{a.wrong_max:.1%}", f"{a.locked_finite:.0%}")
    console.print(table)

    tune_rows = [fine_tune_experiment(n, splits[n], args.epochs, args.runs, args.rate)
                 for n in ("breast-cancer-lr", "digits-mlp")]
    shown = sorted({0, 1, 2, 5, 10, 20, args.epochs} & set(range(args.epochs + 1)))
    table = Table("model", "10% rows", "original",
                  *(f"epoch {e}: locked / scratch" for e in shown),
                  title=f"fine-tuning a wrong-key model vs training from scratch "
                        f"(mean of {args.runs})")
    for t in tune_rows:
        table.add_row(t.model, str(t.rows), f"{t.original:.1%}",
                      *(f"{t.locked_fine_tuned[e]:.1%} / {t.scratch[e]:.1%}" for e in shown))
    console.print(table)

    cost_rows = [cost_experiment(n, s[0], s[2], args.repeats) for n, s in splits.items()]
    big = _synthetic_mlp([784, 2048, 2048, 10])
    cost_rows.append(cost_experiment("synthetic MLP 784-2048-2048-10", big,
                                     np.random.default_rng(0).normal(size=(100, 784)),
                                     max(args.repeats // 4, 3)))
    table = Table("model", "MB", "rows", "plain load+infer (ms)", "unlock (ms)",
                  "unlock+load+infer (ms)", "ratio", title="cost of unlocking at model load "
                                                           "(medians)")
    for c in cost_rows:
        table.add_row(c.model, f"{c.megabytes:.2f}", str(c.rows), f"{c.plain_ms:.1f}",
                      f"{c.unlock_ms:.1f}", f"{c.locked_ms:.1f}", f"{c.ratio:.2f}x")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"accuracy": [asdict(a) for a in accuracy_rows],
                                         "fine_tuning": [asdict(t) for t in tune_rows],
                                         "cost": [asdict(c) for c in cost_rows]}, indent=2))


if __name__ == "__main__":
    main()

"""Issue 11, finding 2: a fingerprinted copy moves trained weights only, never the model's
preprocessing constants, and no copy that changes more predictions than the limit is sold.

Real scikit-learn pipelines exported by skl2onnx (MinMaxScaler: Mul and Add constants;
StandardScaler with option div: Sub and Div constants), a network that normalizes its own
inputs the way a PyTorch export does (Sub mean, Div std, built with onnx.helper), and a
model no fingerprint strength can mark within the limit. Plaintext only (onnxruntime).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from skl2onnx import to_onnx
from sklearn.datasets import make_classification, make_regression
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from common.onnx_io import MAX_IR_VERSION, run_model
from common.tabular import FloatArray
from seller_server.catalog import (
    MAX_FINGERPRINT_DISAGREEMENT,
    CopyCheck,
    fingerprint_strength,
    sale_key,
)
from seller_server.cli import TRACE_Z
from seller_server.compiler import compile_model
from seller_server.fingerprint import fingerprint, trace, weights

FEATURES = 12
HELD_OUT = 2000  # 99.5% agreement: at most 10 rows differ


@dataclass(frozen=True)
class Listed:
    model: bytes
    train: FloatArray
    held_out: FloatArray
    output: str
    check: CopyCheck


def _data(regression: bool = False) -> tuple[FloatArray, FloatArray]:
    """Columns of very different scales and offsets, so the scaler's constants matter."""
    if regression:
        x, y = make_regression(n_samples=2 * HELD_OUT, n_features=FEATURES, n_informative=8,
                               noise=10.0, random_state=0)
        y = y / 100  # float32 outputs of order 1 (the compiler checks its plan to ~1e-3)
    else:
        x, y = make_classification(n_samples=2 * HELD_OUT, n_features=FEATURES,
                                   n_informative=6, n_redundant=2, n_classes=3,
                                   n_clusters_per_class=1, class_sep=3.0, random_state=0)
    rng = np.random.default_rng(0)
    return x * 10 ** rng.uniform(-1, 3, FEATURES) + rng.uniform(-100, 100, FEATURES), y


def _list(name: str, model: bytes, x: FloatArray) -> Listed:
    train, held_out = x[:HELD_OUT], x[HELD_OUT:]
    tail = compile_model(model, train, degree=2).tail  # (only its outputs matter here)
    return Listed(model, train, held_out, tail.probability_output,
                  CopyCheck.of(name, model, train, tail))


def _export(pipeline: Pipeline, x: FloatArray) -> bytes:
    options: dict[int, dict[str, str | bool]] = {id(pipeline.steps[0][1]): {"div": "div"}} \
        if isinstance(pipeline.steps[0][1], StandardScaler) else {}
    if hasattr(pipeline.steps[-1][1], "predict_proba"):
        options[id(pipeline.steps[-1][1])] = {"zipmap": False}
    model = to_onnx(pipeline, x[:1].astype(np.float32), options=options,
                    target_opset={"": 17, "ai.onnx.ml": 3})
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    return bytes(model.SerializeToString())


def _pipeline(name: str, pipeline: Pipeline, regression: bool = False) -> Listed:
    x, y = _data(regression)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipeline.fit(x[:HELD_OUT], y[:HELD_OUT])
    return _list(name, _export(pipeline, x), x)


def _preprocessing(model: bytes) -> dict[str, bytes]:
    """The serialized constants of the elementwise arithmetic before the first trained
    layer."""
    graph = onnx.load_model_from_string(model).graph
    initializers = {init.name: init.SerializeToString() for init in graph.initializer}
    found: dict[str, bytes] = {}
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm", "LinearClassifier", "LinearRegressor"):
            return found
        if node.op_type in ("Mul", "Add", "Sub", "Div"):
            found |= {name: initializers[name] for name in node.input if name in initializers}
    raise AssertionError("no trained layer")


def _outputs(listed: Listed, model: bytes) -> FloatArray:
    return run_model(model, listed.held_out, listed.output, [])


def _sale(listed: Listed) -> tuple[bytes, float]:
    """A sale's copy, made as Seller.open_trial makes it, and the strength."""
    strength, note = fingerprint_strength(listed.check)
    assert strength > 0, note
    key = sale_key(listed.check, strength)
    assert key is not None
    return fingerprint(listed.model, key, strength), strength


@pytest.fixture(scope="module")
def minmax_lr() -> Listed:
    return _pipeline("minmax-lr", make_pipeline(MinMaxScaler(),
                                                LogisticRegression(max_iter=5000)))


@pytest.fixture(scope="module")
def standard_lr() -> Listed:
    return _pipeline("standard-lr", make_pipeline(StandardScaler(),
                                                  LogisticRegression(max_iter=5000)))


@pytest.mark.parametrize("pipeline", ["minmax_lr", "standard_lr"])
def test_a_scaler_pipelines_copy_keeps_its_scaler_and_its_predictions(
        pipeline: str, request: pytest.FixtureRequest) -> None:
    listed: Listed = request.getfixturevalue(pipeline)
    scaler = _preprocessing(listed.model)
    assert len(scaler) == 2  # Mul + Add, or Sub + Div: each one value per column
    copy, _strength = _sale(listed)
    assert _preprocessing(copy) == scaler  # byte for byte
    assert weights(onnx.load_model_from_string(copy)).keys() == {"LinearClassifier/coefficients"}
    original, copied = _outputs(listed, listed.model), _outputs(listed, copy)
    assert not np.array_equal(original, copied)  # marked all the same
    assert np.mean(original.argmax(1) == copied.argmax(1)) >= 0.995


def test_a_regression_pipelines_copy_keeps_its_scaler_and_its_fit() -> None:
    listed = _pipeline("standard-ridge", make_pipeline(StandardScaler(), Ridge(1.0)), True)
    assert listed.check.regression
    scaler = _preprocessing(listed.model)
    copy, _strength = _sale(listed)
    assert _preprocessing(copy) == scaler
    original, copied = _outputs(listed, listed.model)[:, 0], _outputs(listed, copy)[:, 0]
    assert not np.array_equal(original, copied)
    # R^2 of the copy's predictions against the listed model's, on held-out rows
    assert 1 - np.mean((copied - original) ** 2) / np.var(original) >= 0.995


def _normalized_network() -> Listed:
    """A PyTorch-style network that standardizes its own inputs: Sub mean, Div std (one
    constant per column), then MatMul by a weight stored transposed (read through a
    Transpose node) + Add of its bias, ReLU, Gemm."""
    x, y = _data()
    mean, std = x[:HELD_OUT].mean(0), x[:HELD_OUT].std(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier((16,), max_iter=100, random_state=0).fit(
            (x[:HELD_OUT] - mean) / std, y[:HELD_OUT])
    (w1, w2), (b1, b2) = mlp.coefs_, mlp.intercepts_
    tensors = {"mean": mean, "std": std, "w1": w1.T, "b1": b1, "w2": w2.T, "b2": b2}
    graph = helper.make_graph(
        [helper.make_node("Sub", ["x", "mean"], ["centered"]),
         helper.make_node("Div", ["centered", "std"], ["normalized"]),
         helper.make_node("Transpose", ["w1"], ["w1_t"]),
         helper.make_node("MatMul", ["normalized", "w1_t"], ["product"]),
         helper.make_node("Add", ["product", "b1"], ["hidden"]),
         helper.make_node("Relu", ["hidden"], ["activations"]),
         helper.make_node("Gemm", ["activations", "w2", "b2"], ["logits"], transB=1)],
        "normalized", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                     [None, FEATURES])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(v.astype(np.float32), n) for n, v in tensors.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = MAX_IR_VERSION
    return _list("normalized-mlp", model.SerializeToString(), x)


def test_a_networks_own_normalization_is_left_alone() -> None:
    listed = _normalized_network()
    # the mean and std (12 values each) are not weights; b2 has fewer than 8 values
    assert weights(onnx.load_model_from_string(listed.model)).keys() == {"w1", "b1", "w2"}
    constants = _preprocessing(listed.model)
    assert constants.keys() == {"mean", "std"}
    copy, _strength = _sale(listed)
    assert _preprocessing(copy) == constants
    original, copied = _outputs(listed, listed.model), _outputs(listed, copy)
    assert np.mean(original.argmax(1) == copied.argmax(1)) >= 0.995


def _tied_model() -> Listed:
    """Two classes whose scores differ by about 1e-6 on every row: any mark flips about
    half of the predictions."""
    x, _y = _data()
    rng = np.random.default_rng(1)
    first = rng.normal(0, 1, FEATURES)
    weight = np.stack([first, first + 1e-9 * rng.normal(0, 1, FEATURES)])
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["scores"], transB=1)], "tied",
        [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, [None, FEATURES])],
        [helper.make_tensor_value_info("scores", onnx.TensorProto.DOUBLE, [None, 2])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = MAX_IR_VERSION
    return _list("tied-model", model.SerializeToString(), x)


def test_a_model_no_strength_can_mark_within_the_limit_is_sold_unmarked(
        caplog: pytest.LogCaptureFixture) -> None:
    listed = _tied_model()
    with caplog.at_level(logging.WARNING, logger="seller_server.catalog"):
        strength, note = fingerprint_strength(listed.check)
    assert strength == 0.0
    assert note.startswith("not fingerprinted: at the weakest strength 0.005")
    assert "of predictions changed (limit 0.25%)" in note
    assert f"tied-model: {note}" in caplog.text
    assert sale_key(listed.check, strength) is None  # the sale gets the listed model


def test_a_sales_copy_that_costs_too_much_is_not_offered(
        minmax_lr: Listed, caplog: pytest.LogCaptureFixture) -> None:
    # a strength far above what the search chooses: every copy changes many predictions
    copy = fingerprint(minmax_lr.model, b"k" * 32, 2.0)
    assert minmax_lr.check.cost(copy) > MAX_FINGERPRINT_DISAGREEMENT
    with caplog.at_level(logging.WARNING, logger="seller_server.catalog"):
        assert sale_key(minmax_lr.check, 2.0) is None
    assert "minmax-lr: this sale gets the unmarked model: its 4 fingerprinted copies" in \
        caplog.text


def test_a_leaked_scaler_pipeline_is_traced_to_its_sale_after_its_scaler_is_refit() -> None:
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipeline = make_pipeline(MinMaxScaler(), MLPClassifier(
            (16,), max_iter=100, random_state=0)).fit(x[:HELD_OUT], y[:HELD_OUT])
    listed = _list("minmax-mlp", _export(pipeline, x), x)
    strength, note = fingerprint_strength(listed.check)
    assert strength > 0, note
    keys = {f"sale-{i}": sale_key(listed.check, strength) for i in range(20)}
    sold = {sale: key for sale, key in keys.items() if key is not None}
    assert len(sold) == 20
    bought = fingerprint(listed.model, sold["sale-7"], strength)
    original, copied = _outputs(listed, listed.model), _outputs(listed, bought)
    assert np.mean(original.argmax(1) == copied.argmax(1)) >= 0.995  # a working model
    leaked = onnx.load_model_from_string(bought)
    # the reseller refits the scaler on rows of its own (the held-out ones)
    refit = MinMaxScaler().fit(listed.held_out)
    constants = {"Mu_Mulcst": refit.scale_, "Ad_Addcst": refit.min_}
    for init in leaked.graph.initializer:
        if init.name in constants:
            init.CopyFrom(numpy_helper.from_array(constants[init.name].astype(np.float32),
                                                  init.name))
    matches = trace(leaked.SerializeToString(), listed.model, sold)
    assert matches[0].sale == "sale-7" and matches[0].z >= TRACE_Z, matches[:3]
    assert all(m.z < TRACE_Z for m in matches[1:])

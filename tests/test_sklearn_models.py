"""scikit-learn models as skl2onnx exports them: SVMs (exact for linear and degree-2
polynomial kernels, refused otherwise), linear SVMs, the binary MLP's output sigmoid, and
tree ensembles (smoothed comparisons)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import pytest
from skl2onnx import to_onnx
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris, load_wine
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures
from sklearn.svm import SVC, SVR, LinearSVC, LinearSVR
from sklearn.tree import DecisionTreeClassifier

from common.errors import Unsupported
from common.he import engine
from common.onnx_io import MAX_IR_VERSION, model_feed, run_model, session
from common.tabular import FloatArray
from common.tail import apply_tail, predicted_labels
from seller_server.compiler import CompiledModel, compile_model
from seller_server.planner import choose_params
from tests.he_run import encrypted_scores

OPSETS = {"": 17, "ai.onnx.ml": 3}


def _standardized(x: FloatArray) -> FloatArray:
    scaled: FloatArray = (x - x.mean(axis=0)) / x.std(axis=0)
    return scaled


CANCER_X, CANCER_Y = load_breast_cancer(return_X_y=True)
CANCER_X = _standardized(CANCER_X)[:, :8]  # 8 features keep the squares few
IRIS_X, IRIS_Y = load_iris(return_X_y=True)
IRIS_X = _standardized(IRIS_X)
DIABETES_X, DIABETES_Y = load_diabetes(return_X_y=True)


def _onnx(model: Any, x: FloatArray, zipmap: bool | None = None) -> bytes:
    options = None if zipmap is None else {id(model): {"zipmap": zipmap}}
    exported = to_onnx(model, x[:1].astype(np.float32), target_opset=OPSETS, options=options)
    exported.ir_version = min(exported.ir_version, MAX_IR_VERSION)
    data: bytes = exported.SerializeToString()
    return data


def _labels_agree_with_onnxruntime(model: bytes, compiled: CompiledModel, x: FloatArray
                                   ) -> None:
    """The labels the buyer derives from the plan's outputs are the model's own labels."""
    sess = session(model)
    (labels,) = sess.run([compiled.tail.label_output], model_feed(sess, x))
    ours = predicted_labels(apply_tail(compiled.plan.simulate(x), compiled.tail.ops),
                            compiled.tail.class_labels)
    assert ours == [str(v) for v in labels]


@pytest.mark.parametrize(("kernel", "squares"), [("linear", 0), ("poly", 1)])
def test_binary_svc_compiles_exactly(kernel: str, squares: int) -> None:
    svc = SVC(kernel=kernel, degree=2, coef0=1.0).fit(CANCER_X, CANCER_Y)
    model = _onnx(svc, CANCER_X)
    compiled = compile_model(model, CANCER_X)
    assert compiled.layer_errors == () and compiled.approximation_error < 1e-4
    # (x.sv gamma + coef0)^2 summed over the support vectors is a quadratic form: one exact
    # square per eigen-direction, at most one per feature (not one per support vector)
    assert [s.kind for s in compiled.plan.stages] == ["square"] * squares
    assert all(s.units <= CANCER_X.shape[1] < len(svc.support_) for s in compiled.plan.stages)
    assert compiled.plan.depth() == 1 + 2 * squares
    _labels_agree_with_onnxruntime(model, compiled, CANCER_X)
    # onnxruntime's scores are [-d, d] with d sklearn's decision function
    scores = apply_tail(compiled.plan.simulate(CANCER_X), compiled.tail.ops)
    assert np.abs(scores[:, 0] - svc.decision_function(CANCER_X)).max() < 1e-3


def test_svr_compiles_exactly() -> None:
    y = DIABETES_Y / 100
    for svr in (SVR(kernel="linear"), SVR(kernel="poly", degree=2, coef0=1.0), LinearSVR()):
        model = _onnx(svr.fit(DIABETES_X, y), DIABETES_X)
        compiled = compile_model(model, DIABETES_X)
        assert compiled.layer_errors == () and compiled.approximation_error < 1e-4
        assert compiled.tail.class_labels == ()  # a regression
        assert np.abs(compiled.plan.simulate(DIABETES_X)[:, 0]
                      - svr.predict(DIABETES_X)).max() < 1e-4


@pytest.mark.parametrize(("x", "y"), [(CANCER_X, CANCER_Y), (IRIS_X, IRIS_Y)],
                         ids=["binary", "multiclass"])
def test_linear_svc_compiles_exactly(x: FloatArray, y: FloatArray) -> None:
    """LinearSVC exports as LinearClassifier; its binary form outputs one decision value,
    positive for the second class."""
    svc = LinearSVC().fit(x, y)
    model = _onnx(svc, x)
    compiled = compile_model(model, x)
    assert compiled.plan.stages == () and compiled.approximation_error < 1e-4
    assert compiled.plan.output.weights.shape[0] == (1 if len(set(y)) == 2 else 3)
    _labels_agree_with_onnxruntime(model, compiled, x)
    assert predicted_labels(compiled.plan.simulate(x), compiled.tail.class_labels) == [
        str(v) for v in svc.predict(x)]


@pytest.mark.parametrize(("svm", "message"), [
    (SVC(kernel="rbf"), r"kernel RBF: exp\(-gamma \|x - sv\|\^2\) .* not a polynomial"),
    (SVC(kernel="sigmoid"), "kernel SIGMOID"),
    (SVC(kernel="poly", degree=3), "polynomial kernel of degree 3; degree 1 and 2"),
    (SVC(kernel="linear", probability=True, random_state=0),
     r"SVC\(probability=True\).*export the SVC with probability=False"),
    (SVR(kernel="rbf"), r"\(SVMRegressor\): kernel RBF"),
])
def test_svms_that_cannot_be_exact_are_refused_with_the_reason(svm: Any, message: str) -> None:
    y = CANCER_Y if isinstance(svm, SVC) else CANCER_X[:, 0]
    with pytest.raises(Unsupported, match=message):
        compile_model(_onnx(svm.fit(CANCER_X, y), CANCER_X), CANCER_X)


def test_multiclass_svc_votes_are_refused() -> None:
    for shape in ("ovr", "ovo"):
        svc = SVC(kernel="linear", decision_function_shape=shape).fit(IRIS_X, IRIS_Y)
        with pytest.raises(Unsupported, match=r"separates 3 classes one-vs-one: the class is "
                                              r"a majority vote.*train LinearSVC"):
            compile_model(_onnx(svc, IRIS_X), IRIS_X)


@pytest.mark.parametrize("zipmap", [False, True])
def test_binary_mlp_output_sigmoid_is_the_buyers_tail(zipmap: bool) -> None:
    """skl2onnx writes [1 - sigmoid(z), sigmoid(z)]: it becomes sigmoid([-z, z]) applied
    by the buyer, so only the hidden layer is approximated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier((3,), activation="tanh", max_iter=50, random_state=0).fit(
            CANCER_X, CANCER_Y)
    model = _onnx(mlp, CANCER_X, zipmap)
    compiled = compile_model(model, CANCER_X)
    assert compiled.tail.ops == ("sigmoid",)
    # the hidden layer only: no sigmoid is approximated
    assert [name.split(" at ")[0] for name, _error in compiled.layer_errors] == ["tanh"]
    assert [s.kind for s in compiled.plan.stages] == ["chebyshev"]
    assert compiled.plan.output.weights.shape[0] == 2
    assert compiled.approximation_error <= 0.01 and compiled.calibration_agreement > 0.99
    reference = run_model(model, CANCER_X, compiled.tail.probability_output,
                          compiled.tail.class_labels)
    ours = apply_tail(compiled.plan.simulate(CANCER_X), compiled.tail.ops)
    assert np.abs(ours - reference).max() == pytest.approx(compiled.approximation_error)


def test_degree_two_svc_under_encryption() -> None:
    """The squaring path of a polynomial SVC at 128-bit: decrypted scores and labels are
    onnxruntime's."""
    x = CANCER_X[:64]
    model = _onnx(SVC(kernel="poly", degree=2, coef0=1.0).fit(CANCER_X, CANCER_Y), CANCER_X)
    compiled = compile_model(model, CANCER_X)
    plan = compiled.plan
    params = choose_params(plan.depth(), 128, float(np.abs(plan.simulate(CANCER_X)).max()))
    scores = encrypted_scores(plan, x, params)
    reference = run_model(model, x, compiled.tail.probability_output, ())
    assert np.abs(scores - reference).max() < 1e-3 * max(1.0, float(np.abs(reference).max()))
    sess = session(model)
    (labels,) = sess.run([compiled.tail.label_output], model_feed(sess, x))
    assert predicted_labels(scores, compiled.tail.class_labels) == [str(v) for v in labels]


@pytest.mark.parametrize(("degree", "depth"), [(2, 3), (3, 5)])
def test_polynomial_features_compile_to_exact_products(degree: int, depth: int) -> None:
    """skl2onnx writes one ReduceProd per monomial: x_i x_j is an exact product (a
    repeated factor one square), a cubic term a product of a product: two levels per
    product (its weights, its square) after the first."""
    x = _standardized(DIABETES_X[:, :4])
    model = _onnx(make_pipeline(PolynomialFeatures(degree), LinearRegression()).fit(
        x, DIABETES_Y), x)
    assert "ReduceProd" in {n.op_type for n in onnx.load_from_string(model).graph.node}
    compiled = compile_model(model, x)
    assert compiled.layer_errors == ()
    assert {s.kind for s in compiled.plan.stages} == {"square"}
    assert compiled.plan.depth() == depth
    assert "more like it" in compiled.approximation  # one line per kind of stage
    reference = run_model(model, x, compiled.tail.probability_output, ())
    assert np.abs(compiled.plan.simulate(x) - reference).max() < 1e-3


def test_polynomial_features_under_encryption() -> None:
    """The products on OpenFHE at 128-bit: decrypted predictions are onnxruntime's."""
    x = _standardized(DIABETES_X[:, :4])
    model = _onnx(make_pipeline(PolynomialFeatures(3), LinearRegression()).fit(
        x, DIABETES_Y), x)
    compiled = compile_model(model, x)
    plan = compiled.plan
    params = choose_params(engine.levels_needed(plan), 128,
                           float(np.abs(plan.simulate(x)).max()))
    rows = x[:64]
    predicted = encrypted_scores(plan, rows, params)
    reference = run_model(model, rows, compiled.tail.probability_output, ())
    assert np.abs(predicted - reference).max() < 1e-3 * float(np.abs(reference).max())


def _split(x: FloatArray, y: Any) -> tuple[FloatArray, FloatArray, Any]:
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[: len(x) * 7 // 10], order[len(x) * 7 // 10:]
    return x[train], x[test], y[train]


@pytest.mark.parametrize(("make", "dataset", "ops"), [
    (lambda: DecisionTreeClassifier(max_depth=3, random_state=0), "cancer", ()),
    (lambda: RandomForestClassifier(n_estimators=4, max_depth=3, random_state=0), "cancer",
     ()),
    (lambda: GradientBoostingClassifier(n_estimators=6, max_depth=2, random_state=0),
     "cancer", ("sigmoid",)),
    (lambda: GradientBoostingClassifier(n_estimators=3, max_depth=2, random_state=0), "wine",
     ("softmax",))])
def test_tree_ensembles_compile_to_smoothed_comparisons(make: Callable[[], Any], dataset: str,
                                                        ops: tuple[str, ...]) -> None:
    """Every comparison a smoothed step (one series unit), every leaf the product of the
    steps on its path (one squaring level per tree level below the first): onnxruntime's
    labels on held-out rows (binary: [1 - s, s] or [sigmoid(-s), sigmoid(s)]; 3 classes:
    softmax), exact away from thresholds."""
    x, y = load_breast_cancer(return_X_y=True) if dataset == "cancer" else load_wine(
        return_X_y=True)
    x_train, x_test, y_train = _split(x, y)
    estimator = make().fit(x_train, y_train)
    model = _onnx(estimator, x_train, zipmap=False)
    compiled = compile_model(model, x_train)
    assert compiled.tail.ops == ops
    branches = sum(1 for t in getattr(estimator, "estimators_", [estimator])
                   for tree in np.ravel([t]) for f in tree.tree_.feature if f >= 0)
    series, *squares = compiled.plan.stages
    assert series.kind == "series" and series.units == branches and "step" in series.label
    assert [s.kind for s in squares] == ["square"] * (estimator.max_depth - 1)
    rows = np.clip(x_test, x_train.min(axis=0), x_train.max(axis=0))  # as the buyer clips
    reference = run_model(model, rows, compiled.tail.probability_output,
                          compiled.tail.class_labels)
    ours = apply_tail(compiled.plan.simulate(rows), compiled.tail.ops)
    agree = np.mean([a == b for a, b in zip(predicted_labels(ours, compiled.tail.class_labels),
                                            predicted_labels(reference,
                                                             compiled.tail.class_labels),
                                            strict=True)])
    assert agree >= 0.98
    # rows far from every threshold on their paths get the tree's own outputs
    assert np.median(np.abs(ours - reference)) < 0.01


def test_a_tree_comparing_for_equality_is_refused_by_name() -> None:
    x, y = load_breast_cancer(return_X_y=True)
    model = onnx.load_model_from_string(_onnx(DecisionTreeClassifier(max_depth=2).fit(x, y), x,
                                              zipmap=False))
    node = next(n for n in model.graph.node if n.op_type == "TreeEnsembleClassifier")
    modes = next(a for a in node.attribute if a.name == "nodes_modes")
    modes.strings[0] = b"BRANCH_EQ"
    with pytest.raises(Unsupported, match="comparisons \\['BRANCH_EQ'\\]"):
        compile_model(model.SerializeToString(), x)


def test_a_small_tree_under_encryption() -> None:
    """The series steps and the leaf products on OpenFHE: decrypted scores are the plan's.
    On a small insecure ring (security 0): it checks the evaluation, not security."""
    x, y = load_breast_cancer(return_X_y=True)
    model = _onnx(DecisionTreeClassifier(max_depth=2, random_state=0).fit(x, y), x,
                  zipmap=False)
    compiled = compile_model(model, x)
    plan = compiled.plan
    params = choose_params(engine.levels_needed(plan), 0, compiled.value_bound,
                           insecure_ring=4096)
    rows = x[:32]
    scores = encrypted_scores(plan, rows, params, security_bits=0)
    assert np.abs(scores - plan.simulate(rows)).max() < 1e-3

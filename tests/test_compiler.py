"""ONNX -> HE plan: agreement with onnxruntime, exact paths, approximations, refusals."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import helper

from common.errors import BadInput, Unsupported
from common.he.plan import HEPlan, chebyshev_basis
from common.onnx_io import run_model
from common.tabular import FloatArray, load_table
from common.tail import apply_tail
from seller_server import compiler
from seller_server.catalog import read_listing
from seller_server.compiler import compile_model
from tests import onnx_graphs as g


def _example(examples: Path, stem: str) -> tuple[bytes, FloatArray]:
    spec = read_listing(examples / "catalog" / f"{stem}.json")
    rows = load_table(spec.calibration_path, spec.input_columns).rows
    return spec.model_path.read_bytes(), rows


def test_sklearn_logistic_regression_is_exact(examples: Path) -> None:
    model, rows = _example(examples, "breast_cancer_lr")
    compiled = compile_model(model, rows)
    assert compiled.approximation == "exact"
    assert compiled.plan.depth() == 1  # scaler and classifier fold into one affine map
    assert compiled.tail.ops == ("sigmoid",)
    assert compiled.tail.class_labels == ("0", "1")
    assert compiled.tail.probability_output == "output_probability"  # the ZipMap output
    assert compiled.tail.label_output == "output_label"
    assert compiled.approximation_error < 1e-5
    assert compiled.calibration_agreement == 1.0


def test_sklearn_mlp_tanh_is_approximated_within_target(examples: Path) -> None:
    model, rows = _example(examples, "digits_mlp")
    compiled = compile_model(model, rows, error_target=0.01)
    assert compiled.degree > 0 and "Chebyshev" in compiled.approximation
    assert compiled.approximation_error <= 0.01
    assert compiled.calibration_agreement == 1.0
    assert compiled.tail.ops == ("softmax",)
    assert compiled.plan.depth() == 1 + math.ceil(math.log2(compiled.degree)) + 1


def test_activation_ranges_hold_for_every_row_of_the_input_domain(examples: Path) -> None:
    """Rows the seller never saw (here: the corners of the domain box, far outside 200
    calibration rows) stay inside the ranges every approximation is fitted on, and inside the
    value bound the CKKS parameters are sized from."""
    model, rows = _example(examples, "digits_mlp")
    low, high = rows.min(axis=0), rows.max(axis=0)
    compiled = compile_model(model, rows[:200], domain=(low, high))
    rng = np.random.default_rng(1)
    corners = np.where(rng.random((500, low.size)) < 0.5, low, high)
    probe = np.vstack([corners, rng.uniform(low, high, (500, low.size))])
    assert compiled.plan.range_excess(probe).max() <= 1.0
    assert np.abs(compiled.plan.simulate(probe)).max() <= compiled.value_bound
    assert compiled.approximation_error <= 0.01  # still accurate where the data lives
    (fit,) = compiled.fits
    assert fit.widening > 1.5  # the guarantee costs a wider range than the rows span


@pytest.mark.parametrize("activation", ["Relu", "Sigmoid", "Softplus"])
def test_held_out_rows_cannot_blow_up_an_approximation(activation: str) -> None:
    rows = g.calibration()
    domain = (np.full(6, -3.0), np.full(6, 3.0))  # twice the calibration rows' range
    model = g.mlp(activation)
    compiled = compile_model(model, rows, domain=domain, error_target=0.05)
    held_out = np.random.default_rng(2).uniform(-3, 3, (2000, 6))
    reference = run_model(model, held_out, compiled.tail.probability_output, ())
    ours = apply_tail(compiled.plan.simulate(held_out), compiled.tail.ops)
    assert compiled.plan.range_excess(held_out).max() <= 1.0
    assert np.abs(ours - reference).max() < 0.1


def test_a_lower_degree_is_less_accurate(examples: Path) -> None:
    model, rows = _example(examples, "digits_mlp")
    low = compile_model(model, rows, degree=4)
    high = compile_model(model, rows, degree=16)
    assert low.approximation_error > 5 * high.approximation_error


def test_square_activation_needs_no_approximation() -> None:
    rows = g.calibration()
    compiled = compile_model(g.mlp("square"), rows)
    assert compiled.degree == 0
    assert "exact" in compiled.approximation
    assert compiled.plan.depth() == 3
    assert compiled.approximation_error < 1e-5


@pytest.mark.parametrize("activation", ["Relu", "Sigmoid", "Tanh"])
def test_smooth_and_relu_activations_compile(activation: str) -> None:
    rows, model = g.calibration(), g.mlp(activation)
    compiled = compile_model(model, rows, error_target=0.03)
    reference = run_model(model, rows, "probabilities", compiled.tail.class_labels)
    ours = apply_tail(compiled.plan.simulate(rows), compiled.tail.ops)
    assert np.abs(ours - reference).max() == pytest.approx(compiled.approximation_error)
    assert compiled.approximation_error <= 0.03


def _lopsided_relu_mlp() -> bytes:
    """Gemm -> Relu -> Gemm -> Softmax whose hidden units' ranges lean right (bias +1.5)
    and left (-1.5) in turn."""
    rng = np.random.default_rng(0)
    return g.build(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="dense1"),
         helper.make_node("Relu", ["h"], ["a"], name="relu1"),
         helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], name="dense2", transB=1),
         helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1)],
        6, {"probabilities": 3},
        {"w1": g.weights(6, 8, rng=rng), "b1": np.tile([1.5, -1.5], 4).astype(np.float32),
         "w2": g.weights(3, 8, rng=rng), "b2": g.weights(1, 3, rng=rng)[0]})


def test_relu_units_share_one_series_at_a_bounded_cost(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """Above degree 32 every ReLU unit evaluates one polynomial, s_i q(z_i / s_i), which
    feature packing needs; a unit leaning the other way is mirrored (relu(z) = z +
    relu(-z)). The error stays within twice a per-unit fit's; mirroring halves it."""
    rows, model = g.calibration(), _lopsided_relu_mlp()
    shared = compile_model(model, rows, degree=64)
    (stage,) = shared.plan.stages
    assert stage.kind == "series" and stage.coefficients is not None
    assert np.all(stage.coefficients == stage.coefficients[0])
    reference = run_model(model, rows, "probabilities", shared.tail.class_labels)
    ours = apply_tail(shared.plan.simulate(rows), shared.tail.ops)
    assert np.abs(ours - reference).max() == pytest.approx(shared.approximation_error)

    monkeypatch.setattr(compiler, "_odd_slope", lambda *args: None)
    unmirrored = compile_model(model, rows, degree=64)
    monkeypatch.setattr(compiler, "_shared", lambda *args: None)
    own = compile_model(model, rows, degree=64)
    (own_stage,) = own.plan.stages
    assert own_stage.coefficients is not None
    assert np.any(own_stage.coefficients != own_stage.coefficients[0])
    # the units with a negative bias are the mirrored ones: their weights change sign
    mirrored = np.sign(stage.weights[:, [0]].toarray()[:, 0]) != np.sign(
        own_stage.weights[:, [0]].toarray()[:, 0])
    assert list(mirrored) == [False, True] * 4
    assert shared.approximation_error <= 2 * own.approximation_error
    # without mirroring, the left-leaning units get a domain many times their range
    assert unmirrored.fits[0].error > 1.5 * shared.fits[0].error


def test_trailing_activation_becomes_exact_tail() -> None:
    model = g.build([helper.make_node("Gemm", ["x", "w", "b"], ["z"], name="dense"),
                     helper.make_node("Sigmoid", ["z"], ["p"], name="out")],
                    4, {"p": 2}, {"w": g.weights(4, 2), "b": g.weights(1, 2)[0]})
    compiled = compile_model(model, g.calibration(4))
    assert compiled.tail.ops == ("sigmoid",)
    assert compiled.plan.stages == ()
    assert compiled.approximation_error < 1e-5


def test_unsupported_operator_is_named_with_a_suggestion() -> None:
    model = g.build([helper.make_node("Exp", ["x"], ["y"], name="exp1")], 4, {"y": 4}, {})
    with pytest.raises(Unsupported, match=r"node 'exp1': operator Exp .*use a bounded "
                                          r"activation"):
        compile_model(model, g.calibration(4))


@pytest.mark.parametrize(("activation", "op", "pool", "rounds", "last_units"), [
    ("Relu", "MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, 2, 18),
    # windows of 4 (corners), 6 (edges) and 9 values (the 32 inner ones take a 4th
    # round): padding never takes part
    ("", "MaxPool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, 4, 32),
    ("Tanh", "MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2]}, 4, 8),
    ("", "GlobalMaxPool", {}, 6, 2)])
def test_max_pool_is_a_tournament_of_pairwise_maxima(
        activation: str, op: str, pool: dict[str, list[int]], rounds: int, last_units: int
        ) -> None:
    """A window of k values is ceil(log2 k) rounds of max(a, b) = (a + b)/2 + |a - b|/2,
    every pair of a round in one |.| stage; a monotone activation before the pool is
    evaluated once per window, after it. Rows anywhere in the domain stay inside every
    fitted range and agree with onnxruntime within the measured error."""
    model = g.max_pool_cnn(pool, activation=activation, op=op)
    rows = g.calibration(36)
    compiled = compile_model(model, rows, error_target=0.05)
    assert [name for name, _error in compiled.layer_errors] == [
        f"abs at 'pool, round {r} of {rounds}'" for r in range(1, rounds + 1)] + (
        [f"{activation.lower()} at 'pool'"] if activation else [])
    assert compiled.plan.stages[-1].units == last_units
    held_out = np.random.default_rng(5).uniform(-1.5, 1.5, (1000, 36))  # the domain
    assert compiled.plan.range_excess(held_out).max() <= 1.0
    reference = run_model(model, held_out, "logits", ())
    assert np.abs(compiled.plan.simulate(held_out) - reference).max() <= max(
        2 * compiled.approximation_error, 1e-6)
    assert compiled.approximation_error <= 0.05


def test_a_plan_that_meets_its_target_is_made_shallower(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """One local bound gives every activation the precision of the most demanding one;
    once the target is met, activations move down the depth ladder until no single move
    keeps the target and saves a level."""
    model, rows = g.max_pool_cnn({"kernel_shape": [2, 2], "strides": [2, 2]}), g.calibration(36)
    shallow = compile_model(model, rows, error_target=0.1)
    monkeypatch.setattr(compiler, "_shallower", lambda compiled, *args: compiled)
    uniform = compile_model(model, rows, error_target=0.1)
    assert shallow.plan.depth() < uniform.plan.depth()
    assert shallow.approximation_error <= 0.1
    chosen = [fit.degree for fit in shallow.fits]
    for i, degree in enumerate(chosen):  # no activation can save a level within the target
        for step in reversed([step for step in compiler.DEPTH_LADDER if step < degree]):
            trial = compile_model(model, rows, degrees=[*chosen[:i], step, *chosen[i + 1:]])
            if trial.plan.depth() < shallow.plan.depth():
                assert trial.approximation_error > 0.1
                break


def test_a_max_pool_asked_for_its_indices_is_refused() -> None:
    model = g.build([helper.make_node("MaxPool", ["x"], ["y", "where"], name="pool1",
                                      kernel_shape=[2, 2])],
                    4, {"y": 9, "where": 9}, {}, rank=4)
    with pytest.raises(Unsupported, match=r"'pool1' \(MaxPool\): its Indices output"):
        compile_model(model, g.calibration(16))


def test_unknown_operator_is_named() -> None:
    model = g.build([helper.make_node("Gemm", ["x", "w", "b"], ["z"], name="dense"),
                     helper.make_node("Round", ["z"], ["y"], name="round1")],
                    4, {"y": 2}, {"w": g.weights(4, 2), "b": g.weights(1, 2)[0]})
    with pytest.raises(Unsupported, match=r"node 'round1': operator Round cannot be evaluated"):
        compile_model(model, g.calibration(4))


@pytest.mark.parametrize("merge", g.MERGES)
def test_bident_merges_compile(merge: str) -> None:
    """Both branches and the merge run encrypted: concat and average are affine, a product
    of the branches is exact ((a+b)^2 - (a-b)^2)/4, a maximum is (a+b)/2 + |a-b|/2 with |.|
    a Chebyshev polynomial."""
    rows, model = g.calibration(), g.bident(merge, "square")
    compiled = compile_model(model, rows, error_target=0.01)
    expected = run_model(model, rows, "probabilities", [])
    ours = apply_tail(compiled.plan.simulate(rows), compiled.tail.ops)
    assert np.abs(ours - expected).max() == pytest.approx(compiled.approximation_error)
    if merge == "max":
        assert [name for name, _error in compiled.layer_errors] == ["abs at 'merge'"]
        # |.|'s kink, fitted on a guaranteed range ~2x what the rows span
        assert compiled.approximation_error < 0.1
    else:
        assert compiled.approximation_error < 1e-5
        assert compiled.plan.depth() == (5 if merge == "mul" else 3)  # a product: 2 levels
    relu = compile_model(g.bident(merge), rows, error_target=0.01)
    assert relu.calibration_agreement > 0.95


def test_merging_encrypted_tensors_of_different_shapes_is_refused() -> None:
    model = g.build([helper.make_node("Gemm", ["x", "w", "b"], ["z1"], name="d1"),
                     helper.make_node("Gemm", ["x", "v", "c"], ["z2"], name="d2"),
                     helper.make_node("Mul", ["z1", "z2"], ["y"], name="mul1")],
                    4, {"y": 2}, {"w": g.weights(4, 2), "b": g.weights(1, 2)[0],
                                  "v": g.weights(4, 1), "c": g.weights(1, 1)[0]})
    with pytest.raises(Unsupported, match=r"node 'mul1'.*shaped \[2\] and \[1\]"):
        compile_model(model, g.calibration(4))


def test_reshape_that_mixes_rows_is_refused() -> None:
    model = g.build([helper.make_node("Reshape", ["x", "shape"], ["y"], name="r1")],
                    4, {"y": 2}, {"shape": np.array([-1, 2], dtype=np.int64)})
    with pytest.raises(Unsupported, match=r"node .r1. \(Reshape\) mixes rows"):
        compile_model(model, g.calibration(4))


def test_wrong_feature_count_is_refused(examples: Path) -> None:
    model, rows = _example(examples, "breast_cancer_lr")
    with pytest.raises(Unsupported, match=r"30 features \(shape \[30\]\) but the listing"):
        compile_model(model, rows[:, :10])


def test_garbage_is_not_a_model() -> None:
    with pytest.raises(BadInput, match="not a valid ONNX model"):
        compile_model(b"not onnx at all", g.calibration(4))


def test_plan_round_trip_and_corruption() -> None:
    rows = g.calibration()
    compiled = compile_model(g.mlp("Tanh"), rows, degree=5)
    data = compiled.plan.to_bytes()
    again = HEPlan.from_bytes(data)
    assert np.array_equal(again.simulate(rows), compiled.plan.simulate(rows))
    assert again.digest() == compiled.plan.digest()
    with pytest.raises(BadInput, match="unreadable HE plan"):
        HEPlan.from_bytes(data[: len(data) // 2])


def test_a_plan_with_a_nan_or_an_infinity_is_refused() -> None:
    """HEPlan.check, which from_bytes runs on every cached or received plan."""
    compiled = compile_model(g.mlp("Tanh"), g.calibration(), degree=5)
    stage = compiled.plan.stages[0]
    for weights, bias, where in [
            (stage.weights * np.inf, stage.bias, "plan stage 1 .* non-finite weights"),
            (stage.weights, np.full_like(stage.bias, np.nan), "plan stage 1 .* non-finite biases")]:
        plan = HEPlan(compiled.plan.input_count,
                      (dataclasses.replace(stage, weights=weights, bias=bias),
                       *compiled.plan.stages[1:]), compiled.plan.output)
        with pytest.raises(BadInput, match=where):
            HEPlan.from_bytes(plan.to_bytes())
    output = dataclasses.replace(compiled.plan.output,
                                 bias=np.full_like(compiled.plan.output.bias, np.nan))
    with pytest.raises(BadInput, match="the plan's output stage has non-finite biases"):
        HEPlan.from_bytes(dataclasses.replace(compiled.plan, output=output).to_bytes())


@pytest.mark.parametrize(("model", "message"), [
    (g.self_ratio(), r"node 'self_ratio' \(Div\) divides by an encrypted tensor"),
    (g.softsign_by_division(), r"node 'softsign_ratio' \(Div\) divides by an encrypted tensor"),
])
def test_division_by_an_encrypted_tensor_is_refused(model: bytes, message: str) -> None:
    """Div(x, x) and x / (1 + |x|): their probes divide 0 by 0, and NaN passes every
    comparison; they are refused before any probe, by node name."""
    with pytest.raises(Unsupported, match=message):
        compile_model(model, g.calibration(3))


def _affine_model(nodes: list[Any], initializers: dict[str, Any]) -> bytes:
    return g.build([helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="dense"), *nodes],
                   3, {"y": 2}, {"w": g.weights(3, 2), "b": g.weights(1, 2)[0],
                                 **initializers})


def test_a_product_over_rows_is_refused_by_name() -> None:
    """ReduceProd multiplies a row's features; over the rows (axis 0) it would mix them."""
    model = g.build([helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="dense"),
                     helper.make_node("ReduceProd", ["h"], ["y"], name="prod", axes=[0])],
                    3, {"y": 2}, {"w": g.weights(3, 2), "b": g.weights(1, 2)[0]})
    with pytest.raises(Unsupported, match=r"node 'prod' \(ReduceProd\) over axes \[0\] of "
                                          r"rows shaped \[2\]; only over the features"):
        compile_model(model, g.calibration(3))


def test_the_first_non_finite_value_is_named() -> None:
    nan = np.array([1.0, np.nan], dtype=np.float32)
    cases = [
        (_affine_model([helper.make_node("Add", ["h", "c"], ["y"], name="shift")],
                       {"c": nan}),
         r"node 'shift' \(Add\) gives NaN or infinite values: its input 'c' is not finite "
         r"\(first at initializer 'c'\)"),
        (_affine_model([helper.make_node("Div", ["z", "z"], ["q"], name="zero_by_zero"),
                        helper.make_node("Add", ["h", "q"], ["y"], name="shift")],
                       {"z": np.zeros(2, np.float32)}),
         r"node 'shift' \(Add\) gives NaN .* \(first at node 'zero_by_zero' \(Div\)\)"),
        (_affine_model([helper.make_node("Div", ["h", "c"], ["y"], name="by_zero")],
                       {"c": np.array([1.0, 0.0], np.float32)}),
         r"node 'by_zero' \(Div\) gives NaN or infinite values"),
        (_affine_model([helper.make_node("LeakyRelu", ["h"], ["a"], name="leaky",
                                         alpha=float("nan")),
                        helper.make_node("Gemm", ["a", "v", "b"], ["y"], name="head")],
                       {"v": g.weights(2, 2)}),
         r"leaky_relu at 'leaky' gives NaN or infinite values on its guaranteed range"),
    ]
    for model, message in cases:
        with pytest.raises(Unsupported, match=message):
            compile_model(model, g.calibration(3))


def test_chebyshev_basis_matches_numpy() -> None:
    u = np.linspace(-1, 1, 11, dtype=np.float64)[:, None]
    basis = chebyshev_basis(u, 7)
    for k in range(1, 8):
        coeffs = np.zeros(k + 1)
        coeffs[k] = 1
        assert np.allclose(basis[:, k - 1], np.polynomial.chebyshev.chebval(u[:, 0], coeffs))


def _conv_bn() -> bytes:
    c = 2
    return g.build(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"],
                          name="bn", epsilon=1e-3),
         helper.make_node("AveragePool", ["n"], ["p"], name="pool", kernel_shape=[2, 2],
                          strides=[2, 2]),
         helper.make_node("Mul", ["p", "p"], ["s"], name="square"),
         helper.make_node("GlobalAveragePool", ["s"], ["gap"], name="gap"),
         helper.make_node("Squeeze", ["gap", "axes"], ["flat"], name="squeeze"),
         helper.make_node("Div", ["flat", "ten"], ["out"], name="div")],
        6, {"out": c},
        {"w": g.weights(c * 9, 1).reshape(c, 1, 3, 3), "b": g.weights(1, c)[0],
         "scale": np.abs(g.weights(1, c)[0]) + 0.5, "shift": g.weights(1, c)[0],
         "mean": g.weights(1, c)[0], "var": np.abs(g.weights(1, c)[0]) + 0.1,
         "axes": np.array([2, 3], dtype=np.int64), "ten": np.array(10.0, dtype=np.float32)},
        rank=4)


def test_convolution_batch_norm_pooling_compile_exactly() -> None:
    rows = g.calibration(36)
    compiled = compile_model(_conv_bn(), rows)
    assert compiled.approximation_error < 1e-5
    # conv + batch norm + pool fold into one map (1 level), the square (1), then pooling
    # and scaling fold into the output sum (1)
    assert compiled.plan.depth() == 3
    assert len(compiled.plan.stages) == 1


def _branches() -> bytes:
    """Two branches concatenated, plus a residual sum reaching back to the input."""
    return g.build(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="left"),
         helper.make_node("Gemm", ["x", "w2", "b2"], ["h2"], name="right", alpha=0.5,
                          beta=2.0, transB=1),
         helper.make_node("Concat", ["h1", "h2"], ["h"], name="concat", axis=1),
         helper.make_node("Mul", ["h", "h"], ["sq"], name="square"),
         helper.make_node("Gemm", ["sq", "w3", "b3"], ["deep"], name="deep"),
         helper.make_node("Gemm", ["x", "w4", "b4"], ["skip"], name="skip"),
         helper.make_node("Add", ["deep", "skip"], ["sum"], name="residual"),
         helper.make_node("Transpose", ["sum"], ["out"], name="noop", perm=[0, 1])],
        5, {"out": 3},
        {"w1": g.weights(5, 2), "b1": g.weights(1, 2)[0], "w2": g.weights(4, 5),
         "b2": g.weights(1, 4)[0], "w3": g.weights(6, 3), "b3": g.weights(1, 3)[0],
         "w4": g.weights(5, 3), "b4": g.weights(1, 3)[0]})


def test_concatenated_branches_and_residual_sums_compile_exactly() -> None:
    compiled = compile_model(_branches(), g.calibration(5))
    assert compiled.approximation_error < 1e-5
    assert compiled.plan.depth() == 3
    # the residual reads input ciphertexts directly in the output sum
    assert compiled.plan.output.weights[:, :5].nnz > 0


def _clamped(op: str, constant: float | None, constant_first: bool, trailing: bool) -> bytes:
    """Gemm -> Max/Min against a float32 constant (either argument order; op alone when
    `constant` is None) -> [Gemm]."""
    inputs = ["z"] if constant is None else ["c", "z"] if constant_first else ["z", "c"]
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["z"], name="dense"),
             helper.make_node(op, inputs, ["h"], name="clamp")]
    rng = np.random.default_rng(3)
    values: dict[str, Any] = {"w": rng.normal(0, 0.5, size=(4, 3)).astype(np.float32),
                              "b": rng.normal(0, 0.5, size=3).astype(np.float32)}
    if constant is not None:
        values["c"] = np.array(constant, dtype=np.float32)
    if trailing:
        return g.build(nodes, 4, {"h": 3}, values)
    nodes.append(helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], name="head"))
    values |= {"w2": rng.normal(0, 0.5, size=(3, 2)).astype(np.float32),
               "b2": rng.normal(0, 0.5, size=2).astype(np.float32)}
    return g.build(nodes, 4, {"y": 2}, values)


@pytest.mark.parametrize("constant_first", [False, True])
@pytest.mark.parametrize(("op", "constant"), [("Max", 0.0), ("Max", 0.5), ("Min", -0.25)])
def test_max_and_min_against_a_float32_constant_are_activations(
        op: str, constant: float, constant_first: bool) -> None:
    rows = g.calibration(4)
    model = _clamped(op, constant, constant_first, trailing=False)
    compiled = compile_model(model, rows, error_target=0.03)
    assert [name for name, _error in compiled.layer_errors] == [
        f"{'relu' if constant == 0 else op.lower()} at 'clamp'"]
    assert compiled.approximation_error <= 0.03
    reference = run_model(model, rows, "y", [])
    ours = apply_tail(compiled.plan.simulate(rows), compiled.tail.ops)
    assert np.abs(ours - reference).max() == pytest.approx(compiled.approximation_error)
    if constant == 0:  # Max(x, 0) is Relu, approximated the same way
        relu = compile_model(_clamped("Relu", None, False, False), rows, error_target=0.03)
        assert compiled.approximation_error == pytest.approx(relu.approximation_error)


@pytest.mark.parametrize("constant_first", [False, True])
def test_a_trailing_max_against_zero_is_an_exact_relu_tail(constant_first: bool) -> None:
    compiled = compile_model(_clamped("Max", 0.0, constant_first, trailing=True),
                             g.calibration(4))
    assert compiled.tail.ops == ("relu",) and compiled.plan.stages == ()
    assert compiled.approximation_error < 1e-5

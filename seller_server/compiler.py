"""ONNX -> HE plan.

The compiler walks the graph once, tracking every tensor as one of:
  * a constant (initializers, Constant nodes, shape arithmetic on constants),
  * an affine map of the current ciphertext basis with a per-row shape (`Affine`),
  * an affine map followed by elementwise or row-wise operations not yet committed to
    (`Deferred`): if the graph ends there they become the output tail the buyer applies
    exactly after decryption; if a layer consumes them, the activations are
    *materialized* as Chebyshev polynomial stages on per-unit guaranteed ranges (below),
  * class labels (`Labels`): argmax outputs, computed by the buyer.

Every operator that is affine in its encrypted inputs (Gemm, MatMul, Conv, pooling by
averaging, BatchNormalization, Pad, Concat, Reshape, Transpose, Slice, sums of branches,
...) is handled the same way: the single node is run in float64 by ONNX's reference
evaluator on probe rows (zero, then one-hot rows per encrypted input), which yields its
exact affine map; a random probe then confirms the node really is affine. Anything else is
refused with the node's name and operator. So is a node whose probes or outputs hold a NaN or
an infinity (a division by zero, a NaN constant): a plan is finite everywhere, and the refusal
names the node, and the constant or initializer, where the first non-finite value appears.
Division is by constants only: `Div` by an encrypted tensor (even `Div(x, x)`) is refused
before probing, whose zero rows would divide by zero.
MaxPool is rounds of pairwise maxima, max(a, b) = (a + b)/2 + |a - b|/2, with |.|
approximated like any activation (`_max_pool`); which entries each window holds is read
from the node itself, so padding, strides and dilations mean what they mean in ONNX.

Guaranteed ranges. Every basis entry has an interval that holds for *every* row of the
offer's input domain (the box buyers clip their rows to), not only for the seller's rows:
input columns their domain, Chebyshev entries [-1, 1], squares the square of their input's
interval. An affine value's interval follows exactly from those (center +- |W| radius), so
each activation is fitted on the interval its inputs can reach, and no row inside the
domain can push a polynomial outside the range it was fitted on (where degree 24-32
polynomials explode and garble the ciphertext). The price is a wider fit than the data
needs: `Fit.widening` says how much, and the error is still measured on the seller's rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from scipy import sparse

from common.errors import Unsupported
from common.he.plan import (
    INPUT_RANGE,
    SERIES_DEPTHS,
    HEPlan,
    OutputStage,
    PolyStage,
    Weights,
    as_weights,
    chebyshev_series,
)
from common.onnx_io import parse_model, run_model
from common.tail import TAIL_OPS, apply_tail, predicted_labels

FloatArray = npt.NDArray[np.float64]
UnitFunction = Callable[[FloatArray], FloatArray]

MAX_CALIBRATION_ROWS = 4096
# relative slack on a guaranteed range, for the CKKS error on its inputs (~1e-6 relative)
RANGE_GUARD = 1e-3
NEGLIGIBLE = 1e-12  # relative size of a Chebyshev coefficient below which it is rounding noise
WORST_CASE_POINTS = 257  # grid on which an approximation's worst error over its range is read
MAX_INPUT_FEATURES = 4096
DEGREES = (2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 48, 64, 96, 128, 192, 246, 352, 494)
# up to this degree an activation adds T_1..T_D to the basis; above, one Paterson-Stockmeyer
# series entry per unit (common.he.plan: "series"), which kinks on wide ranges need
MAX_BASIS_DEGREE = 32
# ... and while the stage's basis entries (units x degree) stay this few: slot-per-sample
# holds every one as a ciphertext at once (a max pool's 128 units at degree 32: 4096
# ciphertexts of ~11 MB at N=2^15, and the self-test aborted); a series holds one per unit
MAX_BASIS_ENTRIES = 1024
# per-activation error bounds tried, loosest first, until the end-to-end target holds
LOCAL_TOLERANCES = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
PROBE_CHUNK = 1024

# Operators whose outputs are affine in their (encrypted) data inputs once every other
# input is a constant; their maps are measured by probing.
AFFINE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Identity", "Dropout", "Gemm", "MatMul", "Conv",
    "ConvTranspose", "AveragePool", "GlobalAveragePool", "BatchNormalization", "Pad",
    "Concat", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather",
    "Split", "ReduceMean", "ReduceSum", "Expand", "Tile", "Scaler", "LinearRegressor",
})


@dataclass(frozen=True)
class Tail:
    ops: tuple[str, ...]
    class_labels: tuple[str, ...]
    probability_output: str
    label_output: str


@dataclass(frozen=True)
class CompiledModel:
    plan: HEPlan
    tail: Tail
    degree: int  # highest Chebyshev degree of approximated activations (0: none)
    approximation: str
    approximation_error: float  # max |tail(plan) - onnxruntime| on calibration rows
    calibration_agreement: float  # top-1 agreement with onnxruntime on calibration rows
    layer_errors: tuple[tuple[str, float], ...]  # per activation: max |p - f| on its inputs
    fits: tuple[Fit, ...]  # per approximated activation
    value_bound: float  # max |value| any computed stage input or score takes over the domain


@dataclass(frozen=True)
class Fit:
    """One approximated activation, for the listing's log and refusals."""

    label: str  # e.g. "tanh at 'Tanh'"
    degree: int
    error: float  # max |p - f| on the seller's rows
    worst_error: float  # max |p - f| anywhere on the guaranteed ranges
    widening: float  # guaranteed range / the seller's rows' range (median over units)

    def describe(self) -> str:
        return (f"{self.label}: degree {self.degree}, error {self.error:.2g} on the seller's "
                f"rows, {self.worst_error:.2g} at worst on ranges {self.widening:.1f}x "
                f"the rows' ranges")


@dataclass(frozen=True)
class Activation:
    """An elementwise function of an encrypted tensor: `evaluate` maps (k, units) values to
    (k, units) outputs (for ONNX activations, by running the node itself, so every
    attribute and broadcasting rule means what it means in ONNX)."""

    name: str
    evaluate: Callable[[FloatArray], FloatArray]
    exact_tail: bool = False  # the buyer can apply it exactly after decryption

    @property
    def tail_name(self) -> str | None:
        return self.name if self.exact_tail else None


SQUARE = Activation("square", np.square, exact_tail=True)


@dataclass(frozen=True)
class Affine:
    weights: Weights  # (features, basis size when created)
    bias: FloatArray  # (features,)
    shape: tuple[int, ...]  # per-row tensor shape

    @property
    def features(self) -> int:
        return int(self.bias.size)


@dataclass(frozen=True)
class Deferred:
    base: Affine
    ops: tuple[Activation | str, ...]  # str: row-wise tail ops (softmax, normalizers)
    origin: str  # node that started the deferred ops, for messages

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape


@dataclass(frozen=True)
class Labels:
    class_labels: tuple[str, ...]


Value = Any  # np.ndarray | Affine | Deferred | Labels


def compile_model(
    model_bytes: bytes,
    calibration: FloatArray,
    *,
    degree: int | None = None,
    degrees: Sequence[int] | None = None,
    error_target: float = 0.01,
    domain: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
) -> CompiledModel:
    """Compile and validate against onnxruntime on the calibration rows.

    `domain` is the (low, high) per input column that every row the plan will see lies in
    (default: the calibration rows' own range); the activations' ranges are guaranteed on it.

    Each approximated activation gets the smallest Chebyshev degree whose error on the
    seller's rows is within a local bound; the bound is tightened until the error on
    the model's compared output meets `error_target` (when it never does: the loosest
    bound within 5% of the least error). A plan that meets the target is then made
    shallower where the target allows (`_shallower`). `degree` fixes every degree;
    `degrees` fixes them one by one (to compile a variant of a model to the same depth).
    """
    model = parse_model(model_bytes, "the model")
    rows = np.asarray(calibration, dtype=np.float64)[:MAX_CALIBRATION_ROWS]
    box = _domain_box(rows, domain)
    fixed = degree is not None or degrees is not None
    bounds: Sequence[float | None] = (None,) if fixed else LOCAL_TOLERANCES
    tried: list[CompiledModel] = []
    reference: FloatArray | None = None

    def attempt(bound: float | None, fixed_degrees: Sequence[int] | None) -> CompiledModel:
        nonlocal reference
        tracer = _Tracer(model, rows, box, degree, bound, fixed_degrees)
        plan, tail = tracer.run()
        if reference is None:
            reference = run_model(model_bytes, rows, tail.probability_output, tail.class_labels)
        return _measure(plan, tail, tracer, rows, reference)

    for bound in bounds:
        compiled = attempt(bound, degrees)
        if not compiled.fits or compiled.approximation_error <= error_target:
            return compiled if fixed else _shallower(
                compiled, error_target, lambda chosen: attempt(None, chosen))
        tried.append(compiled)
    # none meets the target: the cheapest (loosest bound) of those near the best
    return _cheapest_near_best(tried, [c.approximation_error for c in tried])


# per multiplicative depth, the most accurate degrees: a Chebyshev basis T_1..T_2^k (up to
# MAX_BASIS_DEGREE) and the top of each band of OpenFHE's series (SERIES_DEPTHS)
DEPTH_LADDER = tuple(sorted({2, 4, 8, 16, MAX_BASIS_DEGREE} | {
    min(top, DEGREES[-1]) for top, _levels in SERIES_DEPTHS}))


def _shallower(compiled: CompiledModel, error_target: float,
               recompile: Callable[[list[int]], CompiledModel]) -> CompiledModel:
    """The same model in fewer levels where the error target allows: one local bound for
    every activation over-serves some (a ReLU after a max pool needs less than the pool's
    |a - b|), so each pass moves one activation a level down the ladder, the one whose
    move costs the least error while the target holds, until none can move. A level less
    is CKKS work and key bytes saved on every trial, and sometimes a smaller ring."""
    best = compiled
    while True:
        chosen = [fit.degree for fit in best.fits]
        moves = []
        for i, current in enumerate(chosen):
            # the highest step a level down (a basis and a series differ by one level)
            for step in reversed([step for step in DEPTH_LADDER if step < current]):
                trial = recompile([*chosen[:i], step, *chosen[i + 1:]])
                if trial.plan.depth() < best.plan.depth():
                    if trial.approximation_error <= error_target:
                        moves.append(trial)
                    break
        if not moves:
            return best
        best = min(moves, key=lambda c: c.approximation_error)


def _is_series(degree: int, units: int) -> bool:
    """Whether an activation of `degree` over `units` units is a series stage."""
    return degree > MAX_BASIS_DEGREE or degree * units > MAX_BASIS_ENTRIES


def _summary(labels: Sequence[str]) -> str:
    """The stages' labels, those that differ only in their node named once with a count
    (PolynomialFeatures has a product per monomial)."""
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(re.sub(r" at '[^']*'", "", label), []).append(label)
    return "; ".join(same[0] + (f" (and {len(same) - 1} more like it)" if len(same) > 1
                                else "") for same in groups.values()) or "exact"


T = TypeVar("T")


def _cheapest_near_best(candidates: Sequence[T], errors: Sequence[float]) -> T:
    """The first (cheapest) candidate whose error is within 5% of the least; the last if
    no error is finite (the caller names the NaN)."""
    finite = [e for e in errors if np.isfinite(e)]
    if not finite:
        return candidates[-1]
    least = min(finite)
    return next(c for c, e in zip(candidates, errors, strict=True) if e <= 1.05 * least)


def _domain_box(rows: FloatArray, domain: tuple[npt.ArrayLike, npt.ArrayLike] | None
                ) -> tuple[FloatArray, FloatArray]:
    if rows.ndim != 2 or not rows.size:
        raise Unsupported("the calibration data has no rows")
    if domain is None:
        return rows.min(axis=0), rows.max(axis=0)
    low, high = (np.asarray(v, dtype=np.float64).reshape(-1) for v in domain)
    if low.shape != (rows.shape[1],) or high.shape != low.shape or not (
            np.all(np.isfinite(low)) and np.all(np.isfinite(high)) and np.all(low <= high)):
        raise Unsupported(f"the input domain must give finite low <= high for each of the "
                          f"{rows.shape[1]} columns")
    return low, high


def input_encoding(low: FloatArray, high: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The (offset, scale) that encrypt each column of the box [low, high] on
    +-INPUT_RANGE (a constant column: on its magnitude, or 1)."""
    half = (high - low) / 2
    half = np.where(half > 0, half, np.maximum(np.abs(high), 1.0))
    return (low + high) / 2, INPUT_RANGE / half


def _measure(plan: HEPlan, tail: Tail, tracer: _Tracer, rows: FloatArray,
             reference: FloatArray) -> CompiledModel:
    ours = apply_tail(plan.simulate(rows), tail.ops)
    if ours.shape != reference.shape:
        raise Unsupported(f"compiled plan gives {ours.shape[1]} outputs but onnxruntime gives "
                          f"{reference.shape[1]} for output {tail.probability_output!r}")
    error = float(np.max(np.abs(ours - reference))) if ours.size else 0.0
    labels_ours = predicted_labels(ours, tail.class_labels)
    labels_ref = predicted_labels(reference, tail.class_labels)
    agreement = (float(np.mean([a == b for a, b in zip(labels_ours, labels_ref, strict=True)]))
                 if labels_ref else 1.0)
    if not tracer.layer_errors and error > 1e-3:
        raise Unsupported(f"internal check failed: the exact HE plan differs from onnxruntime "
                          f"by {error:.3g} on the calibration rows; please report this model")
    summary = _summary([s.label for s in plan.stages])
    degrees = [s.degree for s in plan.stages if "Chebyshev" in s.label]
    return CompiledModel(plan, tail, max(degrees, default=0), summary, error, agreement,
                         tuple(tracer.layer_errors), tuple(tracer.fits),
                         max(tracer.value_bound, tracer.output_bound))


class _Tracer:
    def __init__(self, model: onnx.ModelProto, rows: FloatArray,
                 domain: tuple[FloatArray, FloatArray], degree: int | None,
                 local_bound: float | None, degrees: Sequence[int] | None = None) -> None:
        self.fixed_degrees = list(degrees) if degrees is not None else None
        self.model = model
        self.graph = model.graph
        self.degree = degree
        self.local_bound = local_bound
        self.basis_values = rows  # calibration values of every basis ciphertext so far
        # every basis entry's guaranteed interval over the input domain
        self.basis_low, self.basis_high = (np.array(v, dtype=np.float64) for v in domain)
        self.fits: list[Fit] = []
        self.box = domain
        # the inputs are encrypted at the top level, where the whole modulus chain holds
        # them: only values computed from them size the first modulus
        self.value_bound = 0.0
        self.output_bound = 0.0
        self.input_count = rows.shape[1]
        self.stages: list[PolyStage] = []
        self.layer_errors: list[tuple[str, float]] = []
        self.values: dict[str, Value] = {}
        # constants holding a NaN or an infinity -> where the first one appeared
        self.nonfinite: dict[str, str] = {}
        self.class_labels: tuple[str, ...] = ()

    # ----- driver -----

    def run(self) -> tuple[HEPlan, Tail]:
        for init in self.graph.initializer:
            self.values[init.name] = numpy_helper.to_array(init)
            if not _finite(self.values[init.name]):
                self.nonfinite[init.name] = f"initializer {init.name!r}"
        inputs = [i for i in self.graph.input if i.name not in self.values]
        if len(inputs) != 1:
            raise Unsupported(f"the model must have exactly one data input, it has "
                              f"{[i.name for i in inputs]}")
        for node in self.graph.node:  # refuse what can never work before looking at shapes
            if node.op_type in _SUGGESTIONS:
                raise Unsupported(f"node {node.name!r}: operator {node.op_type} cannot be "
                                  f"evaluated under encryption{_hint(node)}")
        shape = self._input_shape(inputs[0])
        self.values[inputs[0].name] = Affine(as_weights(sparse.identity(self.input_count)),
                                             np.zeros(self.input_count), shape)
        for node in self.graph.node:
            self._visit(node)
        return self._finish()

    def _input_shape(self, value_info: onnx.ValueInfoProto) -> tuple[int, ...]:
        tensor = value_info.type.tensor_type
        if tensor.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            raise Unsupported(f"input {value_info.name!r} must be a float tensor")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if len(dims) < 2:
            raise Unsupported(f"input {value_info.name!r} has rank {len(dims)}; the first "
                              f"dimension must be the rows")
        row_dims = dims[1:]
        if len(row_dims) == 1 and row_dims[0] is None:
            row_dims = [self.input_count]
        if any(d is None for d in row_dims):
            raise Unsupported(f"input {value_info.name!r} has dynamic dimensions {dims[1:]} "
                              f"besides the rows; export it with a fixed per-row shape")
        shape = tuple(int(d) for d in row_dims if d is not None)
        if int(np.prod(shape)) > MAX_INPUT_FEATURES:
            raise Unsupported(f"input {value_info.name!r} has {int(np.prod(shape))} features: "
                              f"slot-per-sample packing uploads one ciphertext per feature; "
                              f"this engine takes up to {MAX_INPUT_FEATURES} (downsample the "
                              f"input in the model)")
        if int(np.prod(shape)) != self.input_count:
            raise Unsupported(f"input {value_info.name!r} has {int(np.prod(shape))} features "
                              f"(shape {list(shape)}) but the listing/calibration data has "
                              f"{self.input_count} columns")
        return shape

    def _visit(self, node: onnx.NodeProto) -> None:
        args = [self.values.get(name) if name else None for name in node.input]
        missing = [n for n, a in zip(node.input, args, strict=True) if n and a is None]
        if missing:
            raise Unsupported(f"node {node.name!r} ({node.op_type}) reads undefined {missing}")
        if all(isinstance(a, np.ndarray) or a is None for a in args) and (
                node.op_type not in _ROW_SHAPE_HANDLERS):
            outputs = self._fold_constant(node, args)
        elif node.op_type in _HANDLERS:
            outputs = _HANDLERS[node.op_type](self, node, args)
        elif node.op_type in AFFINE_OPS:
            outputs = self._probe(node, args)
        else:
            raise Unsupported(f"node {node.name!r}: operator {node.op_type} cannot be "
                              f"evaluated under encryption by this engine{_hint(node)}")
        for name, value in zip(node.output, outputs, strict=False):
            if not name:
                continue
            if isinstance(value, Affine | Deferred):
                base = value if isinstance(value, Affine) else value.base
                if not (_finite(base.weights.data) and _finite(base.bias)):
                    raise self._nonfinite(node)
            elif isinstance(value, np.ndarray) and not _finite(value):
                self.nonfinite[name] = next(
                    (self.nonfinite[i] for i in node.input if i in self.nonfinite),
                    f"node {node.name!r} ({node.op_type})")
            self.values[name] = value

    def _nonfinite(self, node: onnx.NodeProto) -> Unsupported:
        """The refusal of a node whose encrypted output would hold a NaN or an infinity."""
        causes = [f"its input {name!r} is not finite (first at {self.nonfinite[name]})"
                  for name in node.input if name in self.nonfinite]
        return Unsupported(f"node {node.name!r} ({node.op_type}) gives NaN or infinite values"
                           f"{': ' + causes[0] if causes else ''}; an HE plan must be finite "
                           f"everywhere (a division by zero, or a NaN or infinite constant in "
                           f"the model?)")

    def _fold_constant(self, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
        if node.op_type == "Constant":
            attribute = node.attribute[0]
            return [numpy_helper.to_array(attribute.t) if attribute.name == "value"
                    else np.array(helper.get_attribute_value(attribute))]
        try:
            feeds = {n: a for n, a in zip(node.input, args, strict=True) if n}
            return list(self._evaluator(node, feeds).run(None, feeds))
        except Exception as exc:
            raise Unsupported(f"node {node.name!r} ({node.op_type}) on constants: {exc}") from exc

    def _evaluator(self, node: onnx.NodeProto, inputs: Iterable[str]) -> ReferenceEvaluator:
        """A float64 reference evaluator for this one node (in the model's opsets)."""
        graph = helper.make_graph(
            [node], "probe",
            [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)
             for name in inputs],
            [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)
             for name in node.output if name])
        probe = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        return ReferenceEvaluator(probe)

    def _finish(self) -> tuple[HEPlan, Tail]:
        probability: tuple[str, Affine | Deferred] | None = None
        label_output = ""
        for out in self.graph.output:
            value = self.values.get(out.name)
            if isinstance(value, Affine | Deferred) and probability is None:
                probability = (out.name, value)
            elif isinstance(value, Labels) and not label_output:
                label_output = out.name
                self.class_labels = value.class_labels or self.class_labels
        if probability is None:
            raise Unsupported("the model has no numeric output computed from its input")
        name, value = probability
        base, ops = self._tail(value)
        weights = self._pad(base.weights)
        low, high = self.interval(weights, base.bias)
        self.output_bound = float(np.abs(np.concatenate([low, high])).max(initial=0.0))
        plan = HEPlan(self.input_count, tuple(self.stages), OutputStage(
            weights, base.bias.copy())).with_input_encoding(*input_encoding(*self.box))
        plan.check()
        labels = self.class_labels
        if not labels and base.features > 1:
            labels = tuple(str(i) for i in range(base.features))
        return plan, Tail(ops, labels, name, label_output)

    def _tail(self, value: Affine | Deferred) -> tuple[Affine, tuple[str, ...]]:
        """Split the output into what runs encrypted and the exact tail the buyer applies;
        parametrized activations before the tail's first exact op are materialized."""
        if isinstance(value, Affine):
            return value, ()
        ops = list(value.ops)
        exact: list[str] = []
        while ops:
            last = ops[-1]
            name = last if isinstance(last, str) else last.tail_name
            if name is None:
                break
            exact.insert(0, name)
            ops.pop()
        base = value.base
        for op in ops:
            assert isinstance(op, Activation)  # row-wise ops are always tail ops
            base = self._materialize(base, op, value.origin)
        return base, tuple(exact)

    # ----- values -----

    def _pad(self, weights: Weights) -> Weights:
        """`weights` widened to the current basis (entries added since are not used)."""
        return as_weights(weights, columns=self.basis_values.shape[1])

    def trunk(self, node: onnx.NodeProto, value: Value) -> Affine:
        """The value as an affine map of the basis, materializing deferred activations."""
        if isinstance(value, Affine):
            return value
        if isinstance(value, Deferred):
            current = value.base
            for op in value.ops:
                if not isinstance(op, Activation):
                    raise Unsupported(f"node {node.name!r} ({node.op_type}) consumes the "
                                      f"output of {op} from node {value.origin!r}; only "
                                      f"elementwise activations can be evaluated mid-network")
                current = self._materialize(current, op, value.origin)
            return current
        raise Unsupported(f"node {node.name!r} ({node.op_type}) needs a numeric tensor input")

    def interval(self, weights: Weights, bias: FloatArray) -> tuple[FloatArray, FloatArray]:
        """The guaranteed (low, high) of weights @ basis + bias over the input domain."""
        weights = self._pad(weights)
        center = weights @ ((self.basis_low + self.basis_high) / 2) + bias
        radius = abs(weights) @ ((self.basis_high - self.basis_low) / 2)
        low, high = center - radius, center + radius
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise Unsupported("a layer's values are unbounded over the input domain (infinite "
                              "or NaN weights?); check the model's constants")
        return low, high

    def _materialize(self, z: Affine, activation: Activation, origin: str) -> Affine:
        weights = self._pad(z.weights)
        if activation.name == "square":  # exact: u*u joins the basis as it is
            return self._add_stage(PolyStage(weights, z.bias.copy(), 2,
                                             f"square at {origin!r}: exact", "square"),
                                   np.ones((z.features, 1)), np.zeros(z.features), z.shape)
        pre = (weights @ self.basis_values.T).T + z.bias  # calibration values of the inputs
        lo, hi = self.interval(weights, z.bias)
        own = _Normalization((hi + lo) / 2, np.maximum((hi - lo) / 2 * (1 + RANGE_GUARD), 1e-3),
                             np.ones(z.features), np.ones(z.features), np.zeros(z.features))
        target = activation.evaluate(pre)
        fitted = self._fit(activation, pre, target, own, _shared(activation, lo, hi))
        degree, coeffs, offset, error, norm = fitted
        if not (_finite(target) and _finite(coeffs)):
            raise Unsupported(f"{activation.name} at {origin!r} gives NaN or infinite values on "
                              f"its guaranteed range (from {float(lo.min()):.3g} to "
                              f"{float(hi.max()):.3g}); an HE plan must be finite everywhere "
                              f"(check the activation's parameters)")
        grid = np.linspace(-1.0, 1.0, WORST_CASE_POINTS)[:, None] * np.ones(z.features)
        on_grid = norm.sign * (norm.mid + grid * norm.half)
        worst = float(np.abs(norm.scale * _chebyshev_values(grid, coeffs) - offset
                             + norm.linear * on_grid - activation.evaluate(on_grid)).max())
        seen = (pre.max(axis=0) - pre.min(axis=0)) / 2
        widening = float(np.median(norm.half / np.maximum(seen, 1e-9 * norm.half)))
        name = f"{activation.name} at {origin!r}"
        self.layer_errors.append((name, error))
        self.fits.append(Fit(name, degree, error, worst, widening))
        series = _is_series(degree, z.features)
        label = (f"{name}: Chebyshev {'series ' if series else ''}degree {degree} (max error "
                 f"{error:.1e}; guaranteed ranges {widening:.1f}x the rows')")
        stage_weights = as_weights(sparse.diags_array(norm.sign / norm.half) @ weights)
        bias = (norm.sign * z.bias - norm.mid) / norm.half
        if series:
            # the shared series at the units' largest scale: CKKS adds its error to the
            # series' values, which the next layer would otherwise multiply by each scale
            amplitude = float(norm.scale.max())
            stage = PolyStage(stage_weights, bias, degree, label, "series",
                              amplitude * coeffs.T)
            out = self._add_stage(stage, norm.scale[:, None] / amplitude, -offset, z.shape)
        else:
            out = self._add_stage(PolyStage(stage_weights, bias, degree, label),
                                  coeffs[1:].T * norm.scale[:, None],
                                  coeffs[0] * norm.scale - offset, z.shape)
        if not np.any(norm.linear):
            return out
        # flipped units: f(z) = linear * z + f(-z), and the stage computes f(-z)
        return Affine(as_weights(out.weights + sparse.diags_array(norm.linear)
                                 @ self._pad(weights)), out.bias + norm.linear * z.bias,
                      z.shape)

    def product(self, a: Affine, b: Affine, origin: str) -> Affine:
        """a * b elementwise, exactly: ((a + b)^2 - (a - b)^2) / 4, one squaring level."""
        wa, wb = self._pad(a.weights), self._pad(b.weights)
        squares = self._add_stage(
            PolyStage(as_weights(sparse.vstack([wa + wb, wa - wb])),
                      np.concatenate([a.bias + b.bias, a.bias - b.bias]), 2,
                      f"product at {origin!r}: exact ((a+b)^2 - (a-b)^2)/4", "square"),
            np.ones((2 * a.features, 1)), np.zeros(2 * a.features), a.shape)
        n = a.features
        return Affine(as_weights(0.25 * (squares.weights[:n] - squares.weights[n:])),
                      np.zeros(n), a.shape)

    def _fit(self, activation: Activation, pre: FloatArray, target: FloatArray,
             own: _Normalization, shared: _Normalization | None) -> _Fitted:
        """Chebyshev interpolants of every unit's function on its interval: the fixed degree,
        or the smallest whose error on the seller's rows is within the local bound (when
        none is, the smallest within 5% of the least error). A series (degree above
        MAX_BASIS_DEGREE, or a basis too big) is one polynomial for all units where `shared`
        gives one."""
        if self.fixed_degrees is not None:
            if not self.fixed_degrees:
                raise Unsupported("more approximated activations than fixed degrees")
            degrees: Sequence[int] = (self.fixed_degrees.pop(0),)
        else:
            degrees = (self.degree,) if self.degree is not None else DEGREES
        bound = self.local_bound
        tried: list[_Fitted] = []
        for degree in degrees:
            norm = shared if shared is not None and _is_series(degree, pre.shape[1]) else own
            nodes = np.polynomial.chebyshev.chebpts1(degree + 1)
            samples = activation.evaluate(norm.mid + np.outer(nodes, norm.half)) / norm.scale
            if norm is shared:
                samples = samples[:, :1]  # the same function for every unit (`_shared`)
            coeffs = np.polynomial.chebyshev.chebvander(nodes, degree).T @ samples
            coeffs[0] /= degree + 1
            coeffs[1:] /= (degree + 1) / 2
            # rounding noise (e.g. an odd function's even terms) is zero: below CKKS's
            # resolution, it would only cost a series term or a packed plaintext
            coeffs[np.abs(coeffs) < NEGLIGIBLE * np.abs(coeffs).max(axis=0)] = 0.0
            coeffs = np.broadcast_to(coeffs, (degree + 1, pre.shape[1])).copy()
            u = (norm.sign * pre - norm.mid) / norm.half
            residual = norm.scale * _chebyshev_values(u, coeffs) + norm.linear * pre - target
            # a kink's interpolant errs to one side near it: without its mean on the rows,
            # every unit's error adds up in the next layer
            offset = residual.mean(axis=0)
            error = float(np.abs(residual - offset).max())
            tried.append(_Fitted(degree, coeffs, offset, error, norm))
            if bound is not None and error <= bound:
                return tried[-1]
        return _cheapest_near_best(tried, [fit.error for fit in tried])

    def _add_stage(self, stage: PolyStage, combine: FloatArray, constant: FloatArray,
                   shape: tuple[int, ...]) -> Affine:
        """Append `stage`; the activation's output per unit i is
        constant[i] + combine[i] . (the entries unit i adds)."""
        offset = self.basis_values.shape[1]
        u = (stage.weights @ self.basis_values.T).T + stage.bias
        low, high = self.interval(stage.weights, stage.bias)
        self.basis_values = np.concatenate([self.basis_values, stage.entries(u)], axis=1)
        self.value_bound = max(self.value_bound, float(np.abs([low, high]).max(initial=0.0)))
        if stage.kind == "square":  # u*u lies in [0, max u^2], or [min u^2, ...] off zero
            top = np.maximum(low * low, high * high)
            bottom = np.where((low > 0) | (high < 0), np.minimum(low * low, high * high), 0.0)
        elif stage.coefficients is not None:
            bottom, top = _series_range(stage.coefficients)
        else:  # |u| <= 1 by construction, so |T_k(u)| <= 1
            bottom, top = np.full(stage.units * stage.degree, -1.0), np.ones(
                stage.units * stage.degree)
        self.basis_low = np.concatenate([self.basis_low, bottom])
        self.basis_high = np.concatenate([self.basis_high, top])
        self.stages.append(stage)
        units, width = stage.units, stage.width
        rows = np.repeat(np.arange(units), width)
        columns = offset + np.arange(units * width)  # unit-major, as the entries are laid out
        out = sparse.csr_array((np.asarray(combine, dtype=np.float64).reshape(-1),
                                (rows, columns)), shape=(units, self.basis_values.shape[1]))
        return Affine(as_weights(out), constant.copy(), shape)

    def _probe(self, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
        """The exact affine map of `node` in its encrypted inputs, measured in float64."""
        if node.op_type == "Div" and len(args) > 1 and isinstance(args[1], Affine | Deferred):
            raise Unsupported(f"node {node.name!r} (Div) divides by an encrypted tensor; only "
                              f"division by constants can be evaluated under encryption (1/y "
                              f"is no polynomial of y: use multiplication by a constant)")
        encrypted = {i: self.trunk(node, a) for i, a in enumerate(args)
                     if isinstance(a, Affine | Deferred)}
        constants = {node.input[i]: np.asarray(a, dtype=np.float64)
                     if np.asarray(a).dtype.kind == "f" else np.asarray(a)
                     for i, a in enumerate(args) if i not in encrypted and a is not None}
        names = [node.input[i] for i in encrypted]
        evaluator = self._evaluator(node, [*constants, *names])

        def run(batches: Mapping[int, FloatArray]) -> list[FloatArray]:
            """Outputs as (rows, *per-row shape) arrays."""
            feeds = dict(constants)
            for i, value in batches.items():
                feeds[node.input[i]] = value.reshape(-1, *encrypted[i].shape)
            try:
                outputs = evaluator.run(None, feeds)
            except Exception as exc:
                raise Unsupported(f"node {node.name!r} ({node.op_type}) cannot be evaluated "
                                  f"on rows of shape "
                                  f"{[list(a.shape) for a in encrypted.values()]}: {exc}") from exc
            rows = next(iter(batches.values())).shape[0]
            arrays = [np.asarray(out, dtype=np.float64) for out in outputs]
            if any(out.ndim == 0 or out.shape[0] != rows for out in arrays):
                raise Unsupported(f"node {node.name!r} ({node.op_type}) mixes rows: each row "
                                  f"must be computed from that row alone")
            if not all(_finite(out) for out in arrays):
                raise self._nonfinite(node)
            return arrays

        at_zero = run({i: np.zeros((1, a.features)) for i, a in encrypted.items()})
        base: list[FloatArray] = [out.reshape(1, -1) for out in at_zero]
        shapes = [tuple(int(d) for d in out.shape[1:]) for out in at_zero]
        maps: list[list[Weights]] = []  # [encrypted input][output]: (out features, in features)
        for i, a in encrypted.items():
            chunks: list[list[Weights]] = [[] for _ in base]
            for start in range(0, a.features, PROBE_CHUNK):
                count = min(PROBE_CHUNK, a.features - start)
                probes: dict[int, FloatArray] = {j: np.zeros((count, b.features))
                                                 for j, b in encrypted.items()}
                probes[i][np.arange(count), start + np.arange(count)] = 1.0
                for o, out in enumerate(run(probes)):
                    chunks[o].append(as_weights((out.reshape(count, -1) - base[o]).T))
            maps.append([as_weights(sparse.hstack(c, format="csr")) for c in chunks])
        self._check_affine(node, encrypted, base, maps, run)
        results: list[Value] = []
        for o, bias in enumerate(base):
            weights = as_weights((bias.shape[1], self.basis_values.shape[1]))
            offset = bias[0].copy()
            for k, a in enumerate(encrypted.values()):
                weights = weights + maps[k][o] @ self._pad(a.weights)
                offset += maps[k][o] @ a.bias
            results.append(Affine(as_weights(weights), offset, shapes[o]))
        return results

    def _check_affine(self, node: onnx.NodeProto, encrypted: dict[int, Affine],
                      base: Sequence[FloatArray], maps: Sequence[Sequence[Weights]],
                      run: Callable[[Mapping[int, FloatArray]], list[FloatArray]]) -> None:
        rng = np.random.default_rng(0)
        probes: dict[int, FloatArray] = {i: rng.normal(size=(3, a.features))
                                         for i, a in encrypted.items()}
        for o, out in enumerate(run(probes)):
            predicted = base[o] + sum((maps[k][o] @ probes[i].T).T
                                      for k, i in enumerate(encrypted))
            flat = out.reshape(3, -1)
            scale = max(float(np.abs(flat).max()), 1.0)
            if not float(np.abs(flat - predicted).max()) <= 1e-6 * scale:  # NaN: not affine
                raise Unsupported(f"node {node.name!r} ({node.op_type}) is not affine in its "
                                  f"encrypted input (e.g. it multiplies two encrypted "
                                  f"tensors); only x*x and affine layers are supported")


@dataclass(frozen=True)
class _Normalization:
    """Per unit: sign * x = mid + half * u, and f(x) = scale * p(u) + linear * x with p
    fitted on |u| <= 1 (sign -1: a unit flipped, see `_shared`)."""

    mid: FloatArray
    half: FloatArray
    scale: FloatArray
    sign: FloatArray
    linear: FloatArray


class _Fitted(NamedTuple):
    degree: int
    coefficients: FloatArray  # (degree + 1, units)
    offset: FloatArray  # per unit: f = scale * p(u) - offset
    error: float  # max |f - approximation| on the seller's rows
    normalization: _Normalization


HOMOGENEITY_POINTS = 33
# the common domains [-a, 1] tried for a shared polynomial (see `_shared`)
SHARED_LEFT_ENDS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05)


def _shared(activation: Activation, low: FloatArray, high: FloatArray
            ) -> _Normalization | None:
    """A normalization under which every unit's function is one function p on [-1, 1]:
    each unit's range inside [-a s_i, s_i] for one a, and f_i(s_i v) = s_i^k q(v) (relu,
    leaky relu, |.|: k = 1; a tree's steps, which scale with their reach: k = 0, a = 1);
    None for other functions. One polynomial for all units is what lets feature packing
    evaluate a series stage as one ciphertext. Where f(z) - f(-z) is linear (relu: z), a
    unit whose range suits [-a, 1] better mirrored is flipped: f(z) = linear * z + f(-z).
    The a chosen is the one with the least sum of s_i sqrt(a) over units whose range holds
    the kink at 0: a degree-n fit of a kink at t in [-1, 1] errs by about sqrt(1 - t^2) / n
    (over [-a s, s], with t = (a - 1)/(a + 1), s sqrt(a)); sqrt(-low high) is what a unit's
    own fit pays, and a lopsided unit pays up to ~2x that."""
    guarded_low, guarded_high = low * (1 + RANGE_GUARD), high * (1 + RANGE_GUARD)
    kinked = (low < 0) & (high > 0)
    slope = _odd_slope(activation, np.maximum(guarded_high, -guarded_low))

    def oriented(a: float) -> tuple[FloatArray, FloatArray]:
        """Per unit: the sign that fits it best into [-a s, s], and its s."""
        scale = np.maximum(np.maximum(guarded_high, -guarded_low / a), 1e-3)
        mirrored = np.maximum(np.maximum(-guarded_low, guarded_high / a), 1e-3)
        flip = (mirrored < scale) if slope is not None else np.zeros(len(low), dtype=bool)
        return np.where(flip, -1.0, 1.0), np.where(flip, mirrored, scale)

    def cost(a: float) -> float:
        return float(np.sum(oriented(a)[1][kinked]) * a**0.5)

    grid = np.linspace(-1.0, 1.0, HOMOGENEITY_POINTS)[:, None]
    for a in sorted(SHARED_LEFT_ENDS, key=cost):
        sign, scale = oriented(a)
        mid, half = scale * (1 - a) / 2, scale * (1 + a) / 2
        values = activation.evaluate(mid + grid * half)
        for k in (1, 0):
            common = values / scale**k
            if np.allclose(common, common[:, :1], rtol=1e-9, atol=1e-12):
                linear = np.where(sign < 0, slope or 0.0, 0.0)
                return _Normalization(mid, half, scale**k, sign, linear)
    return None


def _odd_slope(activation: Activation, reach: FloatArray) -> float | None:
    """The one c with f(z) - f(-z) = c z for every unit on its reach (relu: 1, leaky relu
    with slope s: 1 + s, |.|: 0), or None."""
    grid = np.linspace(-1.0, 1.0, HOMOGENEITY_POINTS)[:, None] * reach
    odd = activation.evaluate(grid) - activation.evaluate(-grid)
    slope = float(np.sum(odd[:, 0] * grid[:, 0]) / max(np.sum(grid[:, 0] ** 2), 1e-300))
    if not np.allclose(odd, slope * grid, rtol=1e-9, atol=1e-12 * float(reach.max())):
        return None
    return slope


def _series_range(coefficients: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Per unit, an interval holding sum_k c_k T_k(u) for every |u| <= 1: its extremes on
    8(D+1) Chebyshev points, widened by 3% (on that many points a degree-D polynomial's
    deviation from any constant is within 1/cos(pi/16) = 1.02 of its deviation on them)."""
    degree = coefficients.shape[1] - 1
    grid = np.polynomial.chebyshev.chebpts1(8 * (degree + 1))[:, None] * np.ones(
        coefficients.shape[0])
    values = chebyshev_series(grid, coefficients)
    center, radius = (values.max(axis=0) + values.min(axis=0)) / 2, (
        values.max(axis=0) - values.min(axis=0)) / 2
    return center - 1.03 * radius - 1e-12, center + 1.03 * radius + 1e-12


def _chebyshev_values(u: FloatArray, coeffs: FloatArray) -> FloatArray:
    """sum_k coeffs[k, i] T_k(u[:, i]) for every unit i (u: (n, units))."""
    previous, current = np.ones_like(u), u
    total = coeffs[0] * previous + (coeffs[1] * current if len(coeffs) > 1 else 0.0)
    for k in range(2, len(coeffs)):
        previous, current = current, 2 * u * current - previous
        total = total + coeffs[k] * current
    result: FloatArray = total
    return result


# ----- operators with their own meaning -----

Handler = Callable[[_Tracer, onnx.NodeProto, list[Value]], list[Value]]


def _defer(t: _Tracer, node: onnx.NodeProto, value: Value, op: Activation | str) -> Deferred:
    if isinstance(value, Deferred):
        return Deferred(value.base, (*value.ops, op), value.origin)
    return Deferred(t.trunk(node, value), (op,), node.name or node.op_type)


def _elementwise(name: str) -> Handler:
    """A continuous elementwise activation; its constant inputs (slopes, bounds) stay with
    the node, which is evaluated as it is wherever the function is needed."""
    def handler(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
        value = args[0]
        if not isinstance(value, Affine | Deferred) or any(
                a is not None and not isinstance(a, np.ndarray) for a in args[1:]):
            raise Unsupported(f"node {node.name!r} ({node.op_type}) needs one encrypted input "
                              f"and constant parameters")
        shape = value.shape
        # float constants in float64, like the probe rows (Max/Min refuse mixed types)
        constants = {node.input[i]: np.asarray(a, dtype=np.float64)
                     if np.asarray(a).dtype.kind == "f" else a
                     for i, a in enumerate(args) if i and a is not None}
        evaluator = t._evaluator(node, [node.input[0], *constants])

        def evaluate(values: FloatArray) -> FloatArray:
            feeds = {node.input[0]: values.reshape(-1, *shape), **constants}
            try:
                outputs: list[Any] = list(evaluator.run(None, feeds))
            except Exception as exc:
                raise Unsupported(f"node {node.name!r} ({node.op_type}) cannot be evaluated "
                                  f"on rows of shape {list(shape)}: {exc}") from exc
            result = np.asarray(outputs[0], dtype=np.float64)
            return result.reshape(values.shape)

        exact = name in TAIL_OPS and not constants and not node.attribute
        return [_defer(t, node, value, Activation(name, evaluate, exact))]
    return handler


def _encrypted_pair(t: _Tracer, node: onnx.NodeProto, args: list[Value]
                    ) -> tuple[Affine, Affine] | None:
    """The node's two encrypted inputs (a merge of two branches), or None if it has one."""
    encrypted = [a for a in args if isinstance(a, Affine | Deferred)]
    if len(encrypted) < 2:
        return None
    if len(encrypted) > 2 or len(args) > 2:
        raise Unsupported(f"node {node.name!r} ({node.op_type}) combines {len(args)} inputs; "
                          f"only two encrypted tensors can be merged")
    a, b = (t.trunk(node, v) for v in encrypted)
    if a.shape != b.shape:
        raise Unsupported(f"node {node.name!r} ({node.op_type}) combines encrypted tensors "
                          f"shaped {list(a.shape)} and {list(b.shape)}; they must have the "
                          f"same shape (no broadcasting between encrypted tensors)")
    return a, b


def _mul(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    if node.input[0] == node.input[1]:
        return [_defer(t, node, args[0], SQUARE)]
    pair = _encrypted_pair(t, node, args)
    if pair is None:
        return t._probe(node, args)
    return [t.product(*pair, node.name or node.op_type)]


ABS = Activation("abs", np.abs)
RELU = Activation("relu", TAIL_OPS["relu"], exact_tail=True)


def _extremum(sign: float) -> Handler:
    """Max (sign +1) or Min (-1) of two encrypted tensors, as (a + b)/2 +- |a - b|/2 with
    |.| a Chebyshev polynomial on the guaranteed range of a - b; of one encrypted tensor
    and constants, an elementwise activation like any other."""
    def handler(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
        if sum(a is not None for a in args) == 1:
            return [args[0]]  # the extremum of one tensor is that tensor
        pair = _encrypted_pair(t, node, args)
        if pair is None:
            first = next((i for i, a in enumerate(args) if isinstance(a, Affine | Deferred)),
                         0)
            if first:  # Max and Min are symmetric: the encrypted input goes first
                order = [first, *(i for i in range(len(args)) if i != first)]
                args = [args[i] for i in order]
                node = helper.make_node(node.op_type, [node.input[i] for i in order],
                                        list(node.output), node.name)
            constants = [np.asarray(a) for a in args[1:] if a is not None]
            if (sign > 0 and len(constants) == 1 and constants[0].size == 1
                    and float(constants[0].reshape(-1)[0]) == 0.0
                    and isinstance(args[0], Affine | Deferred)):
                # Max(x, 0) is Relu: exact in the tail, approximated like it mid-network
                return [_defer(t, node, args[0], RELU)]
            return _elementwise(node.op_type.lower())(t, node, args)
        a, b = pair
        origin = node.name or node.op_type
        gap = t._materialize(Affine(as_weights(t._pad(a.weights) - t._pad(b.weights)),
                                    a.bias - b.bias, a.shape), ABS, origin)
        weights = 0.5 * (t._pad(a.weights) + t._pad(b.weights)) + sign * 0.5 * gap.weights
        return [Affine(as_weights(weights), 0.5 * (a.bias + b.bias) + sign * 0.5 * gap.bias,
                       a.shape)]
    return handler


# nondecreasing functions: max(f(a), f(b)) = f(max(a, b)), so they move past a max pool
MONOTONE = frozenset({"relu", "tanh", "sigmoid"})


def _max_pool(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    """MaxPool and GlobalMaxPool as a tournament of pairwise maxima, max(a, b) =
    (a + b)/2 + |a - b|/2: each round is one |.| stage for every pair of every window, so a
    window of k values costs ceil(log2 k) rounds. A monotone activation before the pool is
    applied after it (relu(max(a, b)) = max(relu a, relu b)): one unit per window."""
    if len(node.output) > 1 and node.output[1]:
        raise Unsupported(f"node {node.name!r} ({node.op_type}): its Indices output (where "
                          f"each maximum is) cannot be computed under encryption; export "
                          f"the model without return_indices")
    value: Value = args[0]
    ops: tuple[Activation, ...] = ()
    if isinstance(value, Deferred) and all(
            isinstance(op, Activation) and op.tail_name in MONOTONE for op in value.ops):
        # the same functions on the pooled shape
        ops = tuple(Activation(op.name, TAIL_OPS[op.name], True)
                    for op in value.ops if isinstance(op, Activation))
        value = value.base
    a = t.trunk(node, value)
    windows, shape = _pool_windows(t, node, a)
    origin = node.name or node.op_type
    weights, bias = t._pad(a.weights), a.bias
    rounds = int(np.ceil(np.log2(max(len(w) for w in windows))))
    for number in range(1, rounds + 1):
        pairs: list[tuple[int, int]] = []
        carried: list[int] = []
        for w in windows:
            pairs += [(w[k], w[k + 1]) for k in range(0, len(w) - 1, 2)]
            carried += w[-1:] if len(w) % 2 else []
        first, second, keep = (_selection(rows, bias.size) for rows in (
            [p[0] for p in pairs], [p[1] for p in pairs], carried))
        gap = t._materialize(Affine(as_weights((first - second) @ weights),
                                    (first - second) @ bias, (len(pairs),)),
                             ABS, f"{origin}, round {number} of {rounds}")
        weights = t._pad(weights)
        weights = as_weights(sparse.vstack([0.5 * (first + second) @ weights + 0.5 * gap.weights,
                                            keep @ weights]))
        bias = np.concatenate([0.5 * (first + second) @ bias + 0.5 * gap.bias, keep @ bias])
        # the same windows, now over the round's maxima (in pair order), then the carried
        paired, kept, renumbered = 0, len(pairs), []
        for w in windows:
            halves = len(w) // 2
            renumbered.append(list(range(paired, paired + halves))
                              + ([kept] if len(w) % 2 else []))
            paired, kept = paired + halves, kept + len(w) % 2
        windows = renumbered
    pick = _selection([w[0] for w in windows], bias.size)
    pooled = Affine(as_weights(pick @ weights), pick @ bias, shape)
    return [Deferred(pooled, ops, origin) if ops else pooled]


def _selection(rows: Sequence[int], columns: int) -> Weights:
    """The 0/1 matrix whose row i picks entry rows[i]."""
    return as_weights(sparse.csr_array((np.ones(len(rows)), (np.arange(len(rows)), rows)),
                                       shape=(len(rows), columns)))


def _pool_windows(t: _Tracer, node: onnx.NodeProto, a: Affine
                  ) -> tuple[list[list[int]], tuple[int, ...]]:
    """Which input entries each output of the pool takes the maximum of, and the output's
    per-row shape, read from the node itself: a row of -1 with a single 1 at entry j has
    maximum 1 exactly in the windows that hold j (padding never wins in MaxPool)."""
    evaluator = t._evaluator(node, [node.input[0]])
    members: list[Weights] = []
    shape: tuple[int, ...] = ()
    for start in range(0, a.features, PROBE_CHUNK):
        count = min(PROBE_CHUNK, a.features - start)
        probes = -np.ones((count, a.features))
        probes[np.arange(count), start + np.arange(count)] = 1.0
        feeds = {node.input[0]: probes.reshape(count, *a.shape)}
        try:
            outputs: list[Any] = list(evaluator.run(None, feeds))
            out = np.asarray(outputs[0], dtype=np.float64)
        except Exception as exc:
            raise Unsupported(f"node {node.name!r} ({node.op_type}) cannot be evaluated on "
                              f"rows of shape {list(a.shape)}: {exc}") from exc
        shape = tuple(int(d) for d in out.shape[1:])
        members.append(as_weights(out.reshape(count, -1).T > 0))
    membership = as_weights(sparse.hstack(members, format="csr"))
    windows = [list(membership.indices[membership.indptr[o]:membership.indptr[o + 1]])
               for o in range(membership.shape[0])]
    if any(not w for w in windows):
        raise Unsupported(f"node {node.name!r} ({node.op_type}) has a window of padding "
                          f"only; pad less")
    return windows, shape


def _exact_activations(value: Value) -> tuple[str, ...] | None:
    """The names of a deferred value's ops if every one is an elementwise activation the
    buyer applies exactly (the same function for every unit: no per-unit constants)."""
    if not isinstance(value, Deferred) or not all(
            isinstance(op, Activation) and op.tail_name for op in value.ops):
        return None
    return tuple(op.name for op in value.ops if isinstance(op, Activation))


def _sub(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    """1 - sigmoid(z) = sigmoid(-z): the [1 - p, p] that skl2onnx writes for binary
    classifiers stays in the exact tail instead of evaluating the sigmoid twice."""
    one, value = args
    if (isinstance(one, np.ndarray) and one.size == 1 and float(one.reshape(-1)[0]) == 1.0
            and isinstance(value, Deferred) and one.ndim <= len(value.shape) + 1
            and _exact_activations(value) == ("sigmoid",)):
        base = value.base
        return [Deferred(Affine(as_weights(-base.weights), -base.bias, base.shape),
                         value.ops, node.name or node.op_type)]
    return t._probe(node, args)


def _concat(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    """Tensors that all end in the same exact activations are concatenated before it, so
    the activations stay in the tail (they are the same function for every unit)."""
    names = {_exact_activations(a) for a in args}
    if len(names) == 1 and (chain := names.pop()):
        (moved,) = t._probe(node, [a.base for a in args])
        ops = tuple(Activation(name, TAIL_OPS[name], exact_tail=True) for name in chain)
        return [Deferred(moved, ops, node.name or node.op_type)]
    return t._probe(node, args)


def _pow(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    exponent = np.asarray(args[1]).reshape(-1)
    if exponent.size != 1 or float(exponent[0]) not in (1.0, 2.0):
        raise Unsupported(f"node {node.name!r} (Pow): only exponent 2 is supported")
    return [args[0] if float(exponent[0]) == 1.0 else
            _defer(t, node, args[0], SQUARE)]


def _row_op(name: str) -> Handler:
    """Softmax-like operations over a row: only as part of the output tail."""
    def handler(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
        shape = args[0].shape if isinstance(args[0], Affine | Deferred) else ()
        axis = _attr(node, "axis", -1)
        if len(shape) != 1 or axis not in (-1, 1):
            raise Unsupported(f"node {node.name!r} ({node.op_type}) over axis {axis} of rows "
                              f"shaped {list(shape)}; only over the features of flat rows")
        op = name
        if node.op_type == "Normalizer":
            norm = _attr(node, "norm", b"MAX")
            op = (norm.decode() if isinstance(norm, bytes) else str(norm)).lower()
        return [_defer(t, node, args[0], op)]
    return handler


def _keep_deferred(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    """Identity-like ops keep a deferred tail (or labels) as it is."""
    value = args[0]
    if isinstance(value, Labels | Deferred):
        if node.op_type == "Cast" and isinstance(value, Deferred) and _attr(
                node, "to", onnx.TensorProto.FLOAT) not in _FLOAT_TYPES:
            raise Unsupported(f"node {node.name!r} (Cast) to a non-float type on encrypted "
                              f"data")
        return [value]
    if node.op_type == "Cast" and _attr(node, "to", onnx.TensorProto.FLOAT) not in _FLOAT_TYPES:
        raise Unsupported(f"node {node.name!r} (Cast) to a non-float type on encrypted data")
    return [value] if node.op_type == "Cast" else t._probe(node, args)


def _reshape(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    """Reshapes act on the affine base; elementwise activations commute with them."""
    value = args[0]
    if isinstance(value, Labels):
        return [value]
    if isinstance(value, Deferred) and all(isinstance(op, Activation) for op in value.ops):
        (moved,) = t._probe(node, [value.base, *args[1:]])
        return [Deferred(moved, value.ops, value.origin)]
    if isinstance(value, Deferred):  # row-wise tail ops: only a flattening is harmless
        (moved,) = t._probe(node, [value.base, *args[1:]])
        if moved.shape == (value.base.features,):
            return [Deferred(moved, value.ops, value.origin)]
    return t._probe(node, args)


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
_POST_TRANSFORMS = {"NONE": (), "LOGISTIC": ("sigmoid",), "SOFTMAX": ("softmax",)}


def _linear_classifier(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    a = t.trunk(node, args[0])
    post = _attr(node, "post_transform", b"NONE")
    post = post.decode() if isinstance(post, bytes) else str(post)
    if post not in _POST_TRANSFORMS:
        raise Unsupported(f"node {node.name!r} ({node.op_type}): post_transform {post} "
                          f"is not supported (NONE, LOGISTIC, SOFTMAX are)")
    coefficients = np.asarray(_attr(node, "coefficients", []), dtype=np.float64)
    intercepts = np.asarray(_attr(node, "intercepts", []) or [0.0], dtype=np.float64)
    rows = coefficients.size // a.features
    matrix: FloatArray = coefficients.reshape(rows, a.features)  # (classes, features)
    bias = np.broadcast_to(intercepts, (rows,)).astype(np.float64)
    labels = _names(_attr(node, "classlabels_ints", None)
                    or _attr(node, "classlabels_strings", None) or [])
    if rows == 1 and len(labels) == 2:  # binary with one score row: [-s, s]
        matrix, bias = np.vstack([-matrix, matrix]), np.concatenate([-bias, bias])
    t.class_labels = labels
    scores = Affine(as_weights(sparse.csr_array(matrix) @ t._pad(a.weights)),
                    matrix @ a.bias + bias, (matrix.shape[0],))
    ops: tuple[Activation | str, ...] = _POST_TRANSFORMS[post]
    return [Labels(labels), Deferred(scores, ops, node.name) if ops else scores]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _svm_scores(t: _Tracer, node: onnx.NodeProto, a: Affine, coefficients: FloatArray,
                rho: float) -> Affine:
    """sum_j coefficients[j] K(x, sv_j) + rho for the node's kernel K, exactly: affine for
    a linear kernel (or a polynomial of degree 1), one exact squaring level for a
    polynomial of degree 2."""
    name = node.name or node.op_type
    kernel = _text(_attr(node, "kernel_type", b"LINEAR")).upper()
    gamma, coef0, power = [*_attr(node, "kernel_params", []), 0.0, 0.0, 0.0][:3]
    vectors = np.asarray(_attr(node, "support_vectors", []), dtype=np.float64)
    if len(a.shape) != 1 or vectors.size != coefficients.size * a.features:
        raise Unsupported(f"node {name!r} ({node.op_type}): {coefficients.size} support "
                          f"vectors of {vectors.size // max(coefficients.size, 1)} features "
                          f"for rows shaped {list(a.shape)}")
    sv = vectors.reshape(coefficients.size, a.features)
    if kernel == "LINEAR":
        gamma, coef0, power = 1.0, 0.0, 1
    elif kernel != "POLY":
        reason = {"RBF": "exp(-gamma |x - sv|^2) for every support vector is not a "
                         "polynomial of the input",
                  "SIGMOID": "tanh(gamma x.sv + coef0) for every support vector is not "
                             "evaluated by this engine"}.get(kernel, "it is unknown")
        raise Unsupported(f"node {name!r} ({node.op_type}): kernel {kernel}: {reason}; "
                          f"use kernel='linear' or kernel='poly' with degree 2 (exact under "
                          f"encryption), or LinearSVC/LinearSVR")
    if power not in (0, 1, 2):
        raise Unsupported(f"node {name!r} ({node.op_type}): polynomial kernel of degree "
                          f"{power:g}; degree 1 and 2 are exact under encryption (one "
                          f"squaring), higher degrees are not supported")
    # K = (gamma x.sv + coef0)^power, expanded: quadratic + linear + constant in x
    power = int(power)
    linear_term = coefficients @ sv * {0: 0.0, 1: gamma, 2: 2 * gamma * coef0}[power]
    constant = rho + float(coefficients.sum()) * coef0 ** power
    weights = as_weights(sparse.csr_array(linear_term[None, :]) @ t._pad(a.weights))
    bias = np.array([linear_term @ a.bias + constant])
    if power != 2:
        return Affine(weights, bias, (1,))
    quadratic = _quadratic_form(t, node, a, gamma ** 2 * sv.T @ (coefficients[:, None] * sv))
    return Affine(as_weights(t._pad(weights) + t._pad(quadratic.weights)),
                  bias + quadratic.bias, (1,))


def _quadratic_form(t: _Tracer, node: onnx.NodeProto, a: Affine, q: FloatArray) -> Affine:
    """x' q x for a symmetric q, exactly: sum_k lambda_k (v_k . x)^2 over q's eigenvectors,
    one exact square per direction (at most one per feature, however many support vectors
    q sums)."""
    eigenvalues, vectors = np.linalg.eigh(q)
    keep = np.abs(eigenvalues) > 1e-12 * float(np.abs(eigenvalues).max(initial=0.0))
    if not keep.any():
        return Affine(as_weights((1, a.weights.shape[1])), np.zeros(1), (1,))
    directions, scales = vectors[:, keep].T, eigenvalues[keep]
    units = Affine(as_weights(sparse.csr_array(directions) @ t._pad(a.weights)),
                   directions @ a.bias, (len(scales),))
    squares = t.trunk(node, Deferred(units, (SQUARE,), node.name or node.op_type))
    return Affine(as_weights(sparse.csr_array(scales[None, :]) @ t._pad(squares.weights)),
                  np.array([scales @ squares.bias]), (1,))


def _svm_classifier(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    """A binary SVC: onnxruntime's scores are [-s, s] with s the pairwise decision value,
    and s > 0 means the first class, so column 0 scores the second class: the columns are
    labelled (second, first) and the argmax is onnxruntime's label."""
    name = node.name or node.op_type
    a = t.trunk(node, args[0])
    labels = _names(_attr(node, "classlabels_ints", None)
                    or _attr(node, "classlabels_strings", None) or [])
    per_class = [int(v) for v in _attr(node, "vectors_per_class", [])]
    coefficients = np.asarray(_attr(node, "coefficients", []), dtype=np.float64)
    rho = [float(v) for v in _attr(node, "rho", [])]
    if _text(_attr(node, "post_transform", b"NONE")) != "NONE":
        raise Unsupported(f"node {name!r} (SVMClassifier): only post_transform NONE is "
                          f"supported")
    if len(labels) > 2:
        raise Unsupported(
            f"node {name!r} (SVMClassifier) separates {len(labels)} classes one-vs-one: the "
            f"class is a majority vote over {len(labels) * (len(labels) - 1) // 2} pairwise "
            f"decisions (and the probabilities a pairwise coupling), which cannot be "
            f"evaluated on ciphertexts; train LinearSVC (one-vs-rest, exact under "
            f"encryption) or a binary SVC")
    if len(labels) != 2 or not per_class or sum(per_class) != coefficients.size or len(rho) != 1:
        raise Unsupported(f"node {name!r} (SVMClassifier): only binary classifiers with "
                          f"support vectors are supported (LinearSVC exports as "
                          f"LinearClassifier, which is)")
    if coefficients.min() >= 0:  # onnxruntime then labels by another rule
        raise Unsupported(f"node {name!r} (SVMClassifier): every dual coefficient is "
                          f"non-negative (one class has no support vectors)")
    if _attr(node, "prob_a", []) or _attr(node, "prob_b", []):
        raise Unsupported(
            f"node {name!r} (SVMClassifier) outputs probabilities (SVC(probability=True)): "
            f"onnxruntime couples the pair's Platt sigmoid by an iteration that stops at a "
            f"row-dependent step, a few thousandths away from the sigmoid, which cannot be "
            f"reproduced exactly; export the SVC with probability=False: its decision "
            f"values are exact under encryption and give sklearn's predict() labels")
    s = _svm_scores(t, node, a, coefficients, rho[0])
    t.class_labels = (labels[1], labels[0])
    return [Labels(t.class_labels), Affine(as_weights(sparse.vstack([-s.weights, s.weights])),
                                           np.concatenate([-s.bias, s.bias]), (2,))]


def _svm_regressor(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    name = node.name or node.op_type
    a = t.trunk(node, args[0])
    coefficients = np.asarray(_attr(node, "coefficients", []), dtype=np.float64)
    rho = [float(v) for v in _attr(node, "rho", [])] or [0.0]
    if _attr(node, "one_class", 0):
        raise Unsupported(f"node {name!r} (SVMRegressor): a one-class SVM outputs the sign "
                          f"of its decision (+1/-1), a step that cannot be evaluated on "
                          f"ciphertexts")
    if _text(_attr(node, "post_transform", b"NONE")) != "NONE":
        raise Unsupported(f"node {name!r} (SVMRegressor): only post_transform NONE is "
                          f"supported")
    if int(_attr(node, "n_supports", 0)) > 0:
        return [_svm_scores(t, node, a, coefficients, rho[0])]
    if len(a.shape) != 1 or coefficients.size != a.features:  # liblinear: x . w + rho
        raise Unsupported(f"node {name!r} (SVMRegressor): {coefficients.size} coefficients "
                          f"for rows shaped {list(a.shape)}")
    return [Affine(as_weights(sparse.csr_array(coefficients[None, :]) @ t._pad(a.weights)),
                   np.array([coefficients @ a.bias + rho[0]]), (1,))]


# A tree's comparison x <= threshold becomes a smoothed step, 0.5 (1 + tanh(k z / reach))
# of z = threshold - x over z's guaranteed reach: it is within 0.05 of the step beyond 3%
# of the reach from the threshold (rows closer get a blend of both branches), and degree
# 247 fits it within 2e-4 (k 32: 3e-6 but twice as wide; k 64: 1.4e-3)
STEP_SHARPNESS = 96.0
_BRANCHES = {"BRANCH_LEQ": -1.0, "BRANCH_LT": -1.0, "BRANCH_GTE": 1.0, "BRANCH_GT": 1.0}


def _tree_ensemble(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    """TreeEnsembleClassifier/Regressor as polynomials: every comparison a smoothed step
    (one Chebyshev series unit), every node's indicator the product of the steps on its
    path (one exact squaring level per tree depth below the first), each output the sum
    of its leaves' weights times their indicators. Exact except near thresholds."""
    name = node.name or node.op_type
    a = t.trunk(node, args[0])
    classifier = node.op_type == "TreeEnsembleClassifier"
    prefix = "class" if classifier else "target"
    if len(a.shape) != 1:
        raise Unsupported(f"node {name!r} ({node.op_type}): rows shaped {list(a.shape)}")
    modes = [_text(m) for m in _attr(node, "nodes_modes", [])]
    unknown = sorted({m for m in modes if m != "LEAF" and m not in _BRANCHES})
    post = _text(_attr(node, "post_transform", b"NONE"))
    aggregate = _text(_attr(node, "aggregate_function", b"SUM"))
    if unknown or post not in _POST_TRANSFORMS or aggregate not in ("SUM", "AVERAGE"):
        raise Unsupported(f"node {name!r} ({node.op_type}): comparisons {unknown or 'ok'}, "
                          f"post_transform {post}, aggregate {aggregate}; supported: "
                          f"{sorted(_BRANCHES)}, NONE/LOGISTIC/SOFTMAX, SUM/AVERAGE")
    trees = [int(v) for v in _attr(node, "nodes_treeids", [])]
    ids = [int(v) for v in _attr(node, "nodes_nodeids", [])]
    features = [int(v) for v in _attr(node, "nodes_featureids", [])]
    thresholds = np.asarray(_attr(node, "nodes_values", []), dtype=np.float64)
    true_ids = [int(v) for v in _attr(node, "nodes_truenodeids", [])]
    false_ids = [int(v) for v in _attr(node, "nodes_falsenodeids", [])]
    index = {(tree, n): i for i, (tree, n) in enumerate(zip(trees, ids, strict=True))}
    branches = [i for i, m in enumerate(modes) if m != "LEAF"]
    if any(features[i] >= a.features for i in branches):
        raise Unsupported(f"node {name!r} ({node.op_type}) compares a feature beyond the "
                          f"{a.features} it is given")
    # z = sign * (x_f - threshold) >= 0 on each comparison's true branch
    signs = np.array([_BRANCHES[modes[i]] for i in branches])
    rows = t._pad(a.weights)[[features[i] for i in branches]]
    z = Affine(as_weights(sparse.diags_array(signs) @ rows),
               signs * (a.bias[[features[i] for i in branches]] - thresholds[branches]),
               (len(branches),))
    low, high = t.interval(z.weights, z.bias)
    reach = np.maximum(np.maximum(np.abs(low), np.abs(high)), 1e-9)
    step = Activation("step", lambda v: 0.5 * (1.0 + np.tanh(STEP_SHARPNESS * v / reach)))
    steps = t.trunk(node, Deferred(z, (step,), name))
    # each node's indicator (weights row, bias), one tree level at a time: a root's child
    # is its parent's step (or 1 - it), a deeper node its parent's indicator times that
    step_of = {i: j for j, i in enumerate(branches)}
    indicator: dict[int, tuple[Weights, float]] = {}
    level = [index[(tree, 0)] for tree in sorted(set(trees))]
    while level:
        children: list[tuple[int, int, tuple[Weights, float]]] = []  # (node, parent, factor)
        for i in (i for i in level if modes[i] != "LEAF"):
            j = step_of[i]
            children.append((index[(trees[i], true_ids[i])], i,
                             (steps.weights[[j]], float(steps.bias[j]))))
            children.append((index[(trees[i], false_ids[i])], i,
                             (-steps.weights[[j]], 1.0 - float(steps.bias[j]))))
        deep = [(c, p, factor) for c, p, factor in children if p in indicator]
        indicator.update({c: factor for c, p, factor in children if p not in indicator})
        if deep:
            product = t.product(_rows_affine(t, [indicator[p] for _c, p, _f in deep]),
                                _rows_affine(t, [factor for _c, _p, factor in deep]), name)
            indicator.update({c: (product.weights[[r]], float(product.bias[r]))
                              for r, (c, _p, _f) in enumerate(deep)})
        level = [c for c, _p, _f in children]
    outputs = max((int(v) for v in _attr(node, f"{prefix}_ids", [])), default=0) + 1
    weights: FloatArray = np.zeros((outputs, t.basis_values.shape[1]))
    bias: FloatArray = np.zeros(outputs)
    for tree, leaf, target, w in zip(_attr(node, f"{prefix}_treeids", []),
                                     _attr(node, f"{prefix}_nodeids", []),
                                     _attr(node, f"{prefix}_ids", []),
                                     _attr(node, f"{prefix}_weights", []), strict=True):
        row, constant = indicator.get(index[(int(tree), int(leaf))], (None, 1.0))
        if row is not None:
            weights[int(target)] += float(w) * t._pad(row).toarray()[0]
        bias[int(target)] += float(w) * constant
    if aggregate == "AVERAGE":
        weights, bias = weights / len(set(trees)), bias / len(set(trees))  # per tree
    bias += np.broadcast_to(np.asarray(_attr(node, "base_values", None) or [0.0],
                                       dtype=np.float64), bias.shape)
    scores = Affine(as_weights(weights), bias, (outputs,))
    if not classifier:
        return [scores]
    labels = _names(_attr(node, "classlabels_int64s", None)
                    or _attr(node, "classlabels_strings", None) or [])
    t.class_labels = labels
    if outputs == 1 and len(labels) == 2:  # onnxruntime's binary case: s scores the second
        # class: [1 - s, s], or with LOGISTIC [sigmoid(-s), sigmoid(s)]
        first = (1.0 if post == "NONE" else 0.0) - bias[0]
        scores = Affine(as_weights(sparse.vstack([-scores.weights, scores.weights])),
                        np.array([first, bias[0]]), (2,))
    ops: tuple[Activation | str, ...] = _POST_TRANSFORMS[post]
    return [Labels(labels), Deferred(scores, ops, name) if ops else scores]


def _rows_affine(t: _Tracer, rows: list[tuple[Weights, float]]) -> Affine:
    return Affine(as_weights(sparse.vstack([t._pad(r) for r, _b in rows])),
                  np.array([b for _r, b in rows]), (len(rows),))


def _zipmap(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    labels = _attr(node, "classlabels_int64s", None) or _attr(node, "classlabels_strings", [])
    if labels and not t.class_labels:
        t.class_labels = _names(labels)
    value = args[0]
    return [value if isinstance(value, Deferred | Labels) else t.trunk(node, value)]


def _argmax(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    if _attr(node, "axis", 0) not in (1, -1):
        raise Unsupported(f"node {node.name!r} (ArgMax) over rows")
    return [Labels(t.class_labels)]


def _feature_extractor(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    classes, index = args
    if isinstance(classes, np.ndarray) and isinstance(index, Labels):
        names = _names(classes.reshape(-1).tolist())
        t.class_labels = names
        return [Labels(names)]
    return t._probe(node, args)


def _reduce_prod(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    """The product of a flat row's features (skl2onnx's PolynomialFeatures: one per
    monomial), as a tree of exact pairwise products: a repeated factor is squared."""
    value = t.trunk(node, args[0])
    axes = (np.asarray(args[1]).reshape(-1).tolist() if len(args) > 1 and args[1] is not None
            else _attr(node, "axes", None))
    if len(value.shape) != 1 or axes is None or [int(a) for a in axes] not in ([1], [-1]):
        raise Unsupported(f"node {node.name!r} (ReduceProd) over axes {axes} of rows shaped "
                          f"{list(value.shape)}; only over the features of flat rows")
    origin = node.name or node.op_type
    weights = t._pad(value.weights)
    factors = [Affine(as_weights(weights[[i]]), value.bias[[i]], (1,))
               for i in range(value.features)]
    while len(factors) > 1:
        a, b = factors.pop(0), factors.pop(0)
        same = a.bias[0] == b.bias[0] and (t._pad(a.weights) != t._pad(b.weights)).nnz == 0
        factors.append(t._materialize(a, SQUARE, origin) if same else t.product(a, b, origin))
    (result,) = factors
    keep = bool(_attr(node, "keepdims", 1))
    return [Affine(result.weights, result.bias, (1,) if keep else ())]


def _constant_of_shape(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    """A constant tensor shaped like an encrypted one (`_shape`: rows written -1), as an
    affine value with no weights."""
    shape = np.asarray(args[0]).reshape(-1)
    if not (shape.size and shape[0] == -1):
        return t._fold_constant(node, args)
    fill = (numpy_helper.to_array(node.attribute[0].t).reshape(-1)
            if node.attribute else np.zeros(1))
    per_row = tuple(int(d) for d in shape[1:])
    count = int(np.prod(per_row))
    return [Affine(as_weights((count, t.basis_values.shape[1])),
                   np.full(count, float(fill[0])), per_row)]


def _shape(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    """The shape of an encrypted tensor is known but for the row count, written -1 (what
    `x.view(x.size(0), -1)` style reshapes need)."""
    value = args[0]
    if not isinstance(value, Affine | Deferred):
        raise Unsupported(f"node {node.name!r} (Shape) of labels")
    return [np.array([-1, *value.shape], dtype=np.int64)]


ELEMENTWISE = {  # continuous elementwise activations, approximated on guaranteed ranges
    "Relu": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "Softplus": "softplus",
    "Softsign": "softsign", "LeakyRelu": "leaky_relu", "Elu": "elu", "Selu": "selu",
    "Celu": "celu", "PRelu": "prelu", "Clip": "clip", "HardSigmoid": "hard_sigmoid",
    "HardSwish": "hard_swish", "Gelu": "gelu", "Mish": "mish", "Erf": "erf", "Abs": "abs",
    "ThresholdedRelu": "thresholded_relu",
}
_HANDLERS: dict[str, Handler] = {
    **{op: _elementwise(name) for op, name in ELEMENTWISE.items()},
    "Mul": _mul,
    "Sub": _sub,
    "Concat": _concat,
    "Max": _extremum(1.0),
    "Min": _extremum(-1.0),
    "Pow": _pow,
    "Softmax": _row_op("softmax"),
    "LogSoftmax": _row_op("log_softmax"),
    "Normalizer": _row_op("normalizer"),
    "Identity": _keep_deferred,
    "Dropout": _keep_deferred,
    "Cast": _keep_deferred,
    "Reshape": _reshape,
    "Flatten": _reshape,
    "Squeeze": _reshape,
    "Unsqueeze": _reshape,
    "LinearClassifier": _linear_classifier,
    "SVMClassifier": _svm_classifier,
    "SVMRegressor": _svm_regressor,
    "TreeEnsembleClassifier": _tree_ensemble,
    "TreeEnsembleRegressor": _tree_ensemble,
    "ZipMap": _zipmap,
    "ArgMax": _argmax,
    "ArrayFeatureExtractor": _feature_extractor,
    "Shape": _shape,
    "ConstantOfShape": _constant_of_shape,
    "ReduceProd": _reduce_prod,
    "MaxPool": _max_pool,
    "GlobalMaxPool": _max_pool,
}

# handlers whose constant inputs may be `_shape`'s (rows: -1), which no evaluator folds
_ROW_SHAPE_HANDLERS = {"ConstantOfShape"}

_UNBOUNDED = "; it has no bounded range, use a bounded activation in the model instead"
_SUGGESTIONS = {
    "Exp": _UNBOUNDED,
    "Log": _UNBOUNDED,
    "Sqrt": _UNBOUNDED,
    "Reciprocal": _UNBOUNDED,
    "If": "; data-dependent control flow cannot run on ciphertexts",
    "Loop": "; data-dependent control flow cannot run on ciphertexts",
    "Where": "; data-dependent selection cannot run on ciphertexts",
    "TopK": "; sorting cannot run on ciphertexts",
    "NonZero": "; data-dependent shapes cannot run on ciphertexts",
}


def _finite(values: Any) -> bool:
    """False when a float array holds a NaN or an infinity (other arrays are finite)."""
    array = np.asarray(values)
    return array.dtype.kind not in "fc" or bool(np.all(np.isfinite(array)))


def _hint(node: onnx.NodeProto) -> str:
    return _SUGGESTIONS.get(node.op_type, "")


def _names(values: Sequence[Any]) -> tuple[str, ...]:
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in values)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default

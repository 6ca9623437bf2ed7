"""ONNX -> HE plan.

The compiler walks the graph once, tracking every tensor as one of:
  * a constant (initializers, Constant nodes, shape arithmetic on constants),
  * an affine map of the current ciphertext basis (`Affine`),
  * an affine map followed by exact operations not yet committed to (`Deferred`):
    activations, softmax, normalizers. If the graph ends there they become the output
    tail the buyer applies after decryption; if a layer consumes them, elementwise
    activations are *materialized* as Chebyshev polynomial stages on input ranges
    calibrated from the seller's data,
  * class labels (`Labels`): argmax outputs, computed by the buyer.
Anything else is refused with the node's name and operator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from common.errors import Unsupported
from common.he.plan import HEPlan, OutputStage, PolyStage, chebyshev_basis
from common.onnx_io import parse_model, run_model
from common.tail import apply_tail, predicted_labels

FloatArray = npt.NDArray[np.float64]

ACTIVATIONS: dict[str, Callable[[FloatArray], FloatArray]] = {
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
    "sigmoid": lambda x: 0.5 * (1.0 + np.tanh(0.5 * x)),
    "square": np.square,
}
DEGREES = (3, 4, 6, 8, 12, 16, 24, 32)  # tried in order until the error target is met
MAX_CALIBRATION_ROWS = 4096


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
    degree: int  # Chebyshev degree of approximated activations (0: none approximated)
    approximation: str
    approximation_error: float  # max |tail(plan) - onnxruntime| on calibration rows
    calibration_agreement: float  # top-1 agreement with onnxruntime on calibration rows


@dataclass(frozen=True)
class Affine:
    weights: FloatArray  # (features, basis size when created)
    bias: FloatArray

    @property
    def features(self) -> int:
        return int(self.bias.size)


@dataclass(frozen=True)
class Deferred:
    base: Affine
    ops: tuple[str, ...]
    origin: str  # node that started the deferred ops, for messages


@dataclass(frozen=True)
class Labels:
    class_labels: tuple[str, ...]


Value = Any  # np.ndarray | Affine | Deferred | Labels


def compile_model(
    model_bytes: bytes,
    calibration: FloatArray,
    *,
    degree: int | None = None,
    error_target: float = 0.01,
    margin: float = 0.25,
) -> CompiledModel:
    """Compile and validate against onnxruntime on the calibration rows.

    With `degree` None the smallest Chebyshev degree meeting `error_target` (max absolute
    error on the compared output) is chosen; if none does, the most accurate one is.
    """
    model = parse_model(model_bytes, "the model")
    rows = np.asarray(calibration, dtype=np.float64)[:MAX_CALIBRATION_ROWS]
    candidates = (degree,) if degree is not None else DEGREES
    best: CompiledModel | None = None
    reference: FloatArray | None = None
    for candidate in candidates:
        tracer = _Tracer(model, rows, candidate, margin)
        plan, tail = tracer.run()
        if reference is None:
            reference = run_model(model_bytes, rows, tail.probability_output, tail.class_labels)
        compiled = _measure(plan, tail, tracer, rows, reference, candidate)
        if best is None or compiled.approximation_error < best.approximation_error:
            best = compiled
        if not tracer.approximated or compiled.approximation_error <= error_target:
            return compiled
    assert best is not None
    return best


def _measure(
    plan: HEPlan, tail: Tail, tracer: _Tracer, rows: FloatArray, reference: FloatArray,
    degree: int,
) -> CompiledModel:
    ours = apply_tail(plan.simulate(rows), tail.ops)
    if ours.shape != reference.shape:
        raise Unsupported(f"compiled plan gives {ours.shape[1]} outputs but onnxruntime gives "
                          f"{reference.shape[1]} for output {tail.probability_output!r}")
    error = float(np.max(np.abs(ours - reference))) if ours.size else 0.0
    labels_ours = predicted_labels(ours, tail.class_labels)
    labels_ref = predicted_labels(reference, tail.class_labels)
    agreement = (float(np.mean([a == b for a, b in zip(labels_ours, labels_ref, strict=True)]))
                 if labels_ref else 1.0)
    approximated = [s.label for s in plan.stages if "Chebyshev" in s.label]
    summary = "; ".join(s.label for s in plan.stages) or "exact"
    if not approximated and error > 1e-3:
        raise Unsupported(f"internal check failed: the exact HE plan differs from onnxruntime "
                          f"by {error:.3g} on the calibration rows; please report this model")
    return CompiledModel(plan, tail, degree if tracer.approximated else 0, summary, error,
                         agreement)


class _Tracer:
    def __init__(self, model: onnx.ModelProto, rows: FloatArray, degree: int, margin: float):
        self.graph = model.graph
        self.degree = degree
        self.margin = margin
        self.basis_values = rows  # calibration values of every basis ciphertext so far
        self.input_count = rows.shape[1]
        self.stages: list[PolyStage] = []
        self.approximated = False
        self.values: dict[str, Value] = {}
        self.class_labels: tuple[str, ...] = ()

    # ----- driver -----

    def run(self) -> tuple[HEPlan, Tail]:
        for init in self.graph.initializer:
            self.values[init.name] = numpy_helper.to_array(init)
        inputs = [i for i in self.graph.input if i.name not in self.values]
        if len(inputs) != 1:
            raise Unsupported(f"the model must have exactly one data input, it has "
                              f"{[i.name for i in inputs]}")
        for node in self.graph.node:  # refuse what can never work before looking at shapes
            if node.op_type in _SUGGESTIONS:
                raise Unsupported(f"node {node.name!r}: operator {node.op_type} cannot be "
                                  f"evaluated under encryption{_hint(node)}")
        self._check_input(inputs[0])
        self.values[inputs[0].name] = Affine(np.eye(self.input_count), np.zeros(self.input_count))
        for node in self.graph.node:
            self._visit(node)
        return self._finish()

    def _check_input(self, value_info: onnx.ValueInfoProto) -> None:
        tensor = value_info.type.tensor_type
        if tensor.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            raise Unsupported(f"input {value_info.name!r} must be a float tensor")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if len(dims) != 2:
            raise Unsupported(f"input {value_info.name!r} has rank {len(dims)}; this engine "
                              f"takes [rows, features] inputs")
        if dims[1] is not None and dims[1] != self.input_count:
            raise Unsupported(f"input {value_info.name!r} has {dims[1]} features but the "
                              f"listing/calibration data has {self.input_count} columns")

    def _visit(self, node: onnx.NodeProto) -> None:
        args = [self.values.get(name) if name else None for name in node.input]
        missing = [n for n, a in zip(node.input, args, strict=True) if n and a is None]
        if missing:
            raise Unsupported(f"node {node.name!r} ({node.op_type}) reads undefined {missing}")
        if all(isinstance(a, np.ndarray) or a is None for a in args):
            outputs = self._fold_constant(node, args)
        else:
            handler = _HANDLERS.get(node.op_type)
            if handler is None:
                raise Unsupported(f"node {node.name!r}: operator {node.op_type} cannot be "
                                  f"evaluated under encryption by this engine{_hint(node)}")
            outputs = handler(self, node, args)
        for name, value in zip(node.output, outputs, strict=False):
            if name:
                self.values[name] = value

    def _fold_constant(self, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
        if node.op_type == "Constant":
            return [numpy_helper.to_array(node.attribute[0].t)
                    if node.attribute[0].name == "value"
                    else np.array(helper.get_attribute_value(node.attribute[0]))]
        try:
            feeds = {n: a for n, a in zip(node.input, args, strict=True) if n}
            return list(ReferenceEvaluator(node).run(None, feeds))
        except Exception as exc:
            raise Unsupported(f"node {node.name!r} ({node.op_type}) on constants: {exc}") from exc

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
        base, ops = (value.base, value.ops) if isinstance(value, Deferred) else (value, ())
        weights = self._pad(base.weights)
        plan = HEPlan(self.input_count, tuple(self.stages), OutputStage(weights, base.bias.copy()))
        plan.check()
        labels = self.class_labels
        if not labels and base.features > 1:
            labels = tuple(str(i) for i in range(base.features))
        return plan, Tail(ops, labels, name, label_output)

    # ----- values -----

    def _pad(self, weights: FloatArray) -> FloatArray:
        size = self.basis_values.shape[1]
        padded = np.zeros((weights.shape[0], size))
        padded[:, : weights.shape[1]] = weights
        return padded

    def trunk(self, node: onnx.NodeProto, value: Value) -> Affine:
        """The value as an affine map of the basis, materializing deferred activations."""
        if isinstance(value, Affine):
            return value
        if isinstance(value, Deferred):
            current = value.base
            for op in value.ops:
                if op not in ACTIVATIONS:
                    raise Unsupported(f"node {node.name!r} ({node.op_type}) consumes the "
                                      f"output of {op} from node {value.origin!r}; only "
                                      f"elementwise activations can be evaluated mid-network")
                current = self._materialize(current, op, value.origin)
            return current
        raise Unsupported(f"node {node.name!r} ({node.op_type}) needs a numeric tensor input")

    def _materialize(self, z: Affine, op: str, origin: str) -> Affine:
        weights = self._pad(z.weights)
        pre = self.basis_values @ weights.T + z.bias  # calibration values of the inputs
        degree = 2 if op == "square" else self.degree
        lo, hi = pre.min(axis=0), pre.max(axis=0)
        mid = (hi + lo) / 2
        half = np.maximum((hi - lo) / 2 * (1 + self.margin), 1e-3)
        coeffs = np.empty((z.features, degree + 1))
        for i, (m, h) in enumerate(zip(mid, half, strict=True)):
            coeffs[i] = np.polynomial.chebyshev.chebinterpolate(
                _on_interval(ACTIVATIONS[op], float(m), float(h)), degree)
        if op == "square":
            label = f"{op} at {origin!r}: exact"
        else:
            self.approximated = True
            label = f"{op} at {origin!r}: Chebyshev degree {degree}"
        stage = PolyStage(weights / half[:, None], (z.bias - mid) / half, degree, label)
        offset = self.basis_values.shape[1]
        u = pre / half - mid / half
        self.basis_values = np.concatenate([self.basis_values, chebyshev_basis(u, degree)], axis=1)
        self.stages.append(stage)
        units = z.features
        out = np.zeros((units, self.basis_values.shape[1]))
        for i in range(units):
            out[i, offset + i * degree: offset + (i + 1) * degree] = coeffs[i, 1:]
        return Affine(out, coeffs[:, 0].copy())

    def per_feature(self, node: onnx.NodeProto, const: Value, features: int) -> FloatArray:
        """A constant that applies the same way to every row: scalar or one per feature."""
        c = np.asarray(const, dtype=np.float64)
        if c.size == 1:
            return np.full(features, float(c.reshape(-1)[0]))
        if c.size == features and (c.ndim == 1 or (c.ndim == 2 and c.shape[0] == 1)):
            return c.reshape(-1)
        raise Unsupported(f"node {node.name!r} ({node.op_type}): a constant of shape {c.shape} "
                          f"does not apply per feature to {features} features")


def _on_interval(func: Callable[[FloatArray], FloatArray], mid: float, half: float
                 ) -> Callable[[FloatArray], Any]:
    """func on [mid - half, mid + half], as a function of t in [-1, 1]."""
    return lambda t: func(mid + half * t)


# ----- operator handlers -----


def _affine_map(a: Affine, matrix: FloatArray, bias: FloatArray) -> Affine:
    """y = x @ matrix + bias for x = a."""
    return Affine(matrix.T @ a.weights, matrix.T @ a.bias + bias)


def _identity(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    return [args[0]]


def _rows_preserving(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    """Flatten/Reshape that keep [rows, features]."""
    value = args[0]
    features = _features(value)
    if node.op_type == "Reshape":
        shape = [int(s) for s in np.asarray(args[1]).reshape(-1)]
        keeps_layout = len(shape) == 2 and shape[1] in (features, -1) and shape[0] in (-1, 0)
        if not keeps_layout and not isinstance(value, Labels):
            raise Unsupported(f"node {node.name!r} (Reshape) to {shape} changes the "
                                  f"[rows, {features}] layout")
    elif node.op_type == "Flatten":
        axis = _attr(node, "axis", 1)
        if axis != 1:
            raise Unsupported(f"node {node.name!r} (Flatten) with axis={axis} mixes rows")
    return [value]


def _features(value: Value) -> int:
    if isinstance(value, Affine):
        return value.features
    if isinstance(value, Deferred):
        return value.base.features
    return -1


def _gemm(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    if _attr(node, "transA", 0):
        raise Unsupported(f"node {node.name!r} (Gemm) with transA=1 mixes rows")
    if not isinstance(args[1], np.ndarray):
        raise Unsupported(f"node {node.name!r} (Gemm): B must be a constant weight matrix")
    a = t.trunk(node, args[0])
    b = np.asarray(args[1], dtype=np.float64)
    if _attr(node, "transB", 0):
        b = b.T
    alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
    c = args[2] if len(args) > 2 and args[2] is not None else np.zeros(1)
    return [_affine_map(a, alpha * b, beta * t.per_feature(node, c, b.shape[1]))]


def _matmul(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    if not isinstance(args[1], np.ndarray):
        raise Unsupported(f"node {node.name!r} (MatMul): only encrypted x constant is "
                          f"supported (the second input must be a weight matrix)")
    a = t.trunk(node, args[0])
    b = np.asarray(args[1], dtype=np.float64)
    if b.ndim == 1:
        b = b[:, None]
    if b.ndim != 2 or b.shape[0] != a.features:
        raise Unsupported(f"node {node.name!r} (MatMul): weight shape {b.shape} does not fit "
                          f"{a.features} features")
    return [_affine_map(a, b, np.zeros(b.shape[1]))]


def _arith(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    op = node.op_type
    left, right = args
    if op == "Mul" and node.input[0] == node.input[1]:
        return [_activate(t, node, left, "square")]
    if not isinstance(left, np.ndarray) and not isinstance(right, np.ndarray):
        if op in ("Add", "Sub"):
            a, b = t.trunk(node, left), t.trunk(node, right)
            if a.features != b.features:
                raise Unsupported(f"node {node.name!r} ({op}): {a.features} vs {b.features} "
                                  f"features")
            sign = 1.0 if op == "Add" else -1.0
            wa, wb = t._pad(a.weights), t._pad(b.weights)
            return [Affine(wa + sign * wb, a.bias + sign * b.bias)]
        raise Unsupported(f"node {node.name!r} ({op}) multiplies two encrypted tensors; only "
                          f"x*x (square) is supported")
    const_first = isinstance(left, np.ndarray)
    a = t.trunk(node, right if const_first else left)
    c = t.per_feature(node, left if const_first else right, a.features)
    if op == "Add":
        return [Affine(a.weights, a.bias + c)]
    if op == "Sub":
        return [Affine(-a.weights, c - a.bias) if const_first else Affine(a.weights, a.bias - c)]
    if op == "Mul":
        return [Affine(a.weights * c[:, None], a.bias * c)]
    if const_first:
        raise Unsupported(f"node {node.name!r} (Div): dividing by an encrypted tensor")
    return [Affine(a.weights / c[:, None], a.bias / c)]


def _neg(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    a = t.trunk(node, args[0])
    return [Affine(-a.weights, -a.bias)]


def _pow(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    exponent = np.asarray(args[1]).reshape(-1)
    if exponent.size != 1 or float(exponent[0]) not in (1.0, 2.0):
        raise Unsupported(f"node {node.name!r} (Pow): only exponent 2 is supported")
    return [args[0] if float(exponent[0]) == 1.0 else _activate(t, node, args[0], "square")]


def _activate(t: _Tracer, node: onnx.NodeProto, value: Value, op: str) -> Deferred:
    if isinstance(value, Deferred):
        return Deferred(value.base, (*value.ops, op), value.origin)
    return Deferred(t.trunk(node, value), (op,), node.name or node.op_type)


def _activation(op: str) -> Callable[[_Tracer, onnx.NodeProto, list[Value]], list[Value]]:
    def handler(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
        return [_activate(t, node, args[0], op)]
    return handler


def _softmax(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    axis = _attr(node, "axis", -1)
    if axis not in (-1, 1):
        raise Unsupported(f"node {node.name!r} ({node.op_type}) over axis {axis}")
    op = "softmax" if node.op_type == "Softmax" else "log_softmax"
    return [_activate(t, node, args[0], op)]


def _normalizer(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    norm = _attr(node, "norm", b"MAX")
    norm = norm.decode() if isinstance(norm, bytes) else str(norm)
    return [_activate(t, node, args[0], norm.lower())]


def _scaler(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    a = t.trunk(node, args[0])
    offset = t.per_feature(node, np.array(_attr(node, "offset", [0.0])), a.features)
    scale = t.per_feature(node, np.array(_attr(node, "scale", [1.0])), a.features)
    return [Affine(a.weights * scale[:, None], (a.bias - offset) * scale)]


_POST_TRANSFORMS = {"NONE": (), "LOGISTIC": ("sigmoid",), "SOFTMAX": ("softmax",)}


def _linear_model(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    a = t.trunk(node, args[0])
    post = _attr(node, "post_transform", b"NONE")
    post = post.decode() if isinstance(post, bytes) else str(post)
    if post not in _POST_TRANSFORMS:
        raise Unsupported(f"node {node.name!r} ({node.op_type}): post_transform {post} "
                          f"is not supported (NONE, LOGISTIC, SOFTMAX are)")
    coefficients = np.asarray(_attr(node, "coefficients", []), dtype=np.float64)
    intercepts = np.asarray(_attr(node, "intercepts", []) or [0.0], dtype=np.float64)
    rows = coefficients.size // a.features
    matrix: FloatArray = coefficients.reshape(rows, a.features).T  # (features, rows)
    bias = t.per_feature(node, intercepts, rows)
    if node.op_type == "LinearRegressor":
        scores = _affine_map(a, matrix, bias)
        return [Deferred(scores, _POST_TRANSFORMS[post], node.name) if post != "NONE"
                else scores]
    labels = _names(_attr(node, "classlabels_ints", None)
                    or _attr(node, "classlabels_strings", None) or [])
    if rows == 1 and len(labels) == 2:  # binary with one score row: [-s, s]
        matrix, bias = np.hstack([-matrix, matrix]), np.concatenate([-bias, bias])
    t.class_labels = labels
    scores = _affine_map(a, matrix, bias)
    return [Labels(t.class_labels), Deferred(scores, _POST_TRANSFORMS[post], node.name)]


def _zipmap(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    labels = _attr(node, "classlabels_int64s", None) or _attr(node, "classlabels_strings", [])
    if labels and not t.class_labels:
        t.class_labels = _names(labels)
    value = args[0]
    return [value if isinstance(value, Deferred) else Deferred(t.trunk(node, value), (),
                                                               node.name)]


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
    raise Unsupported(f"node {node.name!r} (ArrayFeatureExtractor) selects encrypted "
                      f"features; only class-label lookups are supported")


def _cast(t: _Tracer, node: onnx.NodeProto, args: list[Value]) -> list[Value]:
    to = _attr(node, "to", onnx.TensorProto.FLOAT)
    if isinstance(args[0], Labels) or to in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                              onnx.TensorProto.FLOAT16):
        return [args[0]]
    raise Unsupported(f"node {node.name!r} (Cast) to a non-float type on encrypted data")


_HANDLERS: dict[str, Callable[[_Tracer, onnx.NodeProto, list[Value]], list[Value]]] = {
    "Identity": _identity,
    "Dropout": _identity,
    "Cast": _cast,
    "Flatten": _rows_preserving,
    "Reshape": _rows_preserving,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _arith,
    "Sub": _arith,
    "Mul": _arith,
    "Div": _arith,
    "Neg": _neg,
    "Pow": _pow,
    "Relu": _activation("relu"),
    "Tanh": _activation("tanh"),
    "Sigmoid": _activation("sigmoid"),
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "Normalizer": _normalizer,
    "Scaler": _scaler,
    "LinearClassifier": _linear_model,
    "LinearRegressor": _linear_model,
    "ZipMap": _zipmap,
    "ArgMax": _argmax,
    "ArrayFeatureExtractor": _feature_extractor,
}

_SUGGESTIONS = {
    "MaxPool": "; use AveragePool instead",
    "Max": "; use an average or a polynomial activation",
    "If": "; data-dependent control flow cannot run on ciphertexts",
    "Loop": "; data-dependent control flow cannot run on ciphertexts",
    "Where": "; data-dependent selection cannot run on ciphertexts",
}


def _hint(node: onnx.NodeProto) -> str:
    return _SUGGESTIONS.get(node.op_type, "")


def _names(values: Sequence[Any]) -> tuple[str, ...]:
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in values)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def describe_supported() -> Sequence[str]:
    return sorted(_HANDLERS)

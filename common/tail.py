"""The output tail: exact operations the buyer applies to decrypted scores.

Softmax, logistic, normalizers and trailing activations cost nothing in plaintext but a
lot under encryption, so the seller's plan stops before them and the offer names them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from common.errors import BadInput

FloatArray = npt.NDArray[np.float64]


def _softmax(x: FloatArray) -> FloatArray:
    shifted = np.exp(x - x.max(axis=1, keepdims=True))
    result: FloatArray = shifted / shifted.sum(axis=1, keepdims=True)
    return result


def _sigmoid(x: FloatArray) -> FloatArray:
    result: FloatArray = 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for large |x|
    return result


def _normalize(x: FloatArray, norm: FloatArray) -> FloatArray:
    result: FloatArray = x / np.where(norm == 0, 1.0, norm)
    return result


TAIL_OPS: dict[str, Callable[[FloatArray], FloatArray]] = {
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "square": np.square,
    "softmax": _softmax,
    "log_softmax": lambda x: np.log(_softmax(x)),
    "l1": lambda x: _normalize(x, np.abs(x).sum(axis=1, keepdims=True)),
    "l2": lambda x: _normalize(x, np.sqrt((x * x).sum(axis=1, keepdims=True))),
    "max": lambda x: _normalize(x, x.max(axis=1, keepdims=True)),
}


# How much each op can move its outputs per unit change of its inputs (the largest |change|
# of any output over the largest |change| of any input, everywhere): sigmoid' <= 1/4;
# softmax: |dp_i| <= 2 p_i (1 - p_i) max|dz| <= max|dz| / 2; log-softmax: 2. Square and
# the normalizers have no such bound.
LIPSCHITZ = {"relu": 1.0, "tanh": 1.0, "sigmoid": 0.25, "softmax": 0.5, "log_softmax": 2.0}


def tail_lipschitz(ops: Sequence[str]) -> float | None:
    """The bound for the whole tail (the product of its ops'), None where an op has none."""
    bound = 1.0
    for op in ops:
        if op not in LIPSCHITZ:
            return None
        bound *= LIPSCHITZ[op]
    return bound


def check_tail(ops: Sequence[str]) -> None:
    unknown = [op for op in ops if op not in TAIL_OPS]
    if unknown:
        raise BadInput(f"unknown output tail operation(s) {unknown}; known: {sorted(TAIL_OPS)}")


def apply_tail(scores: FloatArray, ops: Sequence[str]) -> FloatArray:
    check_tail(ops)
    out = np.asarray(scores, dtype=np.float64)
    for op in ops:
        out = np.asarray(TAIL_OPS[op](out), dtype=np.float64)
    return out


def predicted_labels(outputs: FloatArray, class_labels: Sequence[str]) -> list[str]:
    """Argmax over the compared output, named by class label (index when unlabeled). One
    score for two classes is a decision function (e.g. LinearSVC's): positive means the
    second class, as in scikit-learn."""
    if outputs.shape[1] == 1 and len(class_labels) <= 1:
        return []  # a regression: no labels
    if outputs.shape[1] == 1 and len(class_labels) == 2:
        return [class_labels[1] if score > 0 else class_labels[0] for score in outputs[:, 0]]
    index = np.argmax(outputs, axis=1)
    names = list(class_labels) or [str(i) for i in range(outputs.shape[1])]
    return [names[i] for i in index]

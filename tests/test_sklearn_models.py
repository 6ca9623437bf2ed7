"""scikit-learn models as skl2onnx exports them: the binary MLP's output
sigmoid."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from skl2onnx import to_onnx
from sklearn.datasets import load_breast_cancer
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from common.onnx_io import MAX_IR_VERSION, run_model
from common.tabular import FloatArray
from common.tail import apply_tail
from seller_server.compiler import compile_model

OPSETS = {"": 17, "ai.onnx.ml": 3}


def _standardized(x: FloatArray) -> FloatArray:
    scaled: FloatArray = (x - x.mean(axis=0)) / x.std(axis=0)
    return scaled


CANCER_X, CANCER_Y = load_breast_cancer(return_X_y=True)
CANCER_X = _standardized(CANCER_X)[:, :8]  # 8 features keep the squares few


def _onnx(model: Any, x: FloatArray, zipmap: bool | None = None) -> bytes:
    options = None if zipmap is None else {id(model): {"zipmap": zipmap}}
    exported = to_onnx(model, x[:1].astype(np.float32), target_opset=OPSETS, options=options)
    exported.ir_version = min(exported.ir_version, MAX_IR_VERSION)
    data: bytes = exported.SerializeToString()
    return data


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

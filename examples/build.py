"""Build the example catalog from datasets shipped inside scikit-learn (no downloads).

    python examples/build.py --out DIR

writes DIR/catalog/ (ONNX models, listing files, the seller's calibration rows) and
DIR/data/ (held-out test rows for the buyer, with a label column `y`):
  * breast-cancer-lr: StandardScaler + LogisticRegression on breast_cancer (exact under HE)
  * digits-mlp: MinMaxScaler + MLPClassifier (64-32-10, tanh) on digits (tanh approximated
    by Chebyshev polynomials on calibrated ranges)
With --cnn it adds the larger networks: digits-relu-mlp (MinMaxScaler + MLPClassifier
64-32-10 with ReLU: one Chebyshev series shared by its hidden units) and the
PyTorch-exported networks of examples/models/ (trained by examples/torch_models.py):
digits-square-mlp, digits-cnn (8x8), digits-relu-cnn (8x8, ReLU and max pooling) and
cryptonets (28x28 upsampled digits); their calibration rows are .npz files.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from skl2onnx import to_onnx
from sklearn.datasets import load_breast_cancer
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.onnx_io import save_model
from common.tabular import FloatArray, write_csv
from examples.datasets import SEED, digits, pixel_columns

OPSETS = {"": 17, "ai.onnx.ml": 3}


def _export(pipeline: Pipeline, sample: FloatArray, zipmap: bool) -> object:
    options = None if zipmap else {id(pipeline.steps[-1][1]): {"zipmap": False}}
    return to_onnx(pipeline, sample[:1].astype(np.float32), options=options,
                   target_opset=OPSETS)


def _publish(out: Path, name: str, description: str, price: str, budget: int,
             pipeline: Pipeline, columns: list[str], x_train: FloatArray, x_test: FloatArray,
             y_test: npt.NDArray[Any], zipmap: bool) -> None:
    catalog, data = out / "catalog", out / "data"
    catalog.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_")
    save_model(_export(pipeline, x_train, zipmap), catalog / f"{stem}.onnx")  # type: ignore[arg-type]
    write_csv(catalog / f"{stem}_calibration.csv", columns, x_train)
    write_csv(data / f"{stem}_test.csv", columns, x_test, "y", list(y_test))
    np.savez(data / f"{stem}_test.npz", X=x_test, y=y_test)
    listing = {
        "name": name,
        "description": description,
        "model": f"{stem}.onnx",
        "calibration": f"{stem}_calibration.csv",
        "input_columns": columns,
        "price": price,
        "trial_budget_rows": budget,
    }
    (catalog / f"{stem}.json").write_text(json.dumps(listing, indent=2) + "\n")
    accuracy = pipeline.score(x_test, y_test)
    print(f"{name}: plaintext test accuracy {accuracy:.4f} on {len(y_test)} rows")


TORCH_MODELS = {  # listing name: (file in examples/models, image side, price, description)
    "digits-square-mlp": ("digits_square_mlp", 8, "30.00",
                          "8x8 digits; MLP 64-32-10 with x*x activations (exact under CKKS)"),
    "digits-cnn": ("digits_cnn", 8, "45.00",
                   "8x8 digits; conv 3x3 (4 maps) + batch norm + square + average pool + "
                   "dense"),
    "digits-relu-cnn": ("digits_relu_cnn", 8, "50.00",
                        "8x8 digits; conv 3x3 (4 maps) + ReLU + max pool 2x2 + dense 10 "
                        "(max pooling under encryption: rounds of |a - b|)"),
    "digits-bident": ("digits_bident", 8, "35.00",
                      "8x8 digits; bident MLP (untrusted branch 64-64-64, trusted 64-64, x*x "
                      "activations, product merge, dense 10); runs split, its trusted half "
                      "in a trusted environment"),
    "cryptonets": ("cryptonets", 28, "60.00",
                   "28x28 upsampled digits; CryptoNets shape: conv 5x5 stride 2, square, "
                   "dense 100, square, dense 10"),
}


# max |error| on the logits (up to 18 in size) the buyer is told of, where 0.01 would
# need a deeper ring: the ReLU CNN meets 0.3 at depth 20 (N=2^15), 0.01 needs depth 31
LOOSER_MAX_ERROR = {"digits-relu-cnn": 0.3}


def build_torch_models(out: Path) -> None:
    catalog, data = out / "catalog", out / "data"
    for name, (stem, side, price, description) in TORCH_MODELS.items():
        x_train, x_test, _y_train, y_test = digits(side)
        columns = pixel_columns(side)
        (catalog / f"{stem}.onnx").write_bytes(
            (Path(__file__).resolve().parent / "models" / f"{stem}.onnx").read_bytes())
        np.savez_compressed(catalog / f"{stem}_calibration.npz", X=x_train)
        np.savez_compressed(data / f"{stem}_test.npz", X=x_test, y=y_test)
        write_csv(data / f"{stem}_test.csv", columns, x_test, "y", list(y_test))
        listing = {"name": name, "description": description, "model": f"{stem}.onnx",
                   "calibration": f"{stem}_calibration.npz", "input_columns": columns,
                   "price": price, "trial_budget_rows": 10000}
        if name in LOOSER_MAX_ERROR:
            listing["max_error"] = LOOSER_MAX_ERROR[name]
        (catalog / f"{stem}.json").write_text(json.dumps(listing, indent=2) + "\n")
        print(f"{name}: {len(columns)} inputs, {len(x_test)} test rows")


def build(out: Path, cnn: bool = False) -> None:
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    cancer = load_breast_cancer()
    x_train, x_test, y_train, y_test = train_test_split(
        cancer.data, cancer.target, test_size=0.3, random_state=SEED, stratify=cancer.target)
    lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_train, y_train)
    _publish(out, "breast-cancer-lr",
             "Breast cancer diagnosis (0 = malignant, 1 = benign) from 30 cell-nucleus "
             "measurements; scaler + logistic regression.",
             "25.00", 1000, lr, [str(c) for c in cancer.feature_names], x_train, x_test,
             y_test, zipmap=True)

    x_train, x_test, y_train, y_test = digits(8)

    def digits_mlp(name: str, activation: str, description: str) -> None:
        mlp = make_pipeline(MinMaxScaler(), MLPClassifier(
            (32,), activation=activation, alpha=0.1, max_iter=1500, random_state=SEED)
        ).fit(x_train, y_train)
        _publish(out, name, description, "40.00", 2000, mlp, pixel_columns(8), x_train,
                 x_test, y_test, zipmap=False)

    digits_mlp("digits-mlp", "tanh",
               "Handwritten digit recognition from 8x8 images (64 pixel intensities 0-16); "
               "min-max scaler + MLP 64-32-10 with tanh.")
    if cnn:
        digits_mlp("digits-relu-mlp", "relu",
                   "Handwritten digit recognition from 8x8 images; min-max scaler + MLP "
                   "64-32-10 with ReLU (a high-degree Chebyshev series under encryption).")
        build_torch_models(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "build")
    parser.add_argument("--cnn", action="store_true",
                        help="also list the larger networks (a ReLU MLP; the PyTorch-"
                             "exported square MLP and CNNs)")
    args = parser.parse_args()
    build(args.out, args.cnn)


if __name__ == "__main__":
    main()

"""The example datasets, from scikit-learn's bundled copies (nothing is downloaded).

Shared by the catalog builder and the (optional) PyTorch training script, so a model
trained there sees exactly the rows the catalog calibrates and tests with.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.ndimage import zoom
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0
Split = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.int64],
              npt.NDArray[np.int64]]


def digits(side: int = 8) -> Split:
    """8x8 digits (pixel values 0-16), or upsampled to side x side; rows are flattened.
    Returns x_train, x_test, y_train, y_test (70/30, stratified)."""
    data = load_digits()
    images = data.images.astype(np.float64)
    if side != 8:
        images = np.stack([zoom(image, side / 8, order=1) for image in images])
    rows = images.reshape(len(images), -1)
    x_train, x_test, y_train, y_test = train_test_split(
        rows, data.target, test_size=0.3, random_state=SEED, stratify=data.target)
    return x_train, x_test, y_train, y_test


def pixel_columns(side: int) -> list[str]:
    return [f"pixel_{r}_{c}" for r in range(side) for c in range(side)]

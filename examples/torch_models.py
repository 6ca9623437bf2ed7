"""Train the HE-friendly example networks with PyTorch and export them with
torch.onnx.export into examples/models/ (the exported files are checked in, so neither
the catalog nor the tests need PyTorch).

    python examples/torch_models.py [NAME ...]   # any Python with torch, numpy, scipy, sklearn

trains every model, or only those named.

* digits_square_mlp: 64-32-10 MLP with x*x activations (exact under CKKS)
* digits_cnn: 8x8 digits, conv 3x3 (4 maps) + batch norm + square + average pool + dense
* digits_relu_cnn: 8x8 digits, conv 3x3 (4 maps) + ReLU + max pool 2x2 + dense (the
  standard shape; max pooling is rounds of |a - b| under encryption)
* digits_bident (not made here): `gimme-seller bident train --base mlp --shape 64 --merge mul
  --asymmetric --activation square --epochs 60` on the digits split of examples/datasets.py
* cryptonets: 28x28 (upsampled digits), the CryptoNets shape: conv 5x5 stride 2 (5 maps),
  square, dense 100, square, dense 10
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.datasets import digits
from examples.torch_training import fit

OUT = Path(__file__).resolve().parent / "models"


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def square_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), Square(), nn.Linear(32, 10))


def digits_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), Square(),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))


def digits_relu_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 10))


def cryptonets() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 5, 5, stride=2, padding=1), Square(), nn.Flatten(),
                         nn.Linear(5 * 13 * 13, 100), Square(), nn.Linear(100, 10))


class Scaled(nn.Module):
    """Pixels arrive as 0-16 (as in the CSV); the model scales them itself."""

    def __init__(self, body: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.body, self.shape = body, shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x / 16.0).reshape(-1, *self.shape))


def train(name: str, body: nn.Module, side: int, shape: tuple[int, ...], epochs: int) -> None:
    torch.manual_seed(0)
    x_train, x_test, y_train, y_test = digits(side)
    model = Scaled(body, shape)
    xs = torch.tensor(x_train, dtype=torch.float32)
    ys = torch.tensor(y_train)
    fit(model, xs, ys, epochs)
    with torch.no_grad():
        predicted = model(torch.tensor(x_test, dtype=torch.float32)).argmax(1).numpy()
    print(f"{name}: test accuracy {np.mean(predicted == y_test):.4f}")
    sample = torch.tensor(x_test[:2], dtype=torch.float32)
    OUT.mkdir(exist_ok=True)
    torch.onnx.export(model, (sample,), str(OUT / f"{name}.onnx"), input_names=["x"],
                      output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("rows")},), dynamo=True,
                      external_data=False)


MODELS = {  # name: (body, image side, per-row shape, epochs)
    "digits_square_mlp": (square_mlp, 8, (64,), 60),
    "digits_cnn": (digits_cnn, 8, (1, 8, 8), 60),
    "digits_relu_cnn": (digits_relu_cnn, 8, (1, 8, 8), 60),
    "cryptonets": (cryptonets, 28, (1, 28, 28), 30),
}


def main() -> None:
    names = sys.argv[1:] or list(MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {list(MODELS)}")
    for name in names:
        body, side, shape, epochs = MODELS[name]
        train(name, body(), side, shape, epochs)


if __name__ == "__main__":
    main()

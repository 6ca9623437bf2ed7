"""The PyTorch kinds of bench/zoo.py: train one model and export it with torch.onnx.export.

    python bench/zoo_torch.py KIND DATA.npz OUT.onnx

Run by bench/zoo.py with the PyTorch interpreter (torch, numpy and onnx only: no
scikit-learn there), so the training rows arrive in DATA.npz (x_train, y_train) from the
project's own split. The model goes to OUT.onnx (written whole, then renamed); its
training accuracy is printed on stderr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.torch_training import fit

EPOCHS = {"digits": 60, "breast_cancer": 200}


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class Residual(nn.Module):
    """x + W2 relu(W1 x): a residual block whose skip is a sum of two encrypted branches."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner, self.outer = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(torch.relu(self.inner(x)))


class Prepared(nn.Module):
    """The model's own input preparation, then its body: (x - shift) / scale, reshaped."""

    def __init__(self, body: nn.Module, shift: npt.NDArray[np.float64],
                 scale: npt.NDArray[np.float64], shape: tuple[int, ...]) -> None:
        super().__init__()
        self.body, self.shape = body, shape
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(((x - self.shift) / self.scale).reshape(-1, *self.shape))


def _mlp(activation: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), activation, nn.Linear(32, 10))


def _cnn(pool: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), pool, nn.Flatten(),
                         nn.Linear(64, 10))


# kind: (dataset, body, per-row shape, input preparation: "pixels" (x / 16) or "standardize")
KINDS: dict[str, tuple[str, Callable[[], nn.Module], tuple[int, ...], str]] = {
    "torch-relu-mlp": ("digits", lambda: _mlp(nn.ReLU()), (64,), "pixels"),
    "torch-square-mlp": ("digits", lambda: _mlp(Square()), (64,), "pixels"),
    "torch-relu-cnn-avgpool": ("digits", lambda: _cnn(nn.AvgPool2d(2)), (1, 8, 8), "pixels"),
    "torch-relu-cnn-maxpool": ("digits", lambda: _cnn(nn.MaxPool2d(2)), (1, 8, 8), "pixels"),
    "torch-tanh-mlp-norm": ("breast_cancer",
                            lambda: nn.Sequential(nn.Linear(30, 16), nn.Tanh(),
                                                  nn.Linear(16, 2)), (30,), "standardize"),
    "torch-residual-relu": ("digits",
                            lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), Residual(32),
                                                  nn.ReLU(), nn.Linear(32, 10)),
                            (64,), "pixels"),
    "torch-layernorm-mlp": ("digits",
                            lambda: nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32),
                                                  nn.ReLU(), nn.Linear(32, 10)),
                            (64,), "pixels"),
}


def train(kind: str, x_train: npt.NDArray[np.float64], y_train: npt.NDArray[np.int64]
          ) -> nn.Module:
    dataset, body, shape, preparation = KINDS[kind]
    torch.manual_seed(0)
    features = x_train.shape[1]
    if preparation == "pixels":
        shift, scale = np.zeros(features), np.full(features, 16.0)
    else:
        shift, scale = x_train.mean(axis=0), x_train.std(axis=0) + 1e-12
    model = Prepared(body(), shift, scale, shape)
    xs = torch.tensor(x_train, dtype=torch.float32)
    ys = torch.tensor(y_train, dtype=torch.long)
    fit(model, xs, ys, EPOCHS[dataset])
    with torch.no_grad():
        accuracy = float((model(xs).argmax(1) == ys).float().mean())
    print(f"{kind}: training accuracy {accuracy:.4f}", file=sys.stderr)
    return model


def main() -> None:
    if len(sys.argv) != 4 or sys.argv[1] not in KINDS:
        raise SystemExit(f"usage: zoo_torch.py KIND DATA.npz OUT.onnx (KIND: {list(KINDS)})")
    kind, data, out = sys.argv[1:]
    torch.set_num_threads(1)
    arrays = np.load(data)
    model = train(kind, arrays["x_train"], arrays["y_train"])
    sample = torch.tensor(arrays["x_train"][:2], dtype=torch.float32)
    partial = out + ".part"
    torch.onnx.export(model, (sample,), partial, input_names=["x"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("rows")},), dynamo=True,
                      external_data=False)
    os.replace(partial, out)


if __name__ == "__main__":
    main()

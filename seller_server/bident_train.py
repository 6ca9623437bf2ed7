"""Train bident networks with PyTorch (an optional extra: the core install has no torch).

Run by `gimme-seller bident train` (and bench/bident.py) in a Python that has torch, as
`python -m seller_server.bident_train train|attack ...`; it needs only torch, numpy and
onnx(script), not the rest of Gimme, so the torch interpreter may be another Python.

Architectures (input: flat pixel rows, reshaped to --shape and divided by --scale):
  base      conv 3x3 (c) - act - avgpool 2 - conv 3x3 (2c) - act - avgpool 2 - dense h - act
            - dense classes                              (AvgPool: MaxPool has no HE form)
  bident    two branches on the same input, each the base up to `dense h - act`, merged by
            concat | mul | max | avg, then the head `dense classes` on the trusted side;
            asymmetric: the trusted branch is one conv layer of c/2 maps (a smaller TEE part)
  --base mlp: branches `dense h - act - dense h - act` (asymmetric trusted side: one
            layer); tiny, and with --activation square cheap under HE
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seller_server.bident import attack_arguments, train_arguments


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def _act(name: str) -> nn.Module:
    return Square() if name == "square" else nn.ReLU()


def branch(kind: str, shape: tuple[int, ...], channels: int, hidden: int, act: str,
           small: bool) -> nn.Module:
    """The base network up to its last hidden layer (small: the asymmetric trusted side)."""
    if kind == "mlp":  # dense h - act - dense h - act; small: one layer
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), hidden), _act(act),
                             *([] if small else [nn.Linear(hidden, hidden), _act(act)]))
    c, side = shape[0], shape[1]
    if small:
        maps = max(channels // 2, 1)
        return nn.Sequential(nn.Conv2d(c, maps, 3, padding=1), _act(act), nn.AvgPool2d(2),
                             nn.Flatten(), nn.Linear(maps * (side // 2) ** 2, hidden), _act(act))
    return nn.Sequential(nn.Conv2d(c, channels, 3, padding=1), _act(act), nn.AvgPool2d(2),
                         nn.Conv2d(channels, 2 * channels, 3, padding=1), _act(act),
                         nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(2 * channels * (side // 4) ** 2, hidden), _act(act))


class Net(nn.Module):
    """merge "none": the base model (one branch and the head)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        shape = tuple(config["shape"])
        common = (config["base"], shape, config["channels"], config["hidden"],
                  config["activation"])
        self.untrusted = branch(*common, small=False)
        self.trusted = (branch(*common, small=config["asymmetric"])
                        if config["merge"] != "none" else None)
        width = config["hidden"] * (2 if config["merge"] == "concat" else 1)
        self.head = nn.Linear(width, config["classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x / self.config["scale"]).reshape(-1, *self.config["shape"])
        a = self.untrusted(x)
        if self.trusted is None:
            return self.head(a)
        b = self.trusted(x)
        merge = self.config["merge"]
        if merge == "concat":
            m = torch.cat([a, b], dim=1)
        elif merge == "mul":
            m = a * b
        elif merge == "max":
            m = torch.maximum(a, b)
        else:
            m = (a + b) / 2
        return self.head(m)


def _load(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path) as data:
        return (torch.tensor(data["X"], dtype=torch.float32),
                torch.tensor(np.asarray(data["y"]).astype(np.int64)))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, test: tuple[torch.Tensor,
        torch.Tensor], epochs: int, seed: int, parameters: Any = None) -> list[dict[str, float]]:
    """Adam, batch 32, cross-entropy (the paper's setup); test accuracy after every epoch."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(parameters if parameters is not None else model.parameters(),
                                 lr=1e-3)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        started, total = time.perf_counter(), 0.0
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 32):
            batch = order[start:start + 32]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += float(loss) * len(batch)
        history.append({"epoch": epoch, "loss": total / len(x),
                        "test_accuracy": accuracy(model, *test),
                        "seconds": time.perf_counter() - started})
    return history


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    x, y = _load(args.data)
    test = _load(args.test)
    config = {"base": args.base, "shape": [int(d) for d in args.shape.split(",")],
              "channels": args.channels, "hidden": args.hidden, "activation": args.activation,
              "merge": args.merge, "asymmetric": args.asymmetric, "scale": args.scale,
              "classes": int(max(int(y.max()), int(test[1].max())) + 1)}
    model = Net(config)
    history = fit(model, x, y, test, args.epochs, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    torch.save({"config": config, "state": model.state_dict()}, args.out / "model.pt")
    torch.onnx.export(model, (x[:2],), str(args.out / "model.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("rows")},),
                      dynamo=True, external_data=False, verbose=False)
    counts = {part: sum(p.numel() for p in getattr(model, part).parameters())
              for part in ("untrusted", "trusted", "head") if getattr(model, part) is not None}
    summary = {"config": config, "parameters": counts, "history": history,
               "test_accuracy": history[-1]["test_accuracy"]}
    (args.out / "history.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({"test_accuracy": summary["test_accuracy"], "parameters": counts}))


def attack(args: argparse.Namespace) -> None:
    """An attacker who holds the untrusted half (weights frozen) trains a new trusted branch
    and head on a fraction of the training data."""
    saved = torch.load(args.model / "model.pt", weights_only=False)
    config = saved["config"]
    torch.manual_seed(args.seed)
    stolen = Net(config)  # fresh trusted branch and head
    stolen.untrusted.load_state_dict({k[len("untrusted."):]: v for k, v in
                                      saved["state"].items() if k.startswith("untrusted.")})
    for parameter in stolen.untrusted.parameters():
        parameter.requires_grad = False
    x, y = _load(args.data)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    keep = order[:max(int(len(x) * args.fraction), 1)]
    trainable = [p for p in stolen.parameters() if p.requires_grad]
    history = fit(stolen, x[keep], y[keep], _load(args.test), args.epochs, args.seed,
                  trainable)
    print(json.dumps({"rows": len(keep), "history": history}))


def main() -> None:
    parser = argparse.ArgumentParser(prog="bident_train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train_arguments(sub.add_parser("train"))
    attack_arguments(sub.add_parser("attack"))
    args = parser.parse_args()
    (train if args.command == "train" else attack)(args)


if __name__ == "__main__":
    main()

"""Bident experiments (seed 002) on digits 8x8 and the 28x28 upsampled variant: for the base
CNN and every merge (concat, mul, max, avg), symmetric and asymmetric, the accuracy,
the epochs needed, the inference cost of the split deployment against the whole model in
one process, and the attack the paper leaves open: an attacker holding only the untrusted
half trains a new trusted half (branch + head) on 10% of the training rows.

    python bench/bident.py [--epochs 30] [--attack-epochs 30] [--sides 8,28] [--json out]

Training runs in the torch Python (seller_server.bident.torch_python: 'scripts/setup.sh
--torch'); timing runs here with onnxruntime, the trusted half in its own process
(buyer_client.trusted), exactly as `gimme-buyer run` does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from buyer_client.run import predict_bident
from buyer_client.trusted import TrustedHalf
from common.bident import KEY_FILE, UNTRUSTED_FILE, Manifest
from common.onnx_io import model_feed, session
from common.tabular import FloatArray
from examples.datasets import digits
from seller_server.bident import run_torch, split

CONFIGS = [("base", "none", False), *[(f"{m} {'asym' if a else 'sym'}", m, a)
                                      for m in ("concat", "mul", "max", "avg")
                                      for a in (False, True)]]


@dataclass
class Row:
    dataset: str
    model: str
    untrusted_parameters: int
    trusted_parameters: int  # trusted branch + head (base: the whole model)
    accuracy: float
    epochs_needed: int | None  # first epoch within 1 point of the base model's accuracy
    whole_latency_ms: float  # one row, whole model, one process
    split_latency_ms: float | None  # one row through both halves
    whole_rows_per_s: float
    split_rows_per_s: float | None
    attack_accuracy: float | None  # new trusted half on 10% with the untrusted half fixed
    attack_curve: list[float] | None


def _latency_and_throughput(run: Callable[[FloatArray], object], rows: FloatArray,
                            repeats: int) -> tuple[float, float]:
    """Median single-row latency (ms) and rows per second over the whole set."""
    one = []
    for i in range(repeats):
        tick = time.perf_counter()
        run(rows[i % len(rows):i % len(rows) + 1])
        one.append(time.perf_counter() - tick)
    tick = time.perf_counter()
    for _ in range(3):
        run(rows)
    rate = 3 * len(rows) / (time.perf_counter() - tick)
    return 1e3 * statistics.median(one), rate


def _timings(model: bytes, package: Path | None, rows: FloatArray, repeats: int
             ) -> tuple[float, float, float | None, float | None]:
    """Whole model in one process; then, for a package, through both halves (checked to
    predict the same classes)."""
    whole = session(model)
    whole_latency, whole_rate = _latency_and_throughput(
        lambda r: whole.run(None, model_feed(whole, r)), rows, repeats)
    if package is None:
        return whole_latency, whole_rate, None, None
    manifest = Manifest.read(package)
    untrusted = session((package / UNTRUSTED_FILE).read_bytes())
    with TrustedHalf(package, package / KEY_FILE) as trusted:
        def through_halves(r: FloatArray) -> dict[str, FloatArray]:
            return predict_bident(untrusted, trusted, manifest, r)
        split_latency, split_rate = _latency_and_throughput(through_halves, rows, repeats)
        halves = through_halves(rows)[manifest.structure.outputs[0]]
    if not np.array_equal(halves.argmax(1), whole.run(None, model_feed(whole, rows))[0]
                          .argmax(1)):
        raise AssertionError(f"{package}: the halves disagree with the whole model")
    return whole_latency, whole_rate, split_latency, split_rate


def experiment(side: int, epochs: int, attack_epochs: int, work: Path, repeats: int,
               console: Console) -> list[Row]:
    x_train, x_test, y_train, y_test = digits(side)
    train, test = work / f"train{side}.npz", work / f"test{side}.npz"
    np.savez(train, X=x_train, y=y_train)
    np.savez(test, X=x_test, y=y_test)
    tenth = np.random.default_rng(0).permutation(len(x_train))[:len(x_train) // 10]
    small = work / f"tenth{side}.npz"  # the attacker's rows, also the scratch reference's
    np.savez(small, X=x_train[tenth], y=y_train[tenth])
    dataset = f"digits {side}x{side}"
    rows: list[Row] = []
    base_accuracy = 0.0
    for name, merge, asymmetric in CONFIGS:
        out = work / f"{side}-{merge}-{int(asymmetric)}"
        result = run_torch("train", ["--data", str(train), "--test", str(test), "--shape",
                                     f"1,{side},{side}", "--merge", merge, "--epochs",
                                     str(epochs), "--out", str(out),
                                     *(["--asymmetric"] if asymmetric else [])])
        summary = json.loads((out / "history.json").read_text())
        curve = [h["test_accuracy"] for h in summary["history"]]
        if merge == "none":
            base_accuracy = curve[-1]
        needed = next((h["epoch"] for h in summary["history"]
                       if h["test_accuracy"] >= base_accuracy - 0.01), None)
        model = (out / "model.onnx").read_bytes()
        parts = result["parameters"]
        attack_accuracy = attack_curve = None
        package = None
        if merge != "none":
            package = out / "package"
            split(model, package, x_test)
        whole_latency, whole_rate, split_latency, split_rate = _timings(
            model, package, x_test, repeats)
        if merge != "none":
            stolen = run_torch("attack", ["--model", str(out), "--data", str(small), "--test",
                                          str(test), "--fraction", "1", "--epochs",
                                          str(attack_epochs)])
            attack_curve = [h["test_accuracy"] for h in stolen["history"]]
            attack_accuracy = attack_curve[-1]
        trusted_parameters = (parts.get("trusted", 0) + parts["head"] if merge != "none"
                              else parts["untrusted"] + parts["head"])
        rows.append(Row(dataset, name, parts["untrusted"] if merge != "none" else 0,
                        trusted_parameters, curve[-1], needed, whole_latency, split_latency,
                        whole_rate, split_rate, attack_accuracy, attack_curve))
        console.print(f"{dataset} {name}: accuracy {curve[-1]:.2%}"
                      + (f", attack {attack_accuracy:.2%}" if attack_accuracy else ""))
    # the reference for the attack: the base model trained from scratch on the same 10%
    scratch = run_torch("train", ["--data", str(small), "--test", str(test), "--shape",
                                  f"1,{side},{side}", "--merge", "none", "--epochs",
                                  str(attack_epochs), "--out", str(work / f"scratch{side}")])
    rows.append(Row(dataset, "base from scratch on 10%", 0, 0, scratch["test_accuracy"],
                    None, 0.0, None, 0.0, None, None, None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--attack-epochs", type=int, default=30)
    parser.add_argument("--sides", default="8,28", help="image sides: 8 and/or 28")
    parser.add_argument("--repeats", type=int, default=200, help="single-row timings")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="gimme-bident-") as tmp:
        rows = [r for side in args.sides.split(",")
                for r in experiment(int(side), args.epochs, args.attack_epochs, Path(tmp),
                                    args.repeats, console)]
    table = Table("data", "model", "untrusted params", "trusted params", "accuracy",
                  "epochs to base-1pt", "latency whole / split (µs)",
                  "rows/s whole / split", "attack: new trusted half on 10%",
                  title=f"bident networks ({args.epochs} epochs, Adam, batch 32)")
    for r in rows:
        table.add_row(
            r.dataset, r.model, str(r.untrusted_parameters), str(r.trusted_parameters),
            f"{r.accuracy:.2%}", str(r.epochs_needed or "-"),
            f"{1e3 * r.whole_latency_ms:.0f} / {1e3 * r.split_latency_ms:.0f}"
            if r.split_latency_ms else (f"{1e3 * r.whole_latency_ms:.0f}"
                                        if r.whole_latency_ms else "-"),
            f"{r.whole_rows_per_s:,.0f} / {r.split_rows_per_s:,.0f}" if r.split_rows_per_s
            else (f"{r.whole_rows_per_s:,.0f}" if r.whole_rows_per_s else "-"),
            f"{r.attack_accuracy:.2%}" if r.attack_accuracy is not None else "-")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()

"""Scoring decrypted predictions against the buyer's labels, and showing the result."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from common.errors import BadInput


def classification_metrics(truth: Sequence[str], predicted: Sequence[str],
                           classes: Sequence[str]) -> dict[str, Any]:
    labels = list(classes) + sorted(set(truth) - set(classes))
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(truth, predicted, strict=True):
        matrix[index[t]][index[p]] += 1
    per_class = {}
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        predicted_count = sum(row[i] for row in matrix)
        support = sum(matrix[i])
        per_class[label] = {
            "precision": tp / predicted_count if predicted_count else 0.0,
            "recall": tp / support if support else 0.0,
            "support": support,
        }
    correct = sum(matrix[i][i] for i in range(len(labels)))
    return {"kind": "classification", "accuracy": correct / len(truth), "rows": len(truth),
            "labels": labels, "per_class": per_class, "confusion_matrix": matrix}


def regression_targets(labels: Sequence[str], what: str) -> list[float]:
    """The label column of a regression model's test rows, as numbers."""
    targets = []
    for row, label in enumerate(labels, start=1):
        try:
            value = float(label)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise BadInput(f"{what} is a regression model (one score, no classes): its labels "
                           f"are the target values, but row {row}'s label {label!r} is not a "
                           f"finite number")
        targets.append(value)
    return targets


def regression_metrics(truth: Sequence[float], predicted: Sequence[float]) -> dict[str, Any]:
    """RMSE, MAE and R^2 (scikit-learn's definitions; R^2 of constant targets is 1 for a
    perfect fit and 0 otherwise, undefined below two rows)."""
    n = len(truth)
    errors = [p - t for t, p in zip(truth, predicted, strict=True)]
    sse = sum(e * e for e in errors)
    mean = sum(truth) / n
    sst = sum((t - mean) ** 2 for t in truth)
    r2 = None if n < 2 else (1 - sse / sst if sst > 0 else float(sse == 0))
    return {"kind": "regression", "rows": n, "rmse": math.sqrt(sse / n),
            "mae": sum(abs(e) for e in errors) / n, "r2": r2, "target_mean": mean,
            "target_std": math.sqrt(sst / n)}


def render_regression(console: Console, metrics: dict[str, Any], title: str) -> None:
    r2 = "undefined" if metrics["r2"] is None else f"{metrics['r2']:.4f}"
    console.print(f"\n[bold]{title}[/bold]: RMSE [bold]{metrics['rmse']:.4g}[/bold], MAE "
                  f"{metrics['mae']:.4g}, R\u00b2 [bold]{r2}[/bold] on {metrics['rows']} rows "
                  f"(targets: mean {metrics['target_mean']:.4g}, std "
                  f"{metrics['target_std']:.4g})")


def render_metrics(console: Console, metrics: dict[str, Any], title: str) -> None:
    console.print(f"\n[bold]{title}[/bold]: accuracy [bold]{metrics['accuracy']:.2%}[/bold] "
                  f"on {metrics['rows']} rows")
    per_class = Table("class", "precision", "recall", "support", title="per class")
    for label, m in metrics["per_class"].items():
        per_class.add_row(label, f"{m['precision']:.3f}", f"{m['recall']:.3f}",
                          str(m["support"]))
    console.print(per_class)
    labels = metrics["labels"]
    confusion = Table("true \\ predicted", *labels, title="confusion matrix")
    for label, row in zip(labels, metrics["confusion_matrix"], strict=True):
        confusion.add_row(label, *(str(v) for v in row))
    console.print(confusion)

"""Scoring decrypted predictions against the buyer's labels, and showing the result."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table


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
    return {"accuracy": correct / len(truth), "rows": len(truth), "labels": labels,
            "per_class": per_class, "confusion_matrix": matrix}


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

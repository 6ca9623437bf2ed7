"""Reading rows of features (and labels) from CSV or .npz, with errors that say what to fix."""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from common.errors import BadInput

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Table:
    rows: FloatArray  # (n, len(columns)) in the requested column order
    labels: tuple[str, ...] | None


def label_text(value: object) -> str:
    """Labels compare as text; 1, 1.0 and '1' are the same class."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, bytes):
        return value.decode()
    return str(value).strip()


def load_table(path: Path, columns: Sequence[str], label_column: str | None = None) -> Table:
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if path.suffix.lower() == ".npz":
        table = _load_npz(path, len(columns), label_column is not None)
    elif path.suffix.lower() in (".csv", ".txt"):
        table = _load_csv(path, columns, label_column)
    else:
        raise BadInput(f"{path}: unsupported file type {path.suffix!r}; use .csv (with a header "
                       f"row) or .npz (arrays X and y)")
    if table.rows.shape[0] == 0:
        raise BadInput(f"{path}: no data rows")
    bad = np.argwhere(~np.isfinite(table.rows))
    if bad.size:
        row, col = (int(v) for v in bad[0])
        raise BadInput(f"{path}: row {row + 1}, column {columns[col]!r} is not a finite number "
                       f"({len(bad)} such values); fill or drop them first")
    return table


def _load_npz(path: Path, width: int, want_labels: bool) -> Table:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "X" not in data:
                raise BadInput(f"{path}: .npz needs an array 'X' (rows x {width} features); it "
                               f"has {sorted(data.files)}")
            rows = np.asarray(data["X"], dtype=np.float64)
            labels = tuple(label_text(v) for v in data["y"]) if "y" in data else None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise BadInput(f"{path}: not a readable .npz file ({exc})") from exc
    if rows.ndim != 2 or rows.shape[1] != width:
        raise BadInput(f"{path}: X has shape {rows.shape}; the model takes {width} features "
                       f"per row")
    if want_labels and labels is None:
        raise BadInput(f"{path}: .npz has no array 'y' with the labels")
    if labels is not None and len(labels) != rows.shape[0]:
        raise BadInput(f"{path}: X has {rows.shape[0]} rows but y has {len(labels)}")
    return Table(rows, labels)


def _load_csv(path: Path, columns: Sequence[str], label_column: str | None) -> Table:
    try:
        with path.open(newline="") as handle:
            reader = csv.reader(handle)
            header = [h.strip() for h in next(reader, [])]
            body = [line for line in reader if line]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadInput(f"{path}: not a readable CSV file ({exc})") from exc
    if not header:
        raise BadInput(f"{path}: empty file; expected a header row naming the columns")
    missing = [c for c in columns if c not in header]
    if missing:
        raise BadInput(f"{path}: missing column(s) {_short(missing)}; the model needs "
                       f"{len(columns)} columns: {_short(list(columns))} (the file has "
                       f"{_short(header)})")
    if label_column is not None and label_column not in header:
        raise BadInput(f"{path}: no label column {label_column!r} (the file has "
                       f"{_short(header)}); pass --label-column NAME")
    index = [header.index(c) for c in columns]
    rows = np.empty((len(body), len(columns)))
    for r, line in enumerate(body):
        if len(line) != len(header):
            raise BadInput(f"{path}: line {r + 2} has {len(line)} fields, the header has "
                           f"{len(header)}")
        for c, i in enumerate(index):
            try:
                rows[r, c] = float(line[i])
            except ValueError:
                raise BadInput(f"{path}: line {r + 2}, column {columns[c]!r}: {line[i]!r} is "
                               f"not a number") from None
    labels = None
    if label_column is not None:
        li = header.index(label_column)
        labels = tuple(label_text(_number_or_text(line[li])) for line in body)
    return Table(rows, labels)


def _number_or_text(text: str) -> object:
    try:
        return float(text)
    except ValueError:
        return text


def _short(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def write_csv(path: Path, columns: Sequence[str], rows: FloatArray,
              label_column: str | None = None, labels: Sequence[object] = ()) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*columns, *([label_column] if label_column else [])])
        for i, row in enumerate(rows):
            writer.writerow([repr(float(v)) for v in row]
                            + ([label_text(labels[i])] if label_column else []))

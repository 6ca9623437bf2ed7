"""Reading the buyer's rows: every wrong file gets an error that says what to fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.errors import BadInput
from common.tabular import load_table

COLUMNS = ["a", "b", "c"]


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rows.csv"
    path.write_text(text)
    return path


def test_columns_are_taken_by_name_in_model_order(tmp_path: Path) -> None:
    table = load_table(_csv(tmp_path, "c,extra,a,b,y\n3,x,1,2,0\n6,x,4,5,1.0\n"), COLUMNS, "y")
    assert table.rows.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert table.labels == ("0", "1")


@pytest.mark.parametrize(("text", "message"), [
    ("a,b,y\n1,2,0\n", r"missing column\(s\) 'c'; the model needs 3 columns"),
    ("a,b,c\n1,2,3\n", "no label column 'y'"),
    ("a,b,c,y\n1,two,3,0\n", "line 2, column 'b': 'two' is not a number"),
    ("a,b,c,y\n1,2,3\n", "line 2 has 3 fields, the header has 4"),
    ("", "empty file"),
    ("a,b,c,y\n", "no data rows"),
    ("a,b,c,y\n1,nan,3,0\n", "row 1, column 'b' is not a finite number"),
])
def test_bad_csv_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        load_table(_csv(tmp_path, text), COLUMNS, "y")


def test_npz(tmp_path: Path) -> None:
    path = tmp_path / "rows.npz"
    np.savez(path, X=np.ones((4, 3)), y=np.array([0, 1, 0, 1]))
    assert load_table(path, COLUMNS, "y").labels == ("0", "1", "0", "1")
    np.savez(path, X=np.ones((4, 2)), y=np.array([0, 1, 0, 1]))
    with pytest.raises(BadInput, match=r"X has shape \(4, 2\); the model takes 3"):
        load_table(path, COLUMNS, "y")
    np.savez(path, data=np.ones((4, 3)))
    with pytest.raises(BadInput, match="needs an array 'X'"):
        load_table(path, COLUMNS)
    path.write_bytes(b"garbage")
    with pytest.raises(BadInput, match=r"not a readable .npz"):
        load_table(path, COLUMNS)


def test_other_files(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no such file"):
        load_table(tmp_path / "missing.csv", COLUMNS)
    (tmp_path / "rows.xlsx").write_bytes(b"x")
    with pytest.raises(BadInput, match=r"unsupported file type '.xlsx'"):
        load_table(tmp_path / "rows.xlsx", COLUMNS)

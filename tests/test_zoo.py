"""bench/zoo.py end to end on two cheap kinds: an exact model traded under encryption
matches onnxruntime, KNN (a square root) is refused by name, and the exit status is 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_zoo_reports_a_match_and_a_refusal(tmp_path: Path) -> None:
    out = tmp_path / "zoo.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "zoo.py"), "--only", "logreg-std,knn",
         "--rows", "8", "--timeout", "60", "--markdown", "--json", str(out),
         "--cache", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=150, check=False)
    assert done.returncode == 0, done.stderr
    results = {r["name"]: r for r in json.loads(out.read_text())}
    exact, knn = results["logreg-std"], results["knn"]
    assert exact["outcome"] == "match", exact
    assert exact["rows"] == 8 and exact["agreement"] == 1.0 and exact["max_error"] < 0.01
    assert exact["ring"] >= 8192 and exact["depth"] >= 1 and exact["ciphertext_bytes"] > 0
    assert knn["outcome"] == "refused" and "Sqrt" in knn["detail"], knn
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | data | outcome |")
    assert any(line.startswith("| logreg-std | breast_cancer | match |") for line in table)
    assert any(line.startswith("| knn | breast_cancer | refused (expected) |")
               for line in table)
    assert "2 models: 1 match, 1 refused as expected, 0 failures" in done.stdout
    assert "[2/2] knn" in done.stderr  # progress goes to stderr

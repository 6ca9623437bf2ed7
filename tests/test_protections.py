"""Seller protections that run outside a trial: the extraction audit and leak tracing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from seller_server.fingerprint import fingerprint, new_key, trace
from tests.conftest import BIN


def test_extraction_audit_writes_report_and_plot(examples: Path, tmp_path: Path) -> None:
    out = tmp_path / "audit"
    result = subprocess.run(
        [str(BIN / "gimme-seller"), "audit", "breast-cancer-lr", "--catalog",
         str(examples / "catalog"), "--eval", str(examples / "data" / "breast_cancer_lr_test.csv"),
         "--budgets", "4,60", "--max-fidelity", "0.99", "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "audit-breast-cancer-lr.json").read_text())
    assert (out / "audit-breast-cancer-lr.png").read_bytes()[:4] == b"\x89PNG"
    points = {(p["policy"], p["strategy"], p["budget"]): p for p in report["points"]}
    assert len(points) == 4 * 2 * 2
    # stolen fidelity rises with the number of queries
    assert points["full", "random", 60]["fidelity"] > points["full", "random", 4]["fidelity"]
    assert 0.8 < report["victim_accuracy"] <= 1.0
    assert report["recommended_budget"] in (0, 4, 60)
    assert "recommended trial budget for policy 'full'" in result.stdout


def test_a_copy_is_traced_to_its_key_and_survives_pruning(examples: Path) -> None:
    model = (examples / "catalog" / "digits_mlp.onnx").read_bytes()
    keys = {f"sale-{i}": new_key() for i in range(20)}
    leaked = fingerprint(model, keys["sale-7"], 0.03)
    matches = trace(leaked, model, keys)
    assert matches[0].sale == "sale-7" and matches[0].z > 20
    assert all(abs(m.z) < 5 for m in matches[1:])  # the other 19 keys look like chance
    assert matches[0].p_value < 1e-9

    # 30% of every tensor's weights (the smallest) pruned to zero
    import onnx
    from onnx import numpy_helper

    copy = onnx.load_model_from_string(leaked)
    for init in copy.graph.initializer:
        values = numpy_helper.to_array(init)
        if values.size >= 8:
            cut = np.quantile(np.abs(values), 0.3)
            init.CopyFrom(numpy_helper.from_array(np.where(np.abs(values) < cut, 0, values)
                                                  .astype(values.dtype), init.name))
    pruned = trace(copy.SerializeToString(), model, keys)
    assert pruned[0].sale == "sale-7" and pruned[0].z > 6

    # the original, never sold, matches nobody
    assert trace(model, model, keys)[0].z == 0.0


def test_tracing_refuses_a_different_model(examples: Path) -> None:
    from common.errors import BadInput

    other = (examples / "catalog" / "breast_cancer_lr.onnx").read_bytes()
    model = (examples / "catalog" / "digits_mlp.onnx").read_bytes()
    with pytest.raises(BadInput, match="not a copy of this model"):
        trace(other, model, {"sale": new_key()})

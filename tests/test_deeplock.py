"""Deep-Lock (seed 003): locking is exact to undo with the key and ruinous without it."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import helper, numpy_helper

from common.deeplock import is_locked, key_id, lock, new_master_key, unlock
from common.errors import BadInput
from common.onnx_io import run_model, session
from common.tabular import load_table
from common.tail import predicted_labels
from tests.conftest import BIN, ROOT

TORCH_MODELS = sorted((ROOT / "examples" / "models").glob("*.onnx"))


def _models(examples: Path) -> list[Path]:
    return [*sorted((examples / "catalog").glob("*.onnx")), *TORCH_MODELS]


def _parameters(model_bytes: bytes) -> npt.NDArray[np.float32]:
    """Every float parameter, flattened, in the order Deep-Lock visits them."""
    model = onnx.load_model_from_string(model_bytes)
    values: list[npt.NDArray[np.float32]] = [
        numpy_helper.to_array(i).astype(np.float32).ravel() for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT]
    values += [np.array(a.floats, dtype=np.float32) for n in model.graph.node
               for a in n.attribute if a.type == onnx.AttributeProto.FLOATS]
    return np.concatenate(values)


def test_the_key_restores_every_model_bit_for_bit(examples: Path) -> None:
    for path in _models(examples):
        original = path.read_bytes()
        key = new_master_key()
        locked = lock(original, key)
        assert is_locked(locked) and not is_locked(original)
        before, after = _parameters(original), _parameters(locked)
        assert before.shape == after.shape and abs(len(locked) - len(original)) < 200
        # every parameter substituted (a zero byte pattern maps to a random one too)
        assert np.mean(before != after) > 0.99, path.name
        assert np.all(np.isfinite(after))
        assert unlock(locked, key) == original, path.name


def test_without_the_key_a_model_is_a_random_classifier(examples: Path) -> None:
    model = (examples / "catalog" / "digits_mlp.onnx").read_bytes()
    test = np.load(examples / "data" / "digits_mlp_test.npz")
    labels = [str(v) for v in test["y"]]
    classes = [str(c) for c in range(10)]

    def accuracy(candidate: bytes) -> float:
        scores = run_model(candidate, test["X"], "probabilities", classes)
        assert np.all(np.isfinite(scores))  # it runs; it is just wrong
        return float(np.mean([a == b for a, b in zip(
            predicted_labels(scores, classes), labels, strict=True)]))

    key = new_master_key()
    locked = lock(model, key)
    assert accuracy(model) > 0.9
    assert accuracy(locked) < 0.3
    assert accuracy(unlock(locked, new_master_key())) < 0.3  # a wrong key is no better
    assert accuracy(unlock(locked, key)) == accuracy(model)


def test_equal_weights_get_unrelated_locked_values() -> None:
    """Each parameter has its own key: a constant tensor does not stay constant."""
    weights = numpy_helper.from_array(np.ones((64, 4), dtype=np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                             [None, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT,
                                                             [None, 4])], [weights])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]
                              ).SerializeToString()
    locked = _parameters(lock(model, new_master_key()))
    assert len(np.unique(locked)) > 250
    assert np.mean(locked > 0) == pytest.approx(0.5, abs=0.1)  # signs flipped at random
    session(lock(model, new_master_key()))  # still a loadable model


def test_misuse_is_named(examples: Path) -> None:
    model = (examples / "catalog" / "breast_cancer_lr.onnx").read_bytes()
    key = new_master_key()
    locked = lock(model, key)
    with pytest.raises(BadInput, match="already Deep-Locked"):
        lock(locked, key)
    with pytest.raises(BadInput, match="not Deep-Locked"):
        unlock(model, key)
    with pytest.raises(BadInput, match="a Deep-Lock key is 32 bytes, got 16"):
        unlock(locked, key[:16])
    with pytest.raises(BadInput, match="not an ONNX model"):
        unlock(b"\x00 not a model", key)
    assert key_id(key) != key_id(new_master_key()) and key.hex() not in key_id(key)


def test_seller_locks_a_file_and_a_key_holder_runs_it(examples: Path, tmp_path: Path) -> None:
    model = examples / "catalog" / "digits_mlp.onnx"
    locked, key = tmp_path / "mlp.locked.onnx", tmp_path / "mlp.key"
    done = subprocess.run([str(BIN / "gimme-seller"), "lock", str(model), "--out", str(locked),
                           "--key-out", str(key)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert unlock(locked.read_bytes(), bytes.fromhex(key.read_text())) == model.read_bytes()

    data, out = examples / "data" / "digits_mlp_test.npz", tmp_path / "predictions.csv"
    base = [str(BIN / "gimme-buyer"), "run", str(locked), "--data", str(data),
            "--home", str(tmp_path / "home")]
    ran = subprocess.run([*base, "--key-file", str(key), "--out", str(out)],
                         capture_output=True, text=True)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "unlock" in ran.stdout and "inference" in ran.stdout
    with out.open() as handle:
        predicted = [int(row["prediction"]) for row in csv.DictReader(handle)]
    rows = load_table(data, [f"x{i}" for i in range(64)]).rows
    plain = run_model(model.read_bytes(), rows, "probabilities", [str(c) for c in range(10)])
    assert predicted == list(np.argmax(plain, axis=1))

    keyless = subprocess.run(base, capture_output=True, text=True)
    assert keyless.returncode == 2 and "needs --key-file" in keyless.stdout


def test_the_deeplock_bench_runs_and_reports(tmp_path: Path) -> None:
    """bench/deeplock.py at a tiny size: every experiment produces its figures."""
    out = tmp_path / "deeplock.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "deeplock.py"), "--wrong-keys",
                           "3", "--epochs", "2", "--runs", "1", "--repeats", "1", "--json",
                           str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    assert {a["model"] for a in figures["accuracy"]} >= {"breast-cancer-lr", "digits-mlp",
                                                         "cryptonets"}
    for row in figures["accuracy"]:
        assert row["right_key_identical"] and row["original"] > 0.9
        assert row["wrong_mean"] < row["original"] - 0.3
    for row in figures["fine_tuning"]:
        assert len(row["locked_fine_tuned"]) == len(row["scratch"]) == 3
    assert len(figures["cost"]) == len(figures["accuracy"]) + 1  # + the synthetic MLP

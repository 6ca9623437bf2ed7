"""Bident packages: finding the merge, splitting with a check, running the two halves with
the trusted one in its own process."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from common.bident import KEY_FILE, MANIFEST, TRUSTED_FILE, UNTRUSTED_FILE, find_structure
from common.deeplock import is_locked, new_master_key
from common.errors import BadInput, Unsupported
from common.onnx_io import run_model
from examples.datasets import digits
from seller_server.bident import split, torch_python
from seller_server.compiler import compile_model
from tests import onnx_graphs as g
from tests.conftest import BIN, ROOT, Daemon, buyer_cli, top_up


@pytest.mark.parametrize("merge", g.MERGES)
def test_the_merge_is_found_and_the_split_reproduces_the_model(merge: str,
                                                               tmp_path: Path) -> None:
    model = g.bident(merge)
    manifest = split(model, tmp_path / "package", g.calibration())
    s = manifest.structure
    assert (s.merge_node, s.merge_op) == ("merge", merge)
    assert (s.untrusted_output, s.trusted_output) == ("left", "right")
    assert manifest.check_max_error < 1e-5 and manifest.check_rows == 400
    package = tmp_path / "package"
    assert is_locked((package / TRUSTED_FILE).read_bytes())
    assert stat.S_IMODE(os.stat(package / KEY_FILE).st_mode) == 0o600
    untrusted = onnx.load(package / UNTRUSTED_FILE)
    # the untrusted half holds only its own branch's weights
    assert {i.name for i in untrusted.graph.initializer} == {"w_left", "b_left"}
    assert manifest.untrusted_parameters == 6 * 4 + 4
    assert json.loads((package / MANIFEST).read_text())["structure"]["merge_op"] == merge


def test_the_trusted_branch_can_be_the_first_input() -> None:
    s = find_structure(onnx.load_model_from_string(g.bident("mul")), trusted="first")
    assert (s.untrusted_output, s.trusted_output) == ("right", "left")


def test_a_model_without_two_trained_branches_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Unsupported, match="no bident merge found"):
        split(g.mlp("Relu"), tmp_path / "p")
    # a layer after the first merge reads the input directly: that merge is no cut, so the
    # split moves to the later merge (the trusted side is then the skip branch)
    model = g.build(
        [helper.make_node("Gemm", ["x", "w1", "b"], ["a"], name="left"),
         helper.make_node("Gemm", ["x", "w2", "b"], ["c"], name="right"),
         helper.make_node("Add", ["a", "c"], ["m"], name="merge"),
         helper.make_node("Gemm", ["x", "w3", "b"], ["skip"], name="skip"),
         helper.make_node("Add", ["m", "skip"], ["y"], name="residual")],
        4, {"y": 3}, {"w1": g.weights(4, 3), "w2": g.weights(4, 3), "w3": g.weights(4, 3),
                      "b": g.weights(1, 3)[0]})
    s = find_structure(onnx.load_model_from_string(model))
    assert (s.merge_node, s.untrusted_output, s.trusted_output) == ("residual", "m", "skip")


def _run(package: Path, data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "gimme-buyer"), "run", str(package), "--data", str(data),
                           "--home", str(package.parent / "home"), *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


def test_the_buyer_runs_a_package_with_the_trusted_half_apart(tmp_path: Path) -> None:
    model, rows = g.bident("max"), g.calibration(rows=3000)
    cli = subprocess.run([str(BIN / "gimme-seller"), "bident", "split", "-", "--out", "x"],
                         capture_output=True, text=True)
    assert cli.returncode != 0  # '-' is no file: argparse/IO error, nothing written
    (tmp_path / "whole.onnx").write_bytes(model)
    done = subprocess.run([str(BIN / "gimme-seller"), "bident", "split",
                           str(tmp_path / "whole.onnx"), "--out", str(tmp_path / "package")],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "split at 'merge' (max merge)" in done.stderr
    package, data, out = tmp_path / "package", tmp_path / "rows.npz", tmp_path / "p.csv"
    np.savez(data, X=rows)
    key = tmp_path / "trusted.key"  # the key travels separately from the package
    (package / KEY_FILE).rename(key)

    ran = _run(package, data, "--key-file", str(key), "--out", str(out))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "3000 rows through the bident halves" in ran.stdout
    with out.open() as handle:
        got = np.array([[float(v) for k, v in row.items() if k.startswith("score_")]
                        for row in csv.DictReader(handle)])
    expected = run_model(model, rows, "probabilities", [])
    assert np.abs(got - expected).max() < 1e-5

    missing = _run(package, data)
    assert missing.returncode == 2 and "no key for the trusted half" in missing.stdout
    wrong = tmp_path / "wrong.key"
    wrong.write_text(new_master_key().hex())
    refused = _run(package, data, "--key-file", str(wrong))
    assert refused.returncode == 2
    assert "does not open the trusted half (wrong key)" in refused.stdout
    tampered = bytearray((package / UNTRUSTED_FILE).read_bytes())
    tampered[-5] ^= 1
    (package / UNTRUSTED_FILE).write_bytes(bytes(tampered))
    changed = _run(package, data, "--key-file", str(key))
    assert changed.returncode == 2 and "is not the file the manifest names" in changed.stdout


def _torch_available() -> bool:
    try:
        torch_python()
    except BadInput:
        return False
    return True


@pytest.mark.skipif(not _torch_available(), reason="no Python with torch ('scripts/setup.sh "
                                                     "--torch' makes .venv-torch)")
def test_seller_trains_splits_and_the_buyer_runs_a_bident_model(tmp_path: Path) -> None:
    x_train, x_test, y_train, y_test = digits(8)
    train, test = tmp_path / "train.npz", tmp_path / "test.npz"
    np.savez(train, X=x_train, y=y_train)
    np.savez(test, X=x_test, y=y_test)
    trained = subprocess.run(
        [str(BIN / "gimme-seller"), "bident", "train", "--data", str(train), "--test",
         str(test), "--base", "mlp", "--shape", "64", "--merge", "mul", "--asymmetric",
         "--activation", "square", "--epochs", "8", "--out", str(tmp_path / "trained")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert trained.returncode == 0, trained.stdout + trained.stderr
    summary = json.loads((tmp_path / "trained" / "history.json").read_text())
    assert len(summary["history"]) == 8 and summary["test_accuracy"] > 0.8
    assert summary["parameters"]["trusted"] < summary["parameters"]["untrusted"]
    model = (tmp_path / "trained" / "model.onnx").read_bytes()
    manifest = split(model, tmp_path / "package", x_test)
    assert manifest.structure.merge_op == "mul"
    # what a buyer tries encrypted is this whole graph: it compiles exactly (square, product)
    compiled = compile_model(model, x_train, error_target=0.01)
    assert compiled.approximation_error < 1e-4 and compiled.calibration_agreement == 1.0
    assert "product at" in compiled.approximation and "Chebyshev" not in compiled.approximation
    ran = _run(tmp_path / "package", test, "--out", str(tmp_path / "p.csv"))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    with (tmp_path / "p.csv").open() as handle:
        predicted = [int(row["prediction"]) for row in csv.DictReader(handle)]
    expected = run_model(model, x_test, "logits", []).argmax(1)
    assert predicted == list(expected)


@pytest.mark.slow  # 2 minutes: digits-bident is depth 8 at N=16384
def test_a_buyer_tries_a_bident_model_encrypted(tls_dir: Path, tmp_path: Path) -> None:
    """The whole bident graph (both branches, the product merge) under 128-bit CKKS through
    the daemon: the buyer tests what it will run split."""
    catalog, data = tmp_path / "catalog", tmp_path / "data"
    x_train, x_test, _y_train, y_test = digits(8)
    catalog.mkdir()
    (catalog / "digits_bident.onnx").write_bytes(
        (ROOT / "examples" / "models" / "digits_bident.onnx").read_bytes())
    np.savez(catalog / "calibration.npz", X=x_train)
    (catalog / "digits_bident.json").write_text(json.dumps({
        "name": "digits-bident", "model": "digits_bident.onnx",
        "calibration": "calibration.npz", "price": "35.00", "trial_budget_rows": 500,
        "input_columns": [f"x{i}" for i in range(64)]}))
    data.mkdir()
    np.savez(data / "test.npz", X=x_test[:120], y=y_test[:120])
    daemon = Daemon(catalog, tmp_path / "state", tls_dir)
    try:
        daemon.wait_serving()
        top_up(daemon, "carol", "100")
        home = tmp_path / "home"
        trial = buyer_cli(daemon, home, "carol", "trial", "digits-bident", "--data",
                          str(data / "test.npz"))
        assert trial.returncode == 0, trial.stdout + trial.stderr
        report = json.loads(next((home / "trials" / "digits-bident").glob(
            "*/report.json")).read_text())
        assert report["metrics"]["accuracy"] > 0.9
        assert buyer_cli(daemon, home, "carol", "buy", "digits-bident").returncode == 0
        verified = buyer_cli(daemon, home, "carol", "verify", "digits-bident")
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        daemon.stop()

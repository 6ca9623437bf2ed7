"""Catalog loading through the real daemon: refusals are named, the rest is served, and the
digits MLP (approximated activations) trades end to end."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import external_data_helper, helper, numpy_helper

from common.errors import BadInput, WorkerFailed
from common.guarded import run_guarded
from common.he.packing import FEATURE_PACKED, SLOT_PER_SAMPLE
from common.onnx_io import run_model
from common.signing import sha256
from seller_server import catalog
from seller_server.catalog import read_listing
from seller_server.store import Store
from seller_server.worker import Capacity
from tests import onnx_graphs as g
from tests.conftest import Daemon, buyer_cli, top_up


def test_an_unevaluable_model_is_refused_by_name_and_the_rest_is_served(
        lr_catalog: Path, tls_dir: Path, tmp_path: Path) -> None:
    """Also: a plan that misses its listing's max_error is refused with the figures, not
    listed with a tolerance that hides the miss."""
    catalog = tmp_path / "catalog"
    shutil.copytree(lr_catalog, catalog)
    (catalog / "relu.onnx").write_bytes(g.mlp("Relu"))
    np.savetxt(catalog / "relu.csv", g.calibration(), delimiter=",", header="a,b,c,d,e,f",
               comments="")
    (catalog / "relu.json").write_text(json.dumps({
        "name": "relu-strict", "model": "relu.onnx", "calibration": "relu.csv",
        "input_columns": list("abcdef"), "price": "1", "trial_budget_rows": 10,
        "activation_degree": 4, "max_error": 0.001}))
    model = g.build([helper.make_node("Gemm", ["x", "w", "b"], ["z"], name="dense"),
                     helper.make_node("Round", ["z"], ["y"], name="round_layer")],
                    3, {"y": 2}, {"w": g.weights(3, 2), "b": g.weights(1, 2)[0]})
    (catalog / "bad.onnx").write_bytes(model)
    np.savetxt(catalog / "bad.csv", g.calibration(3), delimiter=",", header="a,b,c",
               comments="")
    (catalog / "bad.json").write_text(json.dumps({
        "name": "bad-model", "model": "bad.onnx", "calibration": "bad.csv",
        "input_columns": ["a", "b", "c"], "price": "1", "trial_budget_rows": 10}))
    daemon = Daemon(catalog, tmp_path / "state", tls_dir)
    try:
        daemon.wait_serving()
        listed = buyer_cli(daemon, tmp_path / "home", "alice", "models")
        assert "breast-cancer-lr" in listed.stdout and "bad-model" not in listed.stdout
        assert "node 'round_layer': operator Round cannot be evaluated" in daemon.logs()
        assert "relu-strict" not in listed.stdout
        refusal = re.search(r"refused listing relu\.json: the best plan's error on the "
                            r"calibration rows is ([0-9.e-]+), above the listing's max_error "
                            r"0\.001 \(relu at 'relu1': degree 4", daemon.logs())
        assert refusal and float(refusal.group(1)) > 0.001, daemon.logs()
    finally:
        daemon.stop()


@pytest.mark.parametrize(("change", "message"), [
    ({"price": "1.234"}, "at most 2 decimals"),
    ({"name": "Bad Name"}, "must be lowercase"),
    ({"trial_budget_rows": 0}, "positive integer"),
    ({"input_columns": []}, "non-empty list"),
])
def test_bad_listing_files(lr_catalog: Path, tmp_path: Path, change: dict[str, object],
                           message: str) -> None:
    listing = json.loads((lr_catalog / "breast_cancer_lr.json").read_text())
    path = tmp_path / "listing.json"
    path.write_text(json.dumps({**listing, **change}))
    with pytest.raises(BadInput, match=message):
        read_listing(path)
    path.write_text(json.dumps({k: v for k, v in listing.items() if k != "calibration"}))
    with pytest.raises(BadInput, match=r"missing field\(s\) \['calibration'\]"):
        read_listing(path)


def test_digits_mlp_trade_end_to_end(examples: Path, tls_dir: Path, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    for path in (examples / "catalog").glob("digits_mlp*"):
        shutil.copy(path, catalog)
    daemon = Daemon(catalog, tmp_path / "state", tls_dir)
    try:
        daemon.wait_serving()
        top_up(daemon, "alice", "100")
        home = tmp_path / "home"
        trial = buyer_cli(daemon, home, "alice", "trial", "digits-mlp", "--data",
                          str(examples / "data" / "digits_mlp_test.npz"))
        assert trial.returncode == 0, trial.stdout + trial.stderr
        report = json.loads(next(home.glob("trials/digits-mlp/*/report.json")).read_text())
        assert report["metrics"]["accuracy"] > 0.95
        assert buyer_cli(daemon, home, "alice", "buy", "digits-mlp").returncode == 0
        verified = buyer_cli(daemon, home, "alice", "verify", "digits-mlp")
        assert verified.returncode == 0, verified.stdout
        agreement = re.search(r"top-1 agreement ([\d.]+)% on 540 rows", verified.stdout)
        assert agreement and float(agreement.group(1)) >= 99.0, verified.stdout
    finally:
        daemon.stop()


def test_a_failing_feature_packed_self_test_leaves_the_model_slot_per_sample_only(
        lr_catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The feature-packed self-test runs in its own worker; when it fails (here: the worker
    reports a crash), the listing is still served, offers only slot-per-sample, says so
    in the log, and a buyer asking for feature packing is told what is offered."""
    real = run_guarded

    def packed_fails(target: str, request: Any, **kwargs: Any) -> Any:
        if target.endswith(":self_test_packed"):
            raise WorkerFailed("the evaluator process crashed (signal 9)")
        return real(target, request, **kwargs)

    monkeypatch.setattr("seller_server.catalog.run_guarded", packed_fails)
    spec = read_listing(lr_catalog / "breast_cancer_lr.json")
    with caplog.at_level(logging.WARNING):
        listing = catalog.load_listing(spec, Store(tmp_path / "s.sqlite"), 128, 0, Capacity())
    assert [e.packing for e in listing.estimates()] == [SLOT_PER_SAMPLE]
    assert "feature packing is not offered: its self-test failed (the evaluator process " \
           "crashed" in caplog.text
    with pytest.raises(BadInput, match="is not offered 'feature-packed'; it is offered: "
                                       "slot-per-sample"):
        listing.estimate(FEATURE_PACKED)
    monkeypatch.setattr("seller_server.catalog.run_guarded", real)
    both = catalog.load_listing(spec, Store(tmp_path / "t.sqlite"), 128, 0, Capacity())
    assert [e.packing for e in both.estimates()] == [SLOT_PER_SAMPLE, FEATURE_PACKED]


def _external_data_catalog(directory: Path) -> Path:
    """A three-feature linear model saved the way newer torch.onnx.export saves one: its
    weights in `linear.onnx.data` next to it; the listing file's path is returned."""
    directory.mkdir()
    model = onnx.load_model_from_string(g.build(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="dense")], 3, {"y": 2},
        {"w": g.weights(3, 2), "b": g.weights(1, 2)[0]}))
    onnx.save_model(model, str(directory / "linear.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="linear.onnx.data", size_threshold=0)
    np.savetxt(directory / "calibration.csv", g.calibration(3), delimiter=",",
               header="a,b,c", comments="")
    listing = directory / "linear.json"
    listing.write_text(json.dumps({
        "name": "linear", "model": "linear.onnx", "calibration": "calibration.csv",
        "input_columns": ["a", "b", "c"], "price": "1", "trial_budget_rows": 10,
        "feature_packing": False, "fingerprint": False}))
    return listing


def test_a_model_with_external_data_is_listed_as_one_self_contained_model(
        tmp_path: Path) -> None:
    path = _external_data_catalog(tmp_path / "catalog")
    listing = catalog.load_listing(read_listing(path), Store(tmp_path / "s.sqlite"), 128, 0,
                                   Capacity())
    model = onnx.load_model_from_string(listing.model_bytes)
    assert not any(external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    assert listing.commitment == sha256(listing.model_bytes)  # what is sold and delivered
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rows = g.calibration(3)[:5]
    assert np.allclose(run_model(listing.model_bytes, rows, "y", []),
                       rows @ weights["w"] + weights["b"], atol=1e-5)


def test_external_data_outside_the_catalog_or_missing_is_refused(tmp_path: Path) -> None:
    path = _external_data_catalog(tmp_path / "catalog")
    spec = read_listing(path)
    model = onnx.load(str(spec.model_path), load_external_data=False)
    data = (path.parent / "linear.onnx.data").read_bytes()
    (tmp_path / "elsewhere.data").write_bytes(data)
    for location, message in [("../elsewhere.data", "outside the catalog directory"),
                              (str(tmp_path / "elsewhere.data"), "outside the catalog"),
                              ("gone.data", r"external file 'gone.data', which is missing")]:
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        spec.model_path.write_bytes(model.SerializeToString())
        with pytest.raises(BadInput, match=message):
            catalog.read_model(spec)

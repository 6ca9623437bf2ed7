"""Catalog loading through the real daemon: refusals are named, the rest is served, and the
digits MLP (approximated activations) trades end to end."""

from __future__ import annotations

import base64
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
from common.guarded import Limits, run_guarded
from common.he.packing import FEATURE_PACKED, SLOT_PER_SAMPLE
from common.he.params import CkksParams
from common.he.plan import HEPlan, OutputStage, as_weights
from common.onnx_io import run_model
from common.rpc import CATALOG_SERVICE, check_health
from common.signing import sha256
from common.tabular import load_table
from seller_server import catalog, jobs
from seller_server.catalog import read_listing
from seller_server.store import Store
from seller_server.worker import Capacity
from tests import onnx_graphs as g
from tests.conftest import Daemon, buyer_cli, top_up


@pytest.fixture(scope="module")
def lr_record(lr_catalog: Path) -> jobs.CompiledListing:
    """The breast-cancer listing compiled and self-tested (in this process; its self-tests
    in workers), for tests that start from a cached compile."""
    spec = read_listing(lr_catalog / "breast_cancer_lr.json")
    files = catalog.ListingFiles.read(spec)
    rows = load_table(spec.calibration_path, spec.input_columns).rows
    return catalog.compile_and_test(spec, files.model, rows, _compile_job(spec), lambda _: None)


def _compile_job(spec: catalog.ListingSpec) -> jobs.CompileListing:
    return jobs.CompileListing(str(spec.path),
                               catalog.ListingFiles.read(spec).cache_key(128, 0), 128, 0,
                               Limits(), 2)


def _cache(store: Store, listing: Path, record: jobs.CompiledListing) -> None:
    store.save_compiled(catalog.ListingFiles.read(read_listing(listing)).cache_key(128, 0),
                        json.dumps(jobs.to_json(record)).encode())


def test_an_unevaluable_model_is_refused_by_name_and_the_rest_is_served(
        lr_catalog: Path, lr_record: jobs.CompiledListing, tls_dir: Path,
        tmp_path: Path) -> None:
    """Also: a plan that misses its listing's max_error is refused with the figures, not
    listed with a tolerance that hides the miss; a division by an encrypted tensor (Div(x, x),
    x / (1 + |x|): NaN plans once) is refused by node name; a compile that outgrows its
    worker's memory and one that outlasts --listing-timeout are refused by name with the
    reason; the cached listing is served at once, while the others still compile; a cached
    plan holding a NaN is not served but compiled again."""
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
    np.savetxt(catalog / "three.csv", g.calibration(3), delimiter=",", header="a,b,c",
               comments="")
    # listings compile in file order: the slow one first (minutes: see slow_to_compile),
    # the others beside it
    for stem, name, onnx_bytes in [("a_slow", "slow-listing", g.slow_to_compile(10_000)),
                                   ("bad", "bad-model", model),
                                   ("self_ratio", "self-ratio", g.self_ratio()),
                                   ("softsign", "softsign", g.softsign_by_division()),
                                   ("hog", "memory-hog", g.memory_hog())]:
        (catalog / f"{stem}.onnx").write_bytes(onnx_bytes)
        (catalog / f"{stem}.json").write_text(json.dumps({
            "name": name, "model": f"{stem}.onnx", "calibration": "three.csv",
            "input_columns": ["a", "b", "c"], "price": "1", "trial_budget_rows": 10,
            "max_error": 1e-6}))
    store = Store(tmp_path / "state" / "gimme.sqlite")
    _cache(store, catalog / "breast_cancer_lr.json", lr_record)
    _cache(store, catalog / "self_ratio.json", _nan_plan_record(3))
    store.close()
    daemon = Daemon(catalog, tmp_path / "state", tls_dir,
                    ["--listing-timeout", "20", "--max-evaluations", "4"])
    try:
        daemon.wait_serving(whole_catalog=False)  # the cached listing is served at once...
        # ...while the others still compile
        assert check_health(daemon.address, daemon.tls(), service=CATALOG_SERVICE) == \
            "NOT_SERVING"
        listed = buyer_cli(daemon, tmp_path / "home", "alice", "models")
        assert "breast-cancer-lr" in listed.stdout, listed.stdout + daemon.logs()
        said = " ".join(listed.stdout.split())
        loading = re.search(r"still loading \(the seller is compiling and self-testing them\): "
                            r"(.*); run 'gimme-buyer models' again", said)
        assert loading and "slow-listing" in loading.group(1), said  # named, not listed
        assert said.count("slow-listing") == 1, said
        ready = re.search(r"listed breast-cancer-lr: .*; still compiling: (.*)", daemon.logs())
        assert ready and "slow-listing" in ready.group(1), daemon.logs()
        assert "compiling breast-cancer-lr" not in daemon.logs()
        daemon.wait_serving()  # every listing is listed or refused
        logs = daemon.logs()
        assert "self_ratio.json: its cached compile is unusable (the plan's output stage " \
               "has non-finite weights (NaN or infinity)" in logs
        listed = buyer_cli(daemon, tmp_path / "home", "alice", "models")
        assert "breast-cancer-lr" in listed.stdout and "bad-model" not in listed.stdout
        assert "node 'round_layer': operator Round cannot be evaluated" in logs
        assert "relu-strict" not in listed.stdout
        refusal = re.search(r"refused listing relu\.json: the best plan's error on the "
                            r"calibration rows is ([0-9.e-]+), above the listing's max_error "
                            r"0\.001 \(relu at 'relu1': degree 4", logs)
        assert refusal and float(refusal.group(1)) > 0.001, logs
        for stem, node in [("self_ratio", "self_ratio"), ("softsign", "softsign_ratio")]:
            assert f"refused listing {stem}.json: node '{node}' (Div) divides by an " \
                   f"encrypted tensor" in logs
        assert "refused listing hog.json: its compile worker ran out of memory while " \
               "compiling" in logs
        assert "refused listing a_slow.json: its compile worker ran out of time (20 s) " \
               "while compiling (serve's --listing-timeout)" in logs
        assert "catalog loaded: 1 model(s) listed (breast-cancer-lr); 6 refused" in logs
        for name in ("self-ratio", "softsign", "memory-hog", "slow-listing"):
            assert name not in listed.stdout
        assert daemon.stop() == 0  # serve was up all along and stops cleanly
    finally:
        daemon.stop()


def _nan_plan_record(columns: int) -> jobs.CompiledListing:
    """A compiled record whose plan holds NaN weights, as a corrupted cache would."""
    plan = HEPlan(columns, (), OutputStage(as_weights(np.full((2, columns), np.nan)),
                                           np.zeros(2)))
    measured = jobs.Measured(1, 1, 1, 1, 0.1, 0.1, 0.1, 0.0, 0.0, he_error=0.0)
    return jobs.CompiledListing(
        base64.b64encode(plan.to_bytes()).decode(), (), ("0", "1"), "y", "",
        CkksParams(8192, 2, 36, 54, 3), 0.01, 0.01, "exact", measured, 0.0,
        "not fingerprinted")


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


@pytest.mark.slow  # test_compose and scripts/demo.sh trade the same example end to end
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
        lr_catalog: Path, lr_record: jobs.CompiledListing, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The feature-packed self-test runs in its own worker; when it fails (here: the worker
    reports a crash), the listing is still served, offers only slot-per-sample, says so
    in the log, and a buyer asking for feature packing is told what is offered.
    Then: a cached listing is listed at once, without a worker, and a compile worker that
    crashes (SIGSEGV) costs only its own listing."""
    real = run_guarded

    def packed_fails(target: str, request: Any, **kwargs: Any) -> Any:
        if target.endswith(":self_test_packed"):
            raise WorkerFailed("the evaluator process crashed (signal 9)")
        return real(target, request, **kwargs)

    monkeypatch.setattr("seller_server.jobs.run_guarded", packed_fails)
    spec = read_listing(lr_catalog / "breast_cancer_lr.json")
    files = catalog.ListingFiles.read(spec)
    rows = load_table(spec.calibration_path, spec.input_columns).rows
    with caplog.at_level(logging.WARNING):
        record = catalog.compile_and_test(spec, files.model, rows, _compile_job(spec),
                                          lambda _: None)
    listing = catalog.listing_from_record(spec, files.model, rows, record)
    assert [e.packing for e in listing.estimates()] == [SLOT_PER_SAMPLE]
    assert record.warnings == ("feature packing is not offered: its self-test failed (the "
                               "evaluator process crashed (signal 9))",)
    assert "feature packing is not offered: its self-test failed (the evaluator process " \
           "crashed" in caplog.text
    with pytest.raises(BadInput, match="is not offered 'feature-packed'; it is offered: "
                                       "slot-per-sample"):
        listing.estimate(FEATURE_PACKED)
    assert [e.packing for e in catalog.listing_from_record(
        spec, files.model, rows, lr_record).estimates()] == [SLOT_PER_SAMPLE, FEATURE_PACKED]

    directory = tmp_path / "catalog"
    shutil.copytree(lr_catalog, directory)
    crash = json.loads((directory / "breast_cancer_lr.json").read_text())
    (directory / "crash.json").write_text(json.dumps({**crash, "name": "crashes"}))
    store = Store(tmp_path / "state.sqlite")
    _cache(store, directory / "breast_cancer_lr.json", lr_record)

    def crashing_compile(job: jobs.Job, **kwargs: Any) -> Any:
        assert isinstance(job, jobs.CompileListing) and job.listing_path.endswith("crash.json")
        return real("tests.guarded_targets:crash", {"stage": "compiling"}, limits=Limits())

    monkeypatch.setattr("seller_server.jobs.run", crashing_compile)
    with caplog.at_level(logging.INFO):
        listings, refused = catalog.CatalogLoad(directory, store, security_bits=128,
                                                capacity=Capacity()).run()
    assert [listing.model_id for listing in listings] == ["breast-cancer-lr"]
    assert refused == ["crash.json: its compile worker was killed by SIGSEGV while "
                       "compiling"]
    assert "compiling breast-cancer-lr" not in caplog.text  # cached: listed at once


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
    """Read in by the gateway and by its compile worker alike: both hash the same bytes."""
    path = _external_data_catalog(tmp_path / "catalog")
    (listing,), refused = catalog.CatalogLoad(path.parent, Store(tmp_path / "s.sqlite"),
                                              security_bits=128, capacity=Capacity()).run()
    assert refused == []
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
    listed, (refused,) = catalog.CatalogLoad(path.parent, Store(tmp_path / "s.sqlite"),
                                             security_bits=128, capacity=Capacity()).run()
    assert listed == [] and re.match(r"linear\.json: .*'gone\.data', which is missing", refused)

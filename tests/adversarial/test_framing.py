"""Finding 8: step 9 cannot frame an honest seller, and cannot excuse a dishonest one.

Unusual rows inside the signed input box (inverted digits on digits-mlp; here, on the
smallest approximated model, the corners of the box) used to push pre-activations outside
the ranges the Chebyshev approximations were fitted on, where the buyer could blame the
seller for the approximation's failure. The ranges are
now guaranteed on the whole box (seller_server.compiler), so such rows stay inside them:
the trial names none, and after payment `verify` and `gimme-arbiter` find the committed
plan computed faithfully and the model within the tolerance. A seller that evaluates
another plan is at fault. A buyer may cap the tolerance it accepts.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.evidence import ROWS
from common.he.plan import HEPlan, OutputStage, as_weights
from common.protocol import OFFER, EncodingSpec, Signed
from common.tabular import load_table, write_csv
from common.wire import (
    envelope_from_json,
    key_release_from_payload,
    offer_from_payload,
    offer_payload,
)
from seller_server.catalog import Listing, input_domain, read_listing
from seller_server.jobs import TrialSetup
from seller_server.store import TrialRow
from seller_server.trade import Seller
from tests import onnx_graphs as g
from tests.conftest import Daemon, buyer_cli, top_up
from tests.test_arbiter import _arbiter, _in_process, _seller_key

MLP = "tanh-mlp"  # the smallest approximated model: a 6-5-3 tanh MLP
COLUMNS = [f"x{i}" for i in range(6)]
ROWS_TESTED = 200


@pytest.fixture(scope="module")
def mlp_seller(tls_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    catalog = tmp_path_factory.mktemp("mlp-catalog")
    (catalog / "tanh_mlp.onnx").write_bytes(g.mlp("Tanh"))
    write_csv(catalog / "tanh_mlp_calibration.csv", COLUMNS, g.calibration())
    (catalog / "tanh_mlp.json").write_text(json.dumps({
        "name": MLP, "model": "tanh_mlp.onnx", "calibration": "tanh_mlp_calibration.csv",
        "input_columns": COLUMNS, "price": "10.00", "trial_budget_rows": 100_000}))
    daemon = Daemon(catalog, tmp_path_factory.mktemp("mlp-seller") / "state", tls_dir)
    daemon.wait_serving()
    top_up(daemon, "alice", "100")
    yield daemon
    daemon.stop()


def _corners(daemon: Daemon, out: Path, count: int = ROWS_TESTED) -> Path:
    """Rows at the corners of the offer's input box: inside what the buyer may send, far
    from the seller's uniform calibration rows (the pre-activations they reach left the
    ranges calibrated on those rows by 1.5x)."""
    spec = read_listing(daemon.catalog / "tanh_mlp.json")
    low, high = input_domain(spec, load_table(spec.calibration_path, COLUMNS).rows)
    signs = np.random.default_rng(3).random((count, len(COLUMNS))) < 0.5
    write_csv(out, COLUMNS, np.where(signs, low, high), "y", ["0"] * count)
    return out


def _only_trial(home: Path) -> Path:
    [folder] = [p for p in (home / "trials" / MLP).iterdir() if p.is_dir()]
    return folder


def _disclosed_plan(folder: Path) -> HEPlan:
    release = envelope_from_json((folder / "key-release.json").read_text(), "key release")
    return HEPlan.from_bytes(key_release_from_payload(release.payload).plan)


def test_unusual_rows_inside_the_box_stay_in_the_ranges_and_cannot_frame_the_seller(
        mlp_seller: Daemon, tmp_path: Path) -> None:
    home = tmp_path / "home"
    trial = buyer_cli(mlp_seller, home, "alice", "trial", MLP, "--data",
                      str(_corners(mlp_seller, tmp_path / "corners.csv")), "--label-column",
                      "y", "--packing", "slot-per-sample")
    assert trial.returncode == 0, trial.stdout + trial.stderr
    said = " ".join(trial.stdout.split())
    report = json.loads((_only_trial(home) / "report.json").read_text())
    assert report.get("rows_outside_ranges", []) == [] and "left the ranges" not in said, said

    bought = buyer_cli(mlp_seller, home, "alice", "buy", MLP)
    assert bought.returncode == 0, bought.stdout + bought.stderr
    folder = _only_trial(home)
    plan = _disclosed_plan(folder)
    with np.load(folder / ROWS) as data:
        # the guarantee, on the disclosed plan: corner rows are far from the seller's rows
        # yet inside every fitted range
        assert plan.range_excess(data["X"]).max() <= 1.0

    verified = buyer_cli(mlp_seller, home, "alice", "verify", MLP)
    said = " ".join(verified.stdout.split())
    assert verified.returncode == 0 and "PASS" in said, said
    assert "outside the plan's guaranteed ranges" not in said, said
    ruling = _arbiter(next(folder.glob("evidence-*.zip")), "--seller-key",
                      _seller_key(mlp_seller))
    said = " ".join(ruling.stdout.split())
    assert ruling.returncode == 0, said
    assert "NO FAULT FOUND: no seller fault" in said, said


class _OtherPlanSeller(Seller):
    """Commits to the trial's plan but evaluates another one (every output 20% larger)."""

    def _setup(self, trial: TrialRow, listing: Listing, encoding: EncodingSpec
               ) -> TrialSetup:
        setup = super()._setup(trial, listing, encoding)
        plan = HEPlan.from_bytes(Path(setup.plan_path).read_bytes())
        # (its range check, 20% larger too, is no longer one)
        other = dataclasses.replace(plan, output=OutputStage(
            as_weights(plan.output.weights * 1.2), plan.output.bias * 1.2), range_check=False)
        path = self.spool / f"other-{trial.trial_id}.plan"
        path.write_bytes(other.to_bytes())
        return dataclasses.replace(setup, plan_path=str(path))


class _OtherEncodingSeller(Seller):
    """Evaluates the plan it commits to, but its offers tell buyers to encrypt their
    columns at twice the scale the plan reads them at."""

    def _sign(self, kind: str, payload: bytes) -> Signed:
        if kind == OFFER:
            offer = offer_from_payload(payload)
            encoding = dataclasses.replace(offer.encoding, input_scale=tuple(
                2 * s for s in offer.encoding.input_scale))
            payload = offer_payload(dataclasses.replace(offer, encoding=encoding))
        return super()._sign(kind, payload)


def _trial_buy_verify(seller_class: type[Seller], mlp_seller: Daemon, tls_dir: Path,
                      tmp_path: Path) -> tuple[str, Path, str]:
    """A trial of 40 corner rows, bought and verified, with an in-process `seller_class`:
    what verify said, the trial's folder and the seller's public key."""
    state = tmp_path / "state"
    state.mkdir()
    # the honest daemon's compiled catalog, so the in-process seller need not compile again
    with sqlite3.connect(mlp_seller.state / "gimme.sqlite") as source, sqlite3.connect(
            state / "gimme.sqlite") as copy:
        source.backup(copy)
    with _in_process(seller_class, mlp_seller.catalog, tls_dir, state, "dave") as (
            endpoint, seller):
        home = tmp_path / "home"
        trial = buyer_cli(endpoint, home, "dave", "trial", MLP, "--data",
                          str(_corners(mlp_seller, tmp_path / "few.csv", 40)), "--label-column",
                          "y", "--packing", "slot-per-sample")
        assert trial.returncode == 0, trial.stdout + trial.stderr
        bought = buyer_cli(endpoint, home, "dave", "buy", MLP)
        assert bought.returncode == 0, bought.stdout + bought.stderr
        verified = buyer_cli(endpoint, home, "dave", "verify", MLP)
        key = seller.signer.public_key.hex()
    said = " ".join(verified.stdout.split())
    assert verified.returncode == 1, said
    assert "the seller is at fault" in said, said
    return said, _only_trial(home), key


def test_a_seller_computing_another_plan_is_at_fault_on_unusual_rows(
        mlp_seller: Daemon, tls_dir: Path, tmp_path: Path) -> None:
    _said, folder, key = _trial_buy_verify(_OtherPlanSeller, mlp_seller, tls_dir, tmp_path)
    ruling = _arbiter(next(folder.glob("evidence-*.zip")), "--seller-key", key)
    said = " ".join(ruling.stdout.split())
    assert ruling.returncode == 3, said
    assert "SELLER AT FAULT: the results the seller signed are not the plan it committed to" \
        in said, said
    with zipfile.ZipFile(next(folder.glob("evidence-*.zip"))) as bundle:
        failed = {c["name"] for c in json.loads(bundle.read("manifest.json"))["checks"]
                  if not c["ok"]}
    assert "seller computed the committed plan" in failed


def test_a_seller_whose_offer_misstates_the_input_encoding_is_at_fault(
        mlp_seller: Daemon, tls_dir: Path, tmp_path: Path) -> None:
    """The buyer encrypts what the signed offer says; a committed plan that reads the
    columns otherwise is the seller's fault, named as such."""
    said, folder, key = _trial_buy_verify(_OtherEncodingSeller, mlp_seller, tls_dir, tmp_path)
    assert "encodes its input columns otherwise than the offer told the buyer" in said, said
    ruling = _arbiter(next(folder.glob("evidence-*.zip")), "--seller-key", key)
    said = " ".join(ruling.stdout.split())
    assert ruling.returncode == 3, said
    assert "encodes its input columns otherwise than the offer told the buyer" in said, said


def test_a_tolerance_above_the_buyers_cap_is_refused_before_anything_is_sent(
        mlp_seller: Daemon, tmp_path: Path) -> None:
    home = tmp_path / "home"
    trial = buyer_cli(mlp_seller, home, "alice", "trial", MLP, "--data",
                      str(_corners(mlp_seller, tmp_path / "rows.csv", 20)), "--label-column", "y",
                      "--rows", "20", "--max-tolerance", "0.001")
    said = " ".join(trial.stdout.split())
    assert trial.returncode != 0, said
    assert "is above your --max-tolerance 0.001: refusing the offer, nothing was encrypted " \
           "or sent" in said, said
    offered = re.search(r"offer ([0-9a-f]{24}):", said)
    assert offered, said
    assert f"trial {offered.group(1)}: keys accepted" not in mlp_seller.logs()
    assert not (home / "trials" / MLP).exists() or not any((home / "trials" / MLP).iterdir())


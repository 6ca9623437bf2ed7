"""The protocol over real gRPC (TLS, loopback) against a real seller daemon process."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from skl2onnx import to_onnx
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from buyer_client.client import SellerClient
from buyer_client.report import regression_metrics, regression_targets
from common import errors
from common.deeplock import unlock, unseal
from common.evidence import LOCKED_MODEL, SEALED_MODEL
from common.he import engine
from common.he.packing import FEATURE_PACKED, SLOT_PER_SAMPLE
from common.he.params import public_key_seed
from common.onnx_io import run_model, save_model
from common.protocol import Progress
from common.signing import Signer, sha256
from common.tabular import FloatArray, load_table, write_csv
from common.tail import apply_tail, predicted_labels, tail_lipschitz
from common.trust import open_key_release, open_offer
from seller_server.catalog import load_catalog
from seller_server.store import Store
from seller_server.trade import Seller
from seller_server.worker import Capacity
from tests.conftest import BIN, Daemon, buyer_cli, perturbed_model, top_up

LR = "breast-cancer-lr"


def _test_csv(examples: Path) -> Path:
    return examples / "data" / "breast_cancer_lr_test.csv"


def test_the_tolerance_covers_every_result_the_plan_tolerance_allows(lr_seller: Daemon
                                                                     ) -> None:
    """Verify and the arbiter accept results within the plan tolerance of the plan; the
    model check must then pass on any row, also one whose output the tail does not flatten
    (a probability near 1/2), not only on the calibration rows the tolerance was measured
    on. The tail's bound holds: random logits moved by up to e move no softmax or sigmoid
    output by more than the bound times e."""
    offer = _Trial(lr_seller, "frank").offer
    bound = tail_lipschitz(offer.output.tail)
    assert bound is not None and offer.tolerance >= bound * offer.plan_tolerance
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 3, (2000, 3))
    for ops in (("softmax",), ("sigmoid",), ("log_softmax",), ("tanh", "softmax")):
        moved = logits + rng.uniform(-1e-3, 1e-3, logits.shape)
        change = np.abs(apply_tail(moved, ops) - apply_tail(logits, ops)).max()
        assert change <= tail_lipschitz(ops) * 1e-3  # type: ignore[operator]
        assert change >= 0.5 * tail_lipschitz(ops) * 1e-3  # type: ignore[operator]


def test_listing_shows_the_catalog(lr_seller: Daemon, tmp_path: Path) -> None:
    result = buyer_cli(lr_seller, tmp_path, "alice", "models")
    assert result.returncode == 0, result.stdout + result.stderr
    assert LR in result.stdout and "25.00" in result.stdout and "N=8192" in result.stdout
    assert "slot-per-sample, feature-packed" in result.stdout


def test_full_trade_trial_buy_verify(lr_seller: Daemon, examples: Path, tmp_path: Path) -> None:
    trial = buyer_cli(lr_seller, tmp_path, "alice", "trial", LR, "--data",
                      str(_test_csv(examples)), "--label-column", "y")
    assert trial.returncode == 0, trial.stdout + trial.stderr
    assert "128-bit security (re-derived)" in trial.stdout
    folder = next((tmp_path / "trials" / LR).glob("*/report.json")).parent
    report = json.loads((folder / "report.json").read_text())
    model = (examples / "catalog" / "breast_cancer_lr.onnx").read_bytes()
    columns = json.loads((examples / "catalog" / "breast_cancer_lr.json").read_text())[
        "input_columns"]
    table = load_table(_test_csv(examples), columns, "y")
    probabilities = run_model(model, table.rows, "output_probability", ["0", "1"])
    plain = predicted_labels(probabilities, ["0", "1"])
    expected_accuracy = np.mean([p == t for p, t in zip(plain, table.labels or (), strict=True)])
    assert report["metrics"]["accuracy"] == pytest.approx(expected_accuracy, abs=0.02)
    assert report["metrics"]["confusion_matrix"] and report["measurements"]["upload_bytes"] > 0

    unpaid = buyer_cli(lr_seller, tmp_path, "alice", "run", LR, "--data",
                       str(_test_csv(examples)))
    assert unpaid.returncode == 2 and "gimme-buyer buy breast-cancer-lr" in unpaid.stdout
    bought = buyer_cli(lr_seller, tmp_path, "alice", "buy", LR)
    assert bought.returncode == 0, bought.stdout + bought.stderr
    assert "opens the model into exactly the committed model" in bought.stdout
    locked = (folder / LOCKED_MODEL).read_bytes()
    assert not (folder / "model.onnx").exists()  # the plain weights never touch the disk
    # without the key, the delivered file runs but computes something else (over 200 keys
    # the mean |difference| of probabilities was 0.12 at least, 0.48 on average)
    keyless = run_model(locked, table.rows, "output_probability", ["0", "1"])
    assert np.abs(keyless - probabilities).mean() > 0.05
    delivered = _bought_model(folder)
    assert delivered != model  # alice's own fingerprinted copy...
    copy_probabilities = run_model(delivered, table.rows, "output_probability", ["0", "1"])
    copy_labels = predicted_labels(copy_probabilities, ["0", "1"])
    # the fingerprint strength changes <= 0.5% of calibration predictions (a few test rows)
    assert np.mean([a == b for a, b in zip(copy_labels, plain, strict=True)]) >= 0.97
    # what the buyer decrypted is her copy's prediction on every row; flooding noise
    # (circuit privacy) may flip only rows closer to a tie than the tolerance
    clear = np.abs(copy_probabilities[:, 1] - 0.5) > report["tolerance"]
    assert clear.mean() > 0.95
    assert all(a == b for a, b, c in zip(report["predictions"], copy_labels, clear, strict=True)
               if c)

    # she runs it: unlocked in memory, the same predictions
    predictions = tmp_path / "predictions.csv"
    ran = buyer_cli(lr_seller, tmp_path, "alice", "run", LR, "--data", str(_test_csv(examples)),
                    "--out", str(predictions))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    with predictions.open() as handle:
        assert [row["prediction"] for row in csv.DictReader(handle)] == copy_labels

    # ...which names her if it leaks
    leaked = tmp_path / "leaked.onnx"
    leaked.write_bytes(delivered)
    traced = subprocess.run([str(BIN / "gimme-seller"), "trace", str(leaked),
                             "--catalog", str(lr_seller.catalog),
                             "--state", str(lr_seller.state)],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert traced.returncode == 0, traced.stdout + traced.stderr
    assert f"is the copy of trial {folder.name}, sold to alice" in traced.stdout

    verified = buyer_cli(lr_seller, tmp_path, "alice", "verify", LR)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "PASS" in verified.stdout
    bundle = zipfile.ZipFile(next(folder.glob("evidence-*.zip")))
    manifest = json.loads(bundle.read("manifest.json"))
    assert manifest["claim"] == "PASS"
    assert manifest["model_commitment"] == sha256(delivered).hex()
    assert {"offer.json", "receipt-0.json", "payment.json", "delivery.json", "key-release.json",
            SEALED_MODEL, "secret.key", "rows.npz", "inputs/batch-0/ct-0.bin",
            "results/batch-0/score-0.bin"} <= set(bundle.namelist())
    assert "model.key" not in bundle.namelist()  # the key release inside carries it, signed


def test_wrong_csv_columns_are_named(lr_seller: Daemon, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("mean radius,y\n1.0,0\n")
    result = buyer_cli(lr_seller, tmp_path / "home", "erin", "trial", LR, "--data", str(bad),
                       "--label-column", "y")
    assert result.returncode == 2
    assert "missing column(s) 'mean texture'" in result.stdout
    assert "the model needs 30 columns" in result.stdout


def _bought_model(folder: Path) -> bytes:
    """What the buyer paid for: the delivered locked model opened with the released key."""
    key = bytes.fromhex((folder / "model.key").read_text())
    return unlock((folder / LOCKED_MODEL).read_bytes(), key)


def _client(daemon: Daemon, identity: str) -> SellerClient:
    return SellerClient(daemon.address, daemon.tls(identity))


class _Trial:
    """A buyer that drives the protocol by hand, so tests can cheat at any step."""

    def __init__(self, daemon: Daemon, identity: str, packing: str = SLOT_PER_SAMPLE) -> None:
        self.client = _client(daemon, identity)
        _listings, self.key = self.client.list_models()
        self.signed = self.client.open_trial(LR, packing)
        self.offer = open_offer(self.signed, self.key, LR)
        self.layout = self.offer.encoding.layout()
        self.cc = engine.build_context(self.offer.params, 128)
        self.secret, self.public = engine.generate_keys(
            self.cc, self.offer.key_tag, public_key_seed(self.offer.trial_id, self.offer.key_tag))
        self.keys = {"relin_key": engine.serialize_relin_key(self.offer.key_tag),
                     "public_key": engine.public_key_bytes(self.public)}
        if self.offer.encoding.rotation_indices:
            self.keys["rotation_keys"] = engine.generate_rotation_keys(
                self.cc, self.secret, self.offer.encoding.rotation_indices)

    def upload_keys(self, **replaced: bytes) -> bytes:
        return self.client.upload_keys(self.offer.trial_id, self.keys | replaced,
                                       lambda n: None)

    def ciphertexts(self, rows: FloatArray) -> list[bytes]:
        return [engine.ciphertext_bytes(engine.encrypt_vector(self.cc, self.public, v))
                for v in self.layout.encode(self.offer.encoding.encoded(rows))]

    def evaluate(self, batch: int, rows: int, blobs: list[bytes]) -> tuple[list[bytes], object]:
        progress: list[Progress] = []
        return self.client.evaluate(
            self.offer.trial_id, batch, rows, blobs,
            result_count=self.layout.result_count(rows, 2), max_result_bytes=1 << 22,
            on_upload=lambda n: None, on_progress=progress.append, on_download=lambda n: None)

    def open(self, results: list[bytes], rows: int) -> FloatArray:
        """(rows, 2) scores, decrypted as the buyer's client does."""
        gate = engine.CiphertextGate(self.cc, self.offer.key_tag, self.offer.output.result_level)
        period = self.layout.fold_period(rows, 2)
        return self.layout.decode([np.array(engine.open_result(
            self.cc, self.secret, gate.load(r, "result"), period, self.layout.slots))
            for r in results], rows, 2)

    def buy(self) -> bytes:
        """Download the sealed model, pay, open and unlock it with the released key."""
        sealed, _record = self.client.deliver(self.offer.trial_id, 1 << 20, lambda n: None)
        _payment, signed_release = self.client.purchase(self.offer.trial_id, uuid.uuid4().hex)
        release = open_key_release(signed_release, self.key, self.offer, sealed)
        return unlock(unseal(sealed, release.master_key), release.master_key)


def test_corrupted_uploads_are_rejected_and_the_daemon_keeps_serving(lr_seller: Daemon) -> None:
    trial = _Trial(lr_seller, "carol")
    key = bytearray(trial.keys["relin_key"])
    key[100] ^= 0xFF  # a header byte of the key
    with pytest.raises(errors.BadInput, match="relinearization key: byte 100"):
        trial.upload_keys(relin_key=bytes(key))
    public = bytearray(engine.public_key_bytes(trial.public))
    public[200] ^= 0x01
    with pytest.raises(errors.BadInput, match="public key: byte 200"):
        trial.upload_keys(public_key=bytes(public))
    trial.upload_keys()

    rows = np.random.default_rng(1).normal(size=(10, 30))
    blobs = trial.ciphertexts(rows)
    flipped = bytearray(blobs[3])
    flipped[64] ^= 0x04  # inside the serialized parameters
    with pytest.raises(errors.BadInput, match="ciphertext 3: byte 64"):
        trial.evaluate(0, 10, [*blobs[:3], bytes(flipped), *blobs[4:]])
    with pytest.raises(errors.BadInput, match=r"'ct-3' declares \d+ bytes; exactly \d+ are"):
        trial.evaluate(0, 10, [*blobs[:3], blobs[3][:-1], *blobs[4:]])
    with pytest.raises(errors.BadInput, match="the stream ended before 'ct-29'"):
        trial.evaluate(0, 10, blobs[:29])

    # the same trial, and other buyers, still work; the failed attempts cost no budget
    results, _receipt = trial.evaluate(0, 10, blobs)
    assert len(results) == 2
    listings, _key = _client(lr_seller, "dave").list_models()
    carol = next(m for m in _client(lr_seller, "carol").list_models()[0] if m.model_id == LR)
    assert carol.trial_rows_remaining == carol.trial_budget_rows - 16  # 10 rows cost 16
    assert [m.model_id for m in listings] == [LR]


def test_feature_packed_trial_buy_verify_and_arbiter(lr_seller: Daemon, examples: Path,
                                                     tmp_path: Path) -> None:
    """All 30 features of a row in one ciphertext, 150 rows in two ciphertexts (the second
    part full): the whole trade works, and an arbiter decodes the packing from the offer."""
    trial = buyer_cli(lr_seller, tmp_path, "dave", "trial", LR, "--data",
                      str(_test_csv(examples)), "--label-column", "y", "--rows", "150",
                      "--packing", "feature-packed")
    assert trial.returncode == 0, trial.stdout + trial.stderr
    assert "planner: 150 rows" in trial.stdout and "chosen with --packing" in trial.stdout
    assert "(feature-packed): 150 rows" in trial.stdout
    folder = next((tmp_path / "trials" / LR).glob("*/report.json")).parent
    report = json.loads((folder / "report.json").read_text())
    measured = report["measurements"]
    assert measured["packing"] == measured["estimated"]["packing"] == "feature-packed"
    # 2 input ciphertexts instead of 30; the rotation keys make up most of the upload
    assert measured["upload_bytes"] == measured["key_bytes"] + 2 * measured["ciphertext_bytes"]
    assert measured["download_bytes"] == 2 * measured["result_bytes"]
    assert measured["estimated"]["upload_bytes"] == pytest.approx(measured["upload_bytes"],
                                                                  rel=0.05)
    for command in ("buy", "verify"):
        done = buyer_cli(lr_seller, tmp_path, "dave", command, LR)
        assert done.returncode == 0, done.stdout + done.stderr
    # the trial evaluated dave's own fingerprinted copy (which may differ from the listed
    # model on a row or two): every prediction clear of the tolerance is that copy's
    columns = json.loads((examples / "catalog" / "breast_cancer_lr.json").read_text())[
        "input_columns"]
    table = load_table(_test_csv(examples), columns, "y")
    probabilities = run_model(_bought_model(folder), table.rows[:150], "output_probability",
                              ["0", "1"])
    clear = np.abs(probabilities[:, 1] - 0.5) > report["tolerance"]
    plain = predicted_labels(probabilities, ["0", "1"])
    assert clear.mean() > 0.9
    assert all(a == b for a, b, c in zip(report["predictions"], plain, clear, strict=True) if c)
    bundle = next(folder.glob("evidence-*.zip"))
    key = subprocess.run([str(BIN / "gimme-seller"), "identity", "--state",
                          str(lr_seller.state)], capture_output=True, text=True, check=True)
    ruling = subprocess.run([str(BIN / "gimme-arbiter"), "verify", str(bundle), "--seller-key",
                             key.stdout.strip()], capture_output=True, text=True, timeout=600)
    assert ruling.returncode == 0 and "NO FAULT FOUND" in ruling.stdout, ruling.stdout


def test_feature_packed_keys_are_checked_and_unpaid_rows_come_back_zero(
        lr_seller: Daemon, lr_catalog: Path) -> None:
    trial = _Trial(lr_seller, "erin", FEATURE_PACKED)
    assert trial.offer.encoding.period == 32 and trial.layout.rows_per_ciphertext == 128
    rotation = bytearray(trial.keys["rotation_keys"])
    rotation[64] ^= 0x10  # a header byte
    with pytest.raises(errors.BadInput, match="rotation keys: byte 64"):
        trial.upload_keys(rotation_keys=bytes(rotation))
    with pytest.raises(errors.BadInput, match="rotation keys: expected exactly"):
        trial.upload_keys(rotation_keys=bytes(rotation[:-8]))
    trial.upload_keys()
    columns = json.loads((lr_catalog / "breast_cancer_lr.json").read_text())["input_columns"]
    rows = load_table(lr_catalog / "breast_cancer_lr_calibration.csv", columns).rows[:200]
    with pytest.raises(errors.BadInput, match="more than the 2 ciphertexts"):
        trial.evaluate(0, 200, trial.ciphertexts(rows)[:1] * 3)  # 200 rows take 2
    # declares 130 rows, packs 200: row 130 onwards comes back zero; each of the two
    # ciphertexts is charged for all 128 rows it can carry
    before = trial.client.list_models()[0][0].trial_rows_remaining
    results, _receipt = trial.evaluate(0, 130, trial.ciphertexts(rows))
    assert trial.client.list_models()[0][0].trial_rows_remaining == before - 256
    assert len(results) == 2
    scores = trial.open(results, 200)
    plain = run_model(trial.buy(), rows, "output_probability", ["0", "1"])  # the buyer's copy
    probabilities = apply_tail(scores[:130], trial.offer.output.tail)
    assert np.abs(probabilities - plain[:130]).max() <= trial.offer.tolerance
    # rows it did not declare carry flooding noise only, not the model's logits
    assert np.abs(scores[130:]).max() < 0.1 < np.abs(scores[:130]).mean()


def test_packings_not_offered_and_keys_not_asked_for_are_refused(
        lr_seller: Daemon, lr_catalog: Path, tmp_path: Path) -> None:
    client = _client(lr_seller, "carol")
    with pytest.raises(errors.BadInput, match="breast-cancer-lr is not offered 'diagonal'; it "
                                              "is offered: slot-per-sample, feature-packed"):
        client.open_trial(LR, "diagonal")
    # a seller may keep its layer widths to itself: no feature packing
    catalog = tmp_path / "catalog"
    shutil.copytree(lr_catalog, catalog)
    listing = json.loads((catalog / "breast_cancer_lr.json").read_text())
    (catalog / "breast_cancer_lr.json").write_text(json.dumps(listing | {
        "feature_packing": False}))
    store = Store(tmp_path / "gimme.sqlite")
    signer, _ = Signer.load_or_create(tmp_path / "identity.key")
    try:
        full, _refused = load_catalog(lr_catalog, store, security_bits=128, capacity=Capacity())
        before = Seller(full, store, signer, tmp_path / "spool", Capacity(), 128)
        offer = open_offer(before.open_trial("carol", LR, FEATURE_PACKED), signer.public_key, LR)
        [only], _refused = load_catalog(catalog, store, security_bits=128, capacity=Capacity())
        assert [e.packing for e in only.estimates()] == ["slot-per-sample"]
        assert not only.measured.packed_period
        # a trial opened feature-packed before the seller stopped offering it
        after = Seller([only], store, signer, tmp_path / "spool", Capacity(), 128)
        with pytest.raises(errors.WrongState, match="no longer offered feature-packed"):
            after.key_sizes("carol", offer.trial_id)
    finally:
        store.close()
    trial = _Trial(lr_seller, "carol")  # slot-per-sample: no rotation keys
    with pytest.raises(errors.BadInput, match=r"more than the keys this trial takes "
                                              r"\(relin_key, public_key\)"):
        trial.upload_keys(rotation_keys=b"\0" * 1024)


def test_budget_is_enforced_by_the_seller(lr_seller: Daemon) -> None:
    trial = _Trial(lr_seller, "dave")
    trial.upload_keys()
    remaining = trial.offer.trial_rows_remaining
    with pytest.raises(errors.Exhausted, match=rf"{remaining} of \d+ rows remain"):
        trial.evaluate(0, remaining + 1, trial.ciphertexts(np.zeros((1, 30))))


def test_payment_is_idempotent_and_releases_the_key(lr_seller: Daemon) -> None:
    trial = _Trial(lr_seller, "frank")
    with pytest.raises(errors.WrongState, match="has no evaluated batch yet"):
        trial.client.deliver(trial.offer.trial_id, 1 << 20, lambda n: None)
    trial.upload_keys()
    trial.evaluate(0, 1, trial.ciphertexts(np.zeros((1, 30))))
    sealed, _record = trial.client.deliver(trial.offer.trial_id, 1 << 20, lambda n: None)
    assert sha256(sealed) != trial.offer.model_commitment
    with pytest.raises(errors.BadInput, match="request id must be 8-64"):
        trial.client.purchase(trial.offer.trial_id, "x")
    request = uuid.uuid4().hex
    first = trial.client.purchase(trial.offer.trial_id, request)
    again = trial.client.purchase(trial.offer.trial_id, request)
    assert first[0] == again[0]  # one payment, one ledger entry
    release = open_key_release(again[1], trial.key, trial.offer, sealed)
    locked = unseal(sealed, release.master_key)
    assert sha256(unlock(locked, release.master_key)) == trial.offer.model_commitment
    # after payment, the same sealed bytes again (the key is fixed per trial)
    assert trial.client.deliver(trial.offer.trial_id, 1 << 20, lambda n: None)[0] == sealed
    broke = _Trial(lr_seller, "mallory")
    with pytest.raises(errors.Exhausted, match=r"insufficient prepaid balance: 0.00"):
        broke.client.purchase(broke.offer.trial_id, uuid.uuid4().hex)


def test_forged_offer_signature_is_refused(lr_seller: Daemon) -> None:
    trial = _Trial(lr_seller, "erin")
    forged = trial.signed.__class__(trial.signed.kind, trial.signed.payload.replace(
        b"breast", b"BREAST"), trial.signed.signature)
    with pytest.raises(errors.Refused, match="signature on this Offer does not verify"):
        open_offer(forged, trial.key, LR)


def test_below_policy_parameters_are_refused(lr_catalog: Path, tls_dir: Path,
                                             examples: Path, tmp_path: Path) -> None:
    weak = Daemon(lr_catalog, tmp_path / "state", tls_dir, ["--insecure-he-params", "4096"])
    try:
        weak.wait_serving()
        result = buyer_cli(weak, tmp_path / "home", "alice", "trial", LR, "--data",
                           str(_test_csv(examples)), "--label-column", "y")
        assert result.returncode == 2
        assert "give no standard security" in result.stdout
        assert "requires 128-bit" in result.stdout
        assert "nothing was encrypted or sent" in result.stdout
        assert "relinearization key accepted" not in weak.logs()
        assert "INSECURE HE PARAMETERS" in weak.logs()
    finally:
        weak.stop()


def _budget_catalog(lr_catalog: Path, tmp_path: Path, rows: int) -> Path:
    catalog = tmp_path / "catalog"
    shutil.copytree(lr_catalog, catalog)
    listing = json.loads((catalog / "breast_cancer_lr.json").read_text())
    listing["trial_budget_rows"] = rows
    (catalog / "breast_cancer_lr.json").write_text(json.dumps(listing))
    return catalog


def test_restart_keeps_ledger_and_budgets(lr_catalog: Path, tls_dir: Path, examples: Path,
                                          tmp_path: Path) -> None:
    catalog = _budget_catalog(lr_catalog, tmp_path, 300)
    state, home = tmp_path / "state", tmp_path / "home"
    first = Daemon(catalog, state, tls_dir, warm=False)
    first.wait_serving()
    assert "NOT_SERVING" in first.statuses  # while the catalog was compiling
    top_up(first, "bob", "60")
    trial = buyer_cli(first, home, "bob", "trial", LR, "--data", str(_test_csv(examples)),
                      "--label-column", "y")
    assert trial.returncode == 0, trial.stdout + trial.stderr
    assert first.stop() == 0  # SIGTERM: a clean, graceful exit
    assert "stopped" in first.logs()

    second = Daemon(catalog, state, tls_dir)
    try:
        second.wait_serving()
        # 300 - 256: the 171 rows were charged as their fold period
        assert "44/300" in buyer_cli(second, home, "bob", "models").stdout
        again = buyer_cli(second, home, "bob", "trial", LR, "--data",
                          str(_test_csv(examples)), "--label-column", "y")
        assert again.returncode == 2
        said = " ".join(again.stdout.split())
        assert "charged as 256, but only 44 trial rows are left" in said
        assert "--rows 32" in said
        bought = buyer_cli(second, home, "bob", "buy", LR)
        assert bought.returncode == 0, bought.stdout + bought.stderr
        assert "balance 35.00" in bought.stdout  # 60 - 25: the top-up survived the restart
        assert buyer_cli(second, home, "bob", "verify", LR).returncode == 0
    finally:
        second.stop()


def test_an_honest_seller_will_not_sell_a_changed_model(
        lr_catalog: Path, tls_dir: Path, examples: Path, tmp_path: Path) -> None:
    catalog = _budget_catalog(lr_catalog, tmp_path, 300)
    state, home = tmp_path / "state", tmp_path / "home"
    first = Daemon(catalog, state, tls_dir)
    first.wait_serving()
    top_up(first, "carol", "100")
    assert buyer_cli(first, home, "carol", "trial", LR, "--data", str(_test_csv(examples)),
                     "--label-column", "y", "--rows", "20").returncode == 0
    first.stop()
    (catalog / "breast_cancer_lr.onnx").write_bytes(perturbed_model(lr_catalog))
    second = Daemon(catalog, state, tls_dir)
    try:
        second.wait_serving()
        bought = buyer_cli(second, home, "carol", "buy", LR)
        assert bought.returncode == 2
        assert "has changed since trial" in bought.stdout
    finally:
        second.stop()


def test_two_buyers_evaluate_at_once_without_sharing_key_state(lr_seller: Daemon,
                                                                 lr_catalog: Path) -> None:
    trials = [_Trial(lr_seller, "erin"), _Trial(lr_seller, "frank")]
    calibration = load_table(lr_catalog / "breast_cancer_lr_calibration.csv", json.loads(
        (lr_catalog / "breast_cancer_lr.json").read_text())["input_columns"]).rows
    rows = [calibration[:20], calibration[20:40]]
    for trial in trials:
        trial.upload_keys()
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda i: trials[i].evaluate(0, 20, trials[i].ciphertexts(
            rows[i])), range(2)))
    for trial, (results, _receipt), data in zip(trials, outcomes, rows, strict=True):
        scores = trial.open(results, 20)
        # compared with the buyer's own (fingerprinted) copy, bought afterwards
        plain = run_model(trial.buy(), data, "output_probability", ["0", "1"])
        ours = apply_tail(scores, trial.offer.output.tail)
        assert np.abs(ours - plain).max() <= trial.offer.tolerance


def test_many_rows_go_in_several_batches(lr_catalog: Path, tls_dir: Path, examples: Path,
                                         tmp_path: Path) -> None:
    """Logic test on a deliberately tiny, insecure ring (512 rows per ciphertext)."""
    columns = json.loads((lr_catalog / "breast_cancer_lr.json").read_text())["input_columns"]
    test = load_table(_test_csv(examples), columns, "y")
    calibration = load_table(lr_catalog / "breast_cancer_lr_calibration.csv", columns)
    rows = np.vstack([calibration.rows, test.rows])  # 569 rows
    data = tmp_path / "rows.npz"
    np.savez(data, X=rows, y=np.zeros(len(rows), dtype=int))
    daemon = Daemon(lr_catalog, tmp_path / "state", tls_dir, ["--insecure-he-params", "1024"])
    try:
        daemon.wait_serving()
        top_up(daemon, "alice", "100")
        home = tmp_path / "home"
        trial = buyer_cli(daemon, home, "alice", "trial", LR, "--data", str(data),
                          "--min-security", "0")
        assert trial.returncode == 0, trial.stdout + trial.stderr
        folder = next((home / "trials" / LR).glob("*/report.json")).parent
        assert sorted(p.name for p in folder.glob("receipt-*.json")) == ["receipt-0.json",
                                                                         "receipt-1.json"]
        report = json.loads((folder / "report.json").read_text())
        assert len(report["predictions"]) == len(rows)
        assert buyer_cli(daemon, home, "alice", "buy", LR).returncode == 0
        assert buyer_cli(daemon, home, "alice", "verify", LR).returncode == 0  # every row
        copy = predicted_labels(run_model(_bought_model(folder), rows,
                                          "output_probability", ["0", "1"]), ["0", "1"])
        agree = np.mean([a == b for a, b in zip(report["predictions"], copy, strict=True)])
        assert agree > 0.98  # only near-ties may flip under the flooding noise
        assert not (daemon.state / "spool" / "trials" / folder.name).exists()
    finally:
        daemon.stop()


def test_without_tls_buyers_are_known_by_api_token(lr_catalog: Path, examples: Path,
                                                   tmp_path: Path) -> None:
    daemon = Daemon(lr_catalog, tmp_path / "state", None, ["--max-evaluations", "1"])
    try:
        daemon.wait_serving()
        assert "serving WITHOUT TLS" in daemon.logs()
        home = tmp_path / "home"
        base = [str(BIN / "gimme-buyer"), "models", "--seller", daemon.address, "--home",
                str(home), "--insecure"]
        missing = subprocess.run(base, capture_output=True, text=True)
        assert missing.returncode == 2 and "API token" in missing.stdout
        wrong = subprocess.run([*base, "--token", "not-a-token"], capture_output=True,
                               text=True)
        assert wrong.returncode == 2
        assert "unknown or missing API token" in wrong.stdout
        assert buyer_cli(daemon, home, "alice", "models").returncode == 0
        subprocess.run([str(BIN / "gimme-seller"), "token", "revoke", "alice", "--state",
                        str(daemon.state)], check=True, capture_output=True)
        revoked = buyer_cli(daemon, home, "alice", "models")
        assert revoked.returncode == 2 and "unknown or missing API token" in revoked.stdout
    finally:
        daemon.stop()


def test_a_batch_pays_for_every_row_its_results_carry(
        lr_catalog: Path, tls_dir: Path, tmp_path: Path) -> None:
    catalog = _budget_catalog(lr_catalog, tmp_path, 300)
    listing = json.loads((catalog / "breast_cancer_lr.json").read_text())
    listing |= {"trial_price_per_row": "0.10",
                "output_policy": {"kind": "noisy", "noise_std": 0.05}}
    (catalog / "breast_cancer_lr.json").write_text(json.dumps(listing))
    daemon = Daemon(catalog, tmp_path / "state", tls_dir)
    try:
        daemon.wait_serving()
        top_up(daemon, "mallory", "5.00")
        trial = _Trial(daemon, "mallory")
        assert trial.offer.trial_price_per_row_cents == 10
        assert trial.offer.output.policy.kind == "noisy"
        assert trial.offer.output.circuit_privacy
        trial.upload_keys()
        rows = load_table(lr_catalog / "breast_cancer_lr_calibration.csv",
                          listing["input_columns"]).rows[:5]
        # 5 rows are charged as 8: the fold period their results carry
        results, _receipt = trial.evaluate(0, 5, trial.ciphertexts(rows))
        plain = run_model((catalog / "breast_cancer_lr.onnx").read_bytes(), rows,
                          "output_probability", ["0", "1"])
        probabilities = apply_tail(trial.open(results, 5), trial.offer.output.tail)
        assert np.abs(probabilities - plain).max() <= trial.offer.tolerance
        listings, _key = trial.client.list_models()
        assert listings[0].trial_rows_remaining == 292
        # 8 rows at 0.10 were charged; 49 rows cost 64 = 6.40 > 4.20 left
        with pytest.raises(errors.Exhausted, match=r"insufficient prepaid balance for 64 "
                                                   r"trial rows at 0\.10 each: 4\.20"):
            trial.evaluate(1, 49, trial.ciphertexts(rows[:1]))
        with pytest.raises(errors.Exhausted, match=r"292 of 300 rows remain and this batch "
                                                   r"costs 512.*0\.10 per row"):
            trial.evaluate(1, 296, trial.ciphertexts(rows[:1]))
    finally:
        daemon.stop()


def test_idle_trials_lose_their_keys_and_can_upload_them_again(lr_catalog: Path,
                                                                tmp_path: Path) -> None:
    store = Store(tmp_path / "gimme.sqlite")
    signer, _ = Signer.load_or_create(tmp_path / "identity.key")
    listings, _refused = load_catalog(lr_catalog, store, security_bits=128,
                                      capacity=Capacity())
    seller = Seller(listings, store, signer, tmp_path / "spool", Capacity(), 128)
    try:
        idle, fresh = (open_offer(seller.open_trial(buyer, LR, SLOT_PER_SAMPLE),
                                  signer.public_key, LR)
                       for buyer in ("bob", "carol"))
        for offer in (idle, fresh):
            (seller._trial_dir(offer.trial_id) / "relin_key.bin").write_bytes(b"key")
            store.set_keys(offer.trial_id, b"k" * 32)
        old = time.time() - 7200
        for item in (seller.spool / "trials" / idle.trial_id).rglob("*"):
            os.utime(item, (old, old))
        assert seller.expire_keys(3600) == 1
        assert not (seller.spool / "trials" / idle.trial_id).exists()
        assert (seller.spool / "trials" / fresh.trial_id / "relin_key.bin").exists()
        with pytest.raises(errors.WrongState, match="expired after the trial sat idle"):
            seller.batch_shape("bob", idle.trial_id, 0, 10)
        assert seller.batch_shape("carol", fresh.trial_id, 0, 10)[0] == 30
    finally:
        store.close()


def test_a_buyer_asking_for_a_packing_the_seller_does_not_offer_is_told_what_is(
        lr_catalog: Path, tls_dir: Path, examples: Path, tmp_path: Path) -> None:
    catalog = _budget_catalog(lr_catalog, tmp_path, 300)
    listing = json.loads((catalog / "breast_cancer_lr.json").read_text())
    (catalog / "breast_cancer_lr.json").write_text(json.dumps(listing | {
        "feature_packing": False}))
    daemon = Daemon(catalog, tmp_path / "state", tls_dir)
    try:
        daemon.wait_serving()
        models = buyer_cli(daemon, tmp_path / "home", "erin", "models")
        assert "slot-per-sample" in models.stdout and "feature-packed" not in models.stdout
        trial = buyer_cli(daemon, tmp_path / "home", "erin", "trial", LR, "--data",
                          str(_test_csv(examples)), "--label-column", "y", "--rows", "20",
                          "--packing", "feature-packed")
        assert trial.returncode == 2, trial.stdout + trial.stderr
        assert (f"{LR} is not offered with feature-packed packing; it is offered with "
                "slot-per-sample (or use --packing auto)") in trial.stdout
        assert not (tmp_path / "home" / "trials").exists()  # nothing was sent or kept
    finally:
        daemon.stop()


def test_a_regression_trial_reports_rmse_mae_and_r2_and_verifies(
        tls_dir: Path, tmp_path: Path) -> None:
    """A Ridge regression trades like a classifier: the trial report scores its decrypted
    predictions against the label column with scikit-learn's RMSE, MAE and R^2."""
    x, y = load_diabetes(return_X_y=True)
    y = y / 100  # targets near 1: onnxruntime's float32 agrees with sklearn to ~1e-7
    columns = [f"x{i}" for i in range(x.shape[1])]
    ridge = make_pipeline(StandardScaler(), Ridge()).fit(x[:300], y[:300])
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    exported = to_onnx(ridge, x[:1].astype(np.float32), target_opset={"": 17, "ai.onnx.ml": 3})
    save_model(exported, catalog / "ridge.onnx")
    write_csv(catalog / "ridge_calibration.csv", columns, x[:300])
    (catalog / "ridge.json").write_text(json.dumps({
        "name": "diabetes-ridge", "model": "ridge.onnx",
        "calibration": "ridge_calibration.csv", "input_columns": columns, "price": "5",
        "trial_budget_rows": 500, "feature_packing": False}))
    test = tmp_path / "test.csv"
    write_csv(test, columns, x[300:], "target", list(y[300:]))
    daemon = Daemon(catalog, tmp_path / "state", tls_dir)
    try:
        daemon.wait_serving()
        top_up(daemon, "dave", "20")
        home = tmp_path / "home"
        trial = buyer_cli(daemon, home, "dave", "trial", "diabetes-ridge", "--data",
                          str(test), "--label-column", "target")
        assert trial.returncode == 0, trial.stdout + trial.stderr
        assert "RMSE" in trial.stdout and "MAE" in trial.stdout
        folder = next(home.glob("trials/diabetes-ridge/*/report.json")).parent
        report = json.loads((folder / "report.json").read_text())
        metrics, tolerance = report["metrics"], report["tolerance"]
        assert metrics["kind"] == "regression" and metrics["rows"] == len(x) - 300
        assert f"{metrics['rmse']:.4g}" in trial.stdout
        bought = buyer_cli(daemon, home, "dave", "buy", "diabetes-ridge")
        assert bought.returncode == 0, bought.stdout + bought.stderr
        # the trial evaluated dave's own (fingerprinted) copy: what he bought
        predicted = run_model(_bought_model(folder), x[300:], "variable", [])[:, 0]
        assert np.abs(np.array(report["predictions"]) - predicted).max() <= tolerance
        truth = y[300:]
        rmse = mean_squared_error(truth, predicted) ** 0.5
        # each decrypted prediction is within the tolerance: RMSE and MAE move by at most
        # that much, R^2 by at most tolerance (2 RMSE + tolerance) / var(y)
        assert metrics["rmse"] == pytest.approx(rmse, abs=tolerance)
        assert metrics["mae"] == pytest.approx(mean_absolute_error(truth, predicted),
                                               abs=tolerance)
        assert metrics["r2"] == pytest.approx(
            r2_score(truth, predicted), abs=tolerance * (2 * rmse + tolerance) / np.var(truth))
        # and the copy scores like the listed model: the fingerprint moves few predictions
        assert metrics["r2"] == pytest.approx(r2_score(truth, ridge.predict(x[300:])),
                                              abs=0.01)
        verified = buyer_cli(daemon, home, "dave", "verify", "diabetes-ridge")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "PASS" in verified.stdout
    finally:
        daemon.stop()


def test_regression_metrics_are_sklearns_and_labels_must_be_numbers() -> None:
    rng = np.random.default_rng(0)
    truth, predicted = rng.normal(size=50), rng.normal(size=50)
    metrics = regression_metrics(list(truth), list(predicted))
    assert metrics["rmse"] == pytest.approx(mean_squared_error(truth, predicted) ** 0.5)
    assert metrics["mae"] == pytest.approx(mean_absolute_error(truth, predicted))
    assert metrics["r2"] == pytest.approx(r2_score(truth, predicted))
    assert regression_metrics([2.0, 2.0], [2.0, 2.0])["r2"] == 1.0  # as sklearn: constant
    assert regression_metrics([2.0, 2.0], [2.0, 3.0])["r2"] == 0.0  # targets
    assert regression_targets(["1.5", "2", "-3e-2"], "m") == [1.5, 2.0, -0.03]
    for bad in ("low", "nan", "inf"):
        with pytest.raises(errors.BadInput, match=rf"m is a regression model .* row 2's label "
                                                  rf"'{bad}' is not a finite number"):
            regression_targets(["1", bad], "m")

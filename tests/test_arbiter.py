"""gimme-arbiter on real bundles: an honest trade, dishonest sellers, doctored evidence."""

from __future__ import annotations

import io
import json
import os
import subprocess
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gimme.v1.gimme_pb2_grpc import add_SellerServicer_to_server

from common.deeplock import lock, new_master_key
from common.protocol import KEY_RELEASE, Signed
from common.rpc import TlsFiles, make_server
from common.signing import Signer
from common.tabular import FloatArray
from common.wire import key_release_from_payload, key_release_payload
from seller_server.catalog import Listing, load_catalog
from seller_server.service import SellerServicer
from seller_server.store import Store, TrialRow
from seller_server.trade import Seller
from seller_server.worker import Capacity
from tests.conftest import BIN, Daemon, buyer_cli, perturbed_model

LR = "breast-cancer-lr"


def _arbiter(bundle: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "gimme-arbiter"), "verify", str(bundle), *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200"})


def _seller_key(daemon: Daemon) -> str:
    shown = subprocess.run([str(BIN / "gimme-seller"), "identity", "--state",
                            str(daemon.state)], capture_output=True, text=True, check=True)
    return shown.stdout.strip()


def _trade(endpoint: Daemon | tuple[str, Path], home: Path, buyer: str, examples: Path,
           honest: bool = True) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A 40-row trial, purchase and verification; the bundle and the verify run (`buy`
    fails when the released key does not open the committed model)."""
    trial = buyer_cli(endpoint, home, buyer, "trial", LR, "--data",
                      str(examples / "data" / "breast_cancer_lr_test.csv"), "--label-column",
                      "y", "--rows", "40")
    assert trial.returncode == 0, trial.stdout + trial.stderr
    bought = buyer_cli(endpoint, home, buyer, "buy", LR)
    assert (bought.returncode == 0) == honest, bought.stdout + bought.stderr
    verified = buyer_cli(endpoint, home, buyer, "verify", LR)
    return next((home / "trials" / LR).glob("*/evidence-*.zip")), verified


@pytest.fixture(scope="module")
def honest(lr_seller: Daemon, examples: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[Path, str]:
    """An honest trade's bundle and the seller's published key."""
    bundle, verified = _trade(lr_seller, tmp_path_factory.mktemp("bob"), "bob", examples)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    return bundle, _seller_key(lr_seller)


def _doctored(bundle: Path, out: Path, changes: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(bundle) as source, zipfile.ZipFile(out, "w") as target:
        for name in source.namelist():
            target.writestr(name, changes.get(name, source.read(name)))
    return out


def _npy(array: FloatArray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_an_honest_trade_shows_no_fault(honest: tuple[Path, str], tmp_path: Path) -> None:
    bundle, key = honest
    ruling = _arbiter(bundle, "--seller-key", key, "--out", str(tmp_path / "ruling.json"))
    assert ruling.returncode == 0, ruling.stdout + ruling.stderr
    assert "NO FAULT FOUND" in ruling.stdout and "(the buyer claimed PASS)" in ruling.stdout
    written = json.loads((tmp_path / "ruling.json").read_text())
    assert written["ruling"] == "NO FAULT FOUND" and written["exit_status"] == 0
    assert {c["name"] for c in written["checks"]} >= {
        "decrypted inputs are the buyer's rows", "decrypted results are the buyer's scores",
        "unlocked model is the committed one", "delivered model reproduces the trial"}
    assert all(c["ok"] for c in written["checks"])


def test_a_false_claim_of_mismatch_is_not_supported(honest: tuple[Path, str],
                                                     tmp_path: Path) -> None:
    bundle, key = honest
    with zipfile.ZipFile(bundle) as source:
        manifest = json.loads(source.read("manifest.json")) | {"claim": "FAIL"}
    lying = _doctored(bundle, tmp_path / "claim.zip",
                      {"manifest.json": json.dumps(manifest).encode()})
    ruling = _arbiter(lying, "--seller-key", key)
    assert ruling.returncode == 0, ruling.stdout + ruling.stderr
    assert "the buyer's claim of a mismatch is not supported" in " ".join(ruling.stdout.split())


def _rows_changed(source: zipfile.ZipFile) -> dict[str, bytes]:
    with np.load(io.BytesIO(source.read("rows.npz"))) as data:
        rows, labels = data["X"].copy(), data["y"]
    rows[3, 0] += 1.0  # "I tested another row 3"
    buffer = io.BytesIO()
    np.savez(buffer, X=rows, y=labels)
    return {"rows.npz": buffer.getvalue()}


def _scores_changed(source: zipfile.ZipFile) -> dict[str, bytes]:
    scores = np.load(io.BytesIO(source.read("scores.npy")))
    return {"scores.npy": _npy(scores + 0.2)}  # "the trial said something else"


def _result_swapped(source: zipfile.ZipFile) -> dict[str, bytes]:
    return {"results/batch-0/score-0.bin": source.read("results/batch-0/score-1.bin")}


def _receipt_forged(source: zipfile.ZipFile) -> dict[str, bytes]:
    receipt = json.loads(source.read("receipt-0.json"))
    receipt["payload"] = receipt["payload"][:-8] + "AAAAAAA="
    return {"receipt-0.json": json.dumps(receipt).encode()}


def _secret_key_replaced(source: zipfile.ZipFile) -> dict[str, bytes]:
    key = bytearray(source.read("secret.key"))
    key[-200:-100] = bytes(100)  # the key's coefficients, not its header
    return {"secret.key": bytes(key)}


def _key_release_dropped(source: zipfile.ZipFile) -> dict[str, bytes]:
    delivery = json.loads(source.read("delivery.json"))
    return {"key-release.json": json.dumps(delivery).encode()}  # a record of another kind


@pytest.mark.parametrize(("doctor", "reason"), [
    (_rows_changed, "do not give the rows in rows.npz"),
    (_scores_changed, "scores.npy is not what the seller's results decrypt to"),
    (_result_swapped, "receipt-0 does not sign the stored offer, inputs and results"),
    (_receipt_forged, "signature on this Receipt does not verify"),
    (_secret_key_replaced, "ciphertexts or secret key are unusable"),
    (_key_release_dropped, "expected a signed gimme.v1.KeyRelease"),
])
def test_doctored_evidence_is_rejected(honest: tuple[Path, str], tmp_path: Path,
                                       doctor: object, reason: str) -> None:
    bundle, key = honest
    with zipfile.ZipFile(bundle) as source:
        changes = doctor(source)  # type: ignore[operator]
    ruling = _arbiter(_doctored(bundle, tmp_path / "doctored.zip", changes), "--seller-key",
                      key)
    assert ruling.returncode == 4, ruling.stdout + ruling.stderr
    assert "BUYER'S EVIDENCE REJECTED" in ruling.stdout
    assert reason in " ".join(ruling.stdout.split())


def test_evidence_signed_by_another_key_is_rejected(honest: tuple[Path, str]) -> None:
    bundle, _key = honest
    impostor = Signer.load_or_create(bundle.parent / "impostor.key")[0].public_key.hex()
    ruling = _arbiter(bundle, "--seller-key", impostor)
    assert ruling.returncode == 4
    assert "the offer is not the seller's" in " ".join(ruling.stdout.split())


def test_unusable_arguments_are_named(tmp_path: Path) -> None:
    not_zip = tmp_path / "notes.txt"
    not_zip.write_text("hello")
    ruling = _arbiter(not_zip)
    assert ruling.returncode == 2 and "is not an evidence bundle" in ruling.stdout
    short = _arbiter(not_zip, "--seller-key", "abcd")
    assert short.returncode == 2 and "64 hex characters" in short.stdout


class _SwappingSeller(Seller):
    """Locks and sells another model under records that claim the committed one."""

    swapped = b""

    def _locked(self, trial: TrialRow, listing: Listing, key: bytes) -> bytes:
        return lock(self.swapped, key)


class _WrongKeySeller(Seller):
    """Delivers the committed model but, once paid, releases a key that does not open it."""

    def purchase(self, buyer_id: str, trial_id: str, request_id: str,
                 escrow_deposit: Signed | None = None) -> tuple[Signed, Signed]:
        payment, release = super().purchase(buyer_id, trial_id, request_id, escrow_deposit)
        wrong = replace(key_release_from_payload(release.payload), master_key=new_master_key())
        return payment, self._sign(KEY_RELEASE, key_release_payload(wrong))


@contextmanager
def _in_process(seller_class: type[Seller], catalog: Path, tls_dir: Path, state: Path,
                buyer: str) -> Iterator[tuple[tuple[str, Path], Seller]]:
    """A seller whose code a test replaces, served over real gRPC and TLS on loopback."""
    store = Store(state / "gimme.sqlite")
    store.top_up(buyer, 10_000, "top")
    signer, _ = Signer.load_or_create(state / "identity.key")
    listings, _refused = load_catalog(catalog, store, security_bits=128, capacity=Capacity())
    seller = seller_class(listings, store, signer, state / "spool", Capacity(), 128)
    server, port, _health = make_server("127.0.0.1:0", TlsFiles.in_dir(tls_dir, "seller"))
    servicer = SellerServicer(require_tls_identity=True)
    servicer.ready(seller)
    add_SellerServicer_to_server(servicer, server)
    server.start()
    try:
        yield (f"127.0.0.1:{port}", tls_dir), seller
    finally:
        server.stop(None)
        store.close()


@pytest.mark.parametrize("seller_class", [_SwappingSeller, _WrongKeySeller])
def test_a_dishonest_seller_is_found_at_fault(
        seller_class: type[Seller], lr_catalog: Path, tls_dir: Path, examples: Path,
        tmp_path: Path) -> None:
    with _in_process(seller_class, lr_catalog, tls_dir, tmp_path / "state", "dave") as (
            endpoint, seller):
        if isinstance(seller, _SwappingSeller):
            seller.swapped = perturbed_model(lr_catalog)
        bundle, verified = _trade(endpoint, tmp_path / "home", "dave", examples, honest=False)
        key = seller.signer.public_key.hex()
    assert verified.returncode == 1 and "FAIL" in verified.stdout
    manifest = json.loads(zipfile.ZipFile(bundle).read("manifest.json"))
    assert manifest["claim"] == "FAIL"
    # a swapped model opens but is not the committed one; a wrong key does not open the seal
    assert {c["name"] for c in manifest["checks"] if not c["ok"]} == (
        {"unlocked model is the committed one", "delivered model reproduces the trial"}
        if seller_class is _SwappingSeller else {"key opens the model"})
    ruling = _arbiter(bundle, "--seller-key", key)
    assert ruling.returncode == 3, ruling.stdout + ruling.stderr
    assert "SELLER AT FAULT" in ruling.stdout
    assert "does not open the model it delivered into the model it committed to" in " ".join(
        ruling.stdout.split())

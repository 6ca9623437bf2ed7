"""The escrow (gimme-escrow) through real daemons: a seller at fault is paid nothing and the
buyer refunded on the arbiter's signed ruling; an honest trade pays the seller on the buyer's
PASS; forged, altered, missing or replayed proofs are refused and move no money."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gimme.v1 import escrow_pb2 as epb

from buyer_client.client import SellerClient
from common.errors import NotFound, Refused, WrongState
from common.escrow import DEPOSIT, RULING, Deposit, deposit_payload, seller_account
from common.protocol import Offer, Signed
from common.rpc import TlsFiles
from common.signing import Signer
from common.wire import envelope_from_json, offer_from_payload
from escrow.client import EscrowClient
from tests.conftest import BIN, ROOT, Daemon, buyer_cli
from tests.test_arbiter import LR, _in_process, _WrongKeySeller

PRICE = 2500  # the breast-cancer listing's price, in cents (checked below)


class Escrow:
    """`gimme-escrow serve` in its own process (python -m escrow: works before a reinstall)."""

    def __init__(self, state: Path, tls_dir: Path, arbiter_key: str) -> None:
        self.state = state
        port_file = state.parent / "escrow.port"
        self.log_path = state.parent / "escrow.log"
        self.log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "escrow", "serve", "--state", str(state), "--listen",
             "127.0.0.1:0", "--port-file", str(port_file), "--tls-dir", str(tls_dir),
             "--trust-arbiter", arbiter_key],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=_env())
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text():
            assert self.process.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, "the escrow did not bind a port"
            time.sleep(0.05)
        self.address = f"127.0.0.1:{port_file.read_text()}"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "escrow", *args], capture_output=True,
                              text=True, cwd=ROOT, env=_env(), timeout=120)

    def identity(self) -> str:
        return self.cli("identity", "--state", str(self.state)).stdout.strip()

    def balances(self) -> dict[str, int]:
        """Every account's balance, read from the escrow's own database."""
        from escrow.store import EscrowStore
        store = EscrowStore(self.state / "escrow.sqlite")
        try:
            balances = dict(store.balances())
            assert balances.get("escrow:held", 0) == store.held_total()  # the invariant
            return balances
        finally:
            store.close()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "COLUMNS": "200"}


@pytest.fixture(scope="module")
def arbiter_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("arbiter") / "arbiter.key"


@pytest.fixture(scope="module")
def escrow(tls_dir: Path, arbiter_key: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Escrow]:
    public = Signer.load_or_create(arbiter_key)[0].public_key.hex()
    daemon = Escrow(tmp_path_factory.mktemp("escrow") / "state", tls_dir, public)
    for buyer in ("erin", "frank"):
        assert daemon.cli("topup", buyer, "100", "--state", str(daemon.state)).returncode == 0
    yield daemon
    daemon.stop()


def _client(escrow: Escrow, tls_dir: Path, identity: str) -> EscrowClient:
    return EscrowClient(escrow.address, TlsFiles.in_dir(tls_dir, identity))


def _trial(endpoint: Daemon | tuple[str, Path], home: Path, buyer: str, examples: Path
           ) -> str:
    trial = buyer_cli(endpoint, home, buyer, "trial", LR, "--data",
                      str(examples / "data" / "breast_cancer_lr_test.csv"), "--label-column",
                      "y", "--rows", "40")
    assert trial.returncode == 0, trial.stdout + trial.stderr
    return _offer(home).trial_id


def _offer(home: Path) -> Offer:
    """The offer of the buyer's (only) trial."""
    signed = next((home / "trials" / LR).glob("*/offer.json")).read_text()
    return offer_from_payload(envelope_from_json(signed, "offer").payload)


@dataclasses.dataclass(frozen=True)
class Dispute:
    trial_id: str
    ruling: Path  # SELLER AT FAULT, signed by the trusted arbiter
    seller_key: bytes
    home: Path


@pytest.fixture(scope="module")
def dispute(escrow: Escrow, lr_catalog: Path, tls_dir: Path, examples: Path,
            arbiter_key: Path, tmp_path_factory: pytest.TempPathFactory) -> Dispute:
    """A seller that releases a wrong key, paid by an escrow deposit; the buyer's FAIL, and
    the trusted arbiter's signed ruling on it."""
    tmp = tmp_path_factory.mktemp("dispute")
    home = tmp / "home"
    with _in_process(_WrongKeySeller, lr_catalog, tls_dir, tmp / "state", "erin") as (
            endpoint, seller):
        seller.escrow_keys = [bytes.fromhex(escrow.identity())]
        assert seller.listings[LR].spec.price_cents == PRICE
        trial_id = _trial(endpoint, home, "erin", examples)
        bought = buyer_cli(endpoint, home, "erin", "buy", LR, "--escrow", escrow.address)
        assert bought.returncode == 2 and "deposited at the escrow" in bought.stdout, (
            bought.stdout + bought.stderr)
        verified = buyer_cli(endpoint, home, "erin", "verify", LR, "--escrow", escrow.address)
        seller_key = seller.signer.public_key
    assert verified.returncode == 1 and "the deposit stays held" in " ".join(
        verified.stdout.split()), verified.stdout + verified.stderr
    assert escrow.balances() == {"buyer:erin": 10_000 - PRICE, "escrow:held": PRICE,
                                 "buyer:frank": 10_000, "external:topups": -20_000}
    bundle = next((home / "trials" / LR).glob(f"*/evidence-{trial_id}.zip"))
    ruled = subprocess.run([str(BIN / "gimme-arbiter"), "verify", str(bundle), "--seller-key",
                            seller_key.hex(), "--sign-with", str(arbiter_key)],
                           capture_output=True, text=True, timeout=600, env=_env())
    assert ruled.returncode == 3 and "SELLER AT FAULT" in ruled.stdout, ruled.stdout
    return Dispute(trial_id, bundle.with_name(f"ruling-{trial_id}.json"), seller_key, home)


def _ruling(dispute: Dispute, signer: Signer, verdict: str, trial_id: str | None = None
            ) -> Signed:
    """The dispute's ruling with its verdict (and trial) changed, signed by `signer`."""
    message = epb.ArbiterRuling.FromString(
        envelope_from_json(dispute.ruling.read_text(), "ruling").payload)
    message.ruling = verdict
    message.trial_id = trial_id or message.trial_id
    payload = message.SerializeToString()
    return Signed(RULING, payload, signer.sign(RULING, payload))


def test_a_refund_without_a_valid_ruling_moves_no_money(
        dispute: Dispute, escrow: Escrow, tls_dir: Path, arbiter_key: Path,
        tmp_path: Path) -> None:
    before = escrow.balances()
    buyer, seller = _client(escrow, tls_dir, "erin"), _client(escrow, tls_dir, "seller")
    trusted, impostor = (Signer.load_or_create(arbiter_key)[0],
                         Signer.load_or_create(tmp_path / "impostor.key")[0])
    genuine = envelope_from_json(dispute.ruling.read_text(), "ruling")
    altered = dataclasses.replace(genuine, payload=genuine.payload.replace(
        b"SELLER AT FAULT", b"NO FAULT FOUND!"))
    attempts: list[tuple[str, Callable[[], Signed], str]] = [
        ("no ruling", lambda: buyer.settle("Refund", dispute.trial_id, _rid(), None),
         "needs an arbiter's signed ruling"),
        ("a ruling signed by an untrusted key",
         lambda: buyer.settle("Refund", dispute.trial_id, _rid(),
                              _ruling(dispute, impostor, "SELLER AT FAULT")),
         "not signed by an arbiter key trusted here"),
        ("the genuine ruling, altered", lambda: seller.settle(
            "Release", dispute.trial_id, _rid(), altered),
         "not signed by an arbiter key trusted here"),
        ("SELLER AT FAULT used to release", lambda: seller.settle(
            "Release", dispute.trial_id, _rid(), genuine), "does not allow Release"),
        ("a release without a ruling by someone else than the depositor",
         lambda: seller.settle("Release", dispute.trial_id, _rid(), None),
         "only the buyer who made the deposit"),
        ("a trusted ruling on another trial", lambda: buyer.settle(
            "Refund", dispute.trial_id, _rid(),
            _ruling(dispute, trusted, "SELLER AT FAULT", "0" * 24)), "is on trial"),
    ]
    for what, attempt, reason in attempts:
        with pytest.raises(Refused) as refused:
            attempt()
        assert reason in refused.value.message, what
        assert escrow.balances() == before, what


def test_seller_at_fault_refunds_the_buyer_and_pays_the_seller_nothing(
        dispute: Dispute, escrow: Escrow, tls_dir: Path) -> None:
    settled = escrow.cli("settle", dispute.trial_id, "--ruling", str(dispute.ruling),
                         "--escrow", escrow.address, "--tls-dir", str(tls_dir), "--identity",
                         "erin", "--escrow-key", escrow.identity())
    assert settled.returncode == 0, settled.stdout + settled.stderr
    assert "25.00 refunded to buyer:erin (arbiter: SELLER AT FAULT" in settled.stdout
    balances = escrow.balances()
    assert balances["buyer:erin"] == 10_000 and balances["escrow:held"] == 0
    assert balances.get(seller_account(dispute.seller_key), 0) == 0


def test_a_replayed_settlement_moves_no_money(dispute: Dispute, escrow: Escrow,
                                              tls_dir: Path, arbiter_key: Path) -> None:
    """After the refund: the same ruling again is a retry (same receipt, nothing moved); a
    fresh request, even with a genuine ruling of no fault, finds the deposit settled."""
    before = escrow.balances()
    again = escrow.cli("settle", dispute.trial_id, "--ruling", str(dispute.ruling), "--escrow",
                       escrow.address, "--tls-dir", str(tls_dir), "--identity", "erin")
    assert again.returncode == 0, again.stdout + again.stderr
    no_fault = _ruling(dispute, Signer.load_or_create(arbiter_key)[0], "NO FAULT FOUND")
    with pytest.raises(WrongState, match="already refunded"):
        _client(escrow, tls_dir, "seller").settle("Release", dispute.trial_id, _rid(),
                                                  no_fault)
    with pytest.raises(WrongState, match="already refunded"):
        _client(escrow, tls_dir, "erin").settle("Release", dispute.trial_id, _rid(), None)
    assert escrow.balances() == before


@pytest.fixture(scope="module")
def honest_seller(lr_catalog: Path, tls_dir: Path, escrow: Escrow,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A real `gimme-seller serve` that accepts this escrow's deposits."""
    daemon = Daemon(lr_catalog, tmp_path_factory.mktemp("escrow-seller") / "state", tls_dir,
                    ["--trust-escrow", escrow.identity()])
    daemon.wait_serving()
    yield daemon
    daemon.stop()


def test_a_forged_deposit_receipt_releases_no_key(honest_seller: Daemon, tls_dir: Path,
                                                  examples: Path, tmp_path: Path) -> None:
    trial_id = _trial(honest_seller, tmp_path / "home", "frank", examples)
    offer = _offer(tmp_path / "home")
    forger = Signer.load_or_create(tmp_path / "forger.key")[0]
    payload = deposit_payload(Deposit(trial_id, _rid(), "frank", offer.seller_public_key,
                                      PRICE, offer.model_commitment, int(time.time())))
    seller = SellerClient(honest_seller.address, TlsFiles.in_dir(tls_dir, "frank"))
    with pytest.raises(Refused, match="not signed by an escrow key trusted here"):
        seller.purchase(trial_id, _rid(), Signed(DEPOSIT, payload,
                                                 forger.sign(DEPOSIT, payload)))
    shown = subprocess.run([str(BIN / "gimme-seller"), "balances", "--state",
                            str(honest_seller.state)], capture_output=True, text=True)
    assert "escrow-revenue" not in shown.stdout  # nothing was sold


def test_an_honest_trade_pays_the_seller_on_the_buyers_pass(
        honest_seller: Daemon, escrow: Escrow, tls_dir: Path, examples: Path,
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    before = escrow.balances()
    trial_id = _trial(honest_seller, home, "frank", examples)
    bought = buyer_cli(honest_seller, home, "frank", "buy", LR, "--escrow", escrow.address)
    assert bought.returncode == 0 and "by the escrow deposit" in bought.stdout, (
        bought.stdout + bought.stderr)
    held = escrow.balances()
    assert held["escrow:held"] == before.get("escrow:held", 0) + PRICE
    verified = buyer_cli(honest_seller, home, "frank", "verify", LR, "--escrow",
                         escrow.address)
    assert verified.returncode == 0 and "released to the seller" in verified.stdout, (
        verified.stdout + verified.stderr)
    key = bytes.fromhex(subprocess.run(
        [str(BIN / "gimme-seller"), "identity", "--state", str(honest_seller.state)],
        capture_output=True, text=True, check=True).stdout.strip())
    paid = escrow.balances()
    assert paid[seller_account(key)] == PRICE and paid["escrow:held"] == before.get(
        "escrow:held", 0)
    assert paid["buyer:frank"] == before["buyer:frank"] - PRICE
    # a replayed release (verify again: the same request id) moves nothing
    again = buyer_cli(honest_seller, home, "frank", "verify", LR, "--escrow", escrow.address)
    assert again.returncode == 0, again.stdout + again.stderr
    assert escrow.balances() == paid
    with pytest.raises(NotFound):
        _client(escrow, tls_dir, "frank").settle("Release", "f" * 24, _rid(), None)
    del trial_id


def _rid() -> str:
    return uuid.uuid4().hex

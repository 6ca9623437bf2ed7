"""Lost replies, Ctrl-C and kill -9 (issue 10, findings 9, 13, 14), through real daemons.

Each test holds an evaluation open by stopping its worker process (SIGSTOP), then plays the
interruption for real: SIGINT to `gimme-buyer trial`, SIGKILL to the buyer after the seller
computed, SIGKILL to the daemon. Afterwards the seller's own SQLite state must agree with
what the buyer got: rows charged once for results it can fetch, refunded otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, buyer_cli, buyer_command, top_up

LR = "breast-cancer-lr"
ROWS = "32"  # a power of two: a batch is charged its fold period (rows rounded up)
PRICE_PER_ROW_CENTS = 1
PRICE_CENTS = 2500


@pytest.fixture(scope="module")
def priced_catalog(lr_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The breast-cancer listing with trial rows at 0.01 each, so the ledger shows charges."""
    catalog = tmp_path_factory.mktemp("priced-catalog")
    for path in lr_catalog.iterdir():
        shutil.copy(path, catalog)
    listing = catalog / "breast_cancer_lr.json"
    raw = json.loads(listing.read_text())
    listing.write_text(json.dumps({**raw, "trial_price_per_row": "0.01"}))
    return catalog


@pytest.fixture(scope="module")
def seller(priced_catalog: Path, tls_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Daemon]:
    daemon = Daemon(priced_catalog, tmp_path_factory.mktemp("interrupts") / "state", tls_dir)
    daemon.wait_serving()
    for buyer in ("alice", "bob", "dave", "erin"):
        top_up(daemon, buyer, "100")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def test_csv(examples: Path) -> Path:
    return examples / "data" / "breast_cancer_lr_test.csv"


def _wait(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.05)


def _workers(daemon: Daemon) -> list[int]:
    """Pids of the daemon's evaluation worker processes."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == daemon.process.pid and b"evaluate_batch" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _stopped_worker(daemon: Daemon) -> int:
    """Wait for the daemon's evaluation worker to load OpenFHE (it has set itself up by
    then) and freeze it mid-evaluation."""
    _wait(lambda: any(_loaded_openfhe(pid) for pid in _workers(daemon)),
          "an evaluation worker")
    pid = next(pid for pid in _workers(daemon) if _loaded_openfhe(pid))
    os.kill(pid, signal.SIGSTOP)
    return pid


def _loaded_openfhe(pid: int) -> bool:
    try:
        return b"openfhe" in Path(f"/proc/{pid}/maps").read_bytes()
    except OSError:
        return False


def _kill_leftover(pid: int) -> None:
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _query(daemon: Daemon, sql: str, *args: str) -> int:
    db = sqlite3.connect(daemon.state / "gimme.sqlite", timeout=30)
    try:
        row = db.execute(sql, args).fetchone()
    finally:
        db.close()
    return int(row[0] or 0) if row else 0


def _rows_used(daemon: Daemon, buyer: str) -> int:
    return _query(daemon, "SELECT rows_used FROM budgets WHERE buyer_id = ?", buyer)


def _balance(daemon: Daemon, buyer: str) -> int:
    return _query(daemon, "SELECT SUM(amount_cents) FROM ledger_entries WHERE account = ?",
                  f"buyer:{buyer}")


def _start_trial(daemon: Daemon, home: Path, buyer: str, csv: Path) -> subprocess.Popen[str]:
    # Ctrl-C as at a terminal: a shell that starts the tests in the background (`&`, no job
    # control) makes them ignore SIGINT, and the buyer would inherit that
    return subprocess.Popen(
        buyer_command(daemon, home, buyer, "trial", LR, "--data", str(csv), "--label-column",
                      "y", "--rows", ROWS),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "200"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _trial_folders(home: Path) -> list[Path]:
    return [p.parent for p in (home / "trials" / LR).glob("*/offer.json")]


def test_ctrl_c_during_evaluation_refunds_the_rows_and_resume_finishes(
        seller: Daemon, test_csv: Path, tmp_path: Path) -> None:
    """Finding 13 (and 9's cancel): SIGINT while the seller evaluates kills its worker,
    refunds the rows, leaves the bought model's verify PASSing, and --resume finishes."""
    home = tmp_path / "alice"
    _ok(buyer_cli(seller, home, "alice", "trial", LR, "--data", str(test_csv),
                  "--label-column", "y", "--rows", ROWS))
    _ok(buyer_cli(seller, home, "alice", "buy", LR))
    assert "PASS" in _ok(buyer_cli(seller, home, "alice", "verify", LR))
    (bought,) = _trial_folders(home)
    used, balance = _rows_used(seller, "alice"), _balance(seller, "alice")

    cli = _start_trial(seller, home, "alice", test_csv)
    worker = _stopped_worker(seller)
    try:
        cli.send_signal(signal.SIGINT)
        out, _ = cli.communicate(timeout=120)
        assert cli.returncode == 130, out
        (line,) = [x for x in out.splitlines() if "interrupted" in x]
        assert f"gimme-buyer trial {LR} --resume" in line
        _wait(lambda: not _alive(worker), "the cancelled evaluation's worker to be killed")
        _wait(lambda: _rows_used(seller, "alice") == used, "the rows to be refunded")
        assert _balance(seller, "alice") == balance
    finally:
        _kill_leftover(worker)

    (broken,) = [f for f in _trial_folders(home) if f != bought]
    assert (home / "trials" / LR / "latest").read_text() == bought.name
    assert "PASS" in _ok(buyer_cli(seller, home, "alice", "verify", LR))
    assert not list(broken.glob("evidence-*"))

    resumed = _ok(buyer_cli(seller, home, "alice", "trial", LR, "--resume"))
    assert f"resuming trial {broken.name}" in resumed
    assert (broken / "report.json").exists()
    assert _rows_used(seller, "alice") == used + int(ROWS)
    assert _balance(seller, "alice") == balance - int(ROWS) * PRICE_PER_ROW_CENTS


def test_reply_lost_after_the_seller_computed_is_fetched_and_charged_once(
        seller: Daemon, test_csv: Path, tmp_path: Path) -> None:
    """Finding 9: the buyer dies after the seller computed; the results stay fetchable,
    the rows are charged once, and the fetched receipt verifies."""
    home = tmp_path / "bob"
    balance = _balance(seller, "bob")
    cli = _start_trial(seller, home, "bob", test_csv)
    worker = _stopped_worker(seller)
    try:
        cli.send_signal(signal.SIGSTOP)  # the buyer cannot read the reply
        os.kill(worker, signal.SIGCONT)
        _wait(lambda: _query(seller, "SELECT COUNT(*) FROM evaluations e JOIN trials t "
                                     "USING (trial_id) WHERE t.buyer_id = 'bob' AND "
                                     "e.status = 'done'") == 1, "the batch to be evaluated")
    finally:
        cli.kill()
        cli.communicate(timeout=60)
        _kill_leftover(worker)
    assert _rows_used(seller, "bob") == int(ROWS)
    charged = balance - int(ROWS) * PRICE_PER_ROW_CENTS
    assert _balance(seller, "bob") == charged

    (folder,) = _trial_folders(home)
    assert not (folder / "receipt-0.json").exists()
    _ok(buyer_cli(seller, home, "bob", "trial", LR, "--resume"))  # checks the receipt
    assert (folder / "receipt-0.json").exists() and (folder / "report.json").exists()
    assert _rows_used(seller, "bob") == int(ROWS)
    assert _balance(seller, "bob") == charged


def test_ctrl_c_during_the_key_upload_charges_nothing(
        seller: Daemon, test_csv: Path, tmp_path: Path) -> None:
    """Finding 13 at upload: one line, exit 130, nothing charged, no trial marked."""
    home = tmp_path / "dave"
    cli = _start_trial(seller, home, "dave", test_csv)
    try:
        _wait(lambda: "opened: buyer dave" in seller.logs(), "the trial to be opened")
        seller.process.send_signal(signal.SIGSTOP)  # the upload cannot finish
        _wait(lambda: any((f / "public.key").exists() for f in _trial_folders(home)),
              "the buyer to reach the key upload")
        cli.send_signal(signal.SIGINT)
        out, _ = cli.communicate(timeout=120)
    finally:
        seller.process.send_signal(signal.SIGCONT)
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 130, out
    (line,) = [x for x in out.splitlines() if "interrupted" in x]
    assert "nothing was charged" in line
    assert _rows_used(seller, "dave") == 0 and _balance(seller, "dave") == 100_00
    assert not (home / "trials" / LR / "latest").exists()
    resumed = buyer_cli(seller, home, "dave", "trial", LR, "--resume")
    assert resumed.returncode == 2 and "start a new trial" in resumed.stdout


def test_a_later_trial_keeps_the_bought_model(seller: Daemon, test_csv: Path,
                                              tmp_path: Path) -> None:
    """Finding 14: run and buy look up the bought trial, not only the latest one."""
    home = tmp_path / "erin"
    trial = ("trial", LR, "--data", str(test_csv), "--label-column", "y", "--rows", ROWS)
    _ok(buyer_cli(seller, home, "erin", *trial))
    _ok(buyer_cli(seller, home, "erin", "buy", LR))
    (first,) = _trial_folders(home)
    _ok(buyer_cli(seller, home, "erin", *trial))
    balance = _balance(seller, "erin")

    ran = _ok(buyer_cli(seller, home, "erin", "run", LR, "--data", str(test_csv)))
    assert "rows; unlock" in ran
    owned = _ok(buyer_cli(seller, home, "erin", "buy", LR))
    assert f"you already own {LR} (trial {first.name}" in owned
    again = _ok(buyer_cli(seller, home, "erin", "buy", LR, "--trial", first.name))
    assert "already paid" in again and "(receipt " in again
    assert _balance(seller, "erin") == balance
    bought = _ok(buyer_cli(seller, home, "erin", "buy", LR, "--again"))
    assert "already" not in bought and "paid 25.00" in bought
    assert _balance(seller, "erin") == balance - PRICE_CENTS


def test_daemon_killed_mid_evaluation_refunds_at_restart(
        priced_catalog: Path, tls_dir: Path, test_csv: Path, tmp_path: Path) -> None:
    """Finding 9 under kill -9: the worker dies with the daemon, the restart refunds the
    rows, and --resume evaluates the batch again, charged once."""
    state = tmp_path / "state"
    daemon = Daemon(priced_catalog, state, tls_dir)
    daemon.wait_serving()
    top_up(daemon, "carol", "100")
    home = tmp_path / "carol"
    cli = _start_trial(daemon, home, "carol", test_csv)
    worker = _stopped_worker(daemon)
    try:
        daemon.process.kill()
        daemon.process.wait()
        _wait(lambda: not _alive(worker), "the worker to die with its daemon")
        out, _ = cli.communicate(timeout=120)
        assert cli.returncode == 2, out
        assert f"gimme-buyer trial {LR} --resume" in " ".join(out.split())  # rich wraps it
    finally:
        _kill_leftover(worker)
        daemon.stop()
    assert _rows_used(daemon, "carol") == int(ROWS)  # charged while it evaluated

    restarted = Daemon(priced_catalog, state, tls_dir)
    try:
        restarted.wait_serving()
        assert _rows_used(restarted, "carol") == 0
        assert _balance(restarted, "carol") == 100_00
        _ok(buyer_cli(restarted, home, "carol", "trial", LR, "--resume"))
        assert _rows_used(restarted, "carol") == int(ROWS)
        assert _balance(restarted, "carol") == 100_00 - int(ROWS) * PRICE_PER_ROW_CENTS
    finally:
        restarted.stop()

"""The seller's SQLite state: double-entry ledger, idempotency, budgets, crash recovery."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from buyer_client.cli import build_parser
from common.errors import BadInput, Exhausted, WrongState
from common.protocol import PAYMENT, Signed
from seller_server.store import REVENUE_ACCOUNT, Store, TrialRow, buyer_account


def _trial(store: Store, trial_id: str = "t1", buyer: str = "alice") -> TrialRow:
    trial = TrialRow(trial_id, "model", buyer, f"tag-{trial_id}", b"c" * 32, b"c" * 32,
                     b"offer", b"sig", None)
    store.add_trial(trial)
    return trial


def _signer(txn_id: str, balance_after: int) -> Signed:
    return Signed(PAYMENT, f"{txn_id}:{balance_after}".encode(), b"sig")


def _entries_balance(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT SUM(amount_cents) FROM ledger_entries").fetchone()[0])


def test_top_up_is_idempotent_and_double_entry(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    assert store.top_up("alice", 5000, "req-1") == (True, 5000)
    assert store.top_up("alice", 5000, "req-1") == (False, 5000)
    assert store.top_up("alice", 250, "req-2") == (True, 5250)
    assert _entries_balance(tmp_path / "s.sqlite") == 0
    with pytest.raises(BadInput, match="positive"):
        store.top_up("alice", 0, "req-3")


def test_purchase_charges_once_per_request_and_trial(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    store.top_up("alice", 5000, "top")
    trial = _trial(store)
    first = store.purchase("buy-1", trial, 2500, _signer)
    assert store.purchase("buy-1", trial, 2500, _signer) == first  # a retry
    assert store.purchase("buy-2", trial, 2500, _signer) == first  # same trial: no 2nd charge
    assert store.balance(buyer_account("alice")) == 2500
    assert store.balance(REVENUE_ACCOUNT) == 2500
    assert store.paid("t1")
    other = _trial(store, "t2")
    with pytest.raises(BadInput, match="already used for another trial"):
        store.purchase("buy-1", other, 2500, _signer)
    poor = _trial(store, "t3", buyer="bob")
    with pytest.raises(Exhausted, match=r"insufficient prepaid balance: 0.00 available, 25.00"):
        store.purchase("buy-3", poor, 2500, _signer)
    assert _entries_balance(tmp_path / "s.sqlite") == 0


def test_budget_reservations_and_refunds(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    trial = _trial(store)
    store.reserve_rows(trial, 0, 60, budget=100)
    with pytest.raises(Exhausted, match="40 of 100 rows remain and this batch costs 50"):
        store.reserve_rows(trial, 1, 50, budget=100)
    with pytest.raises(WrongState, match="already evaluated"):
        store.reserve_rows(trial, 0, 10, budget=100)
    store.release_rows(trial, 0)
    assert store.rows_used("alice", "model") == 0
    store.reserve_rows(trial, 1, 50, budget=100)
    assert store.rows_used("alice", "model") == 50


def test_state_survives_a_crash_and_interrupted_work_is_refunded(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = Store(path)
    store.top_up("alice", 1000, "top")
    trial = _trial(store)
    store.reserve_rows(trial, 0, 30, budget=100)
    store.finish_evaluation("t1", 0, Signed("r", b"p", b"s"))
    store.reserve_rows(trial, 1, 20, budget=100)  # the daemon dies during this evaluation
    del store  # no close(): as after a kill
    again = Store(path)
    assert again.balance(buyer_account("alice")) == 1000
    assert again.rows_used("alice", "model") == 50
    assert again.recover_interrupted() == 1
    assert again.rows_used("alice", "model") == 30
    assert again.evaluated_batches("t1") == 1


def test_trial_rows_are_charged_and_refunded_when_evaluation_fails(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    store.top_up("alice", 1000, "top")
    trial = _trial(store)
    store.reserve_rows(trial, 0, 30, budget=100, price_per_row_cents=5)
    assert store.balance(buyer_account("alice")) == 850
    store.release_rows(trial, 0)  # the worker failed: rows and money come back
    assert store.balance(buyer_account("alice")) == 1000
    assert store.rows_used("alice", "model") == 0
    store.reserve_rows(trial, 0, 30, budget=100, price_per_row_cents=5)
    with pytest.raises(Exhausted, match=r"insufficient prepaid balance for 20 trial rows"):
        store.reserve_rows(trial, 1, 20, budget=100, price_per_row_cents=50)
    assert store.rows_used("alice", "model") == 30  # the refused batch charged nothing
    assert _entries_balance(tmp_path / "s.sqlite") == 0


def test_api_tokens_name_their_buyer_until_revoked_and_survive_a_command_line(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    tokens = [store.create_token("alice") for _ in range(200)]
    parser = build_parser()
    for token in tokens:  # url-safe base64 alone starts with '-' one time in 64
        assert parser.parse_args(["models", "--token", token]).token == token
    assert {store.buyer_for_token(token) for token in tokens} == {"alice"}
    assert store.buyer_for_token("gimme_not-a-token") is None
    assert store.revoke_tokens("alice") == 200
    assert store.buyer_for_token(tokens[0]) is None

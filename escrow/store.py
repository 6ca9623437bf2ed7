"""The escrow's durable state: one SQLite file (WAL), one transaction per state change.

Tables: a double-entry ledger (every transaction balanced, idempotent by request id, with
the escrow-signed receipt it answered) and deposits keyed by trial id. A deposit moves the
price from the buyer's account to HELD_ACCOUNT; its settlement moves it, exactly once, to
the seller's account (released) or back to the buyer's (refunded). So HELD_ACCOUNT's balance
is always the sum of the deposits still held, and no deposit is paid out twice: a
settlement is the state change 'held' -> 'released'/'refunded' in the same transaction as
its ledger entries.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from common.errors import BadInput, Exhausted, NotFound, WrongState
from common.escrow import DEPOSIT, REFUNDED, RELEASED, SETTLEMENT, seller_account
from common.protocol import Signed
from common.sqlite import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS txns (
  txn_id TEXT PRIMARY KEY,
  request_id TEXT NOT NULL UNIQUE,
  kind TEXT NOT NULL CHECK (kind IN ('topup', 'deposit', 'released', 'refunded')),
  trial_id TEXT,
  memo TEXT NOT NULL,
  receipt_payload BLOB,
  receipt_signature BLOB,
  created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
  txn_id TEXT NOT NULL REFERENCES txns(txn_id),
  account TEXT NOT NULL,
  amount_cents INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_account ON entries(account);
CREATE TABLE IF NOT EXISTS deposits (
  trial_id TEXT PRIMARY KEY,
  buyer_id TEXT NOT NULL,
  seller_public_key BLOB NOT NULL,
  amount_cents INTEGER NOT NULL CHECK (amount_cents > 0),
  state TEXT NOT NULL CHECK (state IN ('held', 'released', 'refunded')),
  deposit_txn TEXT NOT NULL REFERENCES txns(txn_id),
  settle_txn TEXT REFERENCES txns(txn_id)
);
"""

HELD_ACCOUNT = "escrow:held"
TOPUP_ACCOUNT = "external:topups"
Sign = Callable[[str], Signed]  # signs the receipt of a txn, given its kind's record


def buyer_account(buyer_id: str) -> str:
    return f"buyer:{buyer_id}"


@dataclass(frozen=True)
class Held:
    """A deposit, as the escrow holds it."""

    trial_id: str
    buyer_id: str
    seller_public_key: bytes
    amount_cents: int
    state: str


class EscrowStore:
    def __init__(self, path: Path) -> None:
        self._database = Database(path, SCHEMA)
        self._lock, self._db = self._database.lock, self._database.connection

    def close(self) -> None:
        self._database.close()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._database.transaction()

    @staticmethod
    def _balance(db: sqlite3.Connection, account: str) -> int:
        row = db.execute("SELECT COALESCE(SUM(amount_cents), 0) FROM entries WHERE "
                         "account = ?", (account,)).fetchone()
        return int(row[0])

    @staticmethod
    def _post(db: sqlite3.Connection, request_id: str, kind: str, trial_id: str | None,
              memo: str, entries: list[tuple[str, int]], receipt: Signed | None) -> str:
        if sum(amount for _account, amount in entries) != 0:
            raise RuntimeError("unbalanced escrow transaction")
        txn_id = uuid.uuid4().hex
        db.execute("INSERT INTO txns VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (txn_id, request_id, kind, trial_id, memo,
                    receipt.payload if receipt else None,
                    receipt.signature if receipt else None, time.time()))
        db.executemany("INSERT INTO entries VALUES (?, ?, ?)",
                       [(txn_id, account, amount) for account, amount in entries])
        return txn_id

    @staticmethod
    def _replayed(db: sqlite3.Connection, request_id: str, kind: str | tuple[str, ...],
                  trial_id: str) -> Signed | None:
        """The receipt already given for this request id (a retry), or None (a new one)."""
        row = db.execute("SELECT kind, trial_id, receipt_payload, receipt_signature FROM txns "
                         "WHERE request_id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        kinds = (kind,) if isinstance(kind, str) else kind
        if row[0] not in kinds or row[1] != trial_id:
            raise BadInput(f"request id {request_id[:64]!r} was already used for another "
                           f"request; use a fresh request id")
        record = DEPOSIT if row[0] == "deposit" else SETTLEMENT
        return Signed(record, bytes(row[2]), bytes(row[3]))

    # ----- money in -----

    def top_up(self, buyer_id: str, amount_cents: int, request_id: str) -> tuple[bool, int]:
        """Credit a buyer's escrow account; (applied now?, balance). Idempotent."""
        if amount_cents <= 0:
            raise BadInput("a top-up amount must be positive")
        with self._transaction() as db:
            done = db.execute("SELECT 1 FROM txns WHERE request_id = ?",
                              (request_id,)).fetchone()
            if not done:
                self._post(db, request_id, "topup", None, f"top-up for {buyer_id}",
                           [(buyer_account(buyer_id), amount_cents),
                            (TOPUP_ACCOUNT, -amount_cents)], None)
            return not done, self._balance(db, buyer_account(buyer_id))

    def deposit(self, request_id: str, trial_id: str, buyer_id: str, seller_public_key: bytes,
                amount_cents: int, sign: Sign) -> Signed:
        """Hold `amount_cents` of the buyer's for the trial, once per request id and trial."""
        if amount_cents <= 0:
            raise BadInput("a deposit must be a positive amount (the offer's price)")
        with self._transaction() as db:
            replayed = self._replayed(db, request_id, "deposit", trial_id)
            if replayed is not None:
                return replayed
            if db.execute("SELECT 1 FROM deposits WHERE trial_id = ?", (trial_id,)).fetchone():
                raise WrongState(f"trial {trial_id} already has a deposit: one deposit per "
                                 f"trial (retry with its request id to get its receipt)")
            account = buyer_account(buyer_id)
            balance = self._balance(db, account)
            if balance < amount_cents:
                raise Exhausted(f"insufficient escrow balance: {balance / 100:.2f} available, "
                                f"{amount_cents / 100:.2f} needed; ask the escrow to top up "
                                f"'{buyer_id}' ('gimme-escrow topup')")
            receipt = sign(request_id)
            txn = self._post(db, request_id, "deposit", trial_id,
                             f"{buyer_id} holds {amount_cents / 100:.2f} for trial {trial_id}",
                             [(account, -amount_cents), (HELD_ACCOUNT, amount_cents)], receipt)
            db.execute("INSERT INTO deposits VALUES (?, ?, ?, ?, 'held', ?, NULL)",
                       (trial_id, buyer_id, seller_public_key, amount_cents, txn))
            return receipt

    # ----- money out -----

    def held(self, trial_id: str) -> Held:
        with self._lock:
            row = self._db.execute("SELECT trial_id, buyer_id, seller_public_key, amount_cents, "
                                   "state FROM deposits WHERE trial_id = ?",
                                   (trial_id,)).fetchone()
        if row is None:
            raise NotFound(f"no deposit for trial {trial_id}: 'gimme-buyer buy MODEL --escrow "
                           f"ADDR' makes one")
        return Held(str(row[0]), str(row[1]), bytes(row[2]), int(row[3]), str(row[4]))

    def settle(self, request_id: str, trial_id: str, outcome: str, grounds: str,
               sign: Callable[[str, str, int], Signed]) -> Signed:
        """Pay the held deposit out once: RELEASED to its seller, REFUNDED to its buyer.
        `sign(request_id, payee, amount)` signs the settlement receipt."""
        with self._transaction() as db:
            replayed = self._replayed(db, request_id, (RELEASED, REFUNDED), trial_id)
            if replayed is not None:
                return replayed
            row = db.execute("SELECT buyer_id, seller_public_key, amount_cents, state FROM "
                             "deposits WHERE trial_id = ?", (trial_id,)).fetchone()
            if row is None:
                raise NotFound(f"no deposit for trial {trial_id}")
            if row[3] != "held":
                raise WrongState(f"the deposit for trial {trial_id} was already {row[3]}: a "
                                 f"deposit is paid out once, nothing was moved")
            payee = (seller_account(bytes(row[1])) if outcome == RELEASED
                     else buyer_account(str(row[0])))
            amount = int(row[2])
            receipt = sign(request_id, payee, amount)
            txn = self._post(db, request_id, outcome, trial_id,
                             f"{amount / 100:.2f} of trial {trial_id} to {payee} ({grounds})",
                             [(HELD_ACCOUNT, -amount), (payee, amount)], receipt)
            db.execute("UPDATE deposits SET state = ?, settle_txn = ? WHERE trial_id = ?",
                       (outcome, txn, trial_id))
            return receipt

    # ----- reading -----

    def balance(self, account: str) -> int:
        with self._lock:
            return self._balance(self._db, account)

    def balances(self) -> list[tuple[str, int]]:
        with self._lock:
            rows = self._db.execute("SELECT account, SUM(amount_cents) FROM entries "
                                    "GROUP BY account ORDER BY account").fetchall()
        return [(str(a), int(b)) for a, b in rows]

    def held_total(self) -> int:
        """The sum of the deposits still held (HELD_ACCOUNT's balance must equal it)."""
        with self._lock:
            row = self._db.execute("SELECT COALESCE(SUM(amount_cents), 0) FROM deposits "
                                   "WHERE state = 'held'").fetchone()
        return int(row[0])


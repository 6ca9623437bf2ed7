"""The seller's durable state: one SQLite file (WAL), one transaction per state change.

Tables: compiled listings (cache), trials, trial budgets, evaluations with their signed
receipts, a double-entry ledger, purchases (idempotent by request id), deliveries.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from common.errors import BadInput, Exhausted, NotFound, WrongState
from common.protocol import PAYMENT, RECEIPT, Signed
from common.sqlite import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS compiled (
  cache_key TEXT PRIMARY KEY,
  payload BLOB NOT NULL,
  created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS trials (
  trial_id TEXT PRIMARY KEY,
  model_id TEXT NOT NULL,
  buyer_id TEXT NOT NULL,
  key_tag TEXT NOT NULL UNIQUE,
  base_commitment BLOB NOT NULL,
  model_commitment BLOB NOT NULL,
  offer_payload BLOB NOT NULL,
  offer_signature BLOB NOT NULL,
  keys_sha256 BLOB,
  created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS budgets (
  buyer_id TEXT NOT NULL,
  model_id TEXT NOT NULL,
  rows_used INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (buyer_id, model_id)
);
CREATE TABLE IF NOT EXISTS evaluations (
  trial_id TEXT NOT NULL,
  batch_index INTEGER NOT NULL,
  rows INTEGER NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('running', 'done')),
  charge_txn TEXT,
  receipt_payload BLOB,
  receipt_signature BLOB,
  created_at REAL NOT NULL,
  results_sent INTEGER NOT NULL DEFAULT 0,  -- 1 once any result frame went to the buyer
  PRIMARY KEY (trial_id, batch_index)
);
CREATE TABLE IF NOT EXISTS ledger_txns (
  txn_id TEXT PRIMARY KEY,
  request_id TEXT NOT NULL UNIQUE,
  kind TEXT NOT NULL,
  memo TEXT NOT NULL,
  created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_entries (
  txn_id TEXT NOT NULL REFERENCES ledger_txns(txn_id),
  account TEXT NOT NULL,
  amount_cents INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_by_account ON ledger_entries(account);
CREATE TABLE IF NOT EXISTS purchases (
  request_id TEXT PRIMARY KEY,
  trial_id TEXT NOT NULL UNIQUE,
  txn_id TEXT NOT NULL,
  receipt_payload BLOB NOT NULL,
  receipt_signature BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS fingerprints (
  trial_id TEXT PRIMARY KEY REFERENCES trials(trial_id),
  model_id TEXT NOT NULL,
  fingerprint_key BLOB NOT NULL,
  strength REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS locks (
  trial_id TEXT PRIMARY KEY REFERENCES trials(trial_id),
  master_key BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
  token_sha256 TEXT PRIMARY KEY,
  buyer_id TEXT NOT NULL,
  created_at REAL NOT NULL,
  revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS escrow_payments (
  trial_id TEXT PRIMARY KEY,
  deposit_payload BLOB NOT NULL,  -- the escrow-signed deposit receipt the key was released on
  deposit_signature BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
  trial_id TEXT NOT NULL,
  delivered_at REAL NOT NULL,
  record_payload BLOB NOT NULL,
  record_signature BLOB NOT NULL
);
"""

# signs a payment receipt for (ledger txn id, balance after)
PurchaseSigner = Callable[[str, int], Signed]

REVENUE_ACCOUNT = "seller:revenue"
TRIAL_REVENUE_ACCOUNT = "seller:trial-revenue"
TOPUP_ACCOUNT = "external:topups"
# sales paid by an escrow deposit: the money is the escrow's to settle (gimme-escrow)
ESCROW_ACCOUNT = "external:escrow"
ESCROW_REVENUE_ACCOUNT = "seller:escrow-revenue"
TOKEN_PREFIX = "gimme_"


def buyer_account(buyer_id: str) -> str:
    return f"buyer:{buyer_id}"


def budget_exhausted(model_id: str, remaining: int, budget: int, rows: int,
                     price_per_row_cents: int) -> Exhausted:
    return Exhausted(f"trial budget exhausted for {model_id!r}: {remaining} of {budget} rows "
                     f"remain and this batch costs {rows} (a batch pays for every row its "
                     f"results can carry: rows rounded up to its fold period; trial price "
                     f"{price_per_row_cents / 100:.2f} per row); test fewer rows or buy the "
                     f"model")



@dataclass(frozen=True)
class TrialRow:
    trial_id: str
    model_id: str
    buyer_id: str
    key_tag: str
    base_commitment: bytes  # the listed model's hash when the trial was offered
    model_commitment: bytes  # what this buyer gets (its fingerprinted copy)
    offer_payload: bytes
    offer_signature: bytes
    keys_sha256: bytes | None


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._database = Database(path, SCHEMA)
        self._lock, self._db = self._database.lock, self._database.connection

    def close(self) -> None:
        self._database.close()

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._database.transaction()

    # ----- compiled listing cache -----

    def compiled(self, cache_key: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT payload FROM compiled WHERE cache_key = ?",
                                   (cache_key,)).fetchone()
        return bytes(row[0]) if row else None

    def save_compiled(self, cache_key: str, payload: bytes) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO compiled VALUES (?, ?, ?)",
                       (cache_key, payload, time.time()))

    # ----- trials and budgets -----

    def add_trial(self, trial: TrialRow) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO trials VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (trial.trial_id, trial.model_id, trial.buyer_id, trial.key_tag,
                        trial.base_commitment, trial.model_commitment, trial.offer_payload,
                        trial.offer_signature, None, time.time()))

    def trial(self, trial_id: str, buyer_id: str) -> TrialRow:
        with self._lock:
            row = self._db.execute(
                "SELECT trial_id, model_id, buyer_id, key_tag, base_commitment, "
                "model_commitment, offer_payload, offer_signature, keys_sha256 FROM trials "
                "WHERE trial_id = ?",
                (trial_id,)).fetchone()
        if row is None or row[2] != buyer_id:
            raise NotFound(f"no trial {trial_id!r} for buyer {buyer_id!r}; open one with "
                           f"'gimme-buyer trial MODEL'")
        return TrialRow(row[0], row[1], row[2], row[3], bytes(row[4]), bytes(row[5]),
                        bytes(row[6]), bytes(row[7]), bytes(row[8]) if row[8] is not None
                        else None)

    def add_fingerprint(self, trial_id: str, model_id: str, key: bytes, strength: float
                        ) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO fingerprints VALUES (?, ?, ?, ?)",
                       (trial_id, model_id, key, strength))

    def fingerprint(self, trial_id: str) -> tuple[bytes, float] | None:
        with self._lock:
            row = self._db.execute("SELECT fingerprint_key, strength FROM fingerprints WHERE "
                                   "trial_id = ?", (trial_id,)).fetchone()
        return (bytes(row[0]), float(row[1])) if row else None

    def fingerprinted_sales(self, model_id: str) -> list[tuple[str, str, bytes, bool]]:
        """(trial id, buyer, key, paid) of every fingerprinted copy of `model_id` offered."""
        with self._lock:
            rows = self._db.execute(
                "SELECT f.trial_id, t.buyer_id, f.fingerprint_key, p.request_id IS NOT NULL "
                "FROM fingerprints f JOIN trials t USING (trial_id) LEFT JOIN purchases p "
                "USING (trial_id) WHERE f.model_id = ? ORDER BY t.created_at",
                (model_id,)).fetchall()
        return [(str(a), str(b), bytes(c), bool(d)) for a, b, c, d in rows]

    def lock_key(self, trial_id: str, new_key: Callable[[], bytes]) -> bytes:
        """The trial's Deep-Lock master key, created on first use."""
        with self.transaction() as db:
            row = db.execute("SELECT master_key FROM locks WHERE trial_id = ?",
                             (trial_id,)).fetchone()
            if row is not None:
                return bytes(row[0])
            key = new_key()
            db.execute("INSERT INTO locks VALUES (?, ?)", (trial_id, key))
            return key

    def set_keys(self, trial_id: str, sha256: bytes | None) -> None:
        """The digest of the trial's uploaded keys (None: none, or expired)."""
        with self.transaction() as db:
            db.execute("UPDATE trials SET keys_sha256 = ? WHERE trial_id = ?",
                       (sha256, trial_id))

    def rows_used(self, buyer_id: str, model_id: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT rows_used FROM budgets WHERE buyer_id = ? AND model_id = ?",
                (buyer_id, model_id)).fetchone()
        return int(row[0]) if row else 0

    def reserve_rows(self, trial: TrialRow, batch_index: int, rows: int, budget: int,
                     price_per_row_cents: int = 0) -> None:
        """Charge `rows` to the buyer's trial budget for this model (and their price to its
        prepaid balance), or refuse."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM evaluations WHERE trial_id = ? AND batch_index = ?",
                          (trial.trial_id, batch_index)).fetchone():
                raise WrongState(f"batch {batch_index} of trial {trial.trial_id} was already "
                                 f"evaluated: fetch its results again (gimme-buyer trial "
                                 f"--resume), or open a new trial to test more rows")
            row = db.execute("SELECT rows_used FROM budgets WHERE buyer_id = ? AND model_id = ?",
                             (trial.buyer_id, trial.model_id)).fetchone()
            used = int(row[0]) if row else 0
            if used + rows > budget:
                raise budget_exhausted(trial.model_id, budget - used, budget, rows,
                                       price_per_row_cents)
            cost = rows * price_per_row_cents
            charge = None
            if cost:
                account = buyer_account(trial.buyer_id)
                balance = self._balance(db, account)
                if balance < cost:
                    raise Exhausted(f"insufficient prepaid balance for {rows} trial rows at "
                                    f"{price_per_row_cents / 100:.2f} each: "
                                    f"{balance / 100:.2f} available, {cost / 100:.2f} needed")
                charge = self._post(db, uuid.uuid4().hex, "trial",
                                    f"{rows} trial rows of {trial.model_id} (trial "
                                    f"{trial.trial_id}, batch {batch_index})",
                                    [(account, -cost), (TRIAL_REVENUE_ACCOUNT, cost)])
            db.execute("INSERT INTO budgets VALUES (?, ?, ?) ON CONFLICT(buyer_id, model_id) "
                       "DO UPDATE SET rows_used = rows_used + excluded.rows_used",
                       (trial.buyer_id, trial.model_id, rows))
            db.execute("INSERT INTO evaluations (trial_id, batch_index, rows, status, "
                       "charge_txn, created_at) VALUES (?, ?, ?, 'running', ?, ?)",
                       (trial.trial_id, batch_index, rows, charge, time.time()))

    def release_rows(self, trial: TrialRow, batch_index: int) -> None:
        """Give back the rows of an evaluation that did not complete."""
        with self.transaction() as db:
            self._refund(db, trial.trial_id, batch_index)

    def _refund(self, db: sqlite3.Connection, trial_id: str, batch_index: int) -> None:
        """Refund a batch none of whose results reached the buyer (a batch whose results
        began to go out stays charged: its buyer fetches them again)."""
        row = db.execute(
            "SELECT e.rows, t.buyer_id, t.model_id, e.charge_txn FROM evaluations e "
            "JOIN trials t "
            "USING (trial_id) WHERE trial_id = ? AND batch_index = ? AND results_sent = 0",
            (trial_id, batch_index)).fetchone()
        if row is None:
            return
        db.execute("UPDATE budgets SET rows_used = rows_used - ? WHERE buyer_id = ? AND "
                   "model_id = ?", (row[0], row[1], row[2]))
        if row[3] is not None:  # a reversing transaction: the ledger keeps both
            entries = db.execute("SELECT account, amount_cents FROM ledger_entries WHERE "
                                 "txn_id = ?", (row[3],)).fetchall()
            self._post(db, f"refund:{row[3]}", "refund",
                       f"evaluation {trial_id}/{batch_index} did not reach the buyer",
                       [(account, -amount) for account, amount in entries])
        db.execute("DELETE FROM evaluations WHERE trial_id = ? AND batch_index = ?",
                   (trial_id, batch_index))

    def recover_interrupted(self) -> int:
        """After a crash: refund evaluations that never produced a receipt."""
        with self.transaction() as db:
            pending = db.execute("SELECT trial_id, batch_index FROM evaluations "
                                 "WHERE status = 'running'").fetchall()
            for trial_id, batch_index in pending:
                self._refund(db, trial_id, batch_index)
        return len(pending)

    def finish_evaluation(self, trial_id: str, batch_index: int, receipt: Signed) -> None:
        with self.transaction() as db:
            db.execute("UPDATE evaluations SET status = 'done', receipt_payload = ?, "
                       "receipt_signature = ? WHERE trial_id = ? AND batch_index = ?",
                       (receipt.payload, receipt.signature, trial_id, batch_index))

    def receipt(self, trial_id: str, batch_index: int) -> Signed | None:
        """The signed receipt of an evaluated batch (None: not evaluated, or refunded)."""
        with self._lock:
            row = self._db.execute("SELECT receipt_payload, receipt_signature FROM evaluations "
                                   "WHERE trial_id = ? AND batch_index = ? AND status = 'done'",
                                   (trial_id, batch_index)).fetchone()
        return Signed(RECEIPT, bytes(row[0]), bytes(row[1])) if row else None

    def results_sent(self, trial_id: str, batch_index: int) -> None:
        """The batch's results start going out: from now on it is charged for good."""
        with self.transaction() as db:
            db.execute("UPDATE evaluations SET results_sent = 1 WHERE trial_id = ? AND "
                       "batch_index = ?", (trial_id, batch_index))

    def refund_unsent(self, trial_id: str) -> int:
        """Refund the trial's evaluated batches none of whose results went out (their
        results are being deleted)."""
        with self.transaction() as db:
            unsent = db.execute("SELECT batch_index FROM evaluations WHERE trial_id = ? AND "
                                "status = 'done' AND results_sent = 0", (trial_id,)).fetchall()
            for (batch_index,) in unsent:
                self._refund(db, trial_id, batch_index)
        return len(unsent)

    def evaluated_batches(self, trial_id: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM evaluations WHERE trial_id = ? AND "
                                   "status = 'done'", (trial_id,)).fetchone()
        return int(row[0])

    # ----- ledger -----

    def balance(self, account: str) -> int:
        with self._lock:
            return self._balance(self._db, account)

    @staticmethod
    def _balance(db: sqlite3.Connection, account: str) -> int:
        row = db.execute("SELECT COALESCE(SUM(amount_cents), 0) FROM ledger_entries "
                         "WHERE account = ?", (account,)).fetchone()
        return int(row[0])

    def _post(self, db: sqlite3.Connection, request_id: str, kind: str, memo: str,
              entries: list[tuple[str, int]]) -> str:
        if sum(amount for _account, amount in entries) != 0:
            raise RuntimeError("unbalanced ledger transaction")
        txn_id = uuid.uuid4().hex
        db.execute("INSERT INTO ledger_txns VALUES (?, ?, ?, ?, ?)",
                   (txn_id, request_id, kind, memo, time.time()))
        db.executemany("INSERT INTO ledger_entries VALUES (?, ?, ?)",
                       [(txn_id, account, amount) for account, amount in entries])
        return txn_id

    def top_up(self, buyer_id: str, amount_cents: int, request_id: str) -> tuple[bool, int]:
        """Credit a buyer's prepaid balance; (applied now?, balance). Idempotent."""
        if amount_cents <= 0:
            raise BadInput("a top-up amount must be positive")
        with self.transaction() as db:
            done = db.execute("SELECT 1 FROM ledger_txns WHERE request_id = ?",
                              (request_id,)).fetchone()
            if not done:
                self._post(db, request_id, "topup", f"top-up for {buyer_id}",
                           [(buyer_account(buyer_id), amount_cents),
                            (TOPUP_ACCOUNT, -amount_cents)])
            return not done, self._balance(db, buyer_account(buyer_id))

    def purchase(self, request_id: str, trial: TrialRow, price_cents: int,
                 sign_receipt: PurchaseSigner, escrow_deposit: Signed | None = None
                 ) -> Signed:
        """Move the price from buyer to seller once per request id (and once per trial);
        with an (already checked) escrow deposit, record the sale as paid through it."""
        with self.transaction() as db:
            row = db.execute("SELECT trial_id, receipt_payload, receipt_signature FROM "
                             "purchases WHERE request_id = ? OR trial_id = ?",
                             (request_id, trial.trial_id)).fetchone()
            if row is not None:
                if row[0] != trial.trial_id:
                    raise BadInput(f"request id {request_id!r} was already used for another "
                                   f"trial; use a fresh request id")
                return Signed(PAYMENT, bytes(row[1]), bytes(row[2]))  # a retry: same answer
            account = buyer_account(trial.buyer_id)
            balance = self._balance(db, account)
            memo = f"{trial.model_id} for {trial.buyer_id} (trial {trial.trial_id})"
            if escrow_deposit is not None:
                txn_id = self._post(db, request_id, "purchase", f"{memo}, escrow deposit",
                                    [(ESCROW_ACCOUNT, -price_cents),
                                     (ESCROW_REVENUE_ACCOUNT, price_cents)])
                db.execute("INSERT INTO escrow_payments VALUES (?, ?, ?)",
                           (trial.trial_id, escrow_deposit.payload, escrow_deposit.signature))
                receipt = sign_receipt(txn_id, balance)
            else:
                if balance < price_cents:
                    raise Exhausted(f"insufficient prepaid balance: {balance / 100:.2f} "
                                    f"available, {price_cents / 100:.2f} needed; ask the "
                                    f"seller to top up '{trial.buyer_id}'")
                txn_id = self._post(db, request_id, "purchase", memo,
                                    [(account, -price_cents), (REVENUE_ACCOUNT, price_cents)])
                receipt = sign_receipt(txn_id, balance - price_cents)
            db.execute("INSERT INTO purchases VALUES (?, ?, ?, ?, ?)",
                       (request_id, trial.trial_id, txn_id, receipt.payload, receipt.signature))
            return receipt

    def paid(self, trial_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM purchases WHERE trial_id = ?",
                                    (trial_id,)).fetchone() is not None

    def record_delivery(self, trial_id: str, record: Signed) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO deliveries VALUES (?, ?, ?, ?)",
                       (trial_id, time.time(), record.payload, record.signature))

    # ----- API tokens (buyer identity when TLS client authentication is off) -----

    def create_token(self, buyer_id: str) -> str:
        # a prefix: url-safe base64 starts with '-' one time in 64, which a command line
        # would read as an option
        token = TOKEN_PREFIX + secrets.token_urlsafe(24)
        with self.transaction() as db:
            db.execute("INSERT INTO tokens VALUES (?, ?, ?, 0)",
                       (hashlib.sha256(token.encode()).hexdigest(), buyer_id, time.time()))
        return token

    def revoke_tokens(self, buyer_id: str) -> int:
        with self.transaction() as db:
            return db.execute("UPDATE tokens SET revoked = 1 WHERE buyer_id = ? AND revoked = 0",
                              (buyer_id,)).rowcount

    def buyer_for_token(self, token: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT buyer_id FROM tokens WHERE token_sha256 = ? AND "
                                   "revoked = 0",
                                   (hashlib.sha256(token.encode()).hexdigest(),)).fetchone()
        return str(row[0]) if row else None

    def balances(self) -> list[tuple[str, int]]:
        with self._lock:
            rows = self._db.execute("SELECT account, SUM(amount_cents) FROM ledger_entries "
                                    "GROUP BY account ORDER BY account").fetchall()
        return [(str(a), int(b)) for a, b in rows]

"""gimme-escrow: run the escrow daemon, fund buyers, show its ledger, settle by a ruling."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import uuid
from decimal import Decimal, InvalidOperation
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.cli import run_command
from common.errors import BadInput
from common.escrow import REFUNDS_BUYER, open_settlement, ruling_verdict
from common.rpc import TlsFiles
from common.signing import Signer, fingerprint, public_key_arg, sha256
from common.wire import envelope_from_json
from escrow.client import EscrowClient
from escrow.service import EscrowOptions, serve
from escrow.store import HELD_ACCOUNT, EscrowStore

console = Console()
DEFAULT_STATE = Path(os.environ.get("GIMME_ESCROW_STATE", "gimme-escrow-data"))


def _store(state: Path) -> EscrowStore:
    return EscrowStore(state / "escrow.sqlite")


def _cents(text: str) -> int:
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise BadInput(f"{text!r} is not an amount (e.g. 100 or 25.50)") from None
    if amount != amount.quantize(Decimal("0.01")):
        raise BadInput(f"{text!r} has more than 2 decimals")
    return int(amount * 100)


def cmd_serve(args: argparse.Namespace) -> None:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    serve(EscrowOptions(
        state=args.state, listen=args.listen,
        tls=None if args.insecure else TlsFiles.in_dir(args.tls_dir, args.tls_name),
        arbiter_keys=tuple(public_key_arg(key, "--trust-arbiter", "'gimme-arbiter identity "
                                          "--key FILE' prints it") for key in args.trust_arbiter),
        port_file=args.port_file), stop)


def cmd_topup(args: argparse.Namespace) -> None:
    applied, balance = _store(args.state).top_up(args.buyer, _cents(args.amount),
                                                 args.request_id or uuid.uuid4().hex)
    note = "" if applied else " (request id seen before: nothing added)"
    console.print(f"{args.buyer}: escrow balance {balance / 100:.2f}{note}")


def cmd_balances(args: argparse.Namespace) -> None:
    store = _store(args.state)
    table = Table("account", "balance")
    for account, cents in store.balances():
        table.add_row(account, f"{cents / 100:.2f}")
    console.print(table)
    console.print(f"deposits held: {store.held_total() / 100:.2f} (= {HELD_ACCOUNT})")


def cmd_identity(args: argparse.Namespace) -> None:
    path = args.state / "identity.key"
    if not path.exists():
        raise BadInput(f"no identity key at {path}: 'gimme-escrow serve --state {args.state}' "
                       f"creates it on first start")
    signer, _created = Signer.load_or_create(path)
    print(signer.public_key.hex())
    Console(stderr=True).print(  # stdout: the key alone
        f"fingerprint {fingerprint(signer.public_key)}: sellers accept deposits "
        f"signed with it when serving with '--trust-escrow KEY'")


def cmd_settle(args: argparse.Namespace) -> None:
    ruling = envelope_from_json(args.ruling.read_bytes(), str(args.ruling))
    # the ruling's verdict picks the call (the escrow checks the ruling itself)
    method = "Refund" if ruling_verdict(ruling) in REFUNDS_BUYER else "Release"
    client = EscrowClient(args.escrow, None if args.insecure else
                          TlsFiles.in_dir(args.tls_dir, args.identity), args.identity)
    # one request id per ruling: settling with the same ruling again is a retry
    receipt = client.settle(method, args.trial, sha256(ruling.payload).hex()[:32], ruling)
    if args.escrow_key is None:
        console.print(f"trial {args.trial}: {method} accepted by the escrow (pass "
                      f"--escrow-key to check its signed settlement receipt)")
        return
    settlement = open_settlement(receipt, public_key_arg(
        args.escrow_key, "--escrow-key", "'gimme-escrow identity' prints it"))
    console.print(f"trial {settlement.trial_id}: {settlement.amount_cents / 100:.2f} "
                  f"{settlement.outcome} to {settlement.payee} ({settlement.grounds})")


def _add_tls(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-dir", type=Path,
                        default=Path(os.environ.get("GIMME_TLS_DIR", "gimme-tls")),
                        help="directory with ca.pem and the certificates (env GIMME_TLS_DIR)")
    parser.add_argument("--insecure", action="store_true",
                        default=os.environ.get("GIMME_INSECURE") == "1",
                        help="no TLS (logged loudly; callers then name themselves: local "
                             "experiments only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gimme-escrow",
        description="Hold a trial's price between buyer and seller: the buyer deposits it, "
                    "the seller releases the model's key against the signed deposit receipt, "
                    "and the deposit goes to the seller on the buyer's PASS or an arbiter's "
                    "ruling of no seller fault, back to the buyer on SELLER AT FAULT.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the escrow daemon")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE,
                   help="state directory: database and identity key (env GIMME_ESCROW_STATE)")
    p.add_argument("--listen", default=os.environ.get("GIMME_ESCROW_LISTEN", "0.0.0.0:50061"),
                   help="address to listen on (env GIMME_ESCROW_LISTEN; port 0 picks one)")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--trust-arbiter", action="append", default=[], metavar="KEY",
                   help="act on rulings signed by this arbiter public key (hex, or a file; "
                        "repeatable). Without one, deposits settle only on the buyer's PASS")
    p.add_argument("--tls-name", default="seller",
                   help="the server certificate in --tls-dir to present (NAME.pem/NAME.key; "
                        "default seller, the one 'gimme-seller certs' makes for its --hosts)")
    _add_tls(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("topup", help="credit a buyer's escrow account")
    p.add_argument("buyer", help="the buyer's identity (its TLS certificate's name)")
    p.add_argument("amount", help="amount, e.g. 100 or 25.50")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE)
    p.add_argument("--request-id", help="idempotency key (a retry with it adds nothing)")
    p.set_defaults(func=cmd_topup)

    p = sub.add_parser("balances", help="show the escrow's accounts and what it holds")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE)
    p.set_defaults(func=cmd_balances)

    p = sub.add_parser("identity", help="print the escrow's public key (sellers trust it)")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE)
    p.set_defaults(func=cmd_identity)

    p = sub.add_parser("settle", help="pay a deposit out as an arbiter's signed ruling says "
                                      "(refund on SELLER AT FAULT, else release to the seller)")
    p.add_argument("trial", help="the trial id the deposit is for")
    p.add_argument("--ruling", type=Path, required=True,
                   help="the signed ruling ('gimme-arbiter verify ... --sign-with KEY')")
    p.add_argument("--escrow", default=os.environ.get("GIMME_ESCROW", "localhost:50061"),
                   help="escrow address host:port (env GIMME_ESCROW)")
    p.add_argument("--identity", default=os.environ.get("GIMME_IDENTITY", "buyer"),
                   help="your TLS certificate's name (without TLS: the name you give)")
    p.add_argument("--escrow-key", help="the escrow's public key, to check its receipt")
    _add_tls(p)
    p.set_defaults(func=cmd_settle)
    return parser


def main(argv: list[str] | None = None) -> None:
    run_command(build_parser().parse_args(argv), console, logging.INFO)

"""gimme-buyer: test a seller's model on your encrypted data, buy it, verify it."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from buyer_client.client import SellerClient
from buyer_client.planner import DEFAULT_MBPS
from buyer_client.purchase import buy, release_on_pass
from buyer_client.run import run_locked
from buyer_client.trial import AUTO, run_trial, seller_key
from buyer_client.verify import verify_delivery
from buyer_client.workspace import Workspace
from common.cli import run_command
from common.errors import BadInput
from common.he.packing import PACKINGS
from common.rpc import TlsFiles
from common.signing import fingerprint
from escrow.client import EscrowClient

console = Console()


def _positive(what: str) -> Callable[[str], float]:
    """An argparse type: a number above 0, named `what` in the error."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be above 0 ({what})")
        return value

    return parse


def _client(args: argparse.Namespace) -> SellerClient:
    if args.insecure:
        if not args.token:
            raise BadInput("without TLS the seller identifies you by an API token: pass "
                           "--token (or set GIMME_TOKEN); the seller creates one with "
                           "'gimme-seller token create NAME'")
        return SellerClient(args.seller, None, token=args.token)
    return SellerClient(args.seller, TlsFiles.in_dir(args.tls_dir, args.identity))


def cmd_models(args: argparse.Namespace) -> None:
    client = _client(args)
    listings, key, loading = client.catalog()
    Workspace(args.home).pin_key(client.address, key)
    table = Table("model", "price", "trial rows left", "inputs", "classes", "CKKS",
                  "tolerance", "packings",
                  title=f"models at {args.seller} (seller key {fingerprint(key)})")
    for m in listings:
        classes = (", ".join(m.class_labels) if len(m.class_labels) <= 4
                   else f"{len(m.class_labels)} classes")
        table.add_row(m.model_id, f"{m.price_cents / 100:.2f}",
                      f"{m.trial_rows_remaining}/{m.trial_budget_rows}",
                      str(len(m.input_columns)), classes or "-",
                      f"N={m.ring_dimension}, depth {m.multiplicative_depth}",
                      f"{m.tolerance:.2g}", ", ".join(e.packing for e in m.estimates))
    console.print(table)
    for m in listings:
        console.print(f"[bold]{m.model_id}[/bold]: {m.description or '(no description)'}\n"
                      f"  HE plan: {m.approximation}; output: {m.output_policy}; trial "
                      f"rows cost {m.trial_price_per_row_cents / 100:.2f} each\n"
                      f"  extraction risk: {m.extraction_risk}")
    if loading:
        console.print(f"still loading (the seller is compiling and self-testing them): "
                      f"{', '.join(loading)}; run 'gimme-buyer models' again in a few minutes")
    elif not listings:
        console.print("the seller lists no models")


def cmd_trial(args: argparse.Namespace) -> None:
    run_trial(_client(args), Workspace(args.home), console, model_id=args.model,
              data=args.data, label_column=args.label_column, max_rows=args.rows,
              min_security=args.min_security, packing=args.packing, link_mbps=args.link_mbps,
              resume=args.resume, max_tolerance=args.max_tolerance)


def _escrow(args: argparse.Namespace) -> EscrowClient | None:
    if args.escrow is None:
        return None
    return EscrowClient(args.escrow, None if args.insecure else
                        TlsFiles.in_dir(args.tls_dir, args.identity), args.identity)


def cmd_buy(args: argparse.Namespace) -> None:
    buy(_client(args), Workspace(args.home), console, args.model, args.trial, args.again,
        _escrow(args))


def cmd_verify(args: argparse.Namespace) -> None:
    workspace = Workspace(args.home)
    verdict = verify_delivery(workspace, console, args.model, args.trial, args.bundle)
    escrow = _escrow(args)
    if escrow is not None:
        release_on_pass(escrow, workspace.owned_trial(args.model, args.trial), console,
                        verdict.passed, verdict.bundle)
    if not verdict.passed:
        sys.exit(1)


def cmd_run(args: argparse.Namespace) -> None:
    run_locked(Workspace(args.home), console, args.model, args.data, args.key_file,
               args.trial, args.out)


def cmd_pin(args: argparse.Namespace) -> None:
    client = _client(args)
    key = seller_key(client, Workspace(args.home), console)
    console.print(f"seller at {client.address}: key {fingerprint(key)}")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seller", default=os.environ.get("GIMME_SELLER", "localhost:50051"),
                        help="seller address host:port (env GIMME_SELLER)")
    common.add_argument("--home", type=Path,
                        default=Path(os.environ.get("GIMME_HOME", Path.home() / ".gimme-buyer")),
                        help="where trials, keys and models are kept (env GIMME_HOME)")
    common.add_argument("--identity", default=os.environ.get("GIMME_IDENTITY", "buyer"),
                        help="your buyer identity: the name of your TLS certificate "
                             "(env GIMME_IDENTITY)")
    common.add_argument("--tls-dir", type=Path,
                        default=Path(os.environ.get("GIMME_TLS_DIR", "gimme-tls")),
                        help="directory with ca.pem, IDENTITY.pem, IDENTITY.key "
                             "(env GIMME_TLS_DIR)")
    common.add_argument("--insecure", action="store_true",
                        default=os.environ.get("GIMME_INSECURE") == "1",
                        help="connect without TLS (local experiments only; needs --token)")
    common.add_argument("--token", default=os.environ.get("GIMME_TOKEN"),
                        help="API token naming you to a seller without TLS (env GIMME_TOKEN)")
    common.add_argument("-v", "--verbose", action="store_true")

    parser = argparse.ArgumentParser(
        prog="gimme-buyer",
        description="Test a model on your data under encryption before you buy it; then buy "
                    "it and verify that you got what you tested.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", parents=[common], help="list the seller's models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("trial", parents=[common],
                       help="test MODEL on your rows, encrypted (protocol steps 2-6)")
    p.add_argument("model")
    p.add_argument("--data", type=Path,
                   help="test rows: CSV with a header naming the model's columns, or .npz "
                        "with X (and y)")
    p.add_argument("--resume", action="store_true",
                   help="finish the newest interrupted trial of MODEL (its rows, keys and "
                        "finished batches are kept): fetch or evaluate the batches left")
    p.add_argument("--label-column", help="CSV column with the true labels, or the target "
                   "values of a regression model (for scoring)")
    p.add_argument("--rows", type=int, help="test only the first N rows")
    p.add_argument("--min-security", type=int, default=128, choices=(0, 128, 192, 256),
                   help="refuse offers below this many bits of security (0: accept "
                        "anything, tests only)")
    p.add_argument("--packing", default=AUTO, choices=(AUTO, *PACKINGS),
                   help="how rows go into ciphertexts; auto (default) takes the packing the "
                        "planner estimates fastest for your row count and link")
    p.add_argument("--link-mbps", type=_positive("Mbit/s"), default=DEFAULT_MBPS,
                   help=f"your link to the seller in Mbit/s, for the planner (default "
                        f"{DEFAULT_MBPS:g})")
    p.add_argument("--max-tolerance", type=_positive("a tolerance"),
                   help="refuse, before sending anything, an offer whose signed tolerance "
                        "(how far the model you would buy may be from the trial's results) "
                        "is above X; default: no cap, any tolerance the seller signs is "
                        "accepted")
    p.set_defaults(func=cmd_trial)

    p = sub.add_parser("buy", parents=[common],
                       help="pay for MODEL from your prepaid balance and download it")
    p.add_argument("model")
    p.add_argument("--trial", help="trial id (default: your latest completed trial of MODEL)")
    p.add_argument("--again", action="store_true",
                   help="buy MODEL again although you already own it (from another trial)")
    p.add_argument("--escrow", metavar="ADDR",
                   help="pay through the escrow at host:port instead of your prepaid balance "
                        "at the seller: the price is held there until 'verify --escrow' "
                        "passes or an arbiter rules")
    p.set_defaults(func=cmd_buy)

    p = sub.add_parser("verify", parents=[common],
                       help="check the delivered MODEL against the commitment and the trial")
    p.add_argument("model")
    p.add_argument("--trial", help="trial id (default: the trial of MODEL you bought last, "
                                   "else your latest completed one)")
    p.add_argument("--bundle", type=Path, help="where to write the evidence bundle (.zip)")
    p.add_argument("--escrow", metavar="ADDR",
                   help="the escrow the trial was paid through: a PASS releases the deposit "
                        "to the seller, a FAIL keeps it held for an arbiter's ruling")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("run", parents=[common],
                       help="predict with a bought (Deep-Locked) model, unlocking it only in "
                            "memory, or with a bident package")
    p.add_argument("model", help="a model you bought (its name), a locked .onnx file, or a "
                                 "bident package directory (its trusted half runs in a "
                                 "separate process)")
    p.add_argument("--data", type=Path, required=True,
                   help="rows (CSV with the model's columns, or .npz with X)")
    p.add_argument("--key-file", type=Path,
                   help="the Deep-Lock key (hex); default: the key released to you (for a "
                        "bident package: its trusted.key, read by the trusted runner only)")
    p.add_argument("--trial", help="trial id (default: the trial of MODEL you bought last)")
    p.add_argument("--out", type=Path, help="write predictions as CSV here")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("pin", parents=[common],
                       help="record the seller's identity key (trust on first use)")
    p.set_defaults(func=cmd_pin)
    return parser


def main(argv: list[str] | None = None) -> None:
    run_command(build_parser().parse_args(argv), console, logging.WARNING)

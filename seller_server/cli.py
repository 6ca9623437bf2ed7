"""gimme-seller: run the seller daemon and manage its ledger and certificates."""

from __future__ import annotations

import argparse
import logging
import os
import uuid
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from common.certs import create_certificates
from common.cli import run_command
from common.deeplock import key_id, lock, new_master_key
from common.errors import BadInput
from common.guarded import Limits
from common.onnx_io import session
from common.rpc import CATALOG_SERVICE, SERVICE_NAME, TlsFiles, check_health
from common.signing import Signer, fingerprint, public_key_arg
from common.tabular import load_table
from seller_server.audit import POLICIES, STRATEGIES, Victim, plot, run_audit
from seller_server.bident import forwarded, run_torch, split, train_arguments
from seller_server.catalog import LISTING_TIMEOUT, read_listing, read_model
from seller_server.compiler import compile_model
from seller_server.daemon import ServeOptions, serve
from seller_server.fingerprint import trace
from seller_server.service import StreamLimits
from seller_server.store import Store
from seller_server.worker import Capacity

console = Console(stderr=True)
TRACE_Z = 6.0  # attribution threshold: p < 1e-9 per copy tested
DEFAULT_STATE = Path(os.environ.get("GIMME_SELLER_STATE", "gimme-seller-data"))
DEFAULT_LISTEN = os.environ.get("GIMME_LISTEN", "0.0.0.0:50051")


def _tls(args: argparse.Namespace) -> TlsFiles | None:
    if args.insecure:
        return None
    return TlsFiles.in_dir(args.tls_dir, "seller")


def _add_tls(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-dir", type=Path,
                        default=Path(os.environ.get("GIMME_TLS_DIR", "gimme-tls")),
                        help="directory with ca.pem, seller.pem, seller.key (env GIMME_TLS_DIR)")
    parser.add_argument("--insecure", action="store_true",
                        default=os.environ.get("GIMME_INSECURE") == "1",
                        help="no TLS (logged loudly; for local experiments only)")


def _cents(text: str) -> int:
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise BadInput(f"{text!r} is not an amount (e.g. 100 or 25.50)") from None
    if amount != amount.quantize(Decimal("0.01")):
        raise BadInput(f"{text!r} has more than 2 decimals")
    return int(amount * 100)


def cmd_serve(args: argparse.Namespace) -> None:
    security = 0 if args.insecure_he_params else 128
    serve(ServeOptions(
        catalog=args.catalog, state=args.state, listen=args.listen, tls=_tls(args),
        security_bits=security, insecure_ring=args.insecure_he_params or 0,
        capacity=Capacity(Limits(memory_bytes=args.worker_memory_mb << 20,
                                 timeout_s=args.worker_timeout),
                          workers_per_evaluation=args.workers_per_evaluation,
                          concurrent_evaluations=args.max_evaluations),
        port_file=args.port_file, key_ttl_hours=args.key_ttl_hours,
        listing_timeout=_positive(args.listing_timeout, "--listing-timeout"),
        escrow_keys=tuple(public_key_arg(key, "--trust-escrow", "'gimme-escrow identity' "
                                         "prints the escrow's") for key in args.trust_escrow),
        streams=StreamLimits(_positive(args.stream_idle_seconds, "--stream-idle-seconds"),
                             int(_positive(args.max_streams_per_buyer,
                                           "--max-streams-per-buyer")),
                             int(_positive(args.max_streams, "--max-streams")))))


def _positive(value: float, flag: str) -> float:
    if not value > 0:
        raise BadInput(f"{flag} must be positive, not {value}")
    return value


def cmd_certs(args: argparse.Namespace) -> None:
    clients = args.client or ["buyer"]
    if "seller" in clients or "ca" in clients:
        raise BadInput("client names 'seller' and 'ca' are reserved")
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    for path in create_certificates(args.out, hosts, clients):
        console.print(f"wrote {path}")
    console.print(f"seller certificate valid for: {', '.join(hosts)}; buyer identities: "
                  f"{', '.join(clients)}")


def cmd_topup(args: argparse.Namespace) -> None:
    store = Store(args.state / "gimme.sqlite")
    applied, balance = store.top_up(args.buyer, _cents(args.amount),
                                    args.request_id or uuid.uuid4().hex)
    note = "" if applied else " (request id seen before: nothing added)"
    console.print(f"{args.buyer}: balance {balance / 100:.2f}{note}")


def cmd_token(args: argparse.Namespace) -> None:
    store = Store(args.state / "gimme.sqlite")
    if args.action == "create":
        print(store.create_token(args.buyer))
        console.print(f"API token for {args.buyer} (shown once; only its hash is stored)")
    else:
        console.print(f"revoked {store.revoke_tokens(args.buyer)} token(s) of {args.buyer}")


def cmd_trace(args: argparse.Namespace) -> None:
    suspect = args.suspect.read_bytes()
    store = Store(args.state / "gimme.sqlite")
    specs = [read_listing(path) for path in sorted(args.catalog.glob("*.json"))]
    tried = []
    for spec in specs:
        if args.model and spec.model_id != args.model:
            continue
        sales = {trial: key for trial, _buyer, key, _paid
                 in store.fingerprinted_sales(spec.model_id)}
        try:
            matches = trace(suspect, read_model(spec), sales)
        except BadInput:
            continue  # another model's structure
        tried.append(spec.model_id)
        buyers = {trial: (buyer, paid) for trial, buyer, _key, paid
                  in store.fingerprinted_sales(spec.model_id)}
        table = Table("trial", "buyer", "paid", "z", "p-value",
                      title=f"{args.suspect.name} against {len(sales)} fingerprinted "
                            f"copies of {spec.model_id}")
        for match in matches[:5]:
            buyer, paid = buyers[match.sale]
            table.add_row(match.sale, buyer, "yes" if paid else "no", f"{match.z:.1f}",
                          f"{match.p_value:.1e}")
        Console().print(table)
        if matches and matches[0].z >= TRACE_Z:
            best = matches[0]
            Console().print(f"[bold]{args.suspect.name} is the copy of trial {best.sale}, "
                            f"sold to {buyers[best.sale][0]}[/bold] (z = {best.z:.1f}, "
                            f"p = {best.p_value:.1e}; an unrelated copy scores z ~ N(0, 1))")
            return
        Console().print(f"no sale of {spec.model_id} matches (best z = "
                        f"{matches[0].z if matches else 0:.1f} < {TRACE_Z})")
    if not tried:
        raise BadInput(f"{args.suspect} has the weights of no model in {args.catalog}")
    raise SystemExit(1)


def cmd_audit(args: argparse.Namespace) -> None:
    path = args.catalog / f"{args.model.replace('-', '_')}.json"
    specs = [read_listing(p) for p in sorted(args.catalog.glob("*.json"))]
    spec = next((s for s in specs if s.model_id == args.model), None)
    if spec is None:
        raise BadInput(f"no listing named {args.model!r} in {args.catalog} ({path.name}?)")
    model = read_model(spec)
    calibration = load_table(spec.calibration_path, spec.input_columns).rows
    evaluation = load_table(args.eval, spec.input_columns, args.label_column)
    tail = compile_model(model, calibration, degree=2).tail  # only the output names matter
    noise = spec.output_policy.noise_std or args.noise_std
    victim = Victim(model, tail.probability_output, tail.class_labels, noise, args.grid, 0)
    budgets = sorted({int(b) for b in args.budgets.split(",")}) if args.budgets else [
        b for b in (10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
        if b <= 2 * spec.trial_budget_rows]
    with console.status("simulating extraction attacks..."):
        report = run_audit(spec.model_id, victim, calibration, evaluation.rows,
                           evaluation.labels or (), budgets, spec.output_policy.kind,
                           args.max_fidelity)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"audit-{spec.model_id}.json").write_text(report.to_json())
    plot(report, args.out / f"audit-{spec.model_id}.png")
    table = Table("queries", *(f"{p} / {s}" for p in POLICIES for s in STRATEGIES),
                  title=f"fidelity (accuracy) of a stolen copy of {spec.model_id}; victim "
                        f"accuracy {report.victim_accuracy:.1%}")
    for budget in budgets:
        cells = [next(f"{p.fidelity:.0%} ({p.accuracy:.0%})" for p in report.points
                      if (p.policy, p.strategy, p.budget) == (pol, strategy, budget))
                 for pol in POLICIES for strategy in STRATEGIES]
        table.add_row(str(budget), *cells)
    Console().print(table)
    Console().print(f"recommended trial budget for policy {report.policy!r}: "
                    f"[bold]{report.recommended_budget}[/bold] rows keep every attack's "
                    f"fidelity below {report.max_fidelity:.0%} (listing allows "
                    f"{spec.trial_budget_rows}); report and plot in {args.out}")


def cmd_balances(args: argparse.Namespace) -> None:
    table = Table("account", "balance")
    for account, cents in Store(args.state / "gimme.sqlite").balances():
        table.add_row(account, f"{cents / 100:.2f}")
    Console().print(table)


def cmd_identity(args: argparse.Namespace) -> None:
    path = args.state / "identity.key"
    if not path.exists():
        raise BadInput(f"no identity key at {path}: 'gimme-seller serve --state {args.state}' "
                       f"creates it on first start")
    signer, _created = Signer.load_or_create(path)
    print(signer.public_key.hex())
    console.print(f"fingerprint {fingerprint(signer.public_key)}: buyers pin this key on "
                  f"first contact; give it to an arbiter ('gimme-arbiter verify BUNDLE "
                  f"--seller-key KEY')")


def cmd_bident_train(args: argparse.Namespace) -> None:
    with console.status(f"training a {args.merge} bident ({args.base}) for {args.epochs} "
                        f"epochs..."):
        result = run_torch("train", forwarded(args, train_arguments))
    parts = ", ".join(f"{k} {v}" for k, v in result["parameters"].items())
    console.print(f"test accuracy {result['test_accuracy']:.2%}; parameters: {parts}. Model "
                  f"in {args.out / 'model.onnx'} (history.json has every epoch); next: "
                  f"'gimme-seller bident split {args.out / 'model.onnx'} --out PACKAGE'")


def cmd_bident_split(args: argparse.Namespace) -> None:
    rows = load_table(args.rows, [f"x{i}" for i in range(_input_width(args.model))]).rows \
        if args.rows else None
    manifest = split(args.model.read_bytes(), args.out, rows, args.trusted)
    s = manifest.structure
    console.print(f"split at {s.merge_node!r} ({s.merge_op} merge): untrusted half "
                  f"{manifest.untrusted_parameters} parameters, trusted half "
                  f"{manifest.trusted_parameters} (Deep-Locked, key {manifest.key_id}); halves "
                  f"reproduce the whole model within {manifest.check_max_error:.2g} on "
                  f"{manifest.check_rows} rows. Package in {args.out}; hand {args.out}/"
                  f"trusted.key to the trusted environment only")


def _input_width(model: Path) -> int:
    dims = session(model.read_bytes()).get_inputs()[0].shape[1:]
    return int(np.prod([d for d in dims if isinstance(d, int)]))


def cmd_lock(args: argparse.Namespace) -> None:
    key = new_master_key()
    locked = lock(args.model.read_bytes(), key)
    out = args.out or args.model.with_suffix(".locked.onnx")
    key_out = args.key_out or out.with_suffix(".key")
    out.write_bytes(locked)
    fd = os.open(key_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key.hex() + "\n")
    console.print(f"locked {args.model} -> {out} (every trained parameter substituted); key "
                  f"{key_id(key)} in {key_out} (mode 0600). 'gimme-buyer run {out} --key-file "
                  f"{key_out} --data ROWS' runs it; without the key it is a random classifier")


def cmd_health(args: argparse.Namespace) -> None:
    status = check_health(args.address, _tls(args),
                          service=CATALOG_SERVICE if args.whole_catalog else SERVICE_NAME)
    print(status)
    if status != "SERVING":
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gimme-seller",
        description="Sell ML models: buyers test them on encrypted data before paying.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the seller daemon for a catalog of models")
    p.add_argument("--catalog", type=Path, required=True,
                   help="directory of listing files (*.json) with their models")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE,
                   help="state directory: database, identity key, spool "
                        "(env GIMME_SELLER_STATE)")
    p.add_argument("--listen", default=DEFAULT_LISTEN,
                   help="address to listen on (env GIMME_LISTEN; port 0 picks one)")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--max-evaluations", type=int, default=2,
                   help="memory-heavy worker jobs (evaluations, key checks, listing "
                        "compiles) run at once; others queue. Listings compile up to one "
                        "fewer at once (at least one), leaving a slot to trades (default 2)")
    p.add_argument("--workers-per-evaluation", type=int, default=os.cpu_count() or 1,
                   help="processes one evaluation is split over (default: CPU count)")
    p.add_argument("--worker-memory-mb", type=int, default=6144,
                   help="address-space limit of each worker process")
    p.add_argument("--worker-timeout", type=float, default=900.0,
                   help="seconds before a worker is killed (default 900)")
    p.add_argument("--listing-timeout", type=float, default=LISTING_TIMEOUT,
                   help="seconds one listing's compile and self-tests may take, in a worker "
                        "of their own; a listing that takes longer is refused and the rest "
                        f"are served (default {LISTING_TIMEOUT:g})")
    limits = StreamLimits()
    p.add_argument("--stream-idle-seconds", type=float, default=limits.idle_seconds,
                   help="end a streaming call whose client sends nothing, or takes no reply, "
                        f"for this long (default {limits.idle_seconds:g})")
    p.add_argument("--max-streams-per-buyer", type=int, default=limits.per_buyer,
                   help="UploadKeys, Evaluate and Deliver calls one buyer may have open at "
                        f"once; more are refused at once (default {limits.per_buyer})")
    p.add_argument("--max-streams", type=int, default=limits.total,
                   help="such calls open at once from all buyers; more are refused at once "
                        f"(default {limits.total})")
    p.add_argument("--key-ttl-hours", type=float, default=24.0,
                   help="delete an unpaid trial's evaluation keys after it sat idle this "
                        "long (default 24; its buyer uploads them again to go on)")
    p.add_argument("--trust-escrow", action="append", default=[], metavar="KEY",
                   help="also accept payment by a deposit at the escrow with this public key "
                        "(hex, or a file; repeatable): the key is released against its signed "
                        "deposit receipt. Default: the prepaid ledger only")
    p.add_argument("--insecure-he-params", type=int, metavar="RING", default=None,
                   help="TESTS ONLY: offer CKKS parameters with no security level on this "
                        "ring dimension; buyers refuse them unless told not to")
    _add_tls(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("certs", help="create a local CA, a seller and buyer certificates")
    p.add_argument("--out", type=Path, default=Path("gimme-tls"))
    p.add_argument("--hosts", default="localhost,127.0.0.1,seller",
                   help="comma-separated names the seller is reached by (compose: 'seller')")
    p.add_argument("--client", action="append",
                   help="buyer identity to issue a client certificate for (repeatable; "
                        "default 'buyer')")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("topup", help="credit a buyer's prepaid balance")
    p.add_argument("buyer", help="buyer identity (its certificate name)")
    p.add_argument("amount", help="amount, e.g. 100 or 25.50")
    p.add_argument("--request-id", help="idempotency key: repeating it adds nothing")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE)
    p.set_defaults(func=cmd_topup)

    p = sub.add_parser("token", help="create or revoke a buyer's API token (used when "
                                     "serving without TLS)")
    p.add_argument("action", choices=("create", "revoke"))
    p.add_argument("buyer", help="buyer identity")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE)
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("trace", help="name the sale a leaked model copy came from (hidden "
                                     "units permuted, negated, rescaled or padded are put "
                                     "back in the listing's order first)")
    p.add_argument("suspect", type=Path, help="the leaked ONNX file")
    p.add_argument("--catalog", type=Path, required=True)
    p.add_argument("--model", help="listing name (default: whichever the weights fit)")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("audit", help="simulate a buyer spending the trial budget on "
                                     "stealing MODEL; recommend a budget")
    p.add_argument("model", help="listing name")
    p.add_argument("--catalog", type=Path, required=True)
    p.add_argument("--eval", type=Path, required=True,
                   help="labelled rows to measure the stolen copy on (CSV or .npz)")
    p.add_argument("--label-column", default="y")
    p.add_argument("--budgets", help="comma-separated query counts to simulate")
    p.add_argument("--max-fidelity", type=float, default=0.9,
                   help="fidelity a stolen copy must stay below (default 0.9)")
    p.add_argument("--noise-std", type=float, default=0.05,
                   help="noise of the 'noisy' policy when the listing sets none")
    p.add_argument("--grid", type=float, default=0.1, help="grid of the 'rounded' policy")
    p.add_argument("--out", type=Path, default=Path("."), help="where the JSON and PNG go")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("balances", help="show the ledger's account balances")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE)
    p.set_defaults(func=cmd_balances)

    p = sub.add_parser("identity", help="print the seller's public signing key (hex)")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE)
    p.set_defaults(func=cmd_identity)

    bident = sub.add_parser("bident", help="bident models: a trusted and an untrusted half "
                                           "(train with PyTorch, split into a package)")
    steps = bident.add_subparsers(dest="step", required=True)
    p = steps.add_parser("train", help="train a bident network (needs PyTorch: "
                                       "'scripts/setup.sh --torch')")
    train_arguments(p)
    p.set_defaults(func=cmd_bident_train)
    p = steps.add_parser("split", help="cut a trained bident model into an untrusted half "
                                       "and a Deep-Locked trusted half, checked to reproduce it")
    p.add_argument("model", type=Path, help="the whole bident model (ONNX)")
    p.add_argument("--out", type=Path, required=True, help="package directory to write")
    p.add_argument("--rows", type=Path, help="rows to check the split on (CSV or .npz X; "
                                             "default: 64 random rows)")
    p.add_argument("--trusted", choices=("first", "second"), default="second",
                   help="which input of the merge is the trusted branch (default: second, "
                        "as 'bident train' exports)")
    p.set_defaults(func=cmd_bident_split)

    p = sub.add_parser("lock", help="Deep-Lock an ONNX model under a fresh key")
    p.add_argument("model", type=Path, help="the ONNX model to lock")
    p.add_argument("--out", type=Path, help="locked model (default MODEL.locked.onnx)")
    p.add_argument("--key-out", type=Path, help="key file (default next to --out, .key)")
    p.set_defaults(func=cmd_lock)

    p = sub.add_parser("health", help="exit 0 if a seller daemon is SERVING (at least one "
                                      "listing is ready)")
    p.add_argument("--address", default=os.environ.get("GIMME_SELLER", "localhost:50051"))
    p.add_argument("--whole-catalog", action="store_true",
                   help="SERVING only once every listing is listed or refused (none still "
                        "compiling)")
    _add_tls(p)
    p.set_defaults(func=cmd_health)
    return parser


def main(argv: list[str] | None = None) -> None:
    run_command(build_parser().parse_args(argv), console, logging.INFO)

"""gimme-arbiter: a third party rules on a disputed trade from the buyer's evidence bundle.

Neither side is taken at its word. The arbiter
  1. checks every seller signature in the bundle (under the seller key it knows, or, failing
     that, the key the offer names) and that the receipts sign the stored ciphertexts;
  2. decrypts the encrypted inputs with the revealed trial secret key and requires them to
     be the rows the buyer says it tested; decrypts the seller's encrypted results itself
     (the buyer's own decryption, scores.npy, is only compared);
  3. opens the delivered locked model with the seller's signed key release, compares its
     hash with the commitment;
  4. recomputes, in plaintext, the HE plan the offer committed to (disclosed in the key
     release) on the decrypted rows: results farther from it than the signed plan tolerance
     are the seller's fault whatever the rows were; then reruns the model against the
     results within the signed tolerance on the rows inside the plan's guaranteed ranges
     (outside them the approximation promised nothing: reported, never the seller's fault;
     common.evidence.Reproduction).
Rulings (exit status): 0 no fault found (a claim of mismatch is not supported),
3 SELLER AT FAULT, 4 BUYER'S EVIDENCE REJECTED, 2 the command itself failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from common.cli import run_command
from common.errors import BadInput, GimmeError
from common.escrow import RULING, ruling_payload
from common.escrow import Ruling as EscrowRuling
from common.evidence import (
    SECRET_KEY,
    Bundle,
    Check,
    check_receipts,
    check_reproduction,
    checks_table,
    input_name,
    load_rows,
    load_scores,
    open_delivered_model,
    result_name,
    signer_of,
)
from common.he.decryptor import decrypt
from common.protocol import Offer, Receipt, Signed
from common.signing import Signer, fingerprint, public_key_arg, sha256
from common.tabular import FloatArray
from common.trust import open_offer
from common.wire import envelope_to_json, offer_from_payload

console = Console()
NO_FAULT, SELLER_AT_FAULT, EVIDENCE_REJECTED = "NO FAULT FOUND", "SELLER AT FAULT", \
    "BUYER'S EVIDENCE REJECTED"
EXIT_STATUS = {NO_FAULT: 0, SELLER_AT_FAULT: 3, EVIDENCE_REJECTED: 4}
# relative to the largest magnitude: CKKS decrypts to within ~1e-6 of it (measured ~1e-7)
DECRYPTION_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Ruling:
    ruling: str
    reason: str
    claim: str | None
    checks: list[Check]

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.ruling]


class _Rejected(Exception):
    """The buyer's evidence failed a check that an honest buyer's evidence always passes."""


class _Checks(list[Check]):
    def require(self, check: Check, reason: str) -> None:
        self.append(check)
        if not check.ok:
            raise _Rejected(f"{reason}: {check.detail}")


def arbitrate(bundle_path: Path, seller_key: bytes | None) -> Ruling:
    bundle = Bundle(bundle_path)
    claim = _claim(bundle)
    checks = _Checks()
    try:
        offer, key = _offer(bundle, seller_key, checks)
        receipts_check, receipts = check_receipts(bundle, key, offer)
        checks.require(receipts_check, "the trial records are not the seller's")
        rows, scores = _decrypted(bundle, offer, receipts, checks)
        opened = open_delivered_model(bundle, key, offer)
        for check in opened.checks if not opened.records_ok else opened.checks[:-1]:
            checks.require(check, "the delivery records are not the seller's")
    except _Rejected as rejected:
        return Ruling(EVIDENCE_REJECTED, str(rejected), claim, checks)
    # from here on every record is the seller's own, signed
    checks.append(opened.checks[-1])
    if opened.model is None or not opened.checks[-1].ok:
        return Ruling(SELLER_AT_FAULT, "the key the seller released does not open the model "
                                       "it delivered into the model it committed to",
                      claim, checks)
    reproduction = check_reproduction(bundle, offer, opened.model, rows, scores)
    checks += reproduction.checks
    if reproduction.seller_fault:
        return Ruling(SELLER_AT_FAULT, reproduction.seller_fault, claim, checks)
    reason = ("no seller fault: the delivered model is the committed one, the trial computed "
              "the committed plan, and the model reproduces it within the tolerance")
    if reproduction.outside:
        reason += (f" on every row inside the plan's guaranteed ranges; "
                   f"{len(reproduction.outside)} rows were outside them, where nothing was "
                   f"promised")
    if claim == "FAIL":
        reason += "; the buyer's claim of a mismatch is not supported"
    return Ruling(NO_FAULT, reason, claim, checks)


def _claim(bundle: Bundle) -> str | None:
    if not bundle.has("manifest.json"):
        return None
    try:
        claim = json.loads(bundle.read("manifest.json")).get("claim")
    except (ValueError, AttributeError):
        return None
    return str(claim) if claim is not None else None


def _offer(bundle: Bundle, seller_key: bytes | None, checks: _Checks) -> tuple[Offer, bytes]:
    name = "offer signed by the seller"
    try:
        signed = bundle.load_signed("offer")
        model_id = offer_from_payload(signed.payload).model_id
        # without a key from the seller, only as good as the offer's own word (said so)
        key = signer_of(signed, [seller_key or offer_from_payload(
            signed.payload).seller_public_key])
        offer = open_offer(signed, key, model_id)
    except GimmeError as exc:
        checks.require(Check(name, False, exc.message), "the offer is not the seller's")
        raise  # not reached: require raised
    checks.append(Check(name, True, f"key {fingerprint(key)}, trial {offer.trial_id}"))
    return offer, key


def _decrypted(bundle: Bundle, offer: Offer, receipts: list[Receipt], checks: _Checks
               ) -> tuple[FloatArray, FloatArray]:
    """The tested rows and the trial results, decrypted here from the signed ciphertexts."""
    secret_key = bundle.read(SECRET_KEY)
    columns, scores = len(offer.encoding.input_columns), offer.output.score_count
    layout = offer.encoding.layout()
    inputs, results = [], []
    with tempfile.TemporaryDirectory(prefix="gimme-arbiter-") as tmp:
        for receipt in receipts:
            b, rows = receipt.batch_index, receipt.rows
            expected = (layout.ciphertexts(rows, columns), layout.result_count(rows, scores))
            if (len(receipt.input_sha256), len(receipt.result_sha256)) != expected:
                checks.require(Check("receipts match the offer", False,
                                     f"batch {b}: {len(receipt.input_sha256)} inputs and "
                                     f"{len(receipt.result_sha256)} results where "
                                     f"{layout.kind} packing of {rows} rows gives "
                                     f"{expected[0]} and {expected[1]}"),
                               "the trial records are inconsistent")
            try:
                inputs.append(decrypt(
                    offer.params, secret_key, offer.key_tag, 0,
                    _extract(bundle, tmp, [input_name(b, j) for j in range(expected[0])]),
                    layout, rows, columns, results=False))
                results.append(decrypt(
                    offer.params, secret_key, offer.key_tag, offer.output.result_level,
                    _extract(bundle, tmp, [result_name(b, i) for i in range(expected[1])]),
                    layout, rows, scores, results=True))
            except GimmeError as exc:
                checks.require(Check("ciphertexts decrypt with the revealed key", False,
                                     f"batch {b}: {exc.message}"),
                               "the bundle's ciphertexts or secret key are unusable")
    decrypted_inputs, decrypted_scores = np.concatenate(inputs), np.concatenate(results)
    # compared as encrypted: each column on the offer's input encoding's common scale
    checks.require(_same("decrypted inputs are the buyer's rows", decrypted_inputs,
                         offer.encoding.encoded(load_rows(bundle)[0]), DECRYPTION_TOLERANCE),
                   f"{SECRET_KEY} and the uploaded ciphertexts do not give the rows in "
                   f"rows.npz")
    # OpenFHE adds fresh noise at every CKKS decode, so two decryptions differ slightly
    checks.require(_same("decrypted results are the buyer's scores", decrypted_scores,
                         load_scores(bundle), DECRYPTION_TOLERANCE),
                   "the buyer's scores.npy is not what the seller's results decrypt to")
    return offer.encoding.decoded(decrypted_inputs), decrypted_scores


def _extract(bundle: Bundle, folder: str, names: list[str]) -> list[str]:
    """Entries as files for the guarded decryptor, named here (never by the zip)."""
    paths = []
    for name in names:
        path = Path(folder) / name.replace("/", "-")
        path.write_bytes(bundle.read(name))
        paths.append(str(path))
    return paths


def _same(name: str, ours: FloatArray, theirs: FloatArray, relative: float) -> Check:
    """Equal within `relative` of the largest magnitude (at least 1)."""
    if ours.shape != theirs.shape:
        return Check(name, False, f"shape {ours.shape} decrypted, {theirs.shape} claimed")
    error = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
    tolerance = relative * max(1.0, float(np.abs(ours).max()) if ours.size else 1.0)
    return Check(name, error <= tolerance,
                 f"max difference {error:.3g} ({'<=' if error <= tolerance else '>'} "
                 f"{tolerance:.3g}) over {ours.shape[0]} rows")


def _seller_key(text: str | None) -> bytes | None:
    return None if text is None else public_key_arg(
        text, "--seller-key", "'gimme-seller identity' prints the seller's")


def cmd_verify(args: argparse.Namespace) -> None:
    seller_key = _seller_key(args.seller_key)
    if seller_key is None:
        console.print("[yellow]note:[/yellow] no --seller-key: the seller's key is taken from "
                      "the offer in the bundle, so signatures show only that the records "
                      "agree with each other; pass the key the seller publishes to bind them "
                      "to the seller")
    ruling = arbitrate(args.bundle, seller_key)
    console.print(checks_table(f"arbitration of {args.bundle.name}", ruling.checks))
    colour = {NO_FAULT: "green", SELLER_AT_FAULT: "red", EVIDENCE_REJECTED: "yellow"}
    console.print(f"[bold {colour[ruling.ruling]}]{ruling.ruling}[/]: {ruling.reason} "
                  f"(the buyer claimed {ruling.claim or 'nothing'})")
    if args.out:
        args.out.write_text(json.dumps({**asdict(ruling), "exit_status": ruling.exit_status},
                                       indent=2))
    if args.sign_with:
        path = _sign_ruling(args, seller_key, ruling)
        console.print(f"signed ruling written to {path}: 'gimme-escrow settle --ruling "
                      f"{path}' pays the escrowed deposit as it says")
    sys.exit(ruling.exit_status)


def _sign_ruling(args: argparse.Namespace, seller_key: bytes | None, ruling: Ruling) -> Path:
    """The ruling, signed by this arbiter, for an escrow that trusts its key: bound to the
    trial and the seller key the records were checked under (an escrow pays only a deposit
    of that trial for that seller)."""
    if seller_key is None:
        raise BadInput("--sign-with needs --seller-key: a signed ruling names the seller key "
                       "the records were checked under, and the offer's own key proves nothing")
    try:
        offer = offer_from_payload(Bundle(args.bundle).load_signed("offer").payload)
    except GimmeError as exc:
        raise BadInput(f"the bundle names no trial to rule on ({exc.message}): nothing "
                       f"signed") from None
    signer, created = Signer.load_or_create(args.sign_with)
    if created:
        console.print(f"created arbiter key {args.sign_with} (public key "
                      f"{signer.public_key.hex()})")
    payload = ruling_payload(EscrowRuling(
        offer.trial_id, ruling.ruling, ruling.reason, seller_key, offer.model_commitment,
        sha256(args.bundle.read_bytes()), int(time.time())))
    path: Path = args.signed_out or args.bundle.with_name(f"ruling-{offer.trial_id}.json")
    path.write_text(envelope_to_json(Signed(RULING, payload, signer.sign(RULING, payload))))
    return path


def cmd_identity(args: argparse.Namespace) -> None:
    signer, created = Signer.load_or_create(args.key)
    print(signer.public_key.hex())
    Console(stderr=True).print(  # stdout: the key alone
        f"{'created' if created else 'loaded'} arbiter key {args.key} (fingerprint "
        f"{fingerprint(signer.public_key)}): an escrow acts on rulings signed with "
        f"it when started with 'gimme-escrow serve --trust-arbiter KEY'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gimme-arbiter", description="Rule on a disputed Gimme trade from the buyer's "
                                          "evidence bundle (exit 0 no fault, 3 seller at "
                                          "fault, 4 buyer's evidence rejected)")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    p = sub.add_parser("verify", help="re-check a bundle from 'gimme-buyer verify' and rule")
    p.add_argument("bundle", type=Path, help="the evidence-TRIAL.zip the buyer handed over")
    p.add_argument("--seller-key", help="the seller's public key (hex, or a file with it)")
    p.add_argument("--out", type=Path, help="also write the ruling as JSON here")
    p.add_argument("--sign-with", type=Path, metavar="KEY_FILE",
                   help="sign the ruling with this arbiter key (Ed25519 PEM, created on first "
                        "use) for an escrow to act on; needs --seller-key")
    p.add_argument("--signed-out", type=Path,
                   help="where the signed ruling goes (default: ruling-TRIAL.json next to "
                        "the bundle)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("identity", help="print this arbiter's public key (escrows trust it)")
    p.add_argument("--key", type=Path, required=True,
                   help="the arbiter key file (Ed25519 PEM, created if missing)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_identity)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_command(args, console, quiet_level=30)

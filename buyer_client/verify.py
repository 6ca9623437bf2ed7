"""Step 9: does the delivered model compute what was tested? PASS/FAIL plus evidence.

Checks, all from the trial folder (offline):
  * every seller signature (offer, receipts, payment, delivery) under the offer's key,
    which must be a key this workspace pinned;
  * the result ciphertexts are the ones the receipts sign;
  * SHA-256 of the delivered model equals the commitment signed in the offer;
  * the delivered model, run with onnxruntime on the tested rows, reproduces the
    decrypted trial results within the signed tolerance.
The evidence bundle (a zip) holds what a third party needs to re-check all of it.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from buyer_client.trust import open_delivery, open_offer
from buyer_client.workspace import TrialFolder, Workspace
from common.errors import GimmeError, Refused
from common.onnx_io import run_model
from common.protocol import OFFER, RECEIPT, Offer, Signed
from common.signing import sha256, verify
from common.tail import apply_tail, predicted_labels
from common.wire import receipt_from_payload


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Verdict:
    passed: bool
    checks: list[Check]
    max_error: float | None
    agreement: float | None
    bundle: Path


def verify_delivery(workspace: Workspace, console: Console, model_id: str,
                    trial_id: str | None = None, bundle: Path | None = None,
                    include_model: bool = False) -> Verdict:
    folder = workspace.trial(model_id, trial_id)
    signed_offer = folder.load_signed("offer")
    key = _pinned_offer_key(workspace, signed_offer)
    offer = open_offer(signed_offer, key, model_id)
    checks = [_check_receipts(folder, key, offer)]
    model = folder.read("model.onnx") if folder.has("model.onnx") else None
    max_error = agreement = None
    if model is None:
        checks.append(Check("model delivered", False, "no model.onnx: run 'gimme-buyer buy' "
                                                      "first"))
    else:
        digest = sha256(model)
        checks.append(Check("hash matches the signed commitment",
                            digest == offer.model_commitment,
                            f"sha256 {digest.hex()[:16]}… vs committed "
                            f"{offer.model_commitment.hex()[:16]}…"))
        try:
            record = open_delivery(folder.load_signed("delivery"), key, offer)
            checks.append(Check("delivery record signed for these bytes",
                                record.model_sha256 == digest,
                                f"record says {record.model_sha256.hex()[:16]}…"))
        except GimmeError as exc:
            checks.append(Check("delivery record signed for these bytes", False, exc.message))
        check, max_error, agreement = _check_outputs(folder, offer, model)
        checks.append(check)
    passed = all(c.ok for c in checks)
    path = bundle or folder.path / f"evidence-{offer.trial_id}.zip"
    _write_bundle(path, folder, offer, passed, checks, max_error, agreement,
                  model if include_model else None)
    verdict = Verdict(passed, checks, max_error, agreement, path)
    folder.save_json("verdict.json", {"passed": passed, "checks": [asdict(c) for c in checks],
                                      "max_error": max_error, "agreement": agreement})
    _show(console, offer, verdict)
    return verdict


def _pinned_offer_key(workspace: Workspace, signed: Signed) -> bytes:
    """The pinned seller key that signed the offer (signature first, then parse)."""
    for key in workspace.pinned_keys():
        try:
            verify(key, OFFER, signed.payload, signed.signature)
        except Refused:
            continue
        return key
    raise Refused("the offer is not signed by any seller key this workspace pinned")


def _check_receipts(folder: TrialFolder, key: bytes, offer: Offer) -> Check:
    name = "receipts signed and bound to the results"
    batches = folder.signed_names("receipt-")
    if not batches:
        return Check(name, False, "no receipts: the trial did not finish")
    offer_digest = sha256(folder.load_signed("offer").payload)
    for batch_name in batches:
        signed = folder.load_signed(batch_name)
        try:
            verify(key, RECEIPT, signed.payload, signed.signature)
        except Refused as exc:
            return Check(name, False, f"{batch_name}: {exc.message}")
        receipt = receipt_from_payload(signed.payload)
        results = [sha256(folder.read(f"results/batch-{receipt.batch_index}/score-{i}.bin"))
                   for i in range(offer.output.score_count)]
        if receipt.offer_sha256 != offer_digest or list(receipt.result_sha256) != results:
            return Check(name, False, f"{batch_name} does not sign the stored offer/results")
    return Check(name, True, f"{len(batches)} receipt(s)")


def _check_outputs(folder: TrialFolder, offer: Offer, model: bytes
                   ) -> tuple[Check, float | None, float | None]:
    name = "delivered model reproduces the trial"
    rows, _labels = folder.load_rows()
    tested = apply_tail(np.load(folder.path / "scores.npy"), offer.output.tail)
    try:
        delivered = run_model(model, rows, offer.output.probability_output,
                              offer.output.class_labels)
    except GimmeError as exc:
        return Check(name, False, f"the delivered model does not run: {exc.message}"), None, None
    if delivered.shape != tested.shape:
        return (Check(name, False, f"delivered model outputs {delivered.shape}, the trial "
                                   f"had {tested.shape}"), None, None)
    max_error = float(np.max(np.abs(delivered - tested)))
    ours, theirs = (predicted_labels(delivered, offer.output.class_labels),
                    predicted_labels(tested, offer.output.class_labels))
    agreement = (float(np.mean([a == b for a, b in zip(ours, theirs, strict=True)]))
                 if ours else 1.0)
    ok = max_error <= offer.tolerance
    return (Check(name, ok, f"max |f'(m) - f(m)| = {max_error:.3g} "
                            f"{'<=' if ok else '>'} tolerance {offer.tolerance:.3g}; top-1 "
                            f"agreement {agreement:.2%} on {len(rows)} rows"),
            max_error, agreement)


def _write_bundle(path: Path, folder: TrialFolder, offer: Offer, passed: bool,
                  checks: list[Check], max_error: float | None, agreement: float | None,
                  model: bytes | None) -> None:
    manifest: dict[str, Any] = {
        "verdict": "PASS" if passed else "FAIL",
        "trial_id": offer.trial_id,
        "model_id": offer.model_id,
        "model_commitment": offer.model_commitment.hex(),
        "tolerance": offer.tolerance,
        "max_error": max_error,
        "top1_agreement": agreement,
        "checks": [asdict(c) for c in checks],
        "seller_public_key": offer.seller_public_key.hex(),
    }
    if folder.has("model.onnx"):
        manifest["delivered_model_sha256"] = sha256(folder.read("model.onnx")).hex()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("manifest.json", json.dumps(manifest, indent=2))
        for item in sorted(folder.path.rglob("*")):
            relative = item.relative_to(folder.path).as_posix()
            if item.is_file() and _in_bundle(relative, model is not None):
                bundle.write(item, relative)
        if not folder.has("secret.key"):  # stored encrypted: reveal it in the bundle only
            bundle.writestr("secret.key", folder.load_secret_key())


def _in_bundle(relative: str, include_model: bool) -> bool:
    if relative.startswith("evidence-") or relative == "secret.key.enc":
        return False
    return include_model or relative != "model.onnx"


def _show(console: Console, offer: Offer, verdict: Verdict) -> None:
    table = Table("check", "result", "detail", title=f"verification of {offer.model_id}")
    for check in verdict.checks:
        table.add_row(check.name, "[green]ok[/green]" if check.ok else "[red]FAIL[/red]",
                      check.detail)
    console.print(table)
    console.print("[bold green]PASS[/bold green]" if verdict.passed else
                  "[bold red]FAIL[/bold red]", f"evidence bundle: {verdict.bundle}")

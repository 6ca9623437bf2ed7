"""Step 9: does the delivered model compute what was tested? PASS/FAIL plus evidence.

Checks, all from the trial folder (offline; common.evidence holds them, shared with
`gimme-arbiter`), signature first each time:
  * every seller signature (offer, receipts, delivery, key release) under the offer's key,
    which must be a key this workspace pinned;
  * the receipts sign the stored encrypted inputs and results;
  * the delivery record names the sealed bytes received; the released key is for them;
  * the released key opens the seal into the locked model the record names, and unlocks
    that into a model whose SHA-256 and size are the offer's commitment;
  * that model, run with onnxruntime on the tested rows (in memory: the unlocked model never
    touches the disk), reproduces the decrypted trial results within the signed tolerance.
The evidence bundle (a zip) holds what a third party needs to re-check all of it
(`gimme-arbiter verify BUNDLE`).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from buyer_client.workspace import TrialFolder, Workspace
from common.evidence import (
    LOCKED_MODEL,
    SECRET_KEY,
    Check,
    Reproduction,
    check_receipts,
    check_reproduction,
    checks_table,
    load_rows,
    load_scores,
    open_delivered_model,
    signer_of,
)
from common.protocol import Offer
from common.trust import open_offer


@dataclass(frozen=True)
class Verdict:
    passed: bool
    checks: list[Check]
    max_error: float | None
    agreement: float | None
    bundle: Path
    reproduction: Reproduction | None  # None: the model could not be opened


def verify_delivery(workspace: Workspace, console: Console, model_id: str,
                    trial_id: str | None = None, bundle: Path | None = None) -> Verdict:
    folder = workspace.owned_trial(model_id, trial_id)
    signed_offer = folder.load_signed("offer")
    key = signer_of(signed_offer, workspace.pinned_keys())
    offer = open_offer(signed_offer, key, model_id)
    receipts, _batches = check_receipts(folder, key, offer)
    opened = open_delivered_model(folder, key, offer)
    checks = [receipts, *opened.checks]
    reproduction = None
    if opened.model is not None:
        reproduction = check_reproduction(folder, offer, opened.model, load_rows(folder)[0],
                                          load_scores(folder))
        checks += reproduction.checks
    passed = all(c.ok for c in checks)
    max_error, agreement, outside = ((reproduction.max_error, reproduction.agreement,
                                      reproduction.outside) if reproduction else
                                     (None, None, []))
    path = bundle or folder.path / f"evidence-{offer.trial_id}.zip"
    _write_bundle(path, folder, offer, passed, checks, max_error, agreement, outside)
    verdict = Verdict(passed, checks, max_error, agreement, path, reproduction)
    folder.save_json("verdict.json", {"passed": passed, "checks": [asdict(c) for c in checks],
                                      "max_error": max_error, "agreement": agreement,
                                      "rows_outside_ranges": outside})
    _show(console, offer, verdict)
    return verdict


def _write_bundle(path: Path, folder: TrialFolder, offer: Offer, passed: bool,
                  checks: list[Check], max_error: float | None, agreement: float | None,
                  outside: list[int]) -> None:
    manifest: dict[str, Any] = {
        "claim": "PASS" if passed else "FAIL",
        "trial_id": offer.trial_id,
        "model_id": offer.model_id,
        "model_commitment": offer.model_commitment.hex(),
        "tolerance": offer.tolerance,
        "max_error": max_error,
        "top1_agreement": agreement,
        "rows_outside_ranges": outside,
        "checks": [asdict(c) for c in checks],
        "seller_public_key": offer.seller_public_key.hex(),
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("manifest.json", json.dumps(manifest, indent=2))
        for item in sorted(folder.path.rglob("*")):
            relative = item.relative_to(folder.path).as_posix()
            if item.is_file() and _in_bundle(relative):
                bundle.write(item, relative)
        if not folder.has(SECRET_KEY):  # stored encrypted: reveal it in the bundle only
            bundle.writestr(SECRET_KEY, folder.load_secret_key())


def _in_bundle(relative: str) -> bool:
    # the locked model is what the sealed delivery and the key release open into
    return not (relative.startswith("evidence-") or relative in (
        "secret.key.enc", "model.key", "verdict.json", "purchase-request-id", LOCKED_MODEL))


def _show(console: Console, offer: Offer, verdict: Verdict) -> None:
    console.print(checks_table(f"verification of {offer.model_id}", verdict.checks))
    reproduction = verdict.reproduction
    if reproduction and reproduction.seller_fault:
        console.print(f"[red]the seller is at fault:[/red] {reproduction.seller_fault}")
    elif reproduction and reproduction.outside:
        console.print(f"the seller computed the committed plan faithfully; "
                      f"{len(reproduction.outside)} of your rows were outside the plan's "
                      f"guaranteed ranges, where the model is not promised to match the "
                      f"trial (not the seller's fault)")
    console.print("[bold green]PASS[/bold green]" if verdict.passed else
                  "[bold red]FAIL[/bold red]", f"evidence bundle: {verdict.bundle}")

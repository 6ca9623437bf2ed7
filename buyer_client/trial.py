"""The buyer's side of steps 2-6: check the offer, encrypt, upload, decrypt, score."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.table import Table

from buyer_client.client import SellerClient
from buyer_client.planner import DEFAULT_MBPS, TrialCost, choose, trial_cost
from buyer_client.report import classification_metrics, render_metrics
from buyer_client.ui import Bars
from buyer_client.workspace import TrialFolder, Workspace
from common.errors import BadInput, Exhausted, NotFound, Refused
from common.he import engine
from common.he.decryptor import decrypt
from common.protocol import ModelListing, Offer, Signed
from common.signing import fingerprint, keys_digest
from common.tabular import load_table
from common.tail import apply_tail, predicted_labels
from common.trust import check_security, open_offer, open_receipt

log = logging.getLogger(__name__)
FloatArray = npt.NDArray[np.float64]
AUTO = "auto"  # --packing: the planner's choice


@dataclass(frozen=True)
class TrialResult:
    folder: TrialFolder
    offer: Offer
    report: dict[str, Any]


def seller_key(client: SellerClient, workspace: Workspace, console: Console) -> bytes:
    """The seller's pinned identity key; pinned on first contact (trust on first use)."""
    return seller_catalog(client, workspace, console)[1]


def seller_catalog(client: SellerClient, workspace: Workspace, console: Console
                   ) -> tuple[list[ModelListing], bytes]:
    """The seller's listings and identity key, which is pinned on first contact (trust on
    first use)."""
    pinned = workspace.pinned_key(client.address)
    listings, presented = client.list_models()
    workspace.pin_key(client.address, presented)
    if pinned is None:
        console.print(f"pinned seller key {fingerprint(presented)} for {client.address} "
                      f"(first contact)")
    return listings, presented


def run_trial(client: SellerClient, workspace: Workspace, console: Console, *, model_id: str,
              data: Path, label_column: str | None, max_rows: int | None,
              min_security: int, packing: str = AUTO, link_mbps: float = DEFAULT_MBPS
              ) -> TrialResult:
    listings, key = seller_catalog(client, workspace, console)
    listing = next((m for m in listings if m.model_id == model_id), None)
    if listing is None:
        raise NotFound(f"the seller lists no model {model_id!r}; 'gimme-buyer models' shows "
                       f"what it offers")
    table = load_table(data, listing.input_columns, label_column)
    rows, labels = table.rows, table.labels
    if max_rows is not None:
        rows, labels = rows[:max_rows], labels[:max_rows] if labels else labels
    costs = choose(listing.estimates, len(rows), len(listing.input_columns),
                   max(len(listing.class_labels), 1), link_mbps)
    chosen = _pick(costs, packing, model_id)
    _show_plan(console, costs, chosen, len(rows), link_mbps, packing == AUTO)

    signed_offer = client.open_trial(model_id, chosen.packing)
    offer = open_offer(signed_offer, key, model_id)
    if offer.encoding.packing != chosen.packing:
        raise Refused(f"asked for {chosen.packing} packing, offered {offer.encoding.packing}")
    derived = check_security(offer.params, min_security)
    console.print(f"offer {offer.trial_id}: {offer.params.describe()} -> {derived}-bit "
                  f"security (re-derived); price {offer.price_cents / 100:.2f}; tolerance "
                  f"{offer.tolerance:.2g}; {offer.trial_rows_remaining} trial rows left")
    if offer.encoding.input_columns != listing.input_columns:
        raise Refused("the offer's input columns differ from the seller's listing")
    if len(rows) > offer.trial_rows_remaining:
        raise Exhausted(f"{data} has {len(rows)} rows but only {offer.trial_rows_remaining} "
                        f"trial rows are left for {model_id!r}; pass --rows "
                        f"{offer.trial_rows_remaining} to test a subset")
    rows, clipped = _clip(rows, offer)
    if clipped:
        console.print(f"[yellow]note:[/yellow] {clipped} value(s) outside the seller's "
                      f"calibrated input ranges were clipped to them (the approximation holds "
                      f"there); the same clipped rows are used at verification")

    folder = workspace.new_trial(model_id, offer.trial_id)
    folder.save_signed("offer", signed_offer)
    folder.save_rows(rows, labels or ())
    measures: dict[str, Any] = {"rows": len(rows)}
    started = time.perf_counter()

    cc = engine.build_context(offer.params, offer.params.claimed_security_bits)
    tick = time.perf_counter()
    secret, public = engine.generate_keys(cc, offer.key_tag)
    keys = {"relin_key": engine.serialize_relin_key(offer.key_tag),
            "public_key": engine.serialize(public)}
    if offer.encoding.rotation_indices:
        keys["rotation_keys"] = engine.generate_rotation_keys(
            cc, secret, offer.encoding.rotation_indices)
    measures["keygen_s"] = time.perf_counter() - tick
    folder.save_secret_key(engine.serialize(secret))

    layout = offer.encoding.layout()
    batches = [rows[i:i + layout.slots] for i in range(0, len(rows), layout.slots)]
    result_paths: list[list[str]] = []
    with Bars(console) as bars:
        key_bytes = sum(len(k) for k in keys.values())
        uploaded_keys = client.upload_keys(offer.trial_id, keys,
                                           bars.transfer("upload keys", key_bytes))
        if uploaded_keys != keys_digest(*keys.values()):
            raise BadInput("the seller acknowledged other keys than were sent")
        measures.update(packing=layout.kind, key_bytes=key_bytes, upload_bytes=key_bytes,
                        download_bytes=0, encrypt_s=0.0, evaluate_s=0.0)

        def encrypt(index: int) -> list[bytes]:
            tick = time.perf_counter()
            vectors = layout.encode(batches[index])
            bar = bars.count(f"encrypt batch {index + 1}/{len(batches)}", len(vectors))
            blobs = []
            for vector in vectors:
                blobs.append(engine.ciphertext_bytes(engine.encrypt_vector(cc, public, vector)))
                bar(len(blobs))
            measures["encrypt_s"] += time.perf_counter() - tick
            return blobs

        # batch k+1 is encrypted while the seller evaluates batch k (OpenFHE releases the GIL)
        encryptor = ThreadPoolExecutor(1)
        pending = encryptor.submit(encrypt, 0)
        for index, batch in enumerate(batches):
            inputs = pending.result()
            if index + 1 < len(batches):
                pending = encryptor.submit(encrypt, index + 1)
            upload = sum(len(b) for b in inputs)
            tick = time.perf_counter()
            result_count = layout.result_count(len(batch), offer.output.score_count)
            results, receipt = client.evaluate(
                offer.trial_id, index, len(batch), inputs,
                result_count=result_count,
                max_result_bytes=_max_result_bytes(offer),
                on_upload=bars.transfer(f"upload batch {index + 1} ({len(batch)} rows)", upload),
                on_progress=bars.steps(f"seller evaluates batch {index + 1}"),
                on_download=bars.transfer(f"download results {index + 1}",
                                          result_count * _result_bytes_hint(offer)),
            )
            measures["evaluate_s"] += time.perf_counter() - tick
            open_receipt(receipt, key, offer, signed_offer.payload, index, len(batch),
                         uploaded_keys, inputs, results)
            folder.save_signed(f"receipt-{index}", receipt)
            for j, blob in enumerate(inputs):  # evidence: what was tested, for an arbiter
                folder.write(f"inputs/batch-{index}/ct-{j}.bin", blob)
            result_paths.append([str(folder.write(f"results/batch-{index}/score-{i}.bin", r))
                                 for i, r in enumerate(results)])
            measures["upload_bytes"] += upload
            measures["download_bytes"] += sum(len(r) for r in results)
            measures.setdefault("ciphertext_bytes", len(inputs[0]))
            measures.setdefault("result_bytes", len(results[0]))
        encryptor.shutdown()

    tick = time.perf_counter()
    scores = np.concatenate([
        decrypt(offer.params, engine.serialize(secret), offer.key_tag,
                offer.output.result_level, paths, layout, len(batch), offer.output.score_count)
        for paths, batch in zip(result_paths, batches, strict=True)])
    measures["decrypt_s"] = time.perf_counter() - tick
    measures["total_s"] = time.perf_counter() - started
    np.save(folder.path / "scores.npy", scores)
    measures["estimated"] = _estimate(offer, len(rows), link_mbps)
    report = _report(offer, scores, labels, measures)
    folder.save_json("report.json", report)
    _show(console, offer, report, folder)
    return TrialResult(folder, offer, report)


def _clip(rows: FloatArray, offer: Offer) -> tuple[FloatArray, int]:
    """Clip to the seller's calibrated ranges (none are given for exact models)."""
    if not offer.encoding.input_min:
        return rows, 0
    low = np.array(offer.encoding.input_min)
    high = np.array(offer.encoding.input_max)
    clipped = np.clip(rows, low, high)
    return clipped, int(np.count_nonzero(clipped != rows))


def _result_bytes_hint(offer: Offer) -> int:
    towers = offer.params.multiplicative_depth + 1 - offer.output.result_level
    return 2 * towers * offer.params.ring_dimension * 8


def _max_result_bytes(offer: Offer) -> int:
    """A cap on one result ciphertext; the decryptor checks its exact layout."""
    return _result_bytes_hint(offer) + (64 << 10)


def _estimate(offer: Offer, rows: int, link_mbps: float) -> dict[str, Any]:
    """What the seller's signed estimate predicts for this trial."""
    cost = trial_cost(offer.estimate, rows, len(offer.encoding.input_columns),
                      offer.output.score_count, link_mbps)
    return {"packing": cost.packing, "upload_bytes": cost.upload_bytes,
            "download_bytes": cost.download_bytes, "seller_compute_s": cost.compute_s,
            "encrypt_s": cost.encrypt_s}


def _pick(costs: list[TrialCost], packing: str, model_id: str) -> TrialCost:
    if packing == AUTO:
        return costs[0]
    for cost in costs:
        if cost.packing == packing:
            return cost
    raise BadInput(f"{model_id} is not offered with {packing} packing; it is offered with "
                   f"{', '.join(c.packing for c in costs)} (or use --packing auto)")


def _show_plan(console: Console, costs: list[TrialCost], chosen: TrialCost, rows: int,
               link_mbps: float, automatic: bool) -> None:
    table = Table("packing", "batches", "upload MB", "download MB", "your encryption s",
                  "seller s", f"transfer s at {link_mbps:g} Mbit/s", "estimated s",
                  title=f"planner: {rows} rows, seller's figures")
    for cost in costs:
        mark = " (chosen)" if cost is chosen else ""
        table.add_row(cost.packing + mark, str(cost.batches), f"{cost.upload_bytes / 1e6:.1f}",
                      f"{cost.download_bytes / 1e6:.1f}", f"{cost.encrypt_s:.2f}",
                      f"{cost.compute_s:.2f}", f"{cost.transfer_s:.2f}", f"{cost.total_s:.2f}")
    console.print(table)
    if not automatic:
        console.print(f"packing {chosen.packing}: chosen with --packing")


def _report(offer: Offer, scores: FloatArray, labels: tuple[str, ...] | None,
            measures: dict[str, Any]) -> dict[str, Any]:
    outputs = apply_tail(scores, offer.output.tail)
    predicted = predicted_labels(outputs, offer.output.class_labels)
    report: dict[str, Any] = {
        "model_id": offer.model_id,
        "trial_id": offer.trial_id,
        "model_commitment": offer.model_commitment.hex(),
        "tolerance": offer.tolerance,
        "params": offer.params.to_dict(),
        "measurements": measures,
        "predictions": predicted,
    }
    if labels and predicted:
        report["metrics"] = classification_metrics(labels, predicted, offer.output.class_labels)
    return report


def _show(console: Console, offer: Offer, report: dict[str, Any], folder: TrialFolder) -> None:
    m = report["measurements"]
    console.print(
        f"trial {offer.trial_id} ({m['packing']}): {m['rows']} rows; keygen "
        f"{m['keygen_s']:.2f}s, encrypt {m['encrypt_s']:.2f}s, upload "
        f"{m['upload_bytes'] / 1e6:.1f} MB (keys {m['key_bytes'] / 1e6:.1f} MB), seller "
        f"{m['evaluate_s']:.2f}s, download "
        f"{m['download_bytes'] / 1e6:.1f} MB, decrypt {m['decrypt_s']:.2f}s, total "
        f"{m['total_s']:.2f}s")
    e = m["estimated"]
    console.print(
        f"seller's estimate ({e['packing']}): upload {e['upload_bytes'] / 1e6:.1f} MB "
        f"(measured {m['upload_bytes'] / 1e6:.1f}), download {e['download_bytes'] / 1e6:.1f} "
        f"MB (measured {m['download_bytes'] / 1e6:.1f}), seller computing "
        f"{e['seller_compute_s']:.2f}s (measured round trip {m['evaluate_s']:.2f}s)")
    if "metrics" in report:
        render_metrics(console, report["metrics"], f"{offer.model_id} on your data (encrypted)")
    else:
        console.print("no labels given: predictions are in the report")
    console.print(f"report: {folder.path / 'report.json'}")


def signed_offer(folder: TrialFolder) -> Signed:
    return folder.load_signed("offer")

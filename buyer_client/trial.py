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
from buyer_client.report import (
    classification_metrics,
    regression_metrics,
    regression_targets,
    render_metrics,
    render_regression,
)
from buyer_client.ui import Bars
from buyer_client.workspace import TrialFolder, Workspace
from common.errors import BadInput, Exhausted, NotFound, Refused, Unavailable, WrongState
from common.evidence import input_name, load_rows, result_name
from common.he import engine
from common.he.decryptor import decrypt
from common.he.packing import Packing
from common.he.params import public_key_seed
from common.he.plan import model_scores
from common.protocol import ModelListing, Offer, Signed
from common.signing import fingerprint, keys_digest
from common.tabular import load_table
from common.tail import apply_tail, predicted_labels
from common.trust import check_security, open_offer, open_receipt

log = logging.getLogger(__name__)
FloatArray = npt.NDArray[np.float64]
AUTO = "auto"  # --packing: the planner's choice
KEYS_DIGEST = "keys.sha256"  # written once the seller accepted the trial's keys
PUBLIC_KEY = "public.key"  # to encrypt the rest of a resumed trial
EVALUATE_ATTEMPTS = 3


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
              data: Path | None, label_column: str | None, max_rows: int | None,
              min_security: int, packing: str = AUTO, link_mbps: float = DEFAULT_MBPS,
              resume: bool = False, max_tolerance: float | None = None) -> TrialResult:
    """A new trial of `model_id` on `data`, or (`resume`) the newest interrupted one.

    Ctrl-C ends it with one line saying where it stopped and how to finish it: the seller
    refunds a batch whose results never went out and keeps those it sent (FetchResults),
    and the trial folder keeps the offer, keys digest, rows and each batch's inputs, so
    `--resume` fetches or re-evaluates exactly the batches that have no receipt yet.
    """
    folders: list[TrialFolder] = []  # the trial's folder, once it has one
    try:
        return _trial(client, workspace, console, folders, model_id=model_id, data=data,
                      label_column=label_column, max_rows=max_rows, min_security=min_security,
                      packing=packing, link_mbps=link_mbps, resume=resume,
                      max_tolerance=max_tolerance)
    except KeyboardInterrupt:
        if folders and folders[0].has(KEYS_DIGEST):
            console.print(f"interrupted: trial {folders[0].trial_id} is unfinished (batches "
                          f"without results are refunded, results the seller computed are "
                          f"kept); finish it with 'gimme-buyer trial {model_id} --resume'")
        else:
            console.print("interrupted before the seller accepted the trial's keys: nothing "
                          "was charged; run the same command again to start over")
        raise


def _trial(client: SellerClient, workspace: Workspace, console: Console,
           folders: list[TrialFolder], *, model_id: str, data: Path | None,
           label_column: str | None, max_rows: int | None, min_security: int, packing: str,
           link_mbps: float, resume: bool, max_tolerance: float | None) -> TrialResult:
    listings, key = seller_catalog(client, workspace, console)
    if resume:
        folder = workspace.unfinished_trial(model_id)
        signed_offer = folder.load_signed("offer")
        offer = open_offer(signed_offer, key, model_id)
        check_security(offer.params, min_security)
        rows, stored_labels = load_rows(folder)
        labels = stored_labels or None
        if not folder.has(KEYS_DIGEST):
            raise WrongState(f"trial {offer.trial_id} stopped before the seller accepted its "
                             f"keys, so nothing was charged: start a new trial (without "
                             f"--resume)")
        console.print(f"resuming trial {offer.trial_id}: {len(rows)} rows")
    else:
        if data is None:
            raise BadInput("pass --data FILE with the rows to test (or --resume to finish an "
                           "interrupted trial)")
        signed_offer, offer, rows, labels = _open(client, console, key, listings, model_id,
                                                  data, label_column, max_rows, min_security,
                                                  packing, link_mbps, max_tolerance)
        folder = workspace.new_trial(model_id, offer.trial_id)
        folder.save_signed("offer", signed_offer)
        folder.save_rows(rows, labels or ())
    folders.append(folder)
    measures: dict[str, Any] = {"rows": len(rows)}
    started = time.perf_counter()

    cc = engine.build_context(offer.params, offer.params.claimed_security_bits)
    keys: dict[str, bytes] = {}
    if resume:  # the seller holds the keys this trial uploaded
        public = engine.load_public_key(folder.read(PUBLIC_KEY))
        measures["keygen_s"] = 0.0
    else:
        tick = time.perf_counter()
        secret, public = engine.generate_keys(
            cc, offer.key_tag, public_key_seed(offer.trial_id, offer.key_tag))
        keys = {"relin_key": engine.serialize_relin_key(offer.key_tag),
                "public_key": engine.public_key_bytes(public)}
        if offer.encoding.rotation_indices:
            keys["rotation_keys"] = engine.generate_rotation_keys(
                cc, secret, offer.encoding.rotation_indices)
        measures["keygen_s"] = time.perf_counter() - tick
        folder.save_secret_key(engine.serialize(secret))
        folder.write(PUBLIC_KEY, keys["public_key"])

    layout = offer.encoding.layout()
    batches = [rows[i:i + layout.slots] for i in range(0, len(rows), layout.slots)]
    with Bars(console) as bars:
        key_bytes = sum(len(k) for k in keys.values())
        if keys:
            uploaded_keys = client.upload_keys(offer.trial_id, keys,
                                               bars.transfer("upload keys", key_bytes))
            if uploaded_keys != keys_digest(*keys.values()):
                raise BadInput("the seller acknowledged other keys than were sent")
            folder.write(KEYS_DIGEST, uploaded_keys.hex().encode())
        uploaded_keys = bytes.fromhex(folder.read(KEYS_DIGEST).decode())
        measures.update(packing=layout.kind, key_bytes=key_bytes, upload_bytes=key_bytes,
                        download_bytes=0, encrypt_s=0.0, evaluate_s=0.0)

        def inputs_of(index: int) -> list[bytes]:
            """The batch's ciphertexts, encrypted once and kept (evidence, and --resume)."""
            count = layout.ciphertexts(len(batches[index]), len(offer.encoding.input_columns))
            if folder.has(input_name(index, count - 1)):
                return [folder.read(input_name(index, j)) for j in range(count)]
            tick = time.perf_counter()
            vectors = layout.encode(offer.encoding.encoded(batches[index]))
            bar = bars.count(f"encrypt batch {index + 1}/{len(batches)}", len(vectors))
            blobs = []
            for vector in vectors:
                blobs.append(engine.ciphertext_bytes(engine.encrypt_vector(cc, public, vector)))
                bar(len(blobs))
            for j, blob in enumerate(blobs):
                folder.write(input_name(index, j), blob)
            measures["encrypt_s"] += time.perf_counter() - tick
            return blobs

        # batches with a receipt came back before an interruption
        todo = [i for i in range(len(batches)) if not folder.has(f"receipt-{i}.json")]
        # batch k+1 is encrypted while the seller evaluates batch k (OpenFHE releases the GIL)
        encryptor = ThreadPoolExecutor(1)
        try:
            pending = encryptor.submit(inputs_of, todo[0]) if todo else None
            for position, index in enumerate(todo):
                assert pending is not None
                inputs = pending.result()
                if position + 1 < len(todo):
                    pending = encryptor.submit(inputs_of, todo[position + 1])
                batch = batches[index]
                upload = sum(len(b) for b in inputs)
                tick = time.perf_counter()
                results, receipt = _evaluated(client, offer, index, len(batch), inputs, bars,
                                              fetch_first=resume)
                measures["evaluate_s"] += time.perf_counter() - tick
                open_receipt(receipt, key, offer, signed_offer.payload, index, len(batch),
                             uploaded_keys, inputs, results)
                for i, r in enumerate(results):
                    folder.write(result_name(index, i), r)
                folder.save_signed(f"receipt-{index}", receipt)  # last: the batch is done
                measures["upload_bytes"] += upload
                measures["download_bytes"] += sum(len(r) for r in results)
                measures.setdefault("ciphertext_bytes", len(inputs[0]))
                measures.setdefault("result_bytes", len(results[0]))
        finally:
            encryptor.shutdown(wait=False, cancel_futures=True)

    tick = time.perf_counter()
    secret_bytes = folder.load_secret_key()
    scores = np.concatenate([
        decrypt(offer.params, secret_bytes, offer.key_tag, offer.output.result_level,
                [str(folder.path / result_name(index, i))
                 for i in range(layout.result_count(len(batch), offer.output.score_count))],
                layout, len(batch), offer.output.score_count, results=True)
        for index, batch in enumerate(batches)])
    measures["decrypt_s"] = time.perf_counter() - tick
    measures["total_s"] = time.perf_counter() - started
    np.save(folder.path / "scores.npy", scores)
    measures["estimated"] = _estimate(offer, len(rows), link_mbps)
    report = _report(offer, scores, labels, measures)
    folder.save_json("report.json", report)
    workspace.finish_trial(model_id, folder)
    _show(console, offer, report, folder)
    return TrialResult(folder, offer, report)


def _open(client: SellerClient, console: Console, key: bytes, listings: list[ModelListing],
          model_id: str, data: Path, label_column: str | None, max_rows: int | None,
          min_security: int, packing: str, link_mbps: float, max_tolerance: float | None
          ) -> tuple[Signed, Offer, FloatArray, tuple[str, ...] | None]:
    """Plan, open and check the offer; the rows to test (clipped to the offer's ranges)."""
    listing = next((m for m in listings if m.model_id == model_id), None)
    if listing is None:
        raise NotFound(f"the seller lists no model {model_id!r}; 'gimme-buyer models' shows "
                       f"what it offers")
    table = load_table(data, listing.input_columns, label_column)
    rows, labels = table.rows, table.labels
    if max_rows is not None:
        rows, labels = rows[:max_rows], labels[:max_rows] if labels else labels
    if labels and not listing.class_labels:  # scored against numbers: check them first
        regression_targets(labels, model_id)
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
    if max_tolerance is not None and offer.tolerance > max_tolerance:
        raise Refused(f"the seller's signed tolerance {offer.tolerance:.3g} (how far the model "
                      f"you would buy may be from the trial's results) is above your "
                      f"--max-tolerance {max_tolerance:g}: refusing the offer, nothing was "
                      f"encrypted or sent; raise --max-tolerance or ask the seller for a "
                      f"more precise listing")
    if offer.encoding.input_columns != listing.input_columns:
        raise Refused("the offer's input columns differ from the seller's listing")
    layout, scores = offer.encoding.layout(), offer.output.score_count
    charged = _charged(layout, scores, len(rows))
    if charged > offer.trial_rows_remaining:
        fits = max((n for n in _candidates(len(rows))
                    if _charged(layout, scores, n) <= offer.trial_rows_remaining), default=0)
        raise Exhausted(f"{data} has {len(rows)} rows, charged as {charged}, but only "
                        f"{offer.trial_rows_remaining} trial rows are left for {model_id!r}"
                        + (f"; pass --rows {fits} to test a subset" if fits else ""))
    if charged != len(rows):
        console.print(f"note: {len(rows)} rows are charged as {charged}: a batch pays for "
                      f"every row its results can carry ({layout.kind}: rows rounded up to "
                      f"the fold period); {charged - len(rows)} more rows would cost nothing")
    rows, clipped = _clip(rows, offer)
    if clipped.size:
        shown = ", ".join(str(r) for r in clipped[:20]) + (", ..." if clipped.size > 20 else "")
        console.print(f"[yellow]note:[/yellow] {clipped.size} row(s) have values outside the "
                      f"offer's input domain and are clipped to it before encryption (rows "
                      f"{shown}, counting from 0); the plan's ranges are guaranteed on the "
                      f"domain, and verification uses the same clipped rows")
    return signed_offer, offer, rows, labels


def _charged(layout: Packing, scores: int, rows: int) -> int:
    """What `rows` rows cost in trial rows, in batches of at most `layout.slots`."""
    return sum(layout.charged_rows(min(layout.slots, rows - start), scores)
               for start in range(0, rows, layout.slots))


def _candidates(rows: int) -> list[int]:
    """Row counts worth offering as a subset: powers of two below `rows`, and `rows`."""
    return [*(1 << k for k in range(rows.bit_length()) if 1 << k < rows), rows]


def _evaluated(client: SellerClient, offer: Offer, index: int, rows: int,
               inputs: list[bytes], bars: Bars, *, fetch_first: bool
               ) -> tuple[list[bytes], Signed]:
    """The batch's results and receipt. When the reply is lost (the stream broke), they
    are fetched again: the seller keeps what it computed and sent; a batch whose results
    never went out was refunded and is evaluated again."""
    result_count = offer.encoding.layout().result_count(rows, offer.output.score_count)
    download = bars.transfer(f"download results {index + 1}",
                             result_count * _result_bytes_hint(offer))
    fetch = fetch_first
    for attempt in range(EVALUATE_ATTEMPTS):
        try:
            if fetch:
                try:
                    return client.fetch_results(offer.trial_id, index,
                                                result_count=result_count,
                                                max_result_bytes=_max_result_bytes(offer),
                                                on_download=download)
                except NotFound:
                    pass  # not evaluated, or refunded: evaluate it
            return client.evaluate(
                offer.trial_id, index, rows, inputs, result_count=result_count,
                max_result_bytes=_max_result_bytes(offer),
                on_upload=bars.transfer(f"upload batch {index + 1} ({rows} rows)",
                                        sum(len(b) for b in inputs)),
                on_progress=bars.steps(f"seller evaluates batch {index + 1}"),
                on_download=download)
        except Unavailable as exc:
            lost = exc
            fetch = True
            if attempt + 1 < EVALUATE_ATTEMPTS:
                time.sleep(attempt + 1)  # a restarting seller, a flapping link
    raise Unavailable(f"the seller's reply to batch {index + 1} was lost "
                      f"{EVALUATE_ATTEMPTS} times ({lost.message}); it keeps the results it "
                      f"sent and refunds the rest: finish the trial with 'gimme-buyer trial "
                      f"{offer.model_id} --resume' once it is back")


def _clip(rows: FloatArray, offer: Offer) -> tuple[FloatArray, npt.NDArray[np.int64]]:
    """Rows clipped to the offer's input domain (none is given for exact models), and the
    indices of the rows that changed."""
    if not offer.encoding.input_min:
        return rows, np.zeros(0, dtype=np.int64)
    low = np.array(offer.encoding.input_min)
    high = np.array(offer.encoding.input_max)
    clipped = np.clip(rows, low, high)
    return clipped, np.flatnonzero((clipped != rows).any(axis=1)).astype(np.int64)


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
    outputs = apply_tail(model_scores(scores, offer.output.range_check), offer.output.tail)
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
    elif outputs.shape[1] == 1 and not predicted:  # a regression: the predicted values
        report["predictions"] = outputs[:, 0].tolist()
        if labels:
            report["metrics"] = regression_metrics(regression_targets(labels, offer.model_id),
                                                   report["predictions"])
    if offer.output.range_check:  # above 1 only for rows outside the plan's ranges
        report["rows_outside_ranges"] = np.flatnonzero(
            scores[:, -1] > 1 + offer.plan_tolerance).tolist()
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
    title = f"{offer.model_id} on your data (encrypted)"
    if report.get("metrics", {}).get("kind") == "regression":
        render_regression(console, report["metrics"], title)
    elif "metrics" in report:
        render_metrics(console, report["metrics"], title)
    else:
        console.print("no labels given: predictions are in the report")
    outside = report.get("rows_outside_ranges", [])
    if outside:
        shown = ", ".join(str(r) for r in outside[:20]) + (", ..." if len(outside) > 20 else "")
        console.print(
            f"[yellow]warning:[/yellow] {len(outside)} of {m['rows']} rows left the ranges "
            f"the seller's approximation is guaranteed on (rows {shown}; 0-based, all in the "
            f"report): their results may differ from the model you would buy by more than "
            f"the tolerance, which verification does not count against the seller. A row "
            f"just outside a range may go unnamed here; 'gimme-buyer verify' names every "
            f"one after purchase")
    console.print(f"report: {folder.path / 'report.json'}")


def signed_offer(folder: TrialFolder) -> Signed:
    return folder.load_signed("offer")

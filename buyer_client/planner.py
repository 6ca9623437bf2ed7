"""Which packing a trial uses: the seller's measured figures, scaled to this test set.

Slot-per-sample sends one ciphertext per column whatever the row count (up to a full
batch) and needs only the relinearization key; feature packing sends one ciphertext per
`rows_per_ciphertext` rows but needs rotation keys. Few rows favour feature packing,
many favour slot-per-sample; the link speed decides where.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.he.packing import SLOT_PER_SAMPLE
from common.protocol import Estimate

DEFAULT_MBPS = 100.0  # the link the estimate assumes unless told (--link-mbps)


@dataclass(frozen=True)
class TrialCost:
    estimate: Estimate
    batches: int
    upload_bytes: int
    download_bytes: int
    compute_s: float  # seller's evaluation time
    transfer_s: float
    encrypt_s: float  # the buyer's encryption

    @property
    def packing(self) -> str:
        return self.estimate.packing

    @property
    def total_s(self) -> float:
        return self.compute_s + self.transfer_s + self.encrypt_s


def trial_cost(estimate: Estimate, rows: int, columns: int, scores: int,
               link_mbps: float) -> TrialCost:
    """What a trial of `rows` rows costs in this packing (batches of at most `slots` rows)."""
    layout = estimate.layout()
    sizes = [min(layout.slots, rows - start) for start in range(0, rows, layout.slots)]
    inputs = sum(layout.ciphertexts(n, columns) for n in sizes)
    results = sum(layout.result_count(n, scores) for n in sizes)
    # the seller's figure is per batch (slot-per-sample) or per ciphertext (feature-packed)
    units = sum(1 if layout.kind == SLOT_PER_SAMPLE else layout.ciphertexts(n, columns)
                for n in sizes)
    upload = estimate.key_bytes + inputs * estimate.ciphertext_bytes
    download = results * estimate.result_bytes
    return TrialCost(estimate, len(sizes), upload, download,
                     estimate.setup_seconds + units * estimate.evaluate_seconds,
                     (upload + download) * 8 / (link_mbps * 1e6),
                     inputs * estimate.encrypt_seconds)


def choose(estimates: tuple[Estimate, ...], rows: int, columns: int, scores: int,
           link_mbps: float) -> list[TrialCost]:
    """Every offered packing's cost, cheapest (in estimated seconds) first."""
    costs = [trial_cost(e, rows, columns, scores, link_mbps) for e in estimates]
    return sorted(costs, key=lambda cost: cost.total_s)

"""The buyer's packing planner on the seller's figures."""

from __future__ import annotations

import subprocess

import pytest

from buyer_client.planner import choose, trial_cost
from common.protocol import Estimate
from tests.conftest import BIN

MB = 1_000_000
# shaped like digits-mlp at N=16384: 64 columns, 10 scores, 8192 slots, period 64
SLOTS = Estimate("slot-per-sample", 12 * MB, 2 * MB, MB, 0.6, 8192, 1, 0.2, 0.01)
PACKED = Estimate("feature-packed", 70 * MB, 2 * MB, MB, 0.1, 128, 64, 1.0, 0.01)


def test_costs_count_ciphertexts_keys_and_evaluations() -> None:
    few = trial_cost(PACKED, 200, 64, 10, link_mbps=100)
    assert (few.batches, few.upload_bytes, few.download_bytes) == (1, 74 * MB, 2 * MB)
    assert few.compute_s == pytest.approx(1.0 + 0.2)  # checking the keys, two ciphertexts
    assert few.transfer_s == pytest.approx(76 * 8 / 100)
    assert few.encrypt_s == pytest.approx(0.02)  # two ciphertexts, on the buyer's side
    assert few.total_s == pytest.approx(1.2 + 76 * 8 / 100 + 0.02)
    many = trial_cost(SLOTS, 9000, 64, 10, link_mbps=100)  # two batches
    assert (many.batches, many.upload_bytes, many.download_bytes) == (2, 268 * MB, 20 * MB)
    assert many.compute_s == pytest.approx(0.2 + 1.2)
    assert many.encrypt_s == pytest.approx(128 * 0.01)  # 64 columns in each batch


@pytest.mark.parametrize(("rows", "link", "expected"), [
    (10, 100, "feature-packed"),  # 72 MB against 140 MB
    (2000, 100, "feature-packed"),  # 102 MB against 140 MB
    (8192, 100, "slot-per-sample"),  # 64 ciphertexts either way; keys and compute decide
    (2000, 10_000, "slot-per-sample"),  # a fast link: compute decides
    (10, 10_000, "feature-packed"),  # few rows: 1 ciphertext to encrypt, not 64
])
def test_the_planner_picks_the_cheaper_packing(rows: int, link: float, expected: str) -> None:
    costs = choose((SLOTS, PACKED), rows, 64, 10, link)
    assert costs[0].packing == expected
    assert costs[0].total_s <= costs[1].total_s


@pytest.mark.parametrize(("value", "message"), [("0", "0 must be above 0 (Mbit/s)"),
                                                ("fast", "'fast' is not a number")])
def test_a_link_speed_that_is_no_speed_is_refused(value: str, message: str) -> None:
    done = subprocess.run([str(BIN / "gimme-buyer"), "trial", "digits-mlp", "--data", "x.csv",
                           "--link-mbps", value], capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr

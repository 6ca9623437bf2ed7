"""Findings 3 and 6: crafted public keys, and racing key uploads, against the real daemon.

3. Circuit privacy re-randomizes each result with the buyer's public key (b, a). A zero,
   constant or otherwise chosen `a` would let the re-randomization mask nothing, so the
   seller requires the `a` the offer derives (engine.public_key_is_seeded).
6. Every key upload lives in its own directory named by its digest, the check reads those
   bytes, and a refused upload leaves nothing behind (seller_server.jobs)."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest

from buyer_client.client import SellerClient
from common import errors
from common.he import engine, rns
from common.he.packing import SLOT_PER_SAMPLE
from common.he.params import public_key_seed
from common.signing import keys_digest
from common.trust import open_offer
from seller_server.store import Store
from tests.conftest import Daemon

LR = "breast-cancer-lr"
NOT_SEEDED = "public key: its uniform half is not the one the offer derives"


class _Buyer:
    def __init__(self, daemon: Daemon, identity: str) -> None:
        self.client = SellerClient(daemon.address, daemon.tls(identity))
        _listings, key = self.client.list_models()
        self.offer = open_offer(self.client.open_trial(LR, SLOT_PER_SAMPLE), key, LR)
        self.cc = engine.build_context(self.offer.params, 128)
        self.seed = public_key_seed(self.offer.trial_id, self.offer.key_tag)
        self.secret, self.public = engine.generate_keys(self.cc, self.offer.key_tag, self.seed)
        self.keys = {"relin_key": engine.serialize_relin_key(self.offer.key_tag),
                     "public_key": engine.public_key_bytes(self.public)}

    def upload(self, **replaced: bytes) -> bytes:
        return self.client.upload_keys(self.offer.trial_id, self.keys | replaced,
                                       lambda n: None)

    def public_key_with(self, b: rns.U64 | None, a: rns.U64 | None) -> bytes:
        """The honest public key's bytes with its halves replaced (same value per tower)."""
        blob = bytearray(self.keys["public_key"])
        layout = rns.find_layout(bytes(blob), self.cc.GetRingDimension(),
                                 engine.ring_modulus(self.cc))
        for element, values in ((0, b), (1, a)):
            if values is None:
                continue
            for t in range(layout.towers):
                start = layout.starts[element][t]
                blob[start:start + 8 * layout.ring_dimension] = (
                    values.astype("<u8").tobytes())
        return bytes(blob)

    def evaluate_one_row(self) -> None:
        vectors = self.offer.encoding.layout().encode(np.zeros((1, 30)))
        blobs = [engine.ciphertext_bytes(engine.encrypt_vector(self.cc, self.public, v))
                 for v in vectors]
        self.client.evaluate(self.offer.trial_id, 0, 1, blobs, result_count=2,
                             max_result_bytes=1 << 22, on_upload=lambda n: None,
                             on_progress=lambda p: None, on_download=lambda n: None)


def test_public_keys_whose_uniform_half_the_buyer_chose_are_refused(lr_seller: Daemon
                                                                    ) -> None:
    buyer = _Buyer(lr_seller, "frank")
    n = buyer.cc.GetRingDimension()
    zero, one = np.zeros(n, np.uint64), np.ones(n, np.uint64)
    # all zero; a constant (1 in every evaluation); a sparse one; a uniform one the buyer
    # drew itself (where a trapdoor a = r t, r small, would hide)
    sparse = zero.copy()
    sparse[::64] = 12345
    drawn = rns.seeded_uniform(b"the buyer's choice", [2**61 - 1], n)[0]
    for crafted in (buyer.public_key_with(zero, zero), buyer.public_key_with(None, one),
                    buyer.public_key_with(None, sparse), buyer.public_key_with(None, drawn)):
        with pytest.raises(errors.BadInput, match=NOT_SEEDED):
            buyer.upload(public_key=crafted)
    # the key pair the offer asks for is taken, and evaluates
    assert buyer.upload() == keys_digest(*buyer.keys.values())
    buyer.evaluate_one_row()


def test_racing_key_uploads_leave_only_the_checked_set(lr_seller: Daemon) -> None:
    buyer = _Buyer(lr_seller, "erin")
    bad = bytearray(buyer.keys["relin_key"])
    bad[100] ^= 0xFF  # a header byte: refused by the template
    honest_digest = keys_digest(*buyer.keys.values())
    refused: list[Exception] = []

    def upload(**replaced: bytes) -> None:
        try:
            buyer.upload(**replaced)
        except errors.BadInput as exc:
            refused.append(exc)

    for _round in range(3):
        threads = [threading.Thread(target=upload, kwargs=kwargs)
                   for kwargs in ({}, {"relin_key": bytes(bad)}, {}, {"relin_key": bytes(bad)})]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(refused) == 6 and all("relinearization key" in str(e) for e in refused)
    store = Store(lr_seller.state / "gimme.sqlite")
    try:
        assert store.trial(buyer.offer.trial_id, "erin").keys_sha256 == honest_digest
    finally:
        store.close()
    # on disk: exactly the recorded set, byte for byte; nothing refused was left behind
    directory = lr_seller.state / "spool" / "trials" / buyer.offer.trial_id
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    assert {p.parent.name for p in files} == {f"keys-{honest_digest.hex()}"}
    assert {hashlib.sha256(p.read_bytes()).digest() for p in files} == {
        hashlib.sha256(data).digest() for data in buyer.keys.values()}
    buyer.evaluate_one_row()

"""Junk at the gRPC edge (finding 16 of issue 10): malformed protobuf, requests in the wrong
state, oversized client strings, and a fuzz of every RPC with mutated real request bytes."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from gimme.v1 import gimme_pb2 as pb
from google.protobuf import message_factory

from buyer_client.client import SellerClient
from common import errors
from common.he import engine
from common.he.params import public_key_seed
from common.protocol import Offer
from common.rpc import SERVICE_NAME, check_health, make_channel
from common.transfer import send_object
from common.trust import open_offer
from seller_server.service import MAX_DETAIL_BYTES, SERVICE
from tests.conftest import Daemon, top_up

LR = "breast-cancer-lr"
INPUTS = 2400  # mutated requests in all, over every RPC
TIME_BOUND = 180.0  # seconds; the fuzz stops early rather than run long on a busy machine
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED,
           grpc.StatusCode.UNAUTHENTICATED}


@pytest.fixture(scope="module")
def seller(lr_catalog: Path, tls_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Daemon]:
    daemon = Daemon(lr_catalog, tmp_path_factory.mktemp("fuzz") / "state", tls_dir)
    daemon.wait_serving()
    top_up(daemon, "frank", "100")
    yield daemon
    daemon.stop()


class _Buyer:
    """A real buyer's trial: its offer, keys and one encrypted row."""

    def __init__(self, daemon: Daemon, identity: str) -> None:
        self.client = SellerClient(daemon.address, daemon.tls(identity))
        _listings, key = self.client.list_models()
        self.offer: Offer = open_offer(self.client.open_trial(LR, "slot-per-sample"), key, LR)
        cc = engine.build_context(self.offer.params, 128)
        _secret, public = engine.generate_keys(
            cc, self.offer.key_tag, public_key_seed(self.offer.trial_id, self.offer.key_tag))
        self.keys = {"relin_key": engine.serialize_relin_key(self.offer.key_tag),
                     "public_key": engine.public_key_bytes(public)}
        layout = self.offer.encoding.layout()
        self.ciphertexts = [engine.ciphertext_bytes(engine.encrypt_vector(cc, public, v))
                            for v in layout.encode(np.zeros((1, 30)))]

    def upload_keys(self) -> bytes:
        return self.client.upload_keys(self.offer.trial_id, self.keys, lambda n: None)

    def evaluate(self, batch: int) -> None:
        self.client.evaluate(self.offer.trial_id, batch, 1, self.ciphertexts, result_count=2,
                             max_result_bytes=1 << 22, on_upload=lambda n: None,
                             on_progress=lambda p: None, on_download=lambda n: None)


def _raw(daemon: Daemon, identity: str, method: str, requests: list[bytes]
         ) -> tuple[grpc.StatusCode, str]:
    """Send serialized requests as they are, through a generic channel."""
    descriptor = SERVICE.methods_by_name[method]
    path = f"/{SERVICE_NAME}/{method}"
    with make_channel(daemon.address, daemon.tls(identity)) as channel:
        try:
            if descriptor.client_streaming:
                stream = iter(requests)
                if descriptor.server_streaming:
                    list(channel.stream_stream(path, None, None)(stream, timeout=60))
                else:
                    channel.stream_unary(path, None, None)(stream, timeout=60)
            elif descriptor.server_streaming:
                list(channel.unary_stream(path, None, None)(requests[0], timeout=60))
            else:
                channel.unary_unary(path, None, None)(requests[0], timeout=60)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_wrong_state_junk_ids_and_malformed_messages_get_named_bounded_refusals(
        seller: Daemon) -> None:
    frank = _Buyer(seller, "frank")
    frank.upload_keys()
    frank.evaluate(0)
    frank.client.deliver(frank.offer.trial_id, 1 << 20, lambda n: None)
    frank.client.purchase(frank.offer.trial_id, uuid.uuid4().hex)
    with pytest.raises(errors.WrongState, match=rf"trial {frank.offer.trial_id} is paid"):
        frank.evaluate(1)
    with pytest.raises(errors.WrongState, match="open a new trial to test again"):
        frank.upload_keys()

    huge = "f" * 200_000
    for method, request in [("Purchase", pb.PurchaseRequest(trial_id=huge, request_id="x" * 9)),
                            ("Deliver", pb.DeliverRequest(trial_id=huge)),
                            ("FetchResults", pb.FetchResultsRequest(trial_id=huge)),
                            ("OpenTrial", pb.OpenTrialRequest(model_id=huge))]:
        code, details = _raw(seller, "frank", method, [request.SerializeToString()])
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details[:200])
        assert "'ffffffff" in details and "(200000 characters)" in details
        assert len(details.encode()) < 300
    code, details = _raw(seller, "frank", "Deliver", [pb.DeliverRequest(
        trial_id="0" * 24).SerializeToString()])
    assert code == grpc.StatusCode.NOT_FOUND and "'000000000000000000000000'" in details

    for method in ("ListModels", "UploadKeys", "Deliver"):
        code, details = _raw(seller, "frank", method, [b"\xff\xff\xff\xff"])
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
        assert "malformed" in details and "message" in details
    logs = seller.logs()
    assert "Traceback" not in logs and "Exception deserializing" not in logs
    assert logs.count("refused: malformed") == 3  # one line each


def _samples(daemon: Daemon) -> dict[str, list[bytes]]:
    """Real request sequences of every RPC, from a real buyer's trial (chunks cut short:
    thousands of mutated 1 MiB messages would only test the network)."""
    buyer = _Buyer(daemon, "mallory")  # no balance: a mutated Purchase cannot buy
    buyer.upload_keys()
    trial = buyer.offer.trial_id
    relin = buyer.keys["relin_key"]
    manifest, chunk = list(send_object("relin_key", relin[:4096]))[:2]
    ct_manifest, ct_chunk = list(send_object("ct-0", buyer.ciphertexts[0][:4096]))[:2]
    captured: dict[str, list[Any]] = {
        "ListModels": [pb.ListModelsRequest()],
        "OpenTrial": [pb.OpenTrialRequest(model_id=LR, packing="slot-per-sample")],
        "UploadKeys": [pb.UploadKeysRequest(trial=pb.TrialRef(trial_id=trial)),
                       pb.UploadKeysRequest(frame=manifest),
                       pb.UploadKeysRequest(frame=chunk)],
        "Evaluate": [pb.EvaluateRequest(header=pb.EvaluateHeader(trial_id=trial,
                                                                 batch_index=0, rows=1)),
                     pb.EvaluateRequest(frame=ct_manifest),
                     pb.EvaluateRequest(frame=ct_chunk)],
        "Purchase": [pb.PurchaseRequest(trial_id=trial, request_id=uuid.uuid4().hex)],
        "Deliver": [pb.DeliverRequest(trial_id=trial)],
    }
    for method in SERVICE.methods:  # RPCs added later: their request, naming the trial
        if method.name not in captured:
            request: Any = message_factory.GetMessageClass(method.input_type)()
            if "trial_id" in method.input_type.fields_by_name:
                request.trial_id = trial
            captured[method.name] = [request]
    return {name: [m.SerializeToString() for m in messages]
            for name, messages in captured.items()}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _mutated(data: bytes, rng: np.random.Generator) -> bytes:
    kind = int(rng.integers(6))
    at = int(rng.integers(len(data) + 1))
    if kind == 0 and data:  # bit flips
        out = bytearray(data)
        for _ in range(int(rng.integers(1, 5))):
            out[int(rng.integers(len(out)))] ^= 1 << int(rng.integers(8))
        return bytes(out)
    if kind == 1:  # truncation
        return data[:at]
    if kind == 2:  # random bytes
        return rng.bytes(int(rng.integers(0, 64)))
    if kind == 3:  # a length-delimited field declaring a huge length
        tag = _varint((int(rng.integers(1, 20)) << 3) | 2)
        return data[:at] + tag + _varint(int(rng.integers(1 << 31, 1 << 62))) + data[at:]
    if kind == 4:  # an over-long varint
        return data[:at] + b"\xff" * 11 + data[at:]
    return data + data[:at]  # a duplicated prefix: repeated and half fields


def test_fuzz_every_rpc_with_mutated_real_requests(seller: Daemon) -> None:
    samples = _samples(seller)
    rng = np.random.default_rng(20240610)
    seen: Counter[tuple[str, str]] = Counter()
    start = time.monotonic()
    sent = 0
    while sent < INPUTS and time.monotonic() - start < TIME_BOUND:
        for method, sequence in samples.items():
            requests = list(sequence)
            victim = int(rng.integers(len(requests)))
            requests[victim] = _mutated(requests[victim], rng)
            if rng.random() < 0.2:  # the stream ends early, or the mutated message is last
                requests = requests[:victim + 1]
            code, details = _raw(seller, "mallory", method, requests)
            assert code in ALLOWED, (method, code, details)
            assert len(details.encode()) <= MAX_DETAIL_BYTES
            seen[method, code.name] += 1
            sent += 1
    print(f"{sent} mutated requests in {time.monotonic() - start:.0f} s:", dict(seen))
    assert sent >= min(INPUTS, 500)
    assert {method for method, _code in seen} == set(SERVICE.methods_by_name)
    assert check_health(seller.address, seller.tls(), timeout=10) == "SERVING"
    logs = seller.logs()
    assert "Traceback" not in logs and "Exception deserializing" not in logs
    assert " ERROR " not in logs  # nothing was an unexpected error

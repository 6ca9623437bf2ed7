"""A hostile network (findings 7 and 15 of issue 10): a second daemon on a busy port, and
clients that open streams and then send nothing, or drip bytes, to starve honest buyers."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from gimme.v1 import gimme_pb2 as pb
from gimme.v1 import gimme_pb2_grpc as pb_grpc

from buyer_client.client import SellerClient
from common.he import engine
from common.he.params import public_key_seed
from common.rpc import check_health, make_channel
from common.transfer import send_object
from common.trust import open_offer
from tests.conftest import Daemon, buyer_cli, top_up

LR = "breast-cancer-lr"
IDLE_SECONDS = 8  # longer than a health probe may take (5 s), so a starved pool shows
PER_BUYER = 4
TOTAL = 12
DRIP_SECONDS = 0.5  # well inside the idle limit: a dripping stream is never idle
BOUND_SECONDS = 120.0  # how long a test waits for something that must happen; never asserted


@pytest.fixture(scope="module")
def seller(lr_catalog: Path, tls_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Daemon]:
    daemon = Daemon(lr_catalog, tmp_path_factory.mktemp("network") / "state", tls_dir,
                    ["--stream-idle-seconds", str(IDLE_SECONDS), "--max-streams-per-buyer",
                     str(PER_BUYER), "--max-streams", str(TOTAL)])
    daemon.wait_serving()
    top_up(daemon, "alice", "100")
    yield daemon
    daemon.stop()


def test_a_second_daemon_on_a_busy_port_fails_and_the_first_keeps_every_client(
        lr_seller: Daemon, lr_catalog: Path, tmp_path: Path) -> None:
    key = SellerClient(lr_seller.address, lr_seller.tls("alice")).list_models()[1]
    second: Daemon | None = None
    try:
        with pytest.raises(RuntimeError, match=r"seller exited \(2\)[\s\S]*port in use"):
            second = Daemon(lr_catalog, tmp_path / "second", lr_seller.tls_dir,
                            ["--listen", lr_seller.address], warm=False)
    finally:
        if second is not None:
            second.stop()
    assert not (tmp_path / "second" / "gimme.sqlite").exists()  # it touched no state
    for _ in range(20):  # a fresh connection each time: every one reaches the first daemon
        client = SellerClient(lr_seller.address, lr_seller.tls("alice"))
        assert client.list_models()[1] == key
        client.close()
        assert check_health(lr_seller.address, lr_seller.tls(), timeout=10) == "SERVING"


def test_a_second_daemon_on_the_same_state_fails_before_touching_it(
        seller: Daemon, lr_catalog: Path, tmp_path: Path) -> None:
    alias = tmp_path / "same-state"  # its own port and log files, the first daemon's state
    alias.symlink_to(seller.state)
    second: Daemon | None = None
    try:
        with pytest.raises(RuntimeError, match=r"seller exited \(2\)") as refused:
            second = Daemon(lr_catalog, alias, seller.tls_dir)
        assert "is in use by another 'gimme-seller serve'" in " ".join(
            str(refused.value).split())  # rich wraps the line
    finally:
        if second is not None:
            second.stop()
    assert "refunded" not in seller.logs()
    _assert_served(seller)


class _Streams:
    """Streaming calls from real gRPC clients that stall or drip on command."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.dripping = threading.Event()
        self.dripping.set()
        self.released = threading.Event()  # ends every client's request generator
        self.calls: list[grpc.Future[Any]] = []
        self._channels: dict[str, grpc.Channel] = {}

    def stub(self, buyer: str) -> pb_grpc.SellerStub:
        if buyer not in self._channels:
            self._channels[buyer] = make_channel(self.daemon.address, self.daemon.tls(buyer))
        return pb_grpc.SellerStub(self._channels[buyer])

    def silent(self, buyer: str) -> None:
        """An UploadKeys that sends nothing at all."""
        def requests() -> Iterator[pb.UploadKeysRequest]:
            self.released.wait()
            yield from ()

        self.calls.append(self.stub(buyer).UploadKeys.future(requests(),
                                                             timeout=BOUND_SECONDS))

    def dripping_upload(self, buyer: str, trial_id: str, relin_key: bytes) -> None:
        """An UploadKeys that sends its trial and key manifest, then a byte every
        DRIP_SECONDS while `dripping` is set, then nothing (it never completes the key)."""
        manifest = next(send_object("relin_key", relin_key))

        def requests() -> Iterator[pb.UploadKeysRequest]:
            yield pb.UploadKeysRequest(trial=pb.TrialRef(trial_id=trial_id))
            yield pb.UploadKeysRequest(frame=manifest)
            for byte in relin_key:
                if self.released.wait(DRIP_SECONDS) or not self.dripping.is_set():
                    break
                yield pb.UploadKeysRequest(frame=pb.Frame(chunk=bytes([byte])))
            self.released.wait()

        self.calls.append(self.stub(buyer).UploadKeys.future(requests(),
                                                             timeout=BOUND_SECONDS))

    def wait_until(self, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + BOUND_SECONDS
        while not condition():
            assert time.monotonic() < deadline, "the seller never answered these calls"
            time.sleep(0.05)

    def ended(self) -> list[grpc.Future[Any]]:
        return [call for call in self.calls if call.done()]

    def close(self) -> None:
        self.released.set()
        for call in self.calls:
            call.cancel()
        for channel in self._channels.values():
            channel.close()


def _status(call: grpc.Future[Any]) -> tuple[grpc.StatusCode, str]:
    error: Any = call.exception()
    assert error is not None, "a stalled call succeeded"
    return error.code(), error.details()


def _assert_served(daemon: Daemon) -> None:
    assert check_health(daemon.address, daemon.tls(), timeout=5) == "SERVING"


@pytest.mark.parametrize("count", [16, 64])
def test_stalled_and_dripping_streams_leave_honest_buyers_and_health_served(
        seller: Daemon, examples: Path, tmp_path: Path, count: int) -> None:
    client = SellerClient(seller.address, seller.tls("mallory"))
    _listings, seller_key = client.list_models()
    offer = open_offer(client.open_trial(LR, "slot-per-sample"), seller_key, LR)
    cc = engine.build_context(offer.params, 128)
    engine.generate_keys(cc, offer.key_tag,
                                       public_key_seed(offer.trial_id, offer.key_tag))
    relin_key = engine.serialize_relin_key(offer.key_tag)
    streams = _Streams(seller)
    try:
        for _ in range(count):
            streams.dripping_upload("mallory", offer.trial_id, relin_key)
        # mallory's calls past her limit are refused at once, before anything is read
        streams.wait_until(lambda: len(streams.ended()) >= count - PER_BUYER)
        refused = streams.ended()
        assert len(refused) == count - PER_BUYER
        for call in refused:
            code, details = _status(call)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"too many concurrent uploads from buyer 'mallory'; limit {PER_BUYER}" \
                in details
        admitted = [call for call in streams.calls if call not in refused]

        for _probe in range(5):
            _assert_served(seller)
        home = tmp_path / "alice"
        models = buyer_cli(seller, home, "alice", "models")
        assert models.returncode == 0, models.stderr
        assert LR in models.stdout
        trial = buyer_cli(seller, home, "alice", "trial", LR, "--data",
                          str(examples / "data" / "breast_cancer_lr_test.csv"),
                          "--label-column", "y", "--rows", "20")
        assert trial.returncode == 0, trial.stderr
        _assert_served(seller)
        assert not any(call.done() for call in admitted)  # dripping: never idle

        streams.dripping.clear()  # now they stall mid-key, and are cut
        streams.wait_until(lambda: all(call.done() for call in admitted))
        for call in admitted:
            code, details = _status(call)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert f"UploadKeys: nothing received for {IDLE_SECONDS} s" in details
        _assert_served(seller)
    finally:
        streams.close()
        client.close()
    assert "Traceback" not in seller.logs()


def test_the_total_stream_limit_refuses_the_next_buyer_at_once(seller: Daemon) -> None:
    streams = _Streams(seller)
    buyers = ["erin", "frank", "mallory"]
    assert len(buyers) * PER_BUYER == TOTAL
    try:
        for buyer in buyers:
            for _ in range(PER_BUYER):
                streams.silent(buyer)
        streams.silent("dave")
        # whichever call came last finds the seller full: exactly one refusal, at once
        streams.wait_until(lambda: len(streams.ended()) >= 1)
        ended = streams.ended()
        assert len(ended) == 1, [_status(call) for call in ended]
        _assert_served(seller)  # with every stream slot taken
        code, details = _status(ended[0])
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"the seller is at its limit of {TOTAL} concurrent uploads" in details
        streams.wait_until(lambda: all(call.done() for call in streams.calls))
        assert sorted(_status(call)[0].name for call in streams.calls) == \
            ["DEADLINE_EXCEEDED"] * TOTAL + ["RESOURCE_EXHAUSTED"]
        _assert_served(seller)
    finally:
        streams.close()


def _workers(daemon: Daemon) -> int:
    """The daemon's worker processes running now."""
    count = 0
    for task in Path(f"/proc/{daemon.process.pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue  # the thread ended
        for child in children:
            with contextlib.suppress(OSError):  # the worker ended
                count += b"common.guarded" in Path(f"/proc/{child}/cmdline").read_bytes()
    return count


def test_concurrent_key_uploads_run_at_most_max_evaluations_workers(seller: Daemon) -> None:
    uploads = []
    for buyer in ("alice", "bob"):
        for _ in range(PER_BUYER):
            client = SellerClient(seller.address, seller.tls(buyer))
            offer = open_offer(client.open_trial(LR, "slot-per-sample"),
                               client.list_models()[1], LR)
            cc = engine.build_context(offer.params, 128)
            _secret, public = engine.generate_keys(cc, offer.key_tag,
                                       public_key_seed(offer.trial_id, offer.key_tag))
            keys = {"relin_key": engine.serialize_relin_key(offer.key_tag),
                    "public_key": engine.public_key_bytes(public)}
            uploads.append((client, offer.trial_id, keys))
    peak = 0
    with ThreadPoolExecutor(len(uploads)) as pool:
        done = [pool.submit(client.upload_keys, trial_id, keys, lambda n: None)
                for client, trial_id, keys in uploads]
        probes = 0
        while not all(future.done() for future in done):
            peak = max(peak, _workers(seller))
            if probes < 3:  # health answers while 8 uploads are checked
                _assert_served(seller)
                probes += 1
            time.sleep(0.01)
        digests = [future.result() for future in done]
    assert len(set(digests)) == len(uploads)  # every upload was checked and accepted
    assert 1 <= peak <= 2  # serve's default --max-evaluations
    for client, _trial, _keys in uploads:
        client.close()


def test_a_buyer_that_stops_reading_replies_is_cut_and_frees_its_slot(seller: Daemon) -> None:
    client = SellerClient(seller.address, seller.tls("alice"))
    offer = open_offer(client.open_trial(LR, "slot-per-sample"), client.list_models()[1], LR)
    cc = engine.build_context(offer.params, 128)
    _secret, public = engine.generate_keys(cc, offer.key_tag,
                                       public_key_seed(offer.trial_id, offer.key_tag))
    keys = {"relin_key": engine.serialize_relin_key(offer.key_tag),
            "public_key": engine.public_key_bytes(public)}
    client.upload_keys(offer.trial_id, keys, lambda n: None)
    blobs = [engine.ciphertext_bytes(engine.encrypt_vector(cc, public, v))
             for v in offer.encoding.layout().encode(np.zeros((1, 30)))]

    def requests() -> Iterator[pb.EvaluateRequest]:
        yield pb.EvaluateRequest(header=pb.EvaluateHeader(trial_id=offer.trial_id,
                                                          batch_index=0, rows=1))
        for index, blob in enumerate(blobs):
            for frame in send_object(f"ct-{index}", blob):
                yield pb.EvaluateRequest(frame=frame)

    tls = seller.tls("alice")
    assert tls is not None
    # a small receive window (no BDP growth): the results cannot all be in flight unread
    channel = grpc.secure_channel(seller.address, grpc.ssl_channel_credentials(
        tls.ca.read_bytes(), tls.key.read_bytes(), tls.cert.read_bytes()),
        options=[("grpc.http2.bdp_probe", 0)])
    streams = _Streams(seller)
    try:
        unread = pb_grpc.SellerStub(channel).Evaluate(requests(), timeout=BOUND_SECONDS)
        streams.wait_until(lambda: "Evaluate: the buyer took no reply" in seller.logs())
        with pytest.raises(grpc.RpcError) as cut:
            list(unread)
        assert cut.value.code() == grpc.StatusCode.CANCELLED
        for _ in range(PER_BUYER):  # the cut call's slot is free again: none is refused
            streams.silent("alice")
        streams.wait_until(lambda: all(call.done() for call in streams.calls))
        assert {_status(call)[0] for call in streams.calls} == {grpc.StatusCode.DEADLINE_EXCEEDED}
    finally:
        streams.close()
        channel.close()
        client.close()

"""gRPC edge of the buyer: calls, framing, caps, and status codes mapped back to errors."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from gimme.v1 import gimme_pb2 as pb
from gimme.v1 import gimme_pb2_grpc as pb_grpc

from common import errors, wire
from common.protocol import ModelListing, Progress, Signed
from common.rpc import TlsFiles, make_channel
from common.transfer import receive_object, send_object

TOKEN_HEADER = "x-gimme-token"
T = TypeVar("T")
E = TypeVar("E", pb.EvaluateEvent, pb.DeliverEvent)
BytesFn = Callable[[int], None]

_ERRORS: dict[grpc.StatusCode, type[errors.GimmeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.BadInput,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: errors.WrongState,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.Exhausted,
    grpc.StatusCode.PERMISSION_DENIED: errors.Refused,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
}


def _seller_errors(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def wrapper(self: SellerClient, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE and "loading" not in details:
                raise errors.Unavailable(
                    f"cannot reach the seller at {self.address}: {details}. Is "
                    f"'gimme-seller serve' running there, with matching TLS settings?") from None
            raise _ERRORS.get(code, errors.GimmeError)(
                f"seller refused ({code.name}): {details}") from None

    return wrapper


class SellerClient:
    def __init__(self, address: str, tls: TlsFiles | None, token: str | None = None,
                 timeout: float = 3600.0) -> None:
        self.address = address
        self.channel = make_channel(address, tls)
        self.stub = pb_grpc.SellerStub(self.channel)
        self.metadata: tuple[tuple[str, str | bytes], ...] = (
            ((TOKEN_HEADER, token),) if token else ())
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def list_models(self) -> tuple[list[ModelListing], bytes]:
        listings, key, _loading = self.catalog()
        return listings, key

    @_seller_errors
    def catalog(self) -> tuple[list[ModelListing], bytes, tuple[str, ...]]:
        """The listings, the seller's public key, and the model ids still loading."""
        response = self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata,
                                        timeout=60)
        return ([wire.listing_from_pb(m) for m in response.models], response.seller_public_key,
                tuple(response.loading))

    @_seller_errors
    def open_trial(self, model_id: str, packing: str) -> Signed:
        response = self.stub.OpenTrial(pb.OpenTrialRequest(model_id=model_id, packing=packing),
                                       metadata=self.metadata, timeout=60)
        return wire.envelope_from_pb(response.offer)

    @_seller_errors
    def upload_keys(self, trial_id: str, keys: dict[str, bytes], on_bytes: BytesFn) -> bytes:
        """Upload the trial's keys in order: relin_key, public_key[, rotation_keys]."""
        def requests() -> Iterator[pb.UploadKeysRequest]:
            yield pb.UploadKeysRequest(trial=pb.TrialRef(trial_id=trial_id))
            for name, data in keys.items():
                for frame in send_object(name, data, on_bytes):
                    yield pb.UploadKeysRequest(frame=frame)

        response = self.stub.UploadKeys(requests(), metadata=self.metadata,
                                        timeout=self.timeout)
        return bytes(response.keys_sha256)

    @_seller_errors
    def evaluate(
        self, trial_id: str, batch_index: int, rows: int, ciphertexts: Sequence[bytes], *,
        result_count: int, max_result_bytes: int, on_upload: BytesFn,
        on_progress: Callable[[Progress], None], on_download: BytesFn,
    ) -> tuple[list[bytes], Signed]:
        def requests() -> Iterator[pb.EvaluateRequest]:
            yield pb.EvaluateRequest(header=pb.EvaluateHeader(
                trial_id=trial_id, batch_index=batch_index, rows=rows))
            for index, blob in enumerate(ciphertexts):
                for frame in send_object(f"ct-{index}", blob, on_upload):
                    yield pb.EvaluateRequest(frame=frame)

        events = self.stub.Evaluate(requests(), metadata=self.metadata, timeout=self.timeout)
        return _results(events, result_count, max_result_bytes, on_progress, on_download)

    @_seller_errors
    def fetch_results(self, trial_id: str, batch_index: int, *, result_count: int,
                      max_result_bytes: int, on_download: BytesFn
                      ) -> tuple[list[bytes], Signed]:
        """An evaluated batch's results and receipt again (its Evaluate reply was lost)."""
        events = self.stub.FetchResults(
            pb.FetchResultsRequest(trial_id=trial_id, batch_index=batch_index),
            metadata=self.metadata, timeout=self.timeout)
        return _results(events, result_count, max_result_bytes, lambda _p: None, on_download)

    @_seller_errors
    def purchase(self, trial_id: str, request_id: str, escrow_deposit: Signed | None = None
                 ) -> tuple[Signed, Signed]:
        """(payment receipt, key release); paid by `escrow_deposit` when given."""
        request = pb.PurchaseRequest(trial_id=trial_id, request_id=request_id)
        if escrow_deposit is not None:
            request.escrow_deposit.CopyFrom(wire.envelope_to_pb(escrow_deposit))
        response = self.stub.Purchase(request, metadata=self.metadata, timeout=60)
        return (wire.envelope_from_pb(response.payment),
                wire.envelope_from_pb(response.key_release))

    @_seller_errors
    def deliver(self, trial_id: str, model_size: int, on_bytes: BytesFn
                ) -> tuple[bytes, Signed]:
        records: list[Signed] = []
        events = self.stub.Deliver(pb.DeliverRequest(trial_id=trial_id), metadata=self.metadata,
                                   timeout=self.timeout)
        stream = _frames(events, on_bytes,
                         lambda event: records.append(wire.envelope_from_pb(event.record)))
        model = receive_object(stream, expected_name="model", max_size=model_size,
                               what="model delivery").data
        for _extra in stream:
            raise errors.BadInput("the seller sent more than one model")
        if len(records) != 1:
            raise errors.BadInput("the model came without a signed delivery record")
        return model, records[0]


def _results(events: Iterable[pb.EvaluateEvent], result_count: int, max_result_bytes: int,
             on_progress: Callable[[Progress], None], on_download: BytesFn
             ) -> tuple[list[bytes], Signed]:
    """A batch's score objects and its one signed receipt from an Evaluate-style stream."""
    receipts: list[Signed] = []

    def other(event: pb.EvaluateEvent) -> None:
        if event.HasField("progress"):
            on_progress(wire.progress_from_pb(event.progress))
        else:
            receipts.append(wire.envelope_from_pb(event.receipt))

    stream = _frames(events, on_download, other)
    results = [receive_object(stream, expected_name=f"score-{i}", max_size=max_result_bytes,
                              what="seller results").data for i in range(result_count)]
    for _extra in stream:
        raise errors.BadInput("the seller sent more results than the offer announces")
    if len(receipts) != 1:
        raise errors.BadInput("the seller's results came without a signed receipt")
    return results, receipts[0]


def _frames(events: Iterable[E], on_bytes: BytesFn, other: Callable[[E], None]
            ) -> Iterator[pb.Frame]:
    """The data frames of a response stream (counting bytes); other events go to `other`."""
    for event in events:
        if event.HasField("frame"):
            if event.frame.HasField("chunk"):
                on_bytes(len(event.frame.chunk))
            yield event.frame
        else:
            other(event)

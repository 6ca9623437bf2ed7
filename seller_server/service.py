"""gRPC edge of the seller: identity, framing and status codes around seller_server.trade."""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc
from gimme.v1 import gimme_pb2 as pb
from gimme.v1 import gimme_pb2_grpc as pb_grpc

from common import wire
from common.errors import BadInput, GimmeError, Refused, Unavailable
from common.he.packing import SLOT_PER_SAMPLE
from common.protocol import Progress
from common.rpc import peer_identity
from common.transfer import receive_object, send_object
from seller_server.trade import Evaluation, Seller

log = logging.getLogger(__name__)
TOKEN_HEADER = "x-gimme-token"
T = TypeVar("T")


def _abort(context: grpc.ServicerContext, method: str, error: Exception) -> NoReturn:
    """GimmeError -> its gRPC status with the error's message; anything else is logged."""
    if isinstance(error, GimmeError):
        log.warning("%s refused: %s", method, error.message)
        context.abort(getattr(grpc.StatusCode, error.status.value), error.message)
    log.error("%s failed", method, exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, "internal error; see the seller's log")


def _guard(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def wrapper(self: SellerServicer, request: Any, context: grpc.ServicerContext) -> T:
        try:
            return method(self, request, context)
        except Exception as exc:
            _abort(context, method.__name__, exc)

    return wrapper


def _guard_stream(method: Callable[..., Iterator[T]]) -> Callable[..., Iterator[T]]:
    @functools.wraps(method)
    def wrapper(self: SellerServicer, request: Any, context: grpc.ServicerContext
                ) -> Iterator[T]:
        try:
            yield from method(self, request, context)
        except Exception as exc:
            _abort(context, method.__name__, exc)

    return wrapper


class SellerServicer(pb_grpc.SellerServicer):
    def __init__(self, require_tls_identity: bool) -> None:
        self._seller: Seller | None = None  # set once the catalog is loaded
        self.require_tls_identity = require_tls_identity

    @property
    def seller(self) -> Seller:
        if self._seller is None:
            raise Unavailable("the seller is still loading its catalog; retry shortly")
        return self._seller

    def ready(self, seller: Seller) -> None:
        self._seller = seller

    def _buyer(self, context: grpc.ServicerContext) -> str:
        """The TLS client certificate's name; without TLS, the buyer an API token names."""
        identity = peer_identity(context)
        if identity is not None:
            return identity
        if self.require_tls_identity:
            raise Refused("no client certificate: connect with the buyer certificate")
        token = dict(context.invocation_metadata()).get(TOKEN_HEADER)
        buyer = self.seller.store.buyer_for_token(str(token)) if token else None
        if buyer is None:
            raise Refused("unknown or missing API token: without TLS the seller identifies "
                          "buyers by token (gimme-seller token create NAME); pass it with "
                          "--token or GIMME_TOKEN")
        return buyer

    @_guard
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext
                   ) -> pb.ListModelsResponse:
        buyer = self._buyer(context)
        return pb.ListModelsResponse(
            models=[wire.listing_to_pb(m) for m in self.seller.list_models(buyer)],
            seller_public_key=self.seller.signer.public_key)

    @_guard
    def OpenTrial(self, request: pb.OpenTrialRequest, context: grpc.ServicerContext
                  ) -> pb.OpenTrialResponse:
        signed = self.seller.open_trial(self._buyer(context), request.model_id,
                                        request.packing or SLOT_PER_SAMPLE)
        return pb.OpenTrialResponse(offer=wire.envelope_to_pb(signed))

    @_guard
    def UploadKeys(self, request_iterator: Iterator[pb.UploadKeysRequest],
                   context: grpc.ServicerContext) -> pb.UploadKeysResponse:
        buyer = self._buyer(context)
        first = next(request_iterator, None)
        if first is None or not first.HasField("trial"):
            raise BadInput("UploadKeys: the first message must name the trial")
        trial_id = first.trial.trial_id
        frames = _frames(request_iterator)
        keys = {name: receive_object(frames, expected_name=name, max_size=cap,
                                     exact_size=exact, what="UploadKeys").data
                for name, (cap, exact) in self.seller.key_sizes(buyer, trial_id).items()}
        if next(frames, None) is not None:
            raise BadInput(f"UploadKeys: more than the keys this trial takes ({', '.join(keys)})")
        digest = self.seller.accept_keys(buyer, trial_id, keys)
        return pb.UploadKeysResponse(keys_sha256=digest)

    @_guard_stream
    def Evaluate(self, request_iterator: Iterator[pb.EvaluateRequest],
                 context: grpc.ServicerContext) -> Iterator[pb.EvaluateEvent]:
        buyer = self._buyer(context)
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise BadInput("Evaluate: the first message must be the batch header")
        header = first.header
        count, size = self.seller.batch_shape(buyer, header.trial_id, header.batch_index,
                                              header.rows)
        frames = _frames(request_iterator)
        inputs = [receive_object(frames, expected_name=f"ct-{j}", max_size=size,
                                 exact_size=size, what="Evaluate").data for j in range(count)]
        if next(frames, None) is not None:
            raise BadInput(f"Evaluate: more than the {count} ciphertexts this batch takes")
        events: queue.Queue[Progress | Evaluation | GimmeError | Exception] = queue.Queue()

        def work() -> None:
            try:
                events.put(self.seller.evaluate(buyer, header.trial_id, header.batch_index,
                                                header.rows, inputs, events.put))
            except Exception as exc:  # handed to the stream below
                events.put(exc)

        threading.Thread(target=work, daemon=True).start()
        while True:
            event = events.get()
            if isinstance(event, Progress):
                yield pb.EvaluateEvent(progress=wire.progress_to_pb(event))
            elif isinstance(event, Exception):
                raise event
            else:
                for index, result in enumerate(event.results):
                    for frame in send_object(f"score-{index}", result):
                        yield pb.EvaluateEvent(frame=frame)
                yield pb.EvaluateEvent(receipt=wire.envelope_to_pb(event.receipt))
                return

    @_guard
    def Purchase(self, request: pb.PurchaseRequest, context: grpc.ServicerContext
                 ) -> pb.PurchaseResponse:
        payment, release = self.seller.purchase(self._buyer(context), request.trial_id,
                                                request.request_id)
        return pb.PurchaseResponse(payment=wire.envelope_to_pb(payment),
                                   key_release=wire.envelope_to_pb(release))

    @_guard_stream
    def Deliver(self, request: pb.DeliverRequest, context: grpc.ServicerContext
                ) -> Iterator[pb.DeliverEvent]:
        model, record = self.seller.deliver(self._buyer(context), request.trial_id)
        for frame in send_object("model", model):
            yield pb.DeliverEvent(frame=frame)
        yield pb.DeliverEvent(record=wire.envelope_to_pb(record))


def _frames(requests: Iterator[Any]) -> Iterator[pb.Frame]:
    for request in requests:
        if not request.HasField("frame"):
            raise BadInput("expected a data frame")
        yield request.frame

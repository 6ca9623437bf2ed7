"""gRPC edge of the seller: identity, framing and status codes around seller_server.trade.

Why junk and stalled clients cannot hurt other buyers here: every request is parsed by
common.rpc's lenient parser, so a malformed message reaches `_guard` as a Malformed value and
is refused with INVALID_ARGUMENT in one log line; every expected refusal is a GimmeError
mapped to its own status, and client-supplied ids are checked by format before use, so
details and logs echo at most a short prefix of what a peer sent (and never more than
MAX_DETAIL_BYTES); only an unexpected exception is INTERNAL, logged once with its traceback,
and its text (paths, worker output) stays in the log. Streaming calls (the only ones a slow
or silent client can keep open) are admitted per buyer and in total before anything is read,
refused at once past either limit; each read waits at most `idle_seconds`
(common.transfer.idle_limited) and each reply as long (`_taken`). The daemon's thread pool
is larger than the total stream limit by UNARY_THREADS, so admitted streams can never take
the threads that serve unary calls and the health check.
"""

from __future__ import annotations

import functools
import logging
import queue
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from gimme.v1 import gimme_pb2 as pb
from gimme.v1 import gimme_pb2_grpc as pb_grpc

from common import wire
from common.errors import BadInput, Exhausted, GimmeError, Refused, Status, Unavailable, shown
from common.he.packing import SLOT_PER_SAMPLE
from common.protocol import Progress
from common.rpc import Malformed, peer_identity
from common.transfer import idle_limited, receive_object, send_object
from seller_server.trade import Evaluation, Seller

log = logging.getLogger(__name__)
TOKEN_HEADER = "x-gimme-token"
T = TypeVar("T")
MAX_DETAIL_BYTES = 1024
UNARY_THREADS = 16  # threads beyond the stream limit: unary calls and health checks
SERVICE = pb.DESCRIPTOR.services_by_name["Seller"]
STREAMING = frozenset(m.name for m in SERVICE.methods if m.client_streaming
                      or m.server_streaming)
_TRIAL_ID = re.compile(r"[0-9a-f]{24}")  # secrets.token_hex(12), as OpenTrial makes them
MAX_NAME = 64  # model ids and packing names are shorter


@dataclass(frozen=True)
class StreamLimits:
    """How long and how many streaming calls (UploadKeys, Evaluate, Deliver) may stay open."""

    idle_seconds: float = 30.0
    per_buyer: int = 4
    total: int = 32


class Admission:
    """Open streaming calls per buyer and in total; past a limit a call is refused at once
    (RESOURCE_EXHAUSTED), never queued."""

    def __init__(self, limits: StreamLimits) -> None:
        self.limits = limits
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, buyer: str, method: str) -> Iterator[None]:
        with self._lock:
            if self._open[buyer] >= self.limits.per_buyer:
                raise Exhausted(f"too many concurrent uploads from buyer {shown(buyer)}; limit "
                                f"{self.limits.per_buyer} (UploadKeys, Evaluate and Deliver "
                                f"calls at once): let the others finish, then retry {method}")
            if sum(self._open.values()) >= self.limits.total:
                raise Exhausted(f"the seller is at its limit of {self.limits.total} concurrent "
                                f"uploads and downloads; retry {method} in a minute")
            self._open[buyer] += 1
        try:
            yield
        finally:
            with self._lock:
                self._open[buyer] -= 1
                if not self._open[buyer]:
                    del self._open[buyer]


def _trial_id(text: str) -> str:
    """A client's trial id, checked by format before it reaches the store or a message."""
    if not _TRIAL_ID.fullmatch(text):
        raise BadInput(f"{shown(text)} is not a trial id (24 hex characters, as the offer "
                       f"names it); 'gimme-buyer trial MODEL' opens a trial")
    return text


def _name(text: str, what: str) -> str:
    if len(text) > MAX_NAME:
        raise BadInput(f"{shown(text)} is not a {what} (at most {MAX_NAME} characters); "
                       f"'gimme-buyer models' lists what is offered")
    return text


def _detail(message: str) -> str:
    """A status detail cut to MAX_DETAIL_BYTES (gRPC carries details in a header)."""
    data = message.encode()
    return message if len(data) <= MAX_DETAIL_BYTES else \
        data[:MAX_DETAIL_BYTES - 3].decode(errors="ignore") + "..."


def _abort(context: grpc.ServicerContext, method: str, error: Exception) -> NoReturn:
    """GimmeError -> its gRPC status with the error's message; anything else is logged."""
    if isinstance(error, GimmeError) and error.status is not Status.INTERNAL:
        detail = _detail(error.message)
        log.warning("%s refused: %s", method, detail)
        context.abort(getattr(grpc.StatusCode, error.status.value), detail)
    if isinstance(error, grpc.RpcError) or not context.is_active():
        log.info("%s: the buyer went away mid-call", method)
        context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")
    if isinstance(error, GimmeError):  # the seller's own failure, explained in its message
        log.error("%s failed: %s", method, error.message)
    else:
        log.error("%s failed", method, exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, f"{method} failed on the seller's side (its log "
                                            f"says why); retry, or tell the seller")


def _parsed(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        yield _checked(request)


def _checked(request: Any) -> Any:
    if isinstance(request, Malformed):
        raise BadInput(f"malformed {request.message_type} message ({request.reason}); use a "
                       f"gimme-buyer that speaks gimme.v1")
    return request


def _guard(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def wrapper(self: SellerServicer, request: Any, context: grpc.ServicerContext) -> T:
        try:
            with self._edge(method.__name__, request, context) as checked:
                return method(self, checked, context)
        except Exception as exc:
            _abort(context, method.__name__, exc)

    return wrapper


def _guard_stream(method: Callable[..., Iterator[T]]) -> Callable[..., Iterator[T]]:
    @functools.wraps(method)
    def wrapper(self: SellerServicer, request: Any, context: grpc.ServicerContext
                ) -> Iterator[T]:
        try:
            with self._edge(method.__name__, request, context) as checked:
                yield from _taken(method(self, checked, context), context,
                                  self.admission.limits.idle_seconds, method.__name__)
        except Exception as exc:
            _abort(context, method.__name__, exc)

    return wrapper


def _taken(responses: Iterator[T], context: grpc.ServicerContext, idle_seconds: float,
           method: str) -> Iterator[T]:
    """`responses`, the call cancelled when the client takes none for `idle_seconds`: gRPC
    resumes this generator only once the last response was sent, which waits for a client
    that stopped reading (flow control) with no timeout of its own."""
    def cancel() -> None:
        log.warning("%s: the buyer took no reply for %g s; call cancelled", method,
                    idle_seconds)
        context.cancel()  # type: ignore[no-untyped-call]

    for response in responses:
        timer = threading.Timer(idle_seconds, cancel)
        timer.daemon = True
        timer.start()
        try:
            yield response
        finally:
            timer.cancel()


class SellerServicer(pb_grpc.SellerServicer):
    def __init__(self, require_tls_identity: bool,
                 stream_limits: StreamLimits | None = None) -> None:
        self._seller: Seller | None = None  # set once the catalog is loaded
        self.require_tls_identity = require_tls_identity
        self.admission = Admission(stream_limits or StreamLimits())

    @property
    def seller(self) -> Seller:
        if self._seller is None:
            raise Unavailable("the seller is still loading its catalog; retry shortly")
        return self._seller

    def ready(self, seller: Seller) -> None:
        self._seller = seller

    @contextmanager
    def _edge(self, method: str, request: Any, context: grpc.ServicerContext
              ) -> Iterator[Any]:
        """The request, checked; for a streaming call, admitted and read with the idle
        limit."""
        if method not in STREAMING:
            yield _checked(request)
            return
        with self.admission.slot(self._buyer(context), method):
            if SERVICE.methods_by_name[method].client_streaming:
                yield _parsed(idle_limited(request, self.admission.limits.idle_seconds,
                                           method))
            else:
                yield _checked(request)

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
            seller_public_key=self.seller.signer.public_key,
            loading=sorted(self.seller.loading))

    @_guard
    def OpenTrial(self, request: pb.OpenTrialRequest, context: grpc.ServicerContext
                  ) -> pb.OpenTrialResponse:
        signed = self.seller.open_trial(
            self._buyer(context), _name(request.model_id, "model id"),
            _name(request.packing, "packing") or SLOT_PER_SAMPLE)
        return pb.OpenTrialResponse(offer=wire.envelope_to_pb(signed))

    @_guard
    def UploadKeys(self, request_iterator: Iterator[pb.UploadKeysRequest],
                   context: grpc.ServicerContext) -> pb.UploadKeysResponse:
        buyer = self._buyer(context)
        first = next(request_iterator, None)
        if first is None or not first.HasField("trial"):
            raise BadInput("UploadKeys: the first message must name the trial")
        trial_id = _trial_id(first.trial.trial_id)
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
        _trial_id(header.trial_id)
        count, size = self.seller.batch_shape(buyer, header.trial_id, header.batch_index,
                                              header.rows)
        frames = _frames(request_iterator)
        inputs = [receive_object(frames, expected_name=f"ct-{j}", max_size=size,
                                 exact_size=size, what="Evaluate").data for j in range(count)]
        if next(frames, None) is not None:
            raise BadInput(f"Evaluate: more than the {count} ciphertexts this batch takes")
        events: queue.Queue[Progress | Evaluation | GimmeError | Exception] = queue.Queue()
        gone = threading.Event()  # the buyer cancelled or disconnected: stop the work
        if not context.add_callback(gone.set):
            gone.set()

        def work() -> None:
            try:
                events.put(self.seller.evaluate(buyer, header.trial_id, header.batch_index,
                                                header.rows, inputs, events.put, gone))
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
                yield from self._send_results(header.trial_id, header.batch_index, event,
                                              context)
                return

    @_guard_stream
    def FetchResults(self, request: pb.FetchResultsRequest, context: grpc.ServicerContext
                     ) -> Iterator[pb.EvaluateEvent]:
        evaluation = self.seller.results(self._buyer(context), _trial_id(request.trial_id),
                                         request.batch_index)
        yield from self._send_results(request.trial_id, request.batch_index, evaluation,
                                      context)

    def _send_results(self, trial_id: str, batch_index: int, evaluation: Evaluation,
                      context: grpc.ServicerContext) -> Iterator[pb.EvaluateEvent]:
        """Score frames, then the receipt. Once a frame may have left, the batch stays
        charged (FetchResults sends it again); to a buyer already gone nothing is sent, and
        the batch is refunded if nobody fetches it before the trial's keys expire."""
        if not context.is_active():
            return
        self.seller.results_sent(trial_id, batch_index)
        for index, result in enumerate(evaluation.results):
            for frame in send_object(f"score-{index}", result):
                yield pb.EvaluateEvent(frame=frame)
        yield pb.EvaluateEvent(receipt=wire.envelope_to_pb(evaluation.receipt))

    @_guard
    def Purchase(self, request: pb.PurchaseRequest, context: grpc.ServicerContext
                 ) -> pb.PurchaseResponse:
        payment, release = self.seller.purchase(
            self._buyer(context), _trial_id(request.trial_id), request.request_id,
            wire.envelope_from_pb(request.escrow_deposit)
            if request.HasField("escrow_deposit") else None)
        return pb.PurchaseResponse(payment=wire.envelope_to_pb(payment),
                                   key_release=wire.envelope_to_pb(release))

    @_guard_stream
    def Deliver(self, request: pb.DeliverRequest, context: grpc.ServicerContext
                ) -> Iterator[pb.DeliverEvent]:
        model, record = self.seller.deliver(self._buyer(context), _trial_id(request.trial_id))
        for frame in send_object("model", model):
            yield pb.DeliverEvent(frame=frame)
        yield pb.DeliverEvent(record=wire.envelope_to_pb(record))


def _frames(requests: Iterator[Any]) -> Iterator[pb.Frame]:
    for request in requests:
        if not request.HasField("frame"):
            raise BadInput("expected a data frame")
        yield request.frame

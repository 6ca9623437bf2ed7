"""The escrow daemon: what settles a deposit (Escrow), its gRPC edge, and `serve`.

Why a deposit goes only where the trade's outcome sends it: money moves only in
escrow.store transactions that pay a held deposit out once; a release without a ruling
must come from the depositor itself (its TLS client certificate names it: the buyer's own
PASS gives its own money away, nobody else's); any other release or refund needs a ruling
signed by an arbiter key this escrow was started with (--trust-arbiter), naming this trial
and the seller key the deposit pays, and a ruling that sends the money where it is asked
for (SELLER AT FAULT refunds; NO FAULT FOUND and BUYER'S EVIDENCE REJECTED release). A
forged or altered ruling fails its signature, a ruling on another trial or seller fails the
binding, and a replayed request either returns the receipt it got (same request id) or
finds the deposit settled; none of them moves money.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from gimme.v1 import escrow_pb2 as epb
from grpc_health.v1 import health_pb2

from common import wire
from common.errors import BadInput, GimmeError, Refused, Status, shown
from common.escrow import (
    BUYERS_PASS,
    DEPOSIT,
    PAYS_SELLER,
    REFUNDED,
    REFUNDS_BUYER,
    RELEASED,
    SETTLEMENT,
    Deposit,
    Settlement,
    deposit_payload,
    open_ruling,
    settlement_payload,
)
from common.protocol import Signed
from common.rpc import Malformed, TlsFiles, add_service, make_server, peer_identity
from common.signing import Signer, fingerprint, sha256
from escrow.store import EscrowStore, buyer_account

log = logging.getLogger(__name__)
SERVICE = epb.DESCRIPTOR.services_by_name["Escrow"]
SERVICE_NAME = SERVICE.full_name
_TRIAL_ID = re.compile(r"[0-9a-f]{24}")  # as the seller's OpenTrial makes them
T = TypeVar("T")


class Escrow:
    """Deposits and their settlement, free of gRPC."""

    def __init__(self, store: EscrowStore, signer: Signer, arbiter_keys: Sequence[bytes]
                 ) -> None:
        self.store = store
        self.signer = signer
        self.arbiter_keys = list(arbiter_keys)

    def _sign(self, kind: str, payload: bytes) -> Signed:
        return Signed(kind, payload, self.signer.sign(kind, payload))

    def deposit(self, buyer_id: str, trial_id: str, request_id: str, amount_cents: int,
                seller_public_key: bytes, model_commitment: bytes) -> Signed:
        if len(seller_public_key) != 32:
            raise BadInput("the seller key must be the 32-byte Ed25519 key that signed the "
                           "trial's offer")

        def sign(request: str) -> Signed:
            return self._sign(DEPOSIT, deposit_payload(Deposit(
                trial_id, request, buyer_id, seller_public_key, amount_cents,
                model_commitment, int(time.time()))))

        receipt = self.store.deposit(request_id, trial_id, buyer_id, seller_public_key,
                                     amount_cents, sign)
        log.info("trial %s: %s deposited %.2f for seller %s", trial_id, buyer_id,
                 amount_cents / 100, fingerprint(seller_public_key))
        return receipt

    def release(self, caller: str, trial_id: str, request_id: str, ruling: Signed | None
                ) -> Signed:
        """To the seller: on the depositor's own PASS (no ruling), or a ruling of no
        seller fault."""
        if ruling is None:
            held = self.store.held(trial_id)
            if caller != held.buyer_id:
                raise Refused(f"only the buyer who made the deposit ({shown(held.buyer_id)}) "
                              f"releases it without a ruling; anyone else needs an arbiter's "
                              f"signed ruling of no seller fault")
            return self._settle(trial_id, request_id, RELEASED, BUYERS_PASS)
        return self._settle(trial_id, request_id, RELEASED,
                            self._grounds(trial_id, ruling, PAYS_SELLER, "Release"))

    def refund(self, trial_id: str, request_id: str, ruling: Signed | None) -> Signed:
        """To the buyer: only on a ruling of SELLER AT FAULT."""
        if ruling is None:
            raise Refused("a refund needs an arbiter's signed ruling of SELLER AT FAULT "
                          "('gimme-arbiter verify BUNDLE --seller-key KEY --sign-with FILE')")
        return self._settle(trial_id, request_id, REFUNDED,
                            self._grounds(trial_id, ruling, REFUNDS_BUYER, "Refund"))

    def _grounds(self, trial_id: str, signed: Signed, allowed: tuple[str, ...], method: str
                 ) -> str:
        ruling = open_ruling(signed, self.arbiter_keys)
        held = self.store.held(trial_id)
        if ruling.trial_id != trial_id or ruling.seller_public_key != held.seller_public_key:
            raise Refused(f"the ruling is on trial {shown(ruling.trial_id)} under seller key "
                          f"{fingerprint(ruling.seller_public_key)}, but this deposit is for "
                          f"trial {trial_id} paying seller {fingerprint(held.seller_public_key)}")
        if ruling.ruling not in allowed:
            other = "Refund" if method == "Release" else "Release"
            raise Refused(f"the ruling is {ruling.ruling!r}, which does not allow {method} "
                          f"(only {' or '.join(allowed)} does); {other} is what it allows")
        return f"arbiter: {ruling.ruling} (ruling sha256 {sha256(signed.payload).hex()[:16]})"

    def _settle(self, trial_id: str, request_id: str, outcome: str, grounds: str) -> Signed:
        def sign(request: str, payee: str, amount: int) -> Signed:
            return self._sign(SETTLEMENT, settlement_payload(Settlement(
                trial_id, request, outcome, payee, amount, grounds, int(time.time()))))

        receipt = self.store.settle(request_id, trial_id, outcome, grounds, sign)
        log.info("trial %s: deposit %s on %s", trial_id, outcome, grounds)
        return receipt

    def balance(self, account: str) -> int:
        return self.store.balance(account)


def _checked_ids(trial_id: str, request_id: str) -> None:
    if not _TRIAL_ID.fullmatch(trial_id):
        raise BadInput(f"{shown(trial_id)} is not a trial id (24 hex characters, as the "
                       f"seller's offer names it)")
    if not 8 <= len(request_id) <= 64:
        raise BadInput("a request id must be 8-64 characters (a fresh UUID works)")


def _guard(method: Callable[..., T]) -> Callable[..., T]:
    """Refusals -> their gRPC status and message; anything else INTERNAL, logged."""

    @functools.wraps(method)
    def wrapper(self: EscrowServicer, request: Any, context: grpc.ServicerContext) -> T:
        try:
            if isinstance(request, Malformed):
                raise BadInput(f"malformed {request.message_type} message ({request.reason})")
            return method(self, request, context)
        except GimmeError as exc:
            if exc.status is Status.INTERNAL:
                log.error("%s failed: %s", method.__name__, exc.message)
            else:
                log.warning("%s refused: %s", method.__name__, exc.message)
            context.abort(getattr(grpc.StatusCode, exc.status.value), exc.message[:1024])
        except Exception:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed on the "
                                                    f"escrow's side (its log says why)")

    return wrapper


class EscrowServicer:
    def __init__(self, escrow: Escrow, require_tls_identity: bool) -> None:
        self.escrow = escrow
        self.require_tls_identity = require_tls_identity

    def _caller(self, context: grpc.ServicerContext, claimed: str) -> str:
        """The TLS client certificate's name; without TLS, the name the request gives."""
        if self.require_tls_identity:
            name = peer_identity(context)
            if name is None:
                raise Refused("no client certificate: the escrow identifies parties by TLS")
            return name
        if not claimed or len(claimed) > 64:
            raise BadInput("without TLS, name yourself in buyer_id (1-64 characters)")
        return claimed

    @staticmethod
    def _ruling(request: epb.SettleRequest) -> Signed | None:
        return wire.envelope_from_pb(request.ruling) if request.HasField("ruling") else None

    @_guard
    def Deposit(self, request: epb.DepositRequest, context: grpc.ServicerContext
                ) -> epb.EscrowReply:
        _checked_ids(request.trial_id, request.request_id)
        receipt = self.escrow.deposit(
            self._caller(context, request.buyer_id), request.trial_id, request.request_id,
            request.amount_cents, request.seller_public_key, request.model_commitment)
        return epb.EscrowReply(receipt=wire.envelope_to_pb(receipt))

    @_guard
    def Release(self, request: epb.SettleRequest, context: grpc.ServicerContext
                ) -> epb.EscrowReply:
        _checked_ids(request.trial_id, request.request_id)
        receipt = self.escrow.release(self._caller(context, request.buyer_id),
                                      request.trial_id, request.request_id,
                                      self._ruling(request))
        return epb.EscrowReply(receipt=wire.envelope_to_pb(receipt))

    @_guard
    def Refund(self, request: epb.SettleRequest, context: grpc.ServicerContext
               ) -> epb.EscrowReply:
        _checked_ids(request.trial_id, request.request_id)
        receipt = self.escrow.refund(request.trial_id, request.request_id,
                                     self._ruling(request))
        return epb.EscrowReply(receipt=wire.envelope_to_pb(receipt))

    @_guard
    def Balance(self, request: epb.BalanceRequest, context: grpc.ServicerContext
                ) -> epb.BalanceReply:
        account = request.account or buyer_account(self._caller(context, ""))
        return epb.BalanceReply(account=account, balance_cents=self.escrow.balance(account))


@dataclass(frozen=True)
class EscrowOptions:
    state: Path
    listen: str
    tls: TlsFiles | None
    arbiter_keys: tuple[bytes, ...] = ()
    port_file: Path | None = None


def serve(options: EscrowOptions, stop: threading.Event) -> None:
    # bound before the state is touched: a second daemon on a busy port changes nothing
    server, port, health = make_server(options.listen, options.tls)
    store = EscrowStore(options.state / "escrow.sqlite")
    signer, created = Signer.load_or_create(options.state / "identity.key")
    log.info("%s escrow identity %s; trusting %d arbiter key(s)%s",
             "created" if created else "loaded", fingerprint(signer.public_key),
             len(options.arbiter_keys),
             "".join(f" {fingerprint(key)}" for key in options.arbiter_keys))
    if options.tls is None:
        log.warning("WITHOUT TLS the escrow takes each caller's word for its name: anyone "
                    "can release anyone's deposit. For local experiments only")
    add_service(server, EscrowServicer(Escrow(store, signer, options.arbiter_keys),
                                       require_tls_identity=options.tls is not None), SERVICE)
    server.start()
    for service in ("", SERVICE_NAME):
        health.set(service, health_pb2.HealthCheckResponse.SERVING)
    if options.port_file is not None:
        options.port_file.write_text(str(port))
    log.info("SERVING escrow on port %d (held: %.2f)", port, store.held_total() / 100)
    try:
        stop.wait()
        log.info("shutting down")
    finally:
        health.enter_graceful_shutdown()
        server.stop(5).wait()
        store.close()
        log.info("stopped")


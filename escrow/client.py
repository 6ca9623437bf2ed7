"""The escrow's gRPC client, for the buyer (deposit, release on PASS) and for anyone holding
an arbiter's signed ruling (settle)."""

from __future__ import annotations

from typing import Any

import grpc
from gimme.v1 import escrow_pb2 as epb
from gimme.v1 import escrow_pb2_grpc as epb_grpc

from buyer_client.client import _ERRORS
from common import errors, wire
from common.protocol import Signed
from common.rpc import TlsFiles, make_channel


class EscrowClient:
    def __init__(self, address: str, tls: TlsFiles | None, caller: str = "",
                 timeout: float = 60.0) -> None:
        self.address = address
        self.channel = make_channel(address, tls)
        self.stub = epb_grpc.EscrowStub(self.channel)
        self.caller = "" if tls else caller  # without TLS the request names the caller
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE:
                raise errors.Unavailable(f"cannot reach the escrow at {self.address}: "
                                         f"{details}. Is 'gimme-escrow serve' running there, "
                                         f"with matching TLS settings?") from None
            raise _ERRORS.get(code, errors.GimmeError)(
                f"escrow refused {method} ({code.name}): {details}") from None

    def deposit(self, trial_id: str, request_id: str, amount_cents: int,
                seller_public_key: bytes, model_commitment: bytes) -> Signed:
        reply = self._call("Deposit", epb.DepositRequest(
            trial_id=trial_id, request_id=request_id, amount_cents=amount_cents,
            seller_public_key=seller_public_key, model_commitment=model_commitment,
            buyer_id=self.caller))
        return wire.envelope_from_pb(reply.receipt)

    def settle(self, method: str, trial_id: str, request_id: str, ruling: Signed | None
               ) -> Signed:
        """`method` Release or Refund; no ruling: the depositor's own release (PASS)."""
        request = epb.SettleRequest(trial_id=trial_id, request_id=request_id,
                                    buyer_id=self.caller)
        if ruling is not None:
            request.ruling.CopyFrom(wire.envelope_to_pb(ruling))
        return wire.envelope_from_pb(self._call(method, request).receipt)

    def balance(self, account: str = "") -> int:
        reply = self._call("Balance", epb.BalanceRequest(account=account))
        return int(reply.balance_cents)

"""gRPC channel and server construction: the one place transport settings live."""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.errors import BadInput

log = logging.getLogger(__name__)

SERVICE_NAME = "gimme.v1.Seller"
# the seller's health for this name turns SERVING once every listing of its catalog is listed
# or refused ("" and SERVICE_NAME: once the first one is listed)
CATALOG_SERVICE = f"{SERVICE_NAME}.catalog"
# Everything big is chunked (common.transfer); keep gRPC's default 4 MiB receive limit.
MAX_MESSAGE_BYTES = 4 << 20
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
]
# A second server on a busy port must fail to bind, not silently share it (Linux's
# SO_REUSEPORT, on by default in gRPC, splits connections between the two daemons).
# Clients ping every 30 s while a call is silent (an evaluation between progress messages);
# a server counts pings closer than this as strikes (default 5 min) and, after two, drops
# every call of the connection with GOAWAY "too_many_pings" (seen when a worker stalled).
_SERVER_OPTIONS = [*_OPTIONS, ("grpc.so_reuseport", 0),
                   ("grpc.http2.min_ping_interval_without_data_ms", 20_000)]


@dataclass(frozen=True)
class TlsFiles:
    """A CA certificate plus this party's certificate and key (PEM files)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path, name: str) -> TlsFiles:
        files = cls(directory / "ca.pem", directory / f"{name}.pem", directory / f"{name}.key")
        missing = [str(p) for p in (files.ca, files.cert, files.key) if not p.exists()]
        if missing:
            raise BadInput(f"TLS files missing: {', '.join(missing)}. Create them with "
                           f"'gimme-seller certs --out {directory}', or pass --insecure to "
                           f"run without TLS (not for real trades)")
        return files


def make_server(
    address: str, tls: TlsFiles | None, max_workers: int = 16
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A server bound to `address` (port 0 picks a free one); health starts NOT_SERVING."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=_SERVER_OPTIONS)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    if tls is None:
        log.warning("serving WITHOUT TLS on %s (--insecure): anyone on the path can read "
                    "and alter trades", address)
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(tls.key.read_bytes(), tls.cert.read_bytes())],
                root_certificates=tls.ca.read_bytes(),
                require_client_auth=True,
            )
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # gRPC's way of saying the bind failed
        port = 0
    if port == 0:
        raise BadInput(f"cannot listen on {address}: port in use (is another gimme-seller "
                       f"serving there?) or address not available; stop the other daemon or "
                       f"pick another port with --listen")
    return server, port, health_servicer


@dataclass(frozen=True)
class Malformed:
    """A request message that did not parse. gRPC answers a deserializer's exception with
    INTERNAL and a logged traceback per message, so requests are parsed here, never raising,
    and the servicer refuses a Malformed one with INVALID_ARGUMENT."""

    message_type: str
    reason: str


def _lenient_parser(method: MethodDescriptor) -> Any:
    request_class = message_factory.GetMessageClass(method.input_type)

    def parse(data: bytes) -> Any:
        try:
            return request_class.FromString(data)
        except Exception as exc:  # any parse failure is the sender's
            return Malformed(method.input_type.name, str(exc)[:100])

    return parse


def add_service(server: grpc.Server, servicer: Any, service: ServiceDescriptor) -> None:
    """Serve `servicer`'s methods for every RPC of `service` (in place of the generated
    add_*Servicer_to_server), with requests parsed by `_lenient_parser`."""
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    handlers = {
        method.name: kinds[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name),
            request_deserializer=_lenient_parser(method),
            response_serializer=message_factory.GetMessageClass(
                method.output_type).SerializeToString)
        for method in service.methods}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))


def make_channel(address: str, tls: TlsFiles | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes(),
        certificate_chain=tls.cert.read_bytes(),
    )
    return grpc.secure_channel(address, credentials, options=_OPTIONS)


def peer_identity(context: grpc.ServicerContext) -> str | None:
    """The TLS client certificate's common name, when the peer presented one."""
    names = list(context.auth_context().get("x509_common_name", []))
    if not names:
        return None
    name = names[0]
    return name.decode() if isinstance(name, bytes) else str(name)


def check_health(address: str, tls: TlsFiles | None, timeout: float = 5.0,
                 service: str = SERVICE_NAME) -> str:
    """The seller's health status name (SERVING, NOT_SERVING, ...) for `service`."""
    with make_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service),
                              timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

"""`gimme-seller serve`: load the catalog, serve trades, stop cleanly on SIGTERM/SIGINT.

The catalog loads in the background (seller_server.catalog.CatalogLoad): health turns
SERVING, and buyers see models, as soon as the first listing is ready; each other listing
appears when its compile finishes; the CATALOG_SERVICE health name turns SERVING once every
listing is listed or refused. A listing that fails is refused by name in the log and costs
no other; only a catalog of which nothing could be listed stops the daemon.
"""

from __future__ import annotations

import fcntl
import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from grpc_health.v1 import health_pb2

from common.errors import BadInput
from common.rpc import CATALOG_SERVICE, SERVICE_NAME, TlsFiles, add_service, make_server
from common.signing import Signer, fingerprint
from seller_server.catalog import LISTING_TIMEOUT, CatalogLoad, Listing
from seller_server.service import SERVICE, UNARY_THREADS, SellerServicer, StreamLimits
from seller_server.store import Store
from seller_server.trade import Seller
from seller_server.worker import Capacity, WorkerSlots

log = logging.getLogger(__name__)
KEY_SWEEP_SECONDS = 600
GRACE_SECONDS = 10.0
LOADER_STOP_SECONDS = 30.0  # at shutdown: for the catalog's workers to be killed and reaped


@dataclass(frozen=True)
class ServeOptions:
    catalog: Path
    state: Path
    listen: str
    tls: TlsFiles | None
    security_bits: int = 128
    insecure_ring: int = 0
    capacity: Capacity = field(default_factory=Capacity)
    port_file: Path | None = None
    key_ttl_hours: float = 24.0  # unpaid trials' evaluation keys are deleted after this idle
    streams: StreamLimits = field(default_factory=StreamLimits)
    escrow_keys: tuple[bytes, ...] = ()  # escrows whose deposit receipts pay for a trial
    listing_timeout: float = LISTING_TIMEOUT  # seconds one listing's compile may take


def serve(options: ServeOptions, stop: threading.Event | None = None) -> None:
    stop = stop or _stop_on_signals()
    if not options.catalog.is_dir():
        raise BadInput(f"catalog {options.catalog} is not a directory")
    # bound before the state is touched: a second daemon on a busy port changes nothing
    server, port, health = make_server(options.listen, options.tls,
                                       max_workers=options.streams.total + UNARY_THREADS)
    state_lock = _lock_state(options.state)
    store = Store(options.state / "gimme.sqlite")
    refunded = store.recover_interrupted()
    if refunded:
        log.warning("refunded %d evaluation(s) interrupted by the last shutdown", refunded)
    signer, created = Signer.load_or_create(options.state / "identity.key")
    log.info("%s seller identity %s", "created" if created else "loaded",
             fingerprint(signer.public_key))
    if options.security_bits < 128:
        log.warning("INSECURE HE PARAMETERS (security level %d): for tests only; buyers with "
                    "the default policy will refuse every offer", options.security_bits)
    servicer = SellerServicer(require_tls_identity=options.tls is not None,
                              stream_limits=options.streams)
    add_service(server, servicer, SERVICE)
    health.set(CATALOG_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.start()
    log.info("listening on port %d (health NOT_SERVING until the first listing is ready)",
             port)
    if options.port_file is not None:
        options.port_file.write_text(str(port))
    slots = WorkerSlots(options.capacity.concurrent_evaluations)
    seller = Seller([], store, signer, options.state / "spool", options.capacity,
                    options.security_bits, options.escrow_keys, slots=slots)
    cancel = threading.Event()  # kills the catalog's compiles at shutdown
    failure: list[str] = []  # why nothing could be listed
    first = threading.Lock()

    def listed(listing: Listing) -> None:
        seller.add_listing(listing)
        seller.loading = frozenset(loader.pending())
        if first.acquire(blocking=False):  # never released: the first listing only
            servicer.ready(seller)
            for service in ("", SERVICE_NAME):
                health.set(service, health_pb2.HealthCheckResponse.SERVING)
            log.info("SERVING: %s is ready", listing.model_id)

    def settled() -> None:  # a buyer asking for a model still compiling is told so
        seller.loading = frozenset(loader.pending())

    loader = CatalogLoad(options.catalog, store, security_bits=options.security_bits,
                         insecure_ring=options.insecure_ring, capacity=options.capacity,
                         listing_timeout=options.listing_timeout, slots=slots,
                         on_listed=listed, on_settled=settled)

    def load() -> None:
        try:
            listings, refused = loader.run(cancel)
            if cancel.is_set():
                return  # stopping: what is left was not loaded
            if listings:
                health.set(CATALOG_SERVICE, health_pb2.HealthCheckResponse.SERVING)
                log.info("catalog loaded: %d model(s) listed (%s)%s", len(listings),
                         ", ".join(listing.model_id for listing in listings),
                         f"; {len(refused)} refused: "
                         f"{', '.join(r.split(':')[0] for r in refused)}" if refused else "")
            else:
                failure.append("no model in the catalog could be listed:\n  "
                               + "\n  ".join(refused))
        except BadInput as exc:  # e.g. a catalog without listings
            failure.append(exc.message)
        except Exception as exc:  # the loader's own bug: the daemon stops, saying why
            log.exception("loading the catalog failed")
            failure.append(f"loading the catalog failed: {type(exc).__name__}: {exc}")
        if failure:
            stop.set()  # nothing to serve

    loading = threading.Thread(target=load, name="catalog", daemon=True)
    try:
        seller.expire_keys(options.key_ttl_hours * 3600)
        loading.start()
        while not stop.wait(KEY_SWEEP_SECONDS):
            seller.expire_keys(options.key_ttl_hours * 3600)
        if failure:
            raise BadInput(failure[0])
        log.info("shutting down: finishing in-flight calls (up to %.0fs)", GRACE_SECONDS)
    finally:
        cancel.set()
        health.enter_graceful_shutdown()
        server.stop(GRACE_SECONDS).wait()
        if loading.is_alive():
            loading.join(LOADER_STOP_SECONDS)
        store.close()
        state_lock.close()
        log.info("stopped")


def _lock_state(state: Path) -> IO[str]:
    """One daemon per state directory: a second one would refund the first's running
    evaluations as interrupted (recover_interrupted) and share its ledger. The kernel drops
    the lock when the daemon exits, however it exits."""
    state.mkdir(parents=True, exist_ok=True)
    handle = (state / "serve.lock").open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise BadInput(f"state directory {state} is in use by another 'gimme-seller serve': "
                       f"stop it first, or pass another --state") from None
    return handle


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop

"""Chunked transfer of large objects: a manifest (name, exact size, SHA-256), then chunks.

Both ends cap what they accept before reading a byte of payload, so nothing depends on
raising gRPC's 4 MiB message limit.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from gimme.v1 import gimme_pb2 as pb

from common.errors import BadInput, Stalled, shown

CHUNK_BYTES = 1 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class Received:
    name: str
    data: bytes
    sha256: bytes


def send_object(name: str, data: bytes, on_chunk: Callable[[int], None] | None = None
                ) -> Iterator[pb.Frame]:
    yield pb.Frame(manifest=pb.ObjectManifest(
        name=name, size=len(data), sha256=hashlib.sha256(data).digest()))
    for start in range(0, len(data), CHUNK_BYTES):
        chunk = data[start:start + CHUNK_BYTES]
        yield pb.Frame(chunk=chunk)
        if on_chunk is not None:
            on_chunk(len(chunk))


def receive_object(
    frames: Iterator[pb.Frame],
    *,
    expected_name: str,
    max_size: int,
    exact_size: int | None = None,
    what: str,
) -> Received:
    """Read one object; BadInput on a missing/unexpected manifest, size or digest."""
    first = next(frames, None)
    if first is None:
        raise BadInput(f"{what}: the stream ended before {expected_name!r}")
    if not first.HasField("manifest"):
        raise BadInput(f"{what}: expected the manifest of {expected_name!r}, got data")
    manifest = first.manifest
    if manifest.name != expected_name:
        raise BadInput(f"{what}: expected object {expected_name!r}, got {shown(manifest.name)}")
    if exact_size is not None and manifest.size != exact_size:
        raise BadInput(f"{what}: {expected_name!r} declares {manifest.size} bytes; exactly "
                       f"{exact_size} are expected for these parameters")
    if manifest.size > max_size:
        raise BadInput(f"{what}: {expected_name!r} declares {manifest.size} bytes, over the "
                       f"{max_size}-byte cap")
    if len(manifest.sha256) != 32:
        raise BadInput(f"{what}: {expected_name!r} manifest has no SHA-256 digest")
    parts: list[bytes] = []
    got = 0
    digest = hashlib.sha256()
    while got < manifest.size:
        frame = next(frames, None)
        if frame is None or not frame.HasField("chunk"):
            raise BadInput(f"{what}: {expected_name!r} ended after {got} of "
                           f"{manifest.size} bytes")
        if got + len(frame.chunk) > manifest.size:
            raise BadInput(f"{what}: {expected_name!r} sent more than the "
                           f"{manifest.size} bytes its manifest declares")
        parts.append(frame.chunk)
        digest.update(frame.chunk)
        got += len(frame.chunk)
    if digest.digest() != manifest.sha256:
        raise BadInput(f"{what}: {expected_name!r} does not match its SHA-256 (corrupted in "
                       f"transit); send it again")
    return Received(manifest.name, b"".join(parts), manifest.sha256)


class _End:
    """The peer closed its side of the stream."""


def idle_limited(messages: Iterator[T], idle_seconds: float, what: str) -> Iterator[T]:
    """`messages`, ended with Stalled when the peer sends nothing for `idle_seconds`.

    A stalled peer must not hold its slot forever, but gRPC's request iterators block with
    no timeout: one reader thread per stream pulls the next message only when it is asked
    for (so nothing is read ahead) and the caller waits for it with a timeout. Once the
    call ends (the caller aborts it, or the peer goes), the reader's pending read returns and
    the thread exits.
    """
    asked = threading.Semaphore(0)
    closed = threading.Event()
    handed: queue.SimpleQueue[T | _End | BaseException] = queue.SimpleQueue()

    def read() -> None:
        try:
            while asked.acquire() and not closed.is_set():
                item = next(messages, _End())
                handed.put(item)
                if isinstance(item, _End):
                    return
        except BaseException as exc:  # the caller re-raises it in its own thread
            handed.put(exc)

    threading.Thread(target=read, name=f"{what} reader", daemon=True).start()
    try:
        while True:
            asked.release()
            try:
                item = handed.get(timeout=idle_seconds)
            except queue.Empty:
                raise Stalled(f"{what}: nothing received for {idle_seconds:g} s, so the seller "
                              f"ended the stream (its --stream-idle-seconds); send without "
                              f"pausing, or retry over a working connection") from None
            if isinstance(item, _End):
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        closed.set()
        asked.release()

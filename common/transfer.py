"""Chunked transfer of large objects: a manifest (name, exact size, SHA-256), then chunks.

Both ends cap what they accept before reading a byte of payload, so nothing depends on
raising gRPC's 4 MiB message limit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from gimme.v1 import gimme_pb2 as pb

from common.errors import BadInput

CHUNK_BYTES = 1 << 20


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
        raise BadInput(f"{what}: expected object {expected_name!r}, got {manifest.name!r}")
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

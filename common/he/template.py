"""Byte templates: the check every untrusted OpenFHE object passes before OpenFHE sees it.

The receiving party serializes a few objects of its own that have exactly the shape
it expects (same context, level, scale, key tag). Bytes that differ between those
samples are random polynomial coefficients; every other byte (headers, lengths,
parameters, level, key tag) must be identical in an upload. Bit flips and edited
length fields outside coefficient data are what crash OpenFHE, so this rejects them
before deserialization.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from common.errors import BadInput

WORD = 8  # coefficients are 64-bit words
CHUNK = 1 << 24  # bytes compared at a time (bounds temporary arrays)


@dataclass(frozen=True)
class ByteTemplate:
    reference: bytes
    fixed: npt.NDArray[np.bool_]  # True where an upload must equal `reference`

    @property
    def size(self) -> int:
        return len(self.reference)

    def check(self, data: bytes, what: str) -> None:
        """Raise BadInput naming the first byte that cannot be right."""
        if len(data) != len(self.reference):
            raise BadInput(f"{what}: expected exactly {len(self.reference)} bytes for these "
                           f"parameters, got {len(data)}; it was made for other parameters "
                           f"or truncated")
        got = np.frombuffer(data, dtype=np.uint8)
        want = np.frombuffer(self.reference, dtype=np.uint8)
        for start in range(0, got.size, CHUNK):
            part = slice(start, start + CHUNK)
            bad = np.flatnonzero((got[part] != want[part]) & self.fixed[part])
            if bad.size:
                raise BadInput(f"{what}: byte {start + int(bad[0])} outside the coefficient "
                               f"data differs from the expected layout (wrong context, level, "
                               f"key tag, or a corrupted upload); re-create it from the offer")


def learn_template(samples: Iterable[bytes], block_bytes: int) -> ByteTemplate:
    """Build a template from >= 3 same-shaped serializations of the receiver's own objects
    (taken one at a time: rotation keys run to hundreds of MB each).

    Coefficient data comes in blocks of `block_bytes` (ring dimension x 8). Each block
    starts at the first differing byte; everything outside the blocks is fixed.
    """
    reference: bytes | None = None
    differs = np.zeros(0, dtype=bool)
    count = 0
    for sample in samples:
        count += 1
        if reference is None:
            reference = sample
            differs = np.zeros(len(sample), dtype=bool)
            continue
        if len(sample) != len(reference):
            raise RuntimeError("template learning needs samples of equal length")
        got, want = np.frombuffer(sample, dtype=np.uint8), np.frombuffer(reference, np.uint8)
        for start in range(0, got.size, CHUNK):
            part = slice(start, start + CHUNK)
            differs[part] |= got[part] != want[part]
    if reference is None or count < 3:
        raise RuntimeError("template learning needs >= 3 samples")
    fixed = np.ones(differs.size, dtype=bool)
    cursor = 0
    while (first := _next_differing(differs, cursor)) >= 0:
        start = _block_start(differs, first, block_bytes)
        end = start + block_bytes
        if end > fixed.size:
            raise RuntimeError(f"template learning: random bytes at {start} do not form a "
                               f"{block_bytes}-byte coefficient block")
        fixed[start:end] = False
        cursor = end
    return ByteTemplate(reference=reference, fixed=fixed)


def _next_differing(differs: npt.NDArray[np.bool_], cursor: int) -> int:
    """The first differing byte at or after `cursor` (-1: none), scanning in growing
    windows: headers between blocks are short."""
    step = 4096
    while cursor < differs.size:
        hits = np.flatnonzero(differs[cursor:cursor + step])
        if hits.size:
            return cursor + int(hits[0])
        cursor += step
        step *= 2
    return -1


def _block_start(differs: npt.NDArray[np.bool_], first: int, block_bytes: int) -> int:
    """Where the block whose first differing byte is `first` begins.

    Its first coefficient's low byte can agree in every sample by chance (1 in 65,536
    with 3 samples: keys with hundreds of blocks hit it), making the block look a byte or
    more late. Coefficients are little-endian words narrower than 64 bits, so in each word
    a run of low bytes varies and the top bytes do not: the byte offset (mod 8) where
    that run starts is where words, and so the block, start.
    """
    window = differs[first:first + block_bytes]
    words = len(window) // WORD
    varying = {r for r in range(WORD) if window[r::WORD].sum() > words // 2}
    starts = [r for r in varying if (r - 1) % WORD not in varying]
    if len(starts) != 1:
        return first  # every byte varies (wide moduli): no late start can hide
    return max(first - (-starts[0]) % WORD, 0)

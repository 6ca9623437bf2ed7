"""Dense linear layers on the RNS coefficients of serialized ciphertexts, in numpy.

A linear sum sum_j w_j ct_j is, per RNS tower q and polynomial coefficient, the integer sum
sum_j c_j x_j mod q with c_j the weight scaled to an integer (FIXEDMANUAL: as OpenFHE's
scalar product rounds it). OpenFHE computes it one term at a time, a fresh ciphertext per
product; for a dense layer the whole stage is one matrix product of the weight constants
with the stacked coefficients. numpy has no exact 64-bit modular matrix product, so both
sides are split into limbs small enough that float64 BLAS products and K-term sums stay
exact (< 2^53), and the limb products are recombined mod q in int64. The result is bit
for bit what OpenFHE's EvalLinearWSum computes before its rescale (tests/test_engine.py).

No OpenFHE here: the engine serializes and deserializes; this module reads and writes the
coefficient arrays in those bytes.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

FLOAT_EXACT_BITS = 53
CHUNK = 2048  # coefficients per pass
# |c| beyond this would not fit int64 limb arithmetic; OpenFHE switches to 128-bit there
MAX_CONSTANT_BITS = 62


@dataclass(frozen=True)
class Layout:
    """Where a serialized ciphertext keeps its coefficient arrays: `starts[e][t]` is the
    byte offset of element e's tower t (ring_dimension little-endian uint64 words)."""

    ring_dimension: int
    moduli: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]

    @property
    def elements(self) -> int:
        return len(self.starts)

    @property
    def towers(self) -> int:
        return len(self.moduli)


def find_layout(blob: bytes, ring_dimension: int, modulus: int) -> Layout:
    """Locate the arrays: OpenFHE's binary form writes each tower as its length, the
    words, then the tower's modulus (a prime factor of the context's `modulus`)."""
    n = ring_dimension
    marker = struct.pack("<Q", n)
    found: list[tuple[int, int]] = []
    position = blob.find(marker)
    while position >= 0:
        start = position + 8
        end = start + 8 * n
        if end + 8 <= len(blob):
            q = struct.unpack_from("<Q", blob, end)[0]
            if q > 1 and modulus % q == 0:
                found.append((start, q))
                position = blob.find(marker, end + 8)
                continue
        position = blob.find(marker, position + 1)
    moduli = tuple(q for _start, q in found)
    towers = len(set(moduli))  # distinct primes, repeated once per element
    if not towers or len(found) % towers or moduli != moduli[:towers] * (len(found) // towers):
        raise ValueError(f"no consistent coefficient arrays in {len(blob)} bytes")
    starts = tuple(tuple(start for start, _q in found[e * towers:(e + 1) * towers])
                   for e in range(len(found) // towers))
    return Layout(n, moduli[:towers], starts)


def weight_constants(weights: FloatArray, scale_bits: int) -> I64 | None:
    """The integers OpenFHE multiplies by for these weights (FIXEDMANUAL scalar product:
    truncation of w * 2^scale + 0.5), or None when one needs more than 62 bits."""
    scaled = np.asarray(weights, dtype=np.float64) * 2.0 ** scale_bits + 0.5
    if scaled.size and np.abs(scaled).max() >= 2.0 ** MAX_CONSTANT_BITS:
        return None
    return np.trunc(scaled).astype(np.int64)


def limb_bits(terms: int) -> int:
    """Limb width b with |c limb| <= 2^(b-1), x limb < 2^b: `terms` products sum below
    2^53, so float64 adds them exactly."""
    return (FLOAT_EXACT_BITS + 1 - math.ceil(math.log2(max(terms, 2)))) // 2


def _signed_limbs(constants: I64, bits: int) -> list[FloatArray]:
    limbs: list[FloatArray] = []
    rest = constants.copy()
    half = np.int64(1 << (bits - 1))
    mask = np.int64((1 << bits) - 1)
    while np.any(rest) or not limbs:
        low = ((rest + half) & mask) - half
        limbs.append(low.astype(np.float64))
        rest = (rest - low) >> bits
    return limbs


def _split(constants: I64, moduli: tuple[int, ...]) -> tuple[int, list[FloatArray]]:
    """Limb width and the constants' limbs. Limb products of one shift (i + j = s) are
    summed in float64, so the width allows K times as many terms as shifts overlap."""
    terms = constants.shape[1]
    widest = max(q.bit_length() for q in moduli)
    for overlap in range(2, 8):
        bits = limb_bits(terms * overlap)
        limbs = _signed_limbs(constants, bits)
        if min(len(limbs), math.ceil(widest / bits)) <= overlap:
            return bits, limbs
    raise ValueError("weights too wide for exact float64 limbs")


def combine(constants: I64, sources: Sequence[tuple[bytes, Layout]],
            targets: Sequence[tuple[bytearray, Layout]]) -> None:
    """Write (constants @ sources) mod q, per element and tower, into the targets' arrays.

    constants: rows x K; sources: K serialized ciphertexts at one level (an element a
    source lacks counts as zero); targets: one per row, at the same level. Works on
    CHUNK coefficients at a time in buffers reused across passes: fresh memory
    page-faults at ~1.2 ms per MB on this kind of VM.
    """
    moduli = sources[0][1].moduli
    terms = constants.shape[1]
    bits, c_limbs = _split(constants, moduli)
    n = sources[0][1].ring_dimension
    chunk = min(CHUNK, n)
    limb_mask = np.uint64((1 << bits) - 1)
    if max(moduli).bit_length() > 62:
        raise ValueError(f"a {max(moduli).bit_length()}-bit modulus is too wide for int64 "
                         f"limbs")
    # allocated once: K x CHUNK arrays can exceed the heap's mmap threshold, and a fresh
    # mapping per pass would page-fault all over again
    x = np.zeros((terms, chunk), dtype=np.uint64)
    scratch = np.empty_like(x)
    x_limbs = np.empty((math.ceil(max(moduli).bit_length() / bits), terms, chunk))
    for t, q in enumerate(moduli):
        x_count = math.ceil(q.bit_length() / bits)
        for e in range(max(layout.elements for _target, layout in targets)):
            for first in range(0, n, chunk):
                for k, (blob, layout) in enumerate(sources):
                    if e < layout.elements:
                        start = layout.starts[e][t] + 8 * first
                        x[k].view(np.uint8)[:] = np.frombuffer(blob, np.uint8, 8 * chunk, start)
                    else:
                        x[k] = 0
                for i in range(x_count):
                    np.right_shift(x, np.uint64(bits * i), out=scratch)
                    np.bitwise_and(scratch, limb_mask, out=scratch)
                    x_limbs[i] = scratch
                acc: U64 | None = None
                for shift in reversed(range(x_count + len(c_limbs) - 1)):
                    total = sum(c_limbs[shift - i] @ x_limbs[i] for i in range(x_count)
                                if 0 <= shift - i < len(c_limbs))
                    residue = (np.asarray(total).astype(np.int64) % np.int64(q)
                               ).astype(np.uint64)
                    acc = residue if acc is None else _add_mod(_shift_mod(acc, bits, q),
                                                               residue, q)
                assert acc is not None
                for r, (target, layout) in enumerate(targets):
                    if e < layout.elements:
                        start = layout.starts[e][t] + 8 * first
                        target[start:start + 8 * chunk] = acc[r].astype("<u8").tobytes()


def _shift_mod(values: U64, bits: int, q: int) -> U64:
    """values * 2^bits mod q for values < q, in steps that stay below 2^64."""
    step = 64 - q.bit_length()
    while bits:
        move = min(bits, step)
        values = (values << np.uint64(move)) % np.uint64(q)
        bits -= move
    return values


def _add_mod(a: U64, b: U64, q: int) -> U64:
    total = a + b  # both < q < 2^62: no wrap
    total -= np.uint64(q) * (total >= np.uint64(q))
    return total


def automorphism_map(ring_dimension: int, index: int) -> npt.NDArray[np.int64]:
    """The permutation X -> X^index makes of a polynomial in OpenFHE's evaluation (NTT)
    form: entry j of the result is entry map[j] of the input. OpenFHE stores evaluations
    at the odd powers of a 2N-th root in bit-reversed order; X -> X^k moves the
    evaluation at root^(2j+1) to root^((2j+1)k)."""
    n = ring_dimension
    bits = n.bit_length() - 1
    j = np.arange(n, dtype=np.int64)
    target = (((2 * j + 1) * index) % (2 * n)) >> 1
    result = np.empty(n, dtype=np.int64)
    result[_bit_reversed(j, bits)] = _bit_reversed(target, bits)
    return result


def _bit_reversed(values: npt.NDArray[np.int64], bits: int) -> npt.NDArray[np.int64]:
    out = np.zeros_like(values)
    for b in range(bits):
        out |= ((values >> b) & 1) << (bits - 1 - b)
    return out


def fold_first_element(blob: bytearray, layout: Layout, automorphisms: Sequence[int]) -> None:
    """In place: element 0 becomes prod_k (1 + sigma_k) of itself, divided by 2 once per
    automorphism (mod q). For automorphisms that generate a group H of order
    2^len(automorphisms) this is |H|^-1 * sum over H of sigma(c0), exact integer work
    (seller_server.worker explains what it is for)."""
    maps = [automorphism_map(layout.ring_dimension, k) for k in automorphisms]
    n = layout.ring_dimension
    for t, q in enumerate(layout.moduli):
        start = layout.starts[0][t]
        values = np.frombuffer(bytes(blob[start:start + 8 * n]), dtype="<u8").astype(np.uint64)
        modulus = np.uint64(q)
        for permutation in maps:
            values = values + values[permutation]  # both < q < 2^62: no wrap
            values -= modulus * (values >= modulus)
            # halve mod q (q odd): an odd value plus q is even
            values = (values + modulus * (values & np.uint64(1))) >> np.uint64(1)
        blob[start:start + 8 * n] = values.astype("<u8").tobytes()


def seeded_uniform(seed: bytes, moduli: Sequence[int], ring_dimension: int) -> list[U64]:
    """Per tower, `ring_dimension` values uniform mod q drawn from SHAKE-256(seed, tower):
    a public polynomial no party chose (128 bits per value, so the bias of reducing mod q
    is below 2^-60)."""
    towers = []
    for t, q in enumerate(moduli):
        words = np.frombuffer(hashlib.shake_256(seed + bytes([t])).digest(16 * ring_dimension),
                              dtype="<u8").reshape(ring_dimension, 2)
        high, low = words[:, 0].astype(object), words[:, 1].astype(object)
        towers.append(np.array((high * (1 << 64) + low) % q, dtype=np.uint64))
    return towers


def element(blob: bytes | bytearray, layout: Layout, index: int, tower: int) -> U64:
    start = layout.starts[index][tower]
    return np.frombuffer(bytes(blob[start:start + 8 * layout.ring_dimension]),
                         dtype="<u8").astype(np.uint64)


def _put(blob: bytearray, layout: Layout, index: int, tower: int, values: U64) -> None:
    start = layout.starts[index][tower]
    blob[start:start + 8 * layout.ring_dimension] = values.astype("<u8").tobytes()


def reseed_public_key(public: bytearray, public_layout: Layout, secret: bytes,
                      secret_layout: Layout, seed: bytes) -> None:
    """In place: the key pair's public key (b, a) = (-a s + e, a) becomes (b', a') with
    a' = seeded_uniform(seed) and b' = b + (a - a') s = -a' s + e, the same error for the
    same secret. Both keys are in OpenFHE's evaluation form, where ring products are
    products per entry."""
    moduli = public_layout.moduli
    for t, a_new in enumerate(seeded_uniform(seed, moduli, public_layout.ring_dimension)):
        q = moduli[t]
        b = element(public, public_layout, 0, t).astype(object)
        a = element(public, public_layout, 1, t).astype(object)
        s = element(secret, secret_layout, 0, t).astype(object)
        _put(public, public_layout, 0, t, np.array((b + (a - a_new.astype(object)) * s) % q,
                                                   dtype=np.uint64))
        _put(public, public_layout, 1, t, a_new)

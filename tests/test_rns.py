"""Exact dense linear sums on RNS coefficients (common.he.rns) against Python integers."""

from __future__ import annotations

import numpy as np
import pytest

from common.he import rns

N = 64


def _blob(arrays: list[list[rns.U64]], moduli: tuple[int, ...]) -> bytes:
    """Bytes shaped like OpenFHE's: a header, then per array its length, the words, its
    modulus and a few bytes of other fields."""
    parts = [b"header" + bytes(10)]
    for element in arrays:
        for array, q in zip(element, moduli, strict=True):
            parts += [np.uint64(N).tobytes(), array.astype("<u8").tobytes(),
                      np.uint64(q).tobytes(), b"\x00\x01\x02"]
    return b"".join(parts)


@pytest.mark.parametrize("terms", [3, 1000])
def test_sums_are_exact_for_every_modulus_width(terms: int) -> None:
    rng = np.random.default_rng(terms)
    moduli = ((1 << 60) - 93, (1 << 41) - 21, (1 << 33) - 9)  # 60-bit first tower
    modulus = moduli[0] * moduli[1] * moduli[2]
    elements = [3 if k % 3 == 0 else 2 for k in range(terms)]  # some unrelinearized
    sources = []
    values = []
    for count in elements:
        arrays = [[rng.integers(0, q, N, dtype=np.uint64) for q in moduli]
                  for _ in range(count)]
        values.append(arrays)
        blob = _blob(arrays, moduli)
        sources.append((blob, rns.find_layout(blob, N, modulus)))
    weights = rng.normal(0.0, 3.0, (4, terms))
    weights[0, 0] = -2.0 ** -41  # truncation toward zero after adding one half
    constants = rns.weight_constants(weights, 40)
    assert constants is not None
    template = _blob([[np.zeros(N, np.uint64)] * 3] * 3, moduli)
    targets = [(bytearray(template), rns.find_layout(template, N, modulus)) for _ in range(4)]
    rns.combine(constants, sources, targets)
    for r, (data, layout) in enumerate(targets):
        for e in range(3):
            for t, q in enumerate(moduli):
                got = np.frombuffer(bytes(data), "<u8", N, layout.starts[e][t])
                for i in (0, N // 2, N - 1):
                    expected = sum(int(constants[r, k]) * int(values[k][e][t][i])
                                   for k in range(terms) if e < elements[k]) % q
                    assert int(got[i]) == expected


def test_weights_beyond_62_bits_are_left_to_openfhe() -> None:
    assert rns.weight_constants(np.array([[2.0 ** 22]]), 40) is None
    constants = rns.weight_constants(np.array([[-1.5, 0.25]]), 40)
    assert constants is not None
    assert constants.tolist() == [[-(3 << 39) + 1, 1 << 38]]


def test_bytes_without_coefficient_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="no consistent coefficient arrays"):
        rns.find_layout(b"not a ciphertext" * 100, N, 7)

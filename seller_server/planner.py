"""CKKS parameter choice: the smallest ring meeting the security level for the plan's
depth with at most MAX_KEY_DIGITS key-switching digits (where one does), then the most
precise scale, then the smallest relinearization key."""

from __future__ import annotations

import dataclasses
import math

from common.errors import Unsupported
from common.he import engine
from common.he.params import MAX_LOG_QP, CkksParams

SCALE_BITS = (40, 36, 33)
MAX_FIRST_MOD_BITS = 60
# bits above the scale kept in the first modulus: room for |scores| plus decryption noise
FIRST_MOD_HEADROOM = 12
# near a ring's limit only many key-switching digits fit its modulus, and every key grows
# with them: at depth 20-23, N=2^15 took 21-24 digits and 253-327 MB per key (by
# relin_key_bytes_estimate), against 63-69 MB at N=2^16 with 2 (a feature-packed max-pool
# CNN's 22 rotation keys ran out of memory); capped, N=2^15 holds depth 20-21 at a 2^33
# scale (11 digits), 22 goes to 2^16
MAX_KEY_DIGITS = 12
MAX_RING = max(MAX_LOG_QP[128])  # the largest ring the security table (and an offer) has


def choose_params(depth: int, security_bits: int, max_abs_score: float,
                  insecure_ring: int = 0) -> CkksParams:
    """Parameters for a plan of `depth` whose scores stay within +-max_abs_score.

    security_bits 0 (tests only) takes `insecure_ring` with no security check at all.
    """
    magnitude_bits = max(math.ceil(math.log2(max_abs_score + 1.0)), 0)
    best: tuple[tuple[bool, int, int, int], CkksParams] | None = None
    for scale in SCALE_BITS:
        first = scale + magnitude_bits + FIRST_MOD_HEADROOM
        if first > MAX_FIRST_MOD_BITS:
            continue
        for digits in range(1, depth + 2):
            candidate = CkksParams(
                ring_dimension=insecure_ring, multiplicative_depth=depth,
                scaling_mod_bits=scale, first_mod_bits=first, num_large_digits=digits,
                claimed_security_bits=security_bits)
            try:
                ring = insecure_ring if security_bits == 0 else engine.smallest_ring(
                    candidate, security_bits)
                if security_bits == 0:
                    engine.build_context(candidate, 0)
            except RuntimeError:
                continue  # OpenFHE cannot spread the towers over this many digits
            candidate = dataclasses.replace(candidate, ring_dimension=ring)
            if ring > MAX_RING:
                continue
            rank = (digits > MAX_KEY_DIGITS, ring, -scale, relin_key_bytes_estimate(candidate))
            if best is None or rank < best[0]:
                best = (rank, candidate)
    if best is None:
        raise Unsupported(f"no CKKS parameters reach {security_bits}-bit security for depth "
                          f"{depth} with scores up to {max_abs_score:.3g}")
    return best[1]


def relin_key_bytes_estimate(params: CkksParams) -> int:
    """HYBRID key: dnum digits x 2 polynomials x (Q towers + P towers) x N words."""
    q_towers = params.multiplicative_depth + 1
    digit_bits = math.ceil(q_towers / params.num_large_digits) * params.scaling_mod_bits
    p_towers = math.ceil(digit_bits / MAX_FIRST_MOD_BITS) + 1
    return params.num_large_digits * 2 * (q_towers + p_towers) * params.ring_dimension * 8

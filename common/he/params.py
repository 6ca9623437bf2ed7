"""CKKS parameter records and the HE-standard security table (no OpenFHE here)."""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import asdict, dataclass

from common.errors import BadInput

# Homomorphic Encryption Standard, ternary secret, classical attacks: the largest
# log2(Q*P) for which ring dimension N gives the security level.
MAX_LOG_QP: dict[int, dict[int, int]] = {
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881, 65536: 1761},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611, 65536: 1220},
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476, 65536: 953},
}
SECURITY_LEVELS = (128, 192, 256)

SCALING_TECHNIQUE = "FIXEDMANUAL"
KEY_SWITCHING = "HYBRID"
SECRET_KEY_DISTRIBUTION = "UNIFORM_TERNARY"


@dataclass(frozen=True)
class CkksParams:
    """Everything both parties need to build the same CKKS context."""

    ring_dimension: int
    multiplicative_depth: int
    scaling_mod_bits: int
    first_mod_bits: int
    num_large_digits: int
    scaling_technique: str = SCALING_TECHNIQUE
    key_switching: str = KEY_SWITCHING
    secret_key_distribution: str = SECRET_KEY_DISTRIBUTION
    claimed_security_bits: int = 128

    @property
    def slots(self) -> int:
        return self.ring_dimension // 2

    def check_shape(self) -> None:
        """Reject records no honest seller sends, before any context is built from them."""
        problems = []
        n = self.ring_dimension
        if n < 1024 or n > 65536 or n & (n - 1):
            problems.append(f"ring dimension {n} is not a power of two in [1024, 65536]")
        if not 1 <= self.multiplicative_depth <= 40:
            problems.append(f"multiplicative depth {self.multiplicative_depth} not in [1, 40]")
        if not 20 <= self.scaling_mod_bits <= 60:
            problems.append(f"scaling modulus {self.scaling_mod_bits} bits not in [20, 60]")
        if not self.scaling_mod_bits <= self.first_mod_bits <= 60:
            problems.append(f"first modulus {self.first_mod_bits} bits not in "
                            f"[{self.scaling_mod_bits}, 60]")
        if not 1 <= self.num_large_digits <= self.multiplicative_depth + 1:
            problems.append(f"{self.num_large_digits} key-switching digits for "
                            f"{self.multiplicative_depth + 1} towers")
        for name, value, allowed in (
            ("scaling technique", self.scaling_technique, SCALING_TECHNIQUE),
            ("key switching", self.key_switching, KEY_SWITCHING),
            ("secret key distribution", self.secret_key_distribution, SECRET_KEY_DISTRIBUTION),
        ):
            if value != allowed:
                problems.append(f"{name} {value!r} is not supported (only {allowed!r})")
        if problems:
            raise BadInput("unusable CKKS parameters: " + "; ".join(problems))

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)

    def describe(self) -> str:
        return (f"N={self.ring_dimension} depth={self.multiplicative_depth} "
                f"scale=2^{self.scaling_mod_bits} first=2^{self.first_mod_bits} "
                f"dnum={self.num_large_digits}")


def table_security_bits(ring_dimension: int, log_qp: float) -> int:
    """Highest standard level the table grants to (N, log2 QP); 0 when none."""
    granted = 0
    for bits in SECURITY_LEVELS:
        limit = MAX_LOG_QP[bits].get(ring_dimension)
        if limit is not None and log_qp <= limit:
            granted = bits
    return granted


def log2_int(value: int) -> float:
    return math.log2(value) if value > 0 else 0.0


KEY_TAG_PREFIX = "gimme-"


def new_key_tag() -> str:
    """A fresh per-trial key tag; all tags have one length so serialized sizes are fixed."""
    return KEY_TAG_PREFIX + secrets.token_hex(16)


def public_key_seed(trial_id: str, key_tag: str) -> bytes:
    """What a trial's public key's uniform half is derived from (engine.generate_keys):
    both come from the seller's signed offer, made fresh for each trial, so the buyer
    cannot choose it."""
    return hashlib.sha256(f"gimme public key\0{trial_id}\0{key_tag}".encode()).digest()

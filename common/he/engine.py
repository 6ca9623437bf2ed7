"""The CKKS engine: the only module that calls OpenFHE.

Both parties build their context from the same `CkksParams` record (the seller never
ships a context). Objects that arrive over the network are opened only by
`CiphertextGate.load` / `load_relin_key`, and only inside guarded worker processes after
their bytes passed a `ByteTemplate` check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import openfhe as fhe

from common.errors import Refused
from common.he.params import CkksParams, log2_int, table_security_bits
from common.he.plan import HEPlan, PolyStage, chebyshev_split
from common.he.template import ByteTemplate, learn_template

Ciphertext = Any  # openfhe.Ciphertext (the binding ships no type information)
Context = Any  # openfhe.CryptoContext
ProgressFn = Callable[[int, int], None]

_SECURITY = {
    0: fhe.HEStd_NotSet,
    128: fhe.HEStd_128_classic,
    192: fhe.HEStd_192_classic,
    256: fhe.HEStd_256_classic,
}
TEMPLATE_SAMPLES = 4


def build_context(params: CkksParams, security_bits: int) -> Context:
    """A context for `params`; OpenFHE raises if the ring is too small for `security_bits`."""
    params.check_shape()
    cc = fhe.GenCryptoContext(_openfhe_params(params, security_bits, params.ring_dimension))
    for feature in (fhe.PKE, fhe.KEYSWITCH, fhe.LEVELEDSHE, fhe.ADVANCEDSHE):
        cc.Enable(feature)
    return cc


def smallest_ring(params: CkksParams, security_bits: int) -> int:
    """The smallest ring OpenFHE accepts for `params` at `security_bits` (ring ignored)."""
    ring: int = fhe.GenCryptoContext(_openfhe_params(params, security_bits, None)
                                     ).GetRingDimension()
    return ring


def _openfhe_params(params: CkksParams, security_bits: int, ring: int | None) -> Any:
    if security_bits not in _SECURITY:
        raise Refused(f"unknown security level {security_bits} (use 128, 192 or 256)")
    p = fhe.CCParamsCKKSRNS()
    p.SetMultiplicativeDepth(params.multiplicative_depth)
    p.SetScalingModSize(params.scaling_mod_bits)
    p.SetFirstModSize(params.first_mod_bits)
    p.SetScalingTechnique(fhe.FIXEDMANUAL)
    p.SetKeySwitchTechnique(fhe.HYBRID)
    p.SetNumLargeDigits(params.num_large_digits)
    p.SetSecretKeyDist(fhe.UNIFORM_TERNARY)
    if ring is not None:
        p.SetRingDim(ring)
        p.SetBatchSize(ring // 2)
    p.SetSecurityLevel(_SECURITY[security_bits])
    return p


def derive_security_bits(params: CkksParams) -> int:
    """The security level of `params`, re-derived from the parameters alone.

    Regenerates the context at each standard level with the offered ring (OpenFHE
    refuses a ring too small for the modulus it needs), then checks log2 Q of the
    generated context against the HE-standard table. Never reads a claimed level.
    """
    granted = 0
    for bits in (128, 192, 256):
        try:
            cc = build_context(params, bits)
        except RuntimeError:
            break
        if cc.GetRingDimension() != params.ring_dimension:
            break
        granted = bits
    if granted:
        log_q = log2_int(int(cc_modulus(build_context(params, 0))))
        granted = min(granted, table_security_bits(params.ring_dimension, log_q))
    return granted


def cc_modulus(cc: Context) -> int:
    return int(cc.GetModulus())


def log2_modulus(params: CkksParams) -> float:
    return log2_int(cc_modulus(build_context(params, 0)))


# ---------- keys ----------


def generate_keys(cc: Context, key_tag: str) -> tuple[Any, Any]:
    """A fresh key pair tagged with the trial's key tag; the relinearization key is loaded."""
    pair = cc.KeyGen()
    pair.secretKey.SetKeyTag(key_tag)
    pair.publicKey.SetKeyTag(key_tag)
    cc.EvalMultKeyGen(pair.secretKey)
    return pair.secretKey, pair.publicKey


def serialize(obj: Any) -> bytes:
    data: bytes = fhe.Serialize(obj, fhe.BINARY)
    return data


def ciphertext_bytes(ct: Ciphertext) -> bytes:
    """The canonical wire form of a ciphertext.

    OpenFHE's serializer shares parameter objects between polynomials only when they are
    the same object in memory, so a fresh ciphertext and a computed one serialize to
    different layouts. One round trip gives every ciphertext the same layout, which the
    receiver's byte template can then require.
    """
    return serialize(fhe.DeserializeCiphertextString(serialize(ct), fhe.BINARY))


def serialize_relin_key(key_tag: str) -> bytes:
    data: bytes = fhe.SerializeEvalMultKeyString(fhe.BINARY, key_tag)
    return data


def load_secret_key(data: bytes) -> Any:
    return fhe.DeserializePrivateKeyString(data, fhe.BINARY)


def load_relin_key(data: bytes, template: ByteTemplate) -> None:
    template.check(data, "relinearization key")
    fhe.ClearEvalMultKeys()  # deserializing over keys with the same tag throws
    fhe.DeserializeEvalMultKeyString(data, fhe.BINARY)


# ---------- templates ----------


class CiphertextGate:
    """The only way untrusted ciphertexts at one (level, key tag) get into OpenFHE.

    Bytes must match a template learned from our own ciphertexts of that shape. The
    deserialized polynomials are then moved into a ciphertext object of our own making:
    OpenFHE runs arithmetic on deserialized ciphertext objects up to 10x slower
    (measured with openfhe 1.6.1), and the template guarantees the metadata is equal.
    """

    def __init__(self, cc: Context, key_tag: str, level: int) -> None:
        secret, public = _tagged_pair(cc, key_tag)
        del secret
        samples = []
        for _ in range(TEMPLATE_SAMPLES):
            noise = np.random.default_rng().uniform(-1, 1, cc.GetRingDimension() // 2)
            samples.append(ciphertext_bytes(settle(cc, encrypt_vector(cc, public, noise),
                                                   level)))
        self.template = learn_template(samples, cc.GetRingDimension() * 8)
        self._shell = settle(cc, encrypt_vector(cc, public, np.zeros(1)), level)

    def check(self, data: bytes, what: str) -> None:
        self.template.check(data, what)

    def load(self, data: bytes, what: str) -> Ciphertext:
        self.template.check(data, what)
        loaded = fhe.DeserializeCiphertextString(data, fhe.BINARY)
        ct = self._shell.Clone()
        ct.SetElements(loaded.GetElements())
        return ct


def relin_key_template(cc: Context, key_tag: str) -> ByteTemplate:
    samples = []
    for _ in range(3):
        secret, _public = _tagged_pair(cc, key_tag)
        fhe.ClearEvalMultKeys()
        cc.EvalMultKeyGen(secret)
        samples.append(serialize_relin_key(key_tag))
    fhe.ClearEvalMultKeys()
    return learn_template(samples, cc.GetRingDimension() * 8)


def _tagged_pair(cc: Context, key_tag: str) -> tuple[Any, Any]:
    pair = cc.KeyGen()
    pair.secretKey.SetKeyTag(key_tag)
    pair.publicKey.SetKeyTag(key_tag)
    return pair.secretKey, pair.publicKey


# ---------- data ----------


def encrypt_vector(cc: Context, public_key: Any, values: npt.NDArray[np.float64]) -> Ciphertext:
    slots = cc.GetRingDimension() // 2
    padded = np.zeros(slots)
    padded[: values.size] = values
    return cc.Encrypt(public_key, cc.MakeCKKSPackedPlaintext(padded.tolist()))


def decrypt_vector(cc: Context, secret_key: Any, ct: Ciphertext, length: int) -> list[float]:
    plain = cc.Decrypt(secret_key, ct)
    plain.SetLength(length)
    return [float(v) for v in plain.GetRealPackedValue()]


def settle(cc: Context, ct: Ciphertext, level: int) -> Ciphertext:
    """Bring a rescaled `ct` down to exactly `level` so both sides can template it."""
    if ct.GetNoiseScaleDeg() != 1 or ct.GetLevel() > level:
        raise RuntimeError(f"ciphertext at level {ct.GetLevel()} degree "
                           f"{ct.GetNoiseScaleDeg()} cannot be settled at level {level}")
    if ct.GetLevel() < level:
        ct = cc.LevelReduce(ct, None, level - ct.GetLevel())
    return ct


# ---------- evaluation ----------


def result_level(plan: HEPlan) -> int:
    """Level of every result ciphertext of `plan` (all rescaled, noise degree 1)."""
    return plan.depth()


def evaluate(
    cc: Context, plan: HEPlan, inputs: Sequence[Ciphertext], progress: ProgressFn
) -> list[Ciphertext]:
    """Run `plan` on one batch of input ciphertexts; returns the settled score ciphertexts."""
    basis = _Basis(cc, inputs)
    last_use = _last_uses(plan)
    total = sum(s.units for s in plan.stages) + plan.score_count
    done = 0
    for index, stage in enumerate(plan.stages):
        produced: list[Ciphertext] = []
        for unit in range(stage.units):
            u = basis.combine(stage.weights[unit], stage.bias[unit])
            produced.extend(_stage_entries(cc, stage, u))
            done += 1
            progress(done, total)
        for j, use in enumerate(last_use):
            if use == index:
                basis.release(j)  # no later stage reads it: free the memory
        basis.extend(produced)
    level = result_level(plan)
    scores = []
    for row, bias in zip(plan.output.weights, plan.output.bias, strict=True):
        scores.append(settle(cc, basis.combine(row, bias), level))
        done += 1
        progress(done, total)
    return scores


def _stage_entries(cc: Context, stage: PolyStage, u: Ciphertext) -> list[Ciphertext]:
    """The basis entries one unit of `stage` adds: u*u, or T_1(u)..T_D(u)."""
    if stage.kind == "square":
        return [cc.Rescale(cc.EvalMult(u, u))]
    powers: list[Ciphertext] = [None, u]
    for k in range(2, stage.degree + 1):
        a, b = chebyshev_split(k)
        product = cc.Rescale(cc.EvalMult(powers[a], powers[b]))
        doubled = cc.EvalAdd(product, product)
        powers.append(cc.EvalSub(doubled, 1.0) if a == b else
                      cc.EvalSub(doubled, powers[a - b]))
    return powers[1:]


class _Basis:
    """The basis ciphertexts, plus copies dropped to the levels linear sums need (FIXEDMANUAL
    EvalLinearWSum wants equal levels; each copy is made once and reused)."""

    def __init__(self, cc: Context, inputs: Sequence[Ciphertext]) -> None:
        self.cc = cc
        self.items: list[Ciphertext | None] = list(inputs)
        self.lowered: dict[tuple[int, int], Ciphertext] = {}

    def extend(self, cts: Sequence[Ciphertext]) -> None:
        self.items.extend(cts)

    def release(self, j: int) -> None:
        self.items[j] = None
        for key in [k for k in self.lowered if k[0] == j]:
            del self.lowered[key]

    def item(self, j: int) -> Ciphertext:
        ct = self.items[j]
        if ct is None:
            raise RuntimeError(f"basis entry {j} was released but is still read")
        return ct

    def at_level(self, j: int, level: int) -> Ciphertext:
        ct = self.item(j)
        if ct.GetLevel() == level:
            return ct
        key = (j, level)
        if key not in self.lowered:
            self.lowered[key] = self.cc.LevelReduce(ct, None, level - ct.GetLevel())
        return self.lowered[key]

    def combine(self, weights: npt.NDArray[np.float64], bias: float) -> Ciphertext:
        """sum_j w_j basis_j + bias; EvalLinearWSum rescales in FIXEDMANUAL (never again)."""
        used = np.flatnonzero(weights)
        if used.size == 0:
            used = np.array([next(j for j, ct in enumerate(self.items) if ct is not None)])
        level = max(self.item(j).GetLevel() for j in used)
        total = self.cc.EvalLinearWSum([self.at_level(j, level) for j in used],
                                       [float(weights[j]) for j in used])
        return self.cc.EvalAdd(total, float(bias)) if bias else total


def _last_uses(plan: HEPlan) -> list[int]:
    """For each basis entry, the index of the last stage reading it (len(stages) = output)."""
    size = plan.basis_size()
    last = [-1] * size
    readers = [*(s.weights for s in plan.stages), plan.output.weights]
    for index, weights in enumerate(readers):
        for j in np.flatnonzero(np.any(weights != 0, axis=0)):
            last[int(j)] = index
    return last

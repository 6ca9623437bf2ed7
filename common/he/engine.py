"""The CKKS engine: the only module that calls OpenFHE.

Both parties build their context from the same `CkksParams` record (the seller never
ships a context). Objects that arrive over the network are opened only inside guarded
worker processes after their bytes passed a `ByteTemplate` check: ciphertexts through
`CiphertextGate.load`, evaluation keys through the `load_*` functions once the worker has
checked them (at upload, then by digest: seller_server.worker).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import numpy.typing as npt
import openfhe as fhe

from common.errors import Refused
from common.he import rns
from common.he.packing import PackedLinear, PackedPlan, PackedStage
from common.he.params import CkksParams, log2_int, table_security_bits
from common.he.plan import HEPlan, PolyStage, Weights, chebyshev_split, row_terms
from common.he.template import ByteTemplate, learn_template

# Everything we deserialize joins a context this process built, which has its CRT tables
# already; recomputing them cost ~4 ms per object whatever its size (openfhe 1.6.1), most
# of the time to load a ciphertext.
fhe.DisablePrecomputeCRTTablesAfterDeserializaton()

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
# Keys have thousands of coefficient blocks (585 MB of CryptoNets rotation keys: ~4,500);
# a block's first byte agrees across n samples by chance with p = 256^-(n-1), which at
# n = 3 made an estimated ~7% of such templates refuse honest keys (seen once in
# bench/planner.py; template._block_start cannot always tell); at n = 5 it is ~1e-6.
KEY_TEMPLATE_SAMPLES = 5



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


def generate_keys(cc: Context, key_tag: str, public_seed: bytes | None = None
                  ) -> tuple[Any, Any]:
    """A fresh key pair tagged with the trial's key tag; the relinearization key is loaded.
    With `public_seed`, the public key's uniform half is the one derived from it
    (`public_key_is_seeded`)."""
    pair = cc.KeyGen()
    pair.secretKey.SetKeyTag(key_tag)
    pair.publicKey.SetKeyTag(key_tag)
    cc.EvalMultKeyGen(pair.secretKey)
    if public_seed is None:
        return pair.secretKey, pair.publicKey
    public = bytearray(serialize(pair.publicKey))
    secret = serialize(pair.secretKey)
    rns.reseed_public_key(public, _layout(cc, public), secret, _layout(cc, secret), public_seed)
    return pair.secretKey, fhe.DeserializePublicKeyString(bytes(public), fhe.BINARY)


def public_key_is_seeded(cc: Context, data: bytes, public_seed: bytes) -> bool:
    """Whether a public key (bytes that passed `public_key_template`) has the uniform half
    `public_seed` derives. Circuit privacy re-randomizes results with the buyer's public
    key (`finish`); a uniform half the buyer picked could be degenerate (zero, constant,
    sparse) or hide a trapdoor (a = r t, r small, t known), and the re-randomization would
    then mask nothing. A half no party chose leaves the buyer at most one decryption of the
    folded result, whatever the other half is."""
    layout = _layout(cc, data)
    expected = rns.seeded_uniform(public_seed, layout.moduli, layout.ring_dimension)
    return all(np.array_equal(rns.element(data, layout, 1, t), values)
               for t, values in enumerate(expected))


def _layout(cc: Context, blob: bytes | bytearray) -> rns.Layout:
    return rns.find_layout(bytes(blob), cc.GetRingDimension(), ring_modulus(cc))


def ring_modulus(cc: Context) -> int:
    """The product of the ciphertext moduli (without key switching's extra ones)."""
    return int(str(cc.GetElementParams().GetModulus()))


def serialize(obj: Any) -> bytes:
    data: bytes = fhe.Serialize(obj, fhe.BINARY)
    return data


def ciphertext_bytes(ct: Ciphertext) -> bytes:
    """The wire form of a ciphertext: one fixed layout per level, so the receiver's byte
    template can require it.

    OpenFHE's serializer writes a parameter object once when polynomials share it in
    memory: encryptions under a freshly generated key share, computed ciphertexts and
    encryptions under a deserialized key (a reseeded public key) do not. One
    serialize/deserialize round trip gives every ciphertext the same layout (~5 ms at
    N=16384, a fifth of the encryption).
    """
    return serialize(fhe.DeserializeCiphertextString(serialize(ct), fhe.BINARY))


def serialize_relin_key(key_tag: str) -> bytes:
    data: bytes = fhe.SerializeEvalMultKeyString(fhe.BINARY, key_tag)
    return data


def load_ciphertext(data: bytes) -> Ciphertext:
    """Only for our own bytes, or bytes that passed a `CiphertextGate` check."""
    return fhe.DeserializeCiphertextString(data, fhe.BINARY)


def load_secret_key(data: bytes) -> Any:
    return fhe.DeserializePrivateKeyString(data, fhe.BINARY)


def load_relin_key(data: bytes) -> None:
    """Only for bytes that passed `relin_key_template`."""
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
        return _moved_into(self._shell, fhe.DeserializeCiphertextString(data, fhe.BINARY))

    def load_all(self, blobs: Sequence[bytes], what: str, threads: int) -> list[Ciphertext]:
        """`load` every blob (named "what i"); deserialization releases the GIL, so threads
        run in parallel."""
        with ThreadPoolExecutor(max(threads, 1)) as pool:
            return list(pool.map(lambda item: self.load(item[1], f"{what} {item[0]}"),
                                 enumerate(blobs)))


def public_key_bytes(public_key: Any) -> bytes:
    """The wire form of a public key: its layout after one serialize/deserialize round
    trip (as `ciphertext_bytes`: a fresh key shares parameter objects that the round trip
    writes out), the form a reseeded key (`generate_keys`) has anyway."""
    return serialize(fhe.DeserializePublicKeyString(serialize(public_key), fhe.BINARY))


def public_key_template(cc: Context, key_tag: str) -> ByteTemplate:
    samples = [public_key_bytes(_tagged_pair(cc, key_tag)[1])
               for _ in range(KEY_TEMPLATE_SAMPLES)]
    return learn_template(samples, cc.GetRingDimension() * 8)


def load_public_key(data: bytes) -> Any:
    """Only for bytes that passed `public_key_template`."""
    return fhe.DeserializePublicKeyString(data, fhe.BINARY)


def relin_key_template(cc: Context, key_tag: str) -> ByteTemplate:
    samples = []
    for _ in range(KEY_TEMPLATE_SAMPLES):
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
    """Encrypt `values` into the slots, repeating them to fill every slot: a zero in an
    unused slot can lie far outside the range an activation was approximated on, and one
    slot's polynomial blowing past the modulus garbles every slot."""
    slots = cc.GetRingDimension() // 2
    filled = np.resize(np.asarray(values, dtype=np.float64), slots)
    return cc.Encrypt(public_key, encode(cc, filled))


def encode(cc: Context, values: npt.NDArray[np.float64], level: int = 0) -> Any:
    """`values` as a CKKS plaintext at `level` (noise degree 1). OpenFHE refuses a vector
    whose every coefficient is below the scale's resolution ("Scaling factor too small":
    e.g. a bias of 6e-17 left by rounding, or flooding noise of 1e-11); encoded, each of
    those coefficients would round to zero, so such a vector is encoded as zeros."""
    try:
        return cc.MakeCKKSPackedPlaintext(values.tolist(), 1, level)
    except RuntimeError as exc:
        if "Scaling factor too small" not in str(exc):
            raise
        return cc.MakeCKKSPackedPlaintext([0.0], 1, level)


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


def levels_needed(plan: HEPlan) -> int:
    """CKKS depth a trial of `plan` needs: the plan, then the slot mask of `finish`."""
    return plan.depth() + 1


def result_level(plan: HEPlan) -> int:
    """Level of every result ciphertext (all rescaled, noise degree 1)."""
    return levels_needed(plan)


def finish(cc: Context, scores: Sequence[Ciphertext], masks: Sequence[npt.NDArray[np.float64]],
           public_key: Any | None, noise_std: float, rng: np.random.Generator,
           fold_period: int) -> list[bytes]:
    """What leaves the seller, in wire form: every score ciphertext times its mask
    (`Packing.masks`), then, given the buyer's public key, plus a fresh encryption of
    Gaussian noise, then folded (`fold`). The fresh encryption re-randomizes both
    components: without it the result's second component is a known linear function of
    the inputs' and gives the weights away; the noise floods the computation's own error,
    which also depends on the weights. The fold adds `slots / fold_period` noise samples
    per class, so each is drawn that much smaller."""
    slots = cc.GetRingDimension() // 2
    per_slot_std = noise_std / math.sqrt(slots // fold_period)
    finished = []
    for ct, mask in zip(scores, masks, strict=True):
        masked = cc.Rescale(cc.EvalMult(ct, encode(cc, mask, ct.GetLevel())))
        if public_key is not None:
            fresh = cc.Encrypt(public_key, encode(cc, rng.normal(0.0, per_slot_std, slots)))
            masked = cc.EvalAdd(masked, cc.LevelReduce(fresh, None, masked.GetLevel()))
        blob = bytearray(ciphertext_bytes(masked))
        rns.fold_first_element(blob, _layout(cc, blob),
                               fold_automorphisms(cc.GetRingDimension(), fold_period))
        finished.append(bytes(blob))
    return finished


def fold_automorphisms(ring_dimension: int, period: int) -> list[int]:
    """Generators of the group the seller folds results over: rotations by multiples of
    `period` (X -> X^(5^(period*2^i))) and conjugation (X -> X^-1). Every slot's class is
    the slots equal to it modulo `period`, and conjugation adds each value's complex
    conjugate, so a class sums to a real number: what a buyer put in imaginary parts or
    in slots it did not pay for can only shift the real sum of a class it pays for."""
    order = 2 * ring_dimension
    slots = ring_dimension // 2
    steps = (slots // period).bit_length() - 1
    return [pow(5, period << i, order) for i in range(steps)] + [order - 1]


def open_result(cc: Context, secret_key: Any, ct: Ciphertext, fold_period: int,
                length: int) -> list[float]:
    """The buyer's side of `finish`'s fold: the seller summed only the first component
    over the group, divided by its order; summing the whole ciphertext over the group
    (with automorphism keys generated here, never sent) completes the trace of the
    result, and halving takes the conjugate pair back to the real part."""
    indices = fold_automorphisms(cc.GetRingDimension(), fold_period)
    tag = secret_key.GetKeyTag()
    # OpenFHE keeps them by key tag and generates only those it does not hold yet
    have = set(cc.GetExistingEvalAutomorphismKeyIndices(tag))
    missing = [index for index in indices if index not in have]
    if missing:
        cc.EvalAutomorphismKeyGen(secret_key, missing)
    keys = cc.GetEvalAutomorphismKeyMap(tag)
    for index in indices:
        ct = cc.EvalAdd(ct, cc.EvalAutomorphism(ct, index, keys))
    return [v / 2 for v in decrypt_vector(cc, secret_key, ct, length)]


def evaluate(
    cc: Context, plan: HEPlan, inputs: Sequence[Ciphertext], progress: ProgressFn,
    workers: int = 1,
) -> list[Ciphertext]:
    """Run `plan` on one batch of input ciphertexts; returns the settled score ciphertexts.

    With workers > 1 the units of every stage are split over forked processes (one
    OpenMP thread each). A row of the next stage needs entries held by several processes,
    so each process sends the others only its partial sums for their rows, not the
    entries themselves.
    """
    if workers <= 1:
        scores = _Rank(cc, plan, inputs, 0, {}).run(progress)
        return [scores[row] for row in range(plan.score_count)]
    links = {(a, b): multiprocessing.Pipe() for a in range(workers)
             for b in range(a + 1, workers)}

    def peers(rank: int) -> dict[int, Connection]:
        return {b if a == rank else a: pipe[0] if a == rank else pipe[1]
                for (a, b), pipe in links.items() if rank in (a, b)}

    scores = _in_ranks(cc, inputs[0], workers, progress,
                       lambda rank, report: _Rank(cc, plan, inputs, rank, peers(rank)).run(report))
    return [scores[row] for row in range(plan.score_count)]


def _in_ranks(cc: Context, shell: Ciphertext, workers: int, progress: ProgressFn,
              work: Callable[[int, ProgressFn], dict[int, Ciphertext]]) -> dict[int, Ciphertext]:
    """Run `work(rank)` for ranks 1.. in forked processes (one OpenMP thread each; they
    share everything loaded so far) and rank 0 here; the union of their results."""
    if os.environ.get("OMP_NUM_THREADS") != "1":
        raise RuntimeError("sharded evaluation forks: it needs OMP_NUM_THREADS=1 set before "
                           "OpenFHE loads (a forked OpenMP thread pool hangs)")
    context = multiprocessing.get_context("fork")
    pipes = [context.Pipe(duplex=False) for _ in range(1, workers)]

    def helper(rank: int) -> None:
        results = work(rank, lambda done, total: None)
        pipes[rank - 1][1].send({key: serialize(ct) for key, ct in results.items()})

    children = [context.Process(target=helper, args=(rank,), daemon=True)
                for rank in range(1, workers)]
    for child in children:
        child.start()
    try:
        results = work(0, progress)
        for rank in range(1, workers):
            for key, data in _receive(pipes[rank - 1][0], rank).items():
                results[key] = adopt(cc, shell, data)
    finally:
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.kill()
    return results


def adopt(cc: Context, shell: Ciphertext, data: bytes) -> Ciphertext:
    """A ciphertext we serialized ourselves (trusted), moved into a local object: see
    CiphertextGate for why deserialized objects are not computed on directly."""
    loaded = fhe.DeserializeCiphertextString(data, fhe.BINARY)
    ct = _moved_into(shell, loaded)
    ct.SetLevel(loaded.GetLevel())
    ct.SetNoiseScaleDeg(loaded.GetNoiseScaleDeg())
    ct.SetScalingFactor(loaded.GetScalingFactor())
    ct.SetSlots(loaded.GetSlots())
    return ct


def _moved_into(shell: Ciphertext, loaded: Ciphertext) -> Ciphertext:
    """loaded's polynomials in an object made like `shell` (same metadata), moved rather
    than copied: copies into fresh memory page-fault at ~2 ms per MB on this kind of VM."""
    ct = shell.CloneEmpty()
    ct.SetElementsMove(loaded.GetElementsMutable())
    return ct


def _receive(connection: Connection, rank: int) -> Any:
    try:
        return connection.recv()
    except EOFError:
        raise RuntimeError(f"evaluation helper process {rank} died") from None


class _Rank:
    """One process's share of an evaluation: unit i of a stage with n units belongs to
    rank i * size // n; rows are summed from partial sums over what each rank holds."""

    def __init__(self, cc: Context, plan: HEPlan, inputs: Sequence[Ciphertext], rank: int,
                 peers: dict[int, Connection]) -> None:
        self.cc, self.plan, self.rank, self.peers = cc, plan, rank, peers
        self.size = len(peers) + 1
        self.inputs = len(inputs)
        self.lazy = lazy_entries(plan)
        self.basis = _Basis(cc, dict(enumerate(inputs)), self.lazy)

    def owner(self, row: int, rows: int) -> int:
        return row * self.size // rows

    def run(self, progress: ProgressFn) -> dict[int, Ciphertext]:
        last_use = _last_uses(self.plan)
        mine = [i for s in self.plan.stages for i in range(s.units) if self.owner(i, s.units)
                == self.rank]
        total = len(mine) + sum(1 for r in range(self.plan.score_count)
                                if self.owner(r, self.plan.score_count) == self.rank)
        done = 0
        offset = self.inputs
        for index, stage in enumerate(self.plan.stages):
            lazy = offset in self.lazy
            spent = frozenset(j for j, use in enumerate(last_use) if use == index)
            for unit, u in self._rows(stage.weights, stage.bias, spent).items():
                for k, entry in enumerate(_stage_entries(self.cc, stage, u, relinearize=not lazy,
                                                         unit=unit)):
                    self.basis.put(offset + unit * stage.width + k, entry)
                done += 1
                progress(done, total)
            for j, use in enumerate(last_use):
                if use == index:
                    self.basis.release(j)  # no later stage reads it: free the memory
            offset += stage.units * stage.width
        level = self.plan.depth()  # `finish` masks them one level further
        scores = {}
        spent = frozenset(j for j, use in enumerate(last_use) if use == len(self.plan.stages))
        for row, ct in self._rows(self.plan.output.weights, self.plan.output.bias,
                                  spent).items():
            scores[row] = settle(self.cc, ct, level)
            done += 1
            progress(done, total)
        return scores

    def _rows(self, weights: Weights, biases: npt.NDArray[np.float64], spent: frozenset[int]
              ) -> dict[int, Ciphertext]:
        """weights @ basis + biases for the rows this rank owns; `spent` entries are read
        for the last time."""
        rows = len(biases)
        outgoing: dict[int, dict[int, bytes]] = {peer: {} for peer in self.peers}
        parts: dict[int, list[Ciphertext]] = {}
        # every rank holds the inputs: only the row's owner sums them
        partials = self.basis.partials(weights, [
            0 if self.owner(row, rows) == self.rank else self.inputs for row in range(rows)],
            spent)
        for row in range(rows):
            owner = self.owner(row, rows)
            partial = partials.get(row)
            if owner == self.rank:
                parts[row] = [partial] if partial is not None else []
            elif partial is not None:
                outgoing[owner][row] = serialize(partial)
        for received in self._exchange(outgoing).values():
            for row, data in received.items():
                parts[row].append(adopt(self.cc, self.basis.shell, data))
        result = {}
        for row, pieces in parts.items():
            # in place: every partial is a fresh object of ours, and a new result would
            # be fresh memory (first touches cost ~1.2 ms per MB here)
            total = pieces[0] if pieces else self.basis.zero()
            for piece in pieces[1:]:
                self.cc.EvalAddInPlace(total, piece)
            if not self.lazy.isdisjoint(row_terms(weights, row)[0].tolist()):
                self.cc.RelinearizeInPlace(total)  # once here instead of once per entry
            bias = float(biases[row])
            if bias:
                self.cc.EvalAddInPlace(total, bias)
            result[row] = total
        return result

    def _exchange(self, outgoing: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Send every peer its rows while receiving ours (threads avoid pipe deadlocks)."""
        senders = [threading.Thread(target=self.peers[peer].send, args=(payload,))
                   for peer, payload in outgoing.items()]
        for sender in senders:
            sender.start()
        received = {peer: _receive(connection, peer) for peer, connection in self.peers.items()}
        for sender in senders:
            sender.join()
        return received


def _stage_entries(cc: Context, stage: PolyStage | PackedStage, u: Ciphertext,
                   relinearize: bool = True, unit: int = 0) -> list[Ciphertext]:
    """The basis entries one unit of `stage` adds (or, feature-packed, one block per entry
    kind over all units at once): u*u, T_1(u)..T_D(u), or the unit's Chebyshev series."""
    if stage.kind == "square":
        square = cc.EvalMult(u, u) if relinearize else cc.EvalMultNoRelin(u, u)
        cc.RescaleInPlace(square)
        return [square]
    if stage.coefficients is not None:  # a packed stage's units share row 0
        coefficients = stage.coefficients[unit].copy()
        coefficients[0] *= 2  # OpenFHE's series halves the T_0 coefficient
        return [cc.EvalChebyshevSeries(u, [float(c) for c in coefficients], -1.0, 1.0)]
    powers: list[Ciphertext] = [None, u]
    for k in range(2, stage.degree + 1):
        a, b = chebyshev_split(k)
        product = cc.Rescale(cc.EvalMult(powers[a], powers[b]))
        doubled = cc.EvalAdd(product, product)
        powers.append(cc.EvalSub(doubled, 1.0) if a == b else
                      cc.EvalSub(doubled, powers[a - b]))
    return powers[1:]


# ---------- feature-packed evaluation (common.he.packing) ----------


def generate_rotation_keys(cc: Context, secret_key: Any, indices: Sequence[int]) -> bytes:
    """The rotation keys feature-packed evaluation needs, loaded; their wire form."""
    cc.EvalRotateKeyGen(secret_key, list(indices))
    data: bytes = fhe.SerializeEvalAutomorphismKeyString(fhe.BINARY, secret_key.GetKeyTag())
    return data


def evaluate_packed(cc: Context, packed: PackedPlan, inputs: Sequence[Ciphertext],
                    progress: ProgressFn, workers: int = 1) -> list[Ciphertext]:
    """Feature-packed evaluation of a batch: one score ciphertext per input ciphertext,
    settled at the plan's depth. Ciphertexts are independent, so with workers > 1 forked
    processes (one OpenMP thread each) take every workers-th one."""
    def run(rank: int, report: ProgressFn) -> dict[int, Ciphertext]:
        evaluator = PackedEvaluator(cc, packed)
        mine = range(rank, len(inputs), workers)
        done = {}
        for i in mine:
            done[i] = settle(cc, evaluator.evaluate(inputs[i]), packed.depth)
            report(len(done), len(mine))
        return done

    workers = max(1, min(workers, len(inputs)))
    scores = run(0, progress) if workers == 1 else _in_ranks(cc, inputs[0], workers,
                                                             progress, run)
    return [scores[i] for i in range(len(inputs))]


def load_rotation_keys(data: bytes) -> None:
    """Only for bytes that passed `rotation_key_template`."""
    fhe.CryptoContext.ClearEvalAutomorphismKeys()
    fhe.DeserializeEvalAutomorphismKeyString(data, fhe.BINARY)


def rotation_key_template(cc: Context, key_tag: str, indices: Sequence[int]) -> ByteTemplate:
    def samples() -> Iterator[bytes]:  # one at a time: each can be hundreds of MB
        for _ in range(KEY_TEMPLATE_SAMPLES):
            secret, _public = _tagged_pair(cc, key_tag)
            fhe.CryptoContext.ClearEvalAutomorphismKeys()
            yield generate_rotation_keys(cc, secret, indices)
        fhe.CryptoContext.ClearEvalAutomorphismKeys()

    return learn_template(samples(), cc.GetRingDimension() * 8)


# Encoded diagonals are kept for the next ciphertext up to this many (at N=16384 and 8
# towers one takes 1 MB; a CryptoNets-sized model has thousands): past it, each is encoded
# where it is used.
MAX_CACHED_PLAINTEXTS = 1024


class PackedEvaluator:
    """Feature-packed evaluation (common.he.packing): each ciphertext holds `stride` rows.
    The weights' plaintexts (diagonals and biases) are encoded on first use and kept, as a
    serving model would, when they fit MAX_CACHED_PLAINTEXTS."""

    def __init__(self, cc: Context, packed: PackedPlan) -> None:
        self.cc, self.packed = cc, packed
        self.layout = packed.layout(cc.GetRingDimension() // 2)
        self.plaintexts: dict[tuple[int, ...], Any] = {}
        self.cache = packed.plaintext_products() <= MAX_CACHED_PLAINTEXTS

    def evaluate(self, rows: Ciphertext) -> Ciphertext:
        """The scores of the rows in one feature-packed ciphertext (entries 0..scores-1)."""
        blocks: dict[int, Ciphertext] = {0: rows}
        for index, stage in enumerate(self.packed.stages):
            entries = _stage_entries(self.cc, stage, self._linear(index, stage.linear, blocks))
            if stage.fold is not None:
                entries = [self._fold(index, stage.fold, entries)]
            for entry in entries:
                blocks[len(blocks)] = entry
        return self._linear(len(self.packed.stages), self.packed.output, blocks)

    def _fold(self, index: int, fold: npt.NDArray[np.float64], powers: list[Ciphertext]
              ) -> Ciphertext:
        """sum_k fold[k-1] * T_k(u) at the level of T_degree (see packing._foldable):
        the terms past T_H go through T_H times a sum of low-degree terms."""
        cc, degree = self.cc, len(powers)
        half = 1 << (degree - 1).bit_length() - 1
        top = powers[-1].GetLevel()

        def weighted(j: int, values: npt.NDArray[np.float64], level: int) -> Ciphertext:
            t = powers[j - 1]
            product = cc.Rescale(cc.EvalMult(t, self._plain((index, -2, j, level), values,
                                                            t.GetLevel())))
            return cc.LevelReduce(product, None, level - product.GetLevel()) if (
                product.GetLevel() < level) else product

        highs = [weighted(j, 2.0 * fold[half + j - 1], top - 1)
                 for j in range(1, degree - half + 1)]
        high = highs[0] if len(highs) == 1 else cc.EvalAddMany(highs)
        low = []
        for j in range(1, half + 1):
            mirror = 2 * half - j
            values = fold[j - 1] - (fold[mirror - 1] if half < mirror <= degree else 0.0)
            low.append(weighted(j, values, top))
        low.append(cc.Rescale(cc.EvalMult(powers[half - 1], high)))
        return cc.EvalAddMany(low)

    def _plain(self, key: tuple[int, ...], values: npt.NDArray[np.float64], level: int) -> Any:
        if key in self.plaintexts:
            return self.plaintexts[key]
        plain = encode(self.cc, self.layout.spread(values), level)
        if self.cache:
            self.plaintexts[key] = plain
        return plain

    def _linear(self, index: int, linear: PackedLinear, blocks: dict[int, Ciphertext]
                ) -> Ciphertext:
        """Baby steps hoisted per block, one giant rotation per step for all blocks, one
        rescale for the whole sum."""
        cc = self.cc
        stride = self.layout.rows_per_ciphertext
        level = max(blocks[b].GetLevel() for b in linear.blocks)
        order = cc.GetCyclotomicOrder()
        inner: dict[int, list[Ciphertext]] = {}
        for block in linear.blocks:
            x = blocks[block]
            if x.GetLevel() < level:
                x = cc.LevelReduce(x, None, level - x.GetLevel())
            steps = linear.terms[block]
            digits = cc.EvalFastRotationPrecompute(x)
            rotated = {b: cc.EvalFastRotation(x, b * stride, order, digits) if b else x
                       for b in {b for babies in steps.values() for b in babies}}
            for g, babies in steps.items():
                for b, diagonal in babies.items():
                    plain = self._plain((index, block, g, b, level), diagonal, level)
                    inner.setdefault(g, []).append(cc.EvalMult(rotated[b], plain))
        parts = []
        for g, products in sorted(inner.items()):
            part = cc.EvalAddMany(products) if len(products) > 1 else products[0]
            parts.append(cc.EvalRotate(part, g * self.packed.baby * stride) if g else part)
        total = cc.Rescale(cc.EvalAddMany(parts) if len(parts) > 1 else parts[0])
        return cc.EvalAdd(total, self._plain((index, -1, total.GetLevel()), linear.bias,
                                             total.GetLevel()))


# A relinearization costs about this many terms of a linear sum (measured at N=16384,
# 6 towers: 6.8 ms against 0.3 ms per term), and a term over an unrelinearized
# (3-element) ciphertext half a term more; in a dense stage's matrix product
# (common.he.rns) a term costs about a tenth of that (CryptoNets' 845 x 100 layer:
# 3.2 s against ~30 s term by term).
RELINEARIZATION_TERMS = 22
DENSE_TERM_SHARE = 0.1


def lazy_entries(plan: HEPlan) -> frozenset[int]:
    """Basis entries left unrelinearized: the squares of a stage whose readers relinearize
    each of their rows once instead, where that saves key switching (few reading rows,
    e.g. an MLP's output layer, or dense readers, where a 3-element term costs little)
    and the slower sums over 3-element ciphertexts do not eat the saving (a CryptoNets
    conv layer read term by term would stay relinearized)."""
    lazy: set[int] = set()
    readers = [*(s.weights for s in plan.stages), plan.output.weights]
    offset = plan.input_count
    for index, stage in enumerate(plan.stages):
        size = stage.units * stage.width
        if stage.kind == "square":
            rows = 0
            penalty = 0.0  # in terms of a linear sum
            for weights in readers[index + 1:]:
                block = weights[:, offset:offset + size]
                reading = int(np.count_nonzero(np.diff(block.indptr)))
                share = DENSE_TERM_SHARE if dense_enough(
                    reading, np.unique(block.indices).size, block.nnz) else 1.0
                rows += reading
                penalty += block.nnz * share / 2
            if stage.units > rows + penalty / RELINEARIZATION_TERMS:
                lazy.update(range(offset, offset + size))
        offset += size
    return frozenset(lazy)


# A group of rows at one level is summed as one matrix product (common.he.rns) when it is
# dense enough to pay for the conversions: each row then costs a deserialization and a
# rescale (~2.5 ms at N=16384, 5 towers) instead of ~0.3 ms per term through OpenFHE, and
# every (row, entry) pair costs a few float64 multiply-adds per coefficient even where
# the weight is zero.
DENSE_MIN_TERMS = 48  # nonzero terms per row, on average
DENSE_MIN_FILL = 0.25  # of the rows x entries block
# and enough rows to pay for serializing the entries: digits-lr's 10 x 64 layer took
# 0.05 s term by term, 0.09 s as a matrix product
DENSE_MIN_ROWS = 16


def dense_enough(rows: int, columns: int, nonzero: int) -> bool:
    """Whether a block of `rows` sums over `columns` entries goes through rns.combine."""
    return (rows >= DENSE_MIN_ROWS and nonzero >= DENSE_MIN_TERMS * rows
            and nonzero >= DENSE_MIN_FILL * rows * columns)


class _Basis:
    """The basis ciphertexts this process holds, plus copies dropped to the levels linear
    sums need (FIXEDMANUAL EvalLinearWSum wants equal levels; each copy is made once)."""

    def __init__(self, cc: Context, items: dict[int, Ciphertext], lazy: frozenset[int]
                 ) -> None:
        self.cc = cc
        self.items = items
        self.lazy = lazy  # unrelinearized entries: summed apart (EvalLinearWSum cannot mix)
        self.lowered: dict[tuple[int, int], Ciphertext] = {}
        self.shell = items[min(items)]
        # FIXEDMANUAL keeps every scaling factor at exactly 2^scale bits
        self.scale_bits = round(math.log2(self.shell.GetScalingFactor()))
        self.modulus = ring_modulus(cc)

    def put(self, j: int, ct: Ciphertext) -> None:
        self.items[j] = ct

    def release(self, j: int) -> None:
        self.items.pop(j, None)
        for key in [k for k in self.lowered if k[0] == j]:
            del self.lowered[key]

    def at_level(self, j: int, level: int) -> Ciphertext:
        ct = self.items[j]
        if ct.GetLevel() == level:
            return ct
        key = (j, level)
        if key not in self.lowered:
            self.lowered[key] = self.cc.LevelReduce(ct, None, level - ct.GetLevel())
        return self.lowered[key]

    def partials(self, weights: Weights, skip_below: Sequence[int], spent: frozenset[int]
                 ) -> dict[int, Ciphertext]:
        """Row r of weights @ basis over the entries j >= skip_below[r] held here, for the
        rows with any such term; rows at one level go through one matrix product where
        they are dense enough (DENSE_MIN_*), the others term by term. A matrix product
        frees the `spent` entries no other rows here read as it serializes them, so the
        serialized copies reuse their memory (fresh pages cost ~1.2 ms per MB here)."""
        by_level: dict[int, dict[int, list[tuple[int, float]]]] = {}
        for row, skip in enumerate(skip_below):
            indices, values = row_terms(weights, row)
            terms = [(int(j), float(w)) for j, w in zip(indices, values, strict=True)
                     if j >= skip and int(j) in self.items]
            if terms:
                level = max(self.items[j].GetLevel() for j, _w in terms)
                by_level.setdefault(level, {})[row] = terms
        result: dict[int, Ciphertext] = {}
        for level, rows in by_level.items():
            columns = sorted({j for terms in rows.values() for j, _w in terms})
            nonzero = sum(len(terms) for terms in rows.values())
            elsewhere = {j for other, group in by_level.items() if other != level
                         for terms in group.values() for j, _w in terms}
            sums = (self._dense(rows, columns, level, spent - elsewhere)
                    if dense_enough(len(rows), len(columns), nonzero) else None)
            result.update(sums if sums is not None else
                          {row: self._sum(terms, level) for row, terms in rows.items()})
        return result

    def _dense(self, rows: dict[int, list[tuple[int, float]]], columns: list[int],
               level: int, releasable: frozenset[int]) -> dict[int, Ciphertext] | None:
        """The rows' sums from one exact matrix product over the entries' coefficients,
        each then rescaled as EvalLinearWSum does; None if a weight is too large for it."""
        position = {j: k for k, j in enumerate(columns)}
        weights = np.zeros((len(rows), len(columns)))
        for r, terms in enumerate(rows.values()):
            for j, w in terms:
                weights[r, position[j]] = w
        constants = rns.weight_constants(weights, self.scale_bits)
        if constants is None:
            return None
        n = self.cc.GetRingDimension()
        sources = []
        templates: dict[int, tuple[bytes, rns.Layout]] = {}  # by element count
        for j in columns:
            blob = serialize(self.at_level(j, level))
            if j in releasable:
                self.release(j)
            layout = rns.find_layout(blob, n, self.modulus)
            templates.setdefault(layout.elements, (blob, layout))
            sources.append((blob, layout))
        targets = []
        for terms in rows.values():
            blob, layout = templates[3 if self.lazy.intersection(j for j, _w in terms) else 2]
            targets.append((bytearray(blob), layout))
        rns.combine(constants, sources, targets)
        result = {}
        for row, (data, _layout) in zip(rows, targets, strict=True):
            ct = adopt(self.cc, self.shell, bytes(data))
            ct.SetNoiseScaleDeg(2)
            ct.SetScalingFactor(2.0 ** (2 * self.scale_bits))
            self.cc.RescaleInPlace(ct)
            result[row] = ct
        return result

    def _sum(self, terms: list[tuple[int, float]], level: int) -> Ciphertext:
        """sum_j w_j basis_j at `level` through OpenFHE. EvalLinearWSum rescales in
        FIXEDMANUAL: never rescale again."""
        sums = [self.cc.EvalLinearWSum([self.at_level(j, level) for j, _w in group],
                                       [w for _j, w in group])
                for group in ([t for t in terms if t[0] in self.lazy],
                              [t for t in terms if t[0] not in self.lazy]) if group]
        return sums[0] if len(sums) == 1 else self.cc.EvalAdd(*sums)

    def zero(self) -> Ciphertext:
        """An encryption of zero at level 1, for a row with no nonzero weight."""
        return self.cc.EvalLinearWSum([self.shell], [0.0])


def _last_uses(plan: HEPlan) -> list[int]:
    """For each basis entry, the index of the last stage reading it (len(stages) = output)."""
    size = plan.basis_size()
    last = [-1] * size
    readers = [*(s.weights for s in plan.stages), plan.output.weights]
    for index, weights in enumerate(readers):
        for j in np.unique(weights.indices):
            last[int(j)] = index
    return last

"""Deep-Lock (seed 003): every trained parameter encrypted with its own key through the AES
S-box, so a delivered model is useless until the seller releases a 32-byte master key.

Algorithms 1-2 of the paper, for float32 parameters (little-endian bytes b0..b3):
    per-parameter key bytes k0..k3 = AES-256-CTR(master key) keystream, 4 bytes a parameter
    lock:   b_j' = S[b_j ^ k_j] for j = 0, 1, 2;   b3' = b3 ^ (k3 & 0x80)
    unlock: b_j  = S^-1[b_j'] ^ k_j;               b3  = b3' ^ (k3 & 0x80)

Key schedule: a keyed PRF built on AES (AES-256 in counter mode, the counter starting at
the tensor's index) rather than iterating AES's own key expansion: it is the standard,
proven way to stretch one key into many independent ones, it gives random access (any
tensor unlocks on its own), and it runs in hardware AES through `cryptography`.

What differs from the paper: the S-box covers the mantissa and the exponent's lowest bit,
and the key flips the sign, but the exponent's upper seven bits stay. Substituting those too
would give weights up to 1e38 and NaN/Inf patterns, and the locked file would no longer
"run as a random classifier" (it would return NaN). Locked weights keep their order of
magnitude (within a factor of ~4) and lose sign and value. docs/deeplock.md measures what
that leaves an attacker.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
import numpy.typing as npt
import onnx
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from onnx import numpy_helper

from common.errors import BadInput

KEY_BYTES = 32
MARKER = "gimme.deeplock"
SCHEME = "deeplock-v1: AES S-box on float32 bytes 0-2, sign bit; AES-256-CTR key schedule"

# The AES S-box (FIPS-197), generated rather than typed: multiplicative inverse in GF(2^8)
# followed by the affine map.


def _aes_sbox() -> npt.NDArray[np.uint8]:
    def multiply(a: int, b: int) -> int:
        product = 0
        while b:
            if b & 1:
                product ^= a
            a = ((a << 1) ^ 0x11B) if a & 0x80 else a << 1
            b >>= 1
        return product

    inverse = [0] * 256
    for a in range(1, 256):
        inverse[a] = next(b for b in range(1, 256) if multiply(a, b) == 1)
    box = np.empty(256, dtype=np.uint8)
    for a in range(256):
        x = inverse[a]
        y = x
        for shift in range(1, 5):
            y ^= ((x << shift) | (x >> (8 - shift))) & 0xFF
        box[a] = y ^ 0x63
    return box


SBOX = _aes_sbox()
INVERSE_SBOX = np.argsort(SBOX).astype(np.uint8)
assert SBOX[0x00] == 0x63 and SBOX[0x53] == 0xED  # FIPS-197 examples


def new_master_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def _keystream(master_key: bytes, tensor_index: int, count: int) -> npt.NDArray[np.uint8]:
    """4 key bytes for each of `count` parameters of tensor number `tensor_index`."""
    if len(master_key) != KEY_BYTES:
        raise BadInput(f"a Deep-Lock key is {KEY_BYTES} bytes, got {len(master_key)}")
    nonce = tensor_index.to_bytes(8, "big") + bytes(8)
    encryptor = Cipher(algorithms.AES(master_key), modes.CTR(nonce)).encryptor()
    stream = encryptor.update(bytes(4 * count)) + encryptor.finalize()
    return np.frombuffer(stream, dtype=np.uint8).reshape(count, 4)


def _transform(values: npt.NDArray[np.float32], keys: npt.NDArray[np.uint8], lock: bool
               ) -> npt.NDArray[np.float32]:
    raw = np.ascontiguousarray(values, dtype="<f4").view(np.uint8).reshape(-1, 4).copy()
    if lock:
        raw[:, :3] = SBOX[raw[:, :3] ^ keys[:, :3]]
    else:
        raw[:, :3] = INVERSE_SBOX[raw[:, :3]] ^ keys[:, :3]
    raw[:, 3] ^= keys[:, 3] & np.uint8(0x80)
    result: npt.NDArray[np.float32] = raw.reshape(-1).view("<f4").reshape(values.shape)
    return result


def _parameters(model: onnx.ModelProto) -> list[tuple[str, onnx.TensorProto | onnx.AttributeProto]]:
    """Every trained float parameter, in a fixed order: float32 initializers, then the
    float lists ML operators keep as attributes (coefficients, intercepts, scaler values)."""
    found: list[tuple[str, onnx.TensorProto | onnx.AttributeProto]] = [
        (init.name, init) for init in model.graph.initializer
        if init.data_type == onnx.TensorProto.FLOAT]
    for index, node in enumerate(model.graph.node):
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.FLOATS and len(attribute.floats):
                found.append((f"{node.name or index}/{attribute.name}", attribute))
    return found


def _apply(model: onnx.ModelProto, master_key: bytes, lock: bool) -> None:
    for index, (_name, item) in enumerate(_parameters(model)):
        if isinstance(item, onnx.TensorProto):  # rewritten in its own storage field
            values = numpy_helper.to_array(item).astype(np.float32)
            changed = _transform(values, _keystream(master_key, index, values.size), lock)
            if item.raw_data:
                item.raw_data = changed.astype("<f4").tobytes()
            else:
                item.float_data[:] = changed.reshape(-1).tolist()
        else:
            values = np.array(item.floats, dtype=np.float32)
            changed = _transform(values, _keystream(master_key, index, values.size), lock)
            item.floats[:] = changed.astype(np.float64).tolist()


def is_locked(model_bytes: bytes) -> bool:
    model = onnx.load_model_from_string(model_bytes)
    return any(p.key == MARKER for p in model.metadata_props)


def lock(model_bytes: bytes, master_key: bytes) -> bytes:
    """The locked model: same graph and size, every trained parameter substituted."""
    model = onnx.load_model_from_string(model_bytes)
    if any(p.key == MARKER for p in model.metadata_props):
        raise BadInput("the model is already Deep-Locked")
    _apply(model, master_key, lock=True)
    entry = model.metadata_props.add()
    entry.key, entry.value = MARKER, SCHEME
    return bytes(model.SerializeToString())


def unlock(locked_bytes: bytes, master_key: bytes) -> bytes:
    """The original model, bit for bit (in memory: callers decide whether it is saved)."""
    try:
        model = onnx.load_model_from_string(locked_bytes)
    except Exception as exc:
        raise BadInput(f"not an ONNX model: {exc}") from exc
    markers = [p for p in model.metadata_props if p.key == MARKER]
    if not markers:
        raise BadInput("the model is not Deep-Locked (no gimme.deeplock marker)")
    if markers[0].value != SCHEME:
        raise BadInput(f"unknown Deep-Lock scheme {markers[0].value!r}")
    _apply(model, master_key, lock=False)
    kept = [p for p in model.metadata_props if p.key != MARKER]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    return bytes(model.SerializeToString())


def key_id(master_key: bytes) -> str:
    """A public handle for a key (never the key itself)."""
    return hashlib.sha256(b"gimme-deeplock-key" + master_key).hexdigest()[:16]

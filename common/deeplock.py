"""Deep-Lock (seed 003): every trained parameter encrypted with its own key through the AES
S-box, so a delivered model is useless until the seller releases a 32-byte master key; and
the seal: the whole locked file encrypted (AES-256-GCM) under a key derived from the same
master key, so that before payment the buyer holds no graph either.

Algorithms 1-2 of the paper, for every floating-point parameter (float16, bfloat16, float32,
float64), on its little-endian bytes b0..b(w-1) with per-parameter key bytes k0..k(w-1):
    a byte holding only mantissa bits and the exponent's lowest bit:  b' = S[b ^ k]
    the byte(s) holding the sign and the upper exponent bits:         b' = b ^ (k & m)
where m covers the sign and any mantissa / lowest-exponent bits in that byte (float32:
bytes 0-2 substituted, byte 3 sign only, which is deeplock-v1 exactly). Unlock inverts each.

Key schedule: a keyed PRF built on AES (AES-256 in counter mode, the counter starting at
the parameter tensor's index) rather than iterating AES's own key expansion: it is the
standard, proven way to stretch one key into many independent ones, it gives random access
(any tensor unlocks on its own), and it runs in hardware AES through `cryptography`.

What differs from the paper: the exponent's upper bits stay. Substituting those too would
give weights up to 1e38 and NaN/Inf patterns, and the locked file would no longer "run as a
random classifier". Locked weights keep their order of magnitude (within a factor of ~4)
and lose sign and value. docs/deeplock.md measures what that leaves an attacker.

Why a delivery is useless before payment: every float a model can hold its weights in is
locked (initializers, Constant nodes, tensor and float attributes, subgraphs), and a model
that keeps weights any other way (quantized integers, float8, external or sparse data) is
refused at listing, so no trained number leaves in the clear; and the delivered file is the
locked model sealed with AES-256-GCM, so it does not even parse as ONNX: the architecture,
shapes and weight magnitudes stay hidden until the key is released. The seal's nonce is an
HMAC of the sealed bytes (synthetic IV): one key seals one model, and sealing it again gives
the same bytes, which the signed delivery record and key release name.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import numpy as np
import numpy.typing as npt
import onnx
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.errors import BadInput, Refused

KEY_BYTES = 32
MARKER = "gimme.deeplock"
SCHEME = "deeplock-v2: AES S-box on mantissa bytes, sign bit; AES-256-CTR key schedule"

# per floating type: the mask of each little-endian byte (0xFF: substituted through the S-box)
_MASKS: dict[int, tuple[int, ...]] = {
    onnx.TensorProto.FLOAT16: (0xFF, 0x87),
    onnx.TensorProto.BFLOAT16: (0xFF, 0x80),
    onnx.TensorProto.FLOAT: (0xFF, 0xFF, 0xFF, 0x80),
    onnx.TensorProto.DOUBLE: (0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0x80),
}
_FLOATING = set(_MASKS) | {value for name, value in onnx.TensorProto.DataType.items()
                           if name.startswith(("FLOAT", "COMPLEX"))}
# operators that keep weights as integers (quantized): Deep-Lock has no float to lock there
_QUANTIZED = {"DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
              "MatMulInteger", "DynamicQuantizeLinear"}
_ML_DOMAIN = "ai.onnx.ml"

SEAL_MAGIC = b"gimme-sealed-v1\n"
_NONCE_BYTES = 12
SEAL_OVERHEAD = len(SEAL_MAGIC) + _NONCE_BYTES + 16  # header, nonce, GCM tag

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


def _check_key(master_key: bytes) -> None:
    if len(master_key) != KEY_BYTES:
        raise BadInput(f"a Deep-Lock key is {KEY_BYTES} bytes, got {len(master_key)}")


def _keystream(master_key: bytes, tensor_index: int, count: int, width: int
               ) -> npt.NDArray[np.uint8]:
    """`width` key bytes for each of `count` parameters of tensor number `tensor_index`."""
    _check_key(master_key)
    nonce = tensor_index.to_bytes(8, "big") + bytes(8)
    encryptor = Cipher(algorithms.AES(master_key), modes.CTR(nonce)).encryptor()
    stream = encryptor.update(bytes(width * count)) + encryptor.finalize()
    return np.frombuffer(stream, dtype=np.uint8).reshape(count, width)


def _transform(raw: npt.NDArray[np.uint8], keys: npt.NDArray[np.uint8],
               masks: tuple[int, ...], lock: bool) -> None:
    """Lock or unlock (count, width) little-endian parameter bytes in place."""
    for j, mask in enumerate(masks):
        if mask == 0xFF and lock:
            raw[:, j] = SBOX[raw[:, j] ^ keys[:, j]]
        elif mask == 0xFF:
            raw[:, j] = INVERSE_SBOX[raw[:, j]] ^ keys[:, j]
        else:
            raw[:, j] ^= keys[:, j] & np.uint8(mask)


Item = onnx.TensorProto | onnx.AttributeProto


def _parameters(graph: onnx.GraphProto, where: str = "") -> list[Item]:
    """Every floating parameter of `graph` and its subgraphs, in a fixed order: tensors
    (initializers, Constant values, tensor attributes), float lists, and the single floats
    of ai.onnx.ml operators and Constant nodes. Raises BadInput naming every weight kept in
    a form that cannot be locked."""
    found: list[Item] = []
    problems: list[str] = []

    def tensor(item: onnx.TensorProto, name: str) -> None:
        if item.data_type not in _FLOATING:
            return
        if item.data_type not in _MASKS:
            problems.append(f"{name} is {onnx.TensorProto.DataType.Name(item.data_type)}")
        elif item.data_location == onnx.TensorProto.EXTERNAL:
            problems.append(f"{name} is stored in an external file")
        else:
            found.append(item)

    for init in graph.initializer:
        tensor(init, f"initializer {where}{init.name!r}")
    for sparse in graph.sparse_initializer:
        if sparse.values.data_type in _FLOATING:
            problems.append(f"sparse initializer {where}{sparse.values.name!r}")
    for index, node in enumerate(graph.node):
        name = f"node {where}{node.name or index!r} ({node.op_type})"
        if node.op_type in _QUANTIZED:
            problems.append(f"{name} keeps weights as quantized integers")
        for attribute in node.attribute:
            label = f"{name} attribute {attribute.name!r}"
            kind = attribute.type
            if kind == onnx.AttributeProto.TENSOR:
                tensor(attribute.t, label)
            elif kind == onnx.AttributeProto.TENSORS:
                for t in attribute.tensors:
                    tensor(t, label)
            elif _is_float_parameter(node, attribute):
                found.append(attribute)
            elif kind in (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS):
                problems.append(f"{label} is a sparse tensor")
            elif kind == onnx.AttributeProto.GRAPH:
                found += _parameters(attribute.g, f"{name}/")
            elif kind == onnx.AttributeProto.GRAPHS:
                for g in attribute.graphs:
                    found += _parameters(g, f"{name}/")
    if problems:
        raise BadInput("the model keeps weights that Deep-Lock cannot lock (it locks float16, "
                       "bfloat16, float32 and float64 tensors and float attributes): "
                       + "; ".join(problems) + "; export the model with its weights as "
                       "float initializers")
    return found


def _is_float_parameter(node: onnx.NodeProto, attribute: onnx.AttributeProto) -> bool:
    """Float lists anywhere; single floats where they are trained values (ML operators'
    thresholds, Constant nodes) rather than hyperparameters (alpha, epsilon)."""
    if attribute.type == onnx.AttributeProto.FLOATS:
        return len(attribute.floats) > 0
    return attribute.type == onnx.AttributeProto.FLOAT and (
        node.domain == _ML_DOMAIN or node.op_type == "Constant")


def _bits(item: Item) -> tuple[npt.NDArray[np.uint8], tuple[int, ...]]:
    """A parameter's values as (count, width) little-endian bytes, and its byte masks."""
    if isinstance(item, onnx.AttributeProto):
        values = np.array(item.floats if item.type == onnx.AttributeProto.FLOATS else [item.f],
                          dtype="<f4")
        masks = _MASKS[onnx.TensorProto.FLOAT]
    else:
        masks = _MASKS[item.data_type]
        if item.raw_data:
            values = np.frombuffer(item.raw_data, dtype=np.uint8)
        elif item.data_type == onnx.TensorProto.FLOAT:
            values = np.array(item.float_data, dtype="<f4")
        elif item.data_type == onnx.TensorProto.DOUBLE:
            values = np.array(item.double_data, dtype="<f8")
        else:  # float16 / bfloat16: bit patterns in int32_data
            values = np.array(item.int32_data, dtype=np.int64).astype("<u2")
    raw = np.ascontiguousarray(values).view(np.uint8).reshape(-1, len(masks)).copy()
    return raw, masks


def _store(item: Item, raw: npt.NDArray[np.uint8]) -> None:
    """Write changed bytes back into the field they came from (so unlock is bit-exact)."""
    flat = raw.reshape(-1)
    if isinstance(item, onnx.AttributeProto):
        values = flat.view("<f4").astype(np.float64).tolist()
        if item.type == onnx.AttributeProto.FLOATS:
            item.floats[:] = values
        else:
            item.f = values[0]
    elif item.raw_data:
        item.raw_data = flat.tobytes()
    elif item.data_type == onnx.TensorProto.FLOAT:
        item.float_data[:] = flat.view("<f4").astype(np.float64).tolist()
    elif item.data_type == onnx.TensorProto.DOUBLE:
        item.double_data[:] = flat.view("<f8").tolist()
    else:
        item.int32_data[:] = flat.view("<u2").astype(np.int64).tolist()


def _apply(model: onnx.ModelProto, master_key: bytes, lock: bool) -> None:
    for index, item in enumerate(_parameters(model.graph)):
        raw, masks = _bits(item)
        if len(raw):
            _transform(raw, _keystream(master_key, index, len(raw), len(masks)), masks, lock)
            _store(item, raw)


def check_lockable(model_bytes: bytes) -> None:
    """Raise BadInput (naming them) if the model keeps weights Deep-Lock cannot lock."""
    _parameters(onnx.load_model_from_string(model_bytes).graph)


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


def _seal_keys(master_key: bytes) -> tuple[bytes, bytes]:
    """(AES-256-GCM key, nonce key), both derived from the master key by HKDF-SHA256."""
    _check_key(master_key)
    derived = HKDF(hashes.SHA256(), 64, salt=None, info=b"gimme seal v1").derive(master_key)
    return derived[:32], derived[32:]


def seal(locked_bytes: bytes, master_key: bytes) -> bytes:
    """The delivered file: header, nonce, AES-256-GCM of the locked model."""
    cipher_key, nonce_key = _seal_keys(master_key)
    nonce = hmac.new(nonce_key, locked_bytes, hashlib.sha256).digest()[:_NONCE_BYTES]
    return SEAL_MAGIC + nonce + AESGCM(cipher_key).encrypt(nonce, locked_bytes, SEAL_MAGIC)


def check_sealed(sealed: bytes, locked_size: int) -> None:
    """What can be checked without the key: a sealed model holding `locked_size` bytes."""
    if not sealed.startswith(SEAL_MAGIC):
        raise Refused("the delivered file is not a sealed model (no gimme-sealed-v1 header)")
    if len(sealed) != locked_size + SEAL_OVERHEAD:
        raise Refused(f"the sealed file has {len(sealed)} bytes, but a seal of the "
                      f"{locked_size}-byte locked model the seller declares has "
                      f"{locked_size + SEAL_OVERHEAD}")


def unseal(sealed: bytes, master_key: bytes) -> bytes:
    """The locked model inside a seal; Refused if the key is not the one that sealed it."""
    cipher_key, _nonce_key = _seal_keys(master_key)
    check_sealed(sealed, len(sealed) - SEAL_OVERHEAD)
    start = len(SEAL_MAGIC)
    try:
        return AESGCM(cipher_key).decrypt(sealed[start:start + _NONCE_BYTES],
                                          sealed[start + _NONCE_BYTES:], SEAL_MAGIC)
    except InvalidTag:
        raise Refused("the key does not open the sealed model (AES-GCM authentication "
                      "fails): it is not the key the file was sealed with, or the file was "
                      "altered") from None


def key_id(master_key: bytes) -> str:
    """A public handle for a key (never the key itself)."""
    return hashlib.sha256(b"gimme-deeplock-key" + master_key).hexdigest()[:16]

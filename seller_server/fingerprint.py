"""Per-sale fingerprints against resale, and tracing a leaked copy back to its sale.

Every sale gets its own copy of the model: each trained weight w of tensor t moves by
strength * scale_t * s, with s = +1/-1 drawn from a keyed pseudo-random stream (HMAC-SHA256
of the sale's secret key and the tensor's name) and scale_t the tensor's standard
deviation. The seller commits to that copy, so the buyer tests exactly what it receives.

Tracing a suspect copy: d = (w_suspect - w_original) / scale, per tensor, and for each
sale's key the normalized correlation z = <d, s> / ||d|| (~ N(0, 1) for a key that did not
make the copy, since s is independent of d; ~ strength * sqrt(n) / spread for the key that
did). Fine-tuning and pruning add noise to d but do not remove the correlation from n
weights at once.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

from common.errors import BadInput

FloatArray = npt.NDArray[np.float64]
KEY_BYTES = 32
MIN_WEIGHTS = 8  # tensors smaller than this (scalars, tiny biases) are left alone


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def weights(model: onnx.ModelProto) -> dict[str, FloatArray]:
    """The model's trained float weights by name: initializers, and the coefficients ML
    operators keep as attributes ("node/attribute")."""
    found: dict[str, FloatArray] = {}
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            array = numpy_helper.to_array(init).astype(np.float64)
            if array.size >= MIN_WEIGHTS:
                found[init.name] = array.reshape(-1)
    for index, node in enumerate(model.graph.node):
        for attribute in node.attribute:
            if (attribute.type == onnx.AttributeProto.FLOATS and
                    len(attribute.floats) >= MIN_WEIGHTS and attribute.name == "coefficients"):
                found[f"{node.name or index}/{attribute.name}"] = np.array(
                    attribute.floats, dtype=np.float64)
    return found


def _signs(key: bytes, name: str, count: int) -> FloatArray:
    """A keyed +1/-1 stream for tensor `name` (HMAC-SHA256 in counter mode)."""
    blocks = math.ceil(count / 256)
    stream = b"".join(hmac.new(key, name.encode() + block.to_bytes(4, "big"),
                               hashlib.sha256).digest() for block in range(blocks))
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8))[:count]
    result: FloatArray = bits.astype(np.float64) * 2.0 - 1.0
    return result


def _scale(values: FloatArray) -> float:
    return float(values.std()) or float(np.abs(values).max()) or 1.0


def fingerprint(model_bytes: bytes, key: bytes, strength: float) -> bytes:
    """The buyer's copy: every trained weight moved by strength * tensor scale * +-1."""
    model = onnx.load_model_from_string(model_bytes)
    marked = {name: values + strength * _scale(values) * _signs(key, name, values.size)
              for name, values in weights(model).items()}
    _write(model, marked)
    return model.SerializeToString()


def _write(model: onnx.ModelProto, values: dict[str, FloatArray]) -> None:
    for init in model.graph.initializer:
        if init.name in values:
            original = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(
                values[init.name].reshape(original.shape).astype(original.dtype), init.name))
    for index, node in enumerate(model.graph.node):
        for attribute in node.attribute:
            name = f"{node.name or index}/{attribute.name}"
            if name in values:
                attribute.floats[:] = values[name].tolist()


@dataclass(frozen=True)
class Match:
    sale: str
    z: float
    p_value: float  # one-sided, Bonferroni-corrected over every sale tested


def trace(suspect_bytes: bytes, original_bytes: bytes, sales: dict[str, bytes]) -> list[Match]:
    """Score every sale's key against a suspect copy; best match first."""
    try:
        suspect = weights(onnx.load_model_from_string(suspect_bytes))
    except Exception as exc:
        raise BadInput(f"the suspect file is not an ONNX model: {exc}") from exc
    original = weights(onnx.load_model_from_string(original_bytes))
    if suspect.keys() != original.keys() or any(
            suspect[n].shape != original[n].shape for n in original):
        raise BadInput("the suspect model's weights do not have the listed model's names and "
                       "shapes: it is not a copy of this model (or was re-exported; rename "
                       "its tensors back to trace it)")
    names = sorted(original)
    drift = np.concatenate([(suspect[n] - original[n]) / _scale(original[n]) for n in names])
    # weights zeroed in the suspect (pruning) carry no fingerprint: leave them out
    kept = np.concatenate([(suspect[n] != 0) | (original[n] == 0) for n in names])
    drift = np.where(kept, drift, 0.0)
    norm = float(np.linalg.norm(drift))
    matches = []
    for sale, key in sales.items():
        signs = np.concatenate([_signs(key, n, original[n].size) for n in names]) * kept
        z = float(drift @ signs) / norm if norm else 0.0
        p = min(1.0, len(sales) * 0.5 * math.erfc(z / math.sqrt(2)))
        matches.append(Match(sale, z, p))
    return sorted(matches, key=lambda m: -m.z)

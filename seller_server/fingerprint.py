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

Why a reseller cannot hide the copy by moving hidden units: a dense network computes the
same function after its hidden units are permuted, negated where the activation is odd
(tanh), rescaled where it is positively homogeneous (ReLU), split, or padded with dummy
units, and each of these moves a unit's incoming weights and bias and its outgoing row as
a whole. So before scoring, `align` matches every hidden unit of the suspect to a unit of
the listed model (Hungarian assignment on the cosine of the incoming and of the outgoing
weights, sign ignored: a 2%-fingerprinted unit has cosine ~1 with its own original and a
trained network's distinct units much less), puts it back in place, and divides each side
by its least-squares gain against the original (undoing sign and scale); suspect units left
unmatched (dummies) are dropped, listed units left unmatched count as pruned. The alignment
is computed from the suspect and the listed model only, never from a key, so for a key that
did not make the copy z is still ~N(0, 1); the gain fit costs the fingerprint its component
along each unit's own weight vector (one dimension per unit and side). Renamed tensors
are given back the listed model's names when the two graphs read their constants at the
same places, and float16/float64 conversions are read back in the listed type.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper
from scipy.optimize import linear_sum_assignment

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


# ops through which each hidden unit's value passes alone (elementwise, no mixing of units)
_UNARY = {"Tanh", "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "Elu", "Selu", "Celu",
          "Softplus", "Softsign", "Erf", "Gelu", "Identity", "Cast", "Neg", "Abs"}
_WITH_CONSTANT = {"Mul", "Div", "Add", "Sub", "Pow"}  # by one number shared by all units
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
           onnx.TensorProto.BFLOAT16)
Part = tuple[str, int]  # (initializer name, the axis that indexes the hidden units)


@dataclass(frozen=True)
class HiddenLayer:
    """One layer of hidden units: the tensors that compute them (dense weight, bias) and
    the next dense weight that reads them."""
    incoming: tuple[Part, ...]
    outgoing: Part


def _dense(node: onnx.NodeProto, constants: dict[str, FloatArray]) -> tuple[str, int, int] | None:
    """(weight, its output axis, its input axis) of a MatMul or Gemm by a constant matrix."""
    if len(node.input) < 2 or node.input[1] not in constants or constants[node.input[1]].ndim != 2:
        return None
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul":
        return node.input[1], 1, 0
    if node.op_type == "Gemm" and not attributes.get("transA", 0):
        return (node.input[1], 0, 1) if attributes.get("transB", 0) else (node.input[1], 1, 0)
    return None


def _per_unit(node: onnx.NodeProto, value: str, constants: dict[str, FloatArray]) -> bool:
    if node.op_type in _UNARY:
        return True
    if node.op_type == "Mul" and list(node.input) == [value, value]:  # x * x
        return True
    others = [name for name in node.input if name != value]
    return (node.op_type in _WITH_CONSTANT and len(others) == 1 and others[0] in constants
            and constants[others[0]].size == 1)


def hidden_layers(model: onnx.ModelProto) -> list[HiddenLayer]:
    """Every dense layer whose units reach the next dense layer through elementwise ops
    only, input to output (the graph is topologically sorted)."""
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in set(node.input):  # x * x reads x once
            readers[name].append(node)
    outputs = {o.name for o in model.graph.output}
    layers = []
    for node in model.graph.node:
        dense = _dense(node, constants)
        if dense is None:
            continue
        units = constants[dense[0]].shape[dense[1]]
        incoming: list[Part] = [(dense[0], dense[1])]
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            bias = constants.get(node.input[2])
            if bias is None or bias.size != units:
                continue
            incoming.append((node.input[2], bias.ndim - 1))
        value = node.output[0]
        while value not in outputs and len(readers[value]) == 1:
            step = readers[value][0]
            reader = _dense(step, constants)
            if reader is not None and step.input[0] == value:
                layers.append(HiddenLayer(tuple(incoming), (reader[0], reader[2])))
                break
            bias_name = next((n for n in step.input if n != value), "")
            if (step.op_type == "Add" and value == node.output[0] and bias_name in constants
                    and constants[bias_name].size == units):
                incoming.append((bias_name, constants[bias_name].ndim - 1))
            elif not _per_unit(step, value, constants):
                break
            value = step.output[0]
    return layers


def _unit_rows(tensors: dict[str, FloatArray], parts: tuple[Part, ...],
               listed: dict[str, FloatArray]) -> FloatArray:
    """One row per hidden unit: its entries of every part, side by side."""
    rows = []
    for name, axis in parts:
        if tensors[name].ndim != listed[name].ndim or np.delete(
                tensors[name].shape, axis).tolist() != np.delete(listed[name].shape, axis).tolist():
            raise BadInput(f"the suspect's {name} has shape {list(tensors[name].shape)} where "
                           f"the listed model's is {list(listed[name].shape)}: it is not a copy "
                           f"of this model")
        rows.append(np.moveaxis(tensors[name], axis, 0).reshape(tensors[name].shape[axis], -1))
    if len({len(r) for r in rows}) != 1:
        raise BadInput(f"the suspect's {', '.join(n for n, _ in parts)} disagree on their "
                       f"number of units: it is not a copy of this model")
    return np.concatenate(rows, axis=1)


def _cosines(listed: FloatArray, suspect: FloatArray) -> FloatArray:
    def unit(rows: FloatArray) -> FloatArray:
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        normalized: FloatArray = rows / np.where(norms == 0, 1.0, norms)
        return normalized
    result: FloatArray = unit(listed) @ unit(suspect).T
    return result


def _gains(suspect: FloatArray, listed: FloatArray) -> FloatArray:
    """Per unit, the factor g minimizing ||suspect - g * listed|| over the suspect's nonzero
    entries (pruned ones say nothing of the scale; 1 for a unit with none)."""
    power = np.einsum("ij,ij->i", listed, listed * (suspect != 0))
    result: FloatArray = np.where(power == 0, 1.0, np.einsum("ij,ij->i", suspect, listed)
                                  / np.where(power == 0, 1.0, power))
    return result


def _constant_reads(model: onnx.ModelProto) -> list[tuple[str, int, str]]:
    """(op type, input position, name) of every float constant the graph reads, in order."""
    floats = {i.name for i in model.graph.initializer if i.data_type in _FLOATS}
    return [(node.op_type, position, name) for node in model.graph.node
            for position, name in enumerate(node.input) if name in floats]


def _renamed(suspect: onnx.ModelProto, listed: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the suspect whose float constants and ML operators carry the listed
    model's names wherever the two graphs read them at the same places (renaming or
    re-exporting changes names, not places)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(suspect)
    theirs, ours = _constant_reads(copy), _constant_reads(listed)
    if [read[:2] for read in theirs] == [read[:2] for read in ours]:
        names: dict[str, str] = {}
        for (_, _, their_name), (_, _, our_name) in zip(theirs, ours, strict=True):
            names.setdefault(their_name, our_name)
        if len(set(names.values())) == len(names):  # one to one
            for init in copy.graph.initializer:
                init.name = names.get(init.name, init.name)
            for node in copy.graph.node:
                node.input[:] = [names.get(name, name) for name in node.input]
    their_nodes, our_nodes = ([(index, node) for index, node in enumerate(model.graph.node)
                               if any(a.name == "coefficients" for a in node.attribute)]
                              for model in (copy, listed))
    if [n.op_type for _, n in their_nodes] == [n.op_type for _, n in our_nodes]:
        for (_, node), (index, ours_node) in zip(their_nodes, our_nodes, strict=True):
            node.name = ours_node.name or str(index)  # weights() names by node name or index
    return copy


def align(suspect: onnx.ModelProto, listed: onnx.ModelProto) -> onnx.ModelProto:
    """The suspect with the listed model's tensor names, every hidden unit matched to the
    listed model's and put in its place, sign and scale, and the listed model's float
    types (see the module's docstring)."""
    suspect = _renamed(suspect, listed)
    originals = {i.name: numpy_helper.to_array(i).astype(np.float64)
                 for i in listed.graph.initializer if i.data_type in _FLOATS}
    found = {i.name: numpy_helper.to_array(i).astype(np.float64)
             for i in suspect.graph.initializer if i.data_type in _FLOATS and i.name in originals}
    for layer in hidden_layers(listed):
        sides = (layer.incoming, (layer.outgoing,))
        if any(name not in found for side in sides for name, _ in side):
            continue  # trace names the missing tensors
        suspect_rows = [_unit_rows(found, side, originals) for side in sides]
        listed_rows = [_unit_rows(originals, side, originals) for side in sides]
        similarity = sum(np.abs(_cosines(o, s)) for o, s in zip(listed_rows, suspect_rows,
                                                                strict=True))
        places, picked = linear_sum_assignment(similarity, maximize=True)
        for side, s, o in zip(sides, suspect_rows, listed_rows, strict=True):
            gains = _gains(s[picked], o[places])
            inverse = np.divide(1.0, gains, out=np.zeros_like(gains), where=gains != 0)
            for name, axis in side:
                units = np.moveaxis(found[name], axis, 0)
                placed = np.zeros((originals[name].shape[axis], *units.shape[1:]))
                placed[places] = units[picked] * inverse.reshape(-1, *[1] * (units.ndim - 1))
                found[name] = np.moveaxis(placed, 0, axis)
    dtypes = {i.name: numpy_helper.to_array(i).dtype for i in listed.graph.initializer}
    for init in suspect.graph.initializer:
        if init.name in found:
            init.CopyFrom(numpy_helper.from_array(found[init.name].astype(dtypes[init.name]),
                                                  init.name))
    return suspect


@dataclass(frozen=True)
class Match:
    sale: str
    z: float
    p_value: float  # one-sided, Bonferroni-corrected over every sale tested


def trace(suspect_bytes: bytes, original_bytes: bytes, sales: dict[str, bytes]) -> list[Match]:
    """Score every sale's key against a suspect copy; best match first."""
    try:
        suspect_model = onnx.load_model_from_string(suspect_bytes)
    except Exception as exc:
        raise BadInput(f"the suspect file is not an ONNX model: {exc}") from exc
    listed = onnx.load_model_from_string(original_bytes)
    suspect = weights(align(suspect_model, listed))
    original = weights(listed)
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

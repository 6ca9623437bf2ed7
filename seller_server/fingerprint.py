"""Per-sale fingerprints against resale, and tracing a leaked copy back to its sale.

Every sale gets its own copy of the model: each trained weight w of tensor t moves by
strength * scale_t * s, with s = +1/-1 drawn from a keyed pseudo-random stream (HMAC-SHA256
of the sale's secret key and the tensor's name) and scale_t the tensor's standard
deviation. The seller commits to that copy, so the buyer tests exactly what it receives.

Which tensors are trained weights is read from the graph, by what consumes them: a float
initializer of MIN_WEIGHTS values or more is marked only if every node that reads it
reads it as a layer's weight or bias, namely
  * input 0 or 1 (A, B) or 2 (C, the bias) of Gemm, input 0 or 1 of MatMul, input 1 (the
    kernels) or 2 (the bias) of Conv and ConvTranspose;
  * either input of an Add whose other input is the output of one of those nodes (the
    bias of a MatMul, as skl2onnx and PyTorch export it);
  * through Identity, Cast, Transpose, Reshape, Flatten, Squeeze or Unsqueeze (input 0),
    whose output is itself read only as above (a weight stored transposed or reshaped);
and of the ML operators, the `coefficients` of LinearClassifier, LinearRegressor,
SVMClassifier and SVMRegressor. Everything else is left exactly as listed: constants of
elementwise preprocessing (a scaler's per-column Mul / Add / Sub / Div constants, the
`x - mean` and `/ std` of a normalization layer, Scaler's offset and scale), and
BatchNormalization's scale, bias, mean and variance. Moving those by a fraction of their
spread shifts every row's inputs at once (a MinMaxScaler's Mul constants hold 1/range per
column, and their spread is as large as the constants themselves) and can break the model
outright; a weight's move is averaged over the many inputs of its unit. A tensor read as a
weight by one node and elementwise by another is not marked.

Tracing a suspect copy: d = (w_suspect - w_original) / scale, per tensor, and for each
sale's key the normalized correlation z = <d, s> / ||d|| (~ N(0, 1) for a key that did not
make the copy, since s is independent of d; ~ strength * sqrt(n) / spread for the key that
did). Fine-tuning and pruning add noise to d but do not remove the correlation from n
weights at once.

Why a reseller cannot hide the copy by moving hidden units: a network computes the same
function after its hidden units (or convolution channels) are permuted, negated where the
activation allows it (tanh is odd; x*x is even), rescaled where it is homogeneous (ReLU,
x*x), split, or padded with dummy units, and each of these moves a unit's incoming weights
and bias and its outgoing row as a whole. So before scoring, `align` walks the listed
model's layers from the input: it matches each listed unit to a suspect unit (Hungarian
assignment on the |cosine| of their incoming weights, whose inputs are already in place: a
copy of a trained unit has cosine > 0.9 with it, distinct units much less; units below 0.5,
whose weights are smaller than the fingerprint, are scored as pruned), puts it in place
with its outgoing row, divides its incoming side by its gain (sign and norm ratio) and
multiplies its outgoing row by what the activation passes on of that gain (tanh: the
sign, ReLU: the scale, x*x: its square), so the next layer's inputs are in place too;
then each side's gains are refitted (a split unit's halved row). Suspect units left
unmatched (dummies) are dropped. The alignment is computed from the suspect and the listed
model only, never from a key, so for a key that did not make the copy z is still
~N(0, 1); the gain fit costs the fingerprint its component along each unit's own weight
vector (one dimension per unit and side). Renamed tensors get the listed model's names
back when the two graphs read their constants at the same places, and float16/float64
conversions are read back in the listed type.
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
REFITS = 2  # rounds of gain refits once units are in place
MIN_MATCH = 0.5  # |cosine| of a matched unit's incoming weights (copies of trained units: >0.9)


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


# (op type, input position) at which a node reads a trained weight or bias
_WEIGHT_READS = {("Gemm", 0), ("Gemm", 1), ("Gemm", 2), ("MatMul", 0), ("MatMul", 1),
                 ("Conv", 1), ("Conv", 2), ("ConvTranspose", 1), ("ConvTranspose", 2)}
_LAYERS = {op for op, _ in _WEIGHT_READS}  # an Add of a constant to their output: a bias
_LAYOUTS = {"Identity", "Cast", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}
_COEFFICIENT_OPS = {"LinearClassifier", "LinearRegressor", "SVMClassifier", "SVMRegressor"}
_ONNX_DOMAINS = ("", "ai.onnx")
COEFFICIENTS = "coefficients"


def trained_tensors(model: onnx.ModelProto) -> set[str]:
    """The names of the initializers that only layers read as their weights or biases,
    and "node/coefficients" of the ML operators whose coefficients are trained (see the
    module's docstring for the rule)."""
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for position, name in enumerate(node.input):
            readers[name].append((node, position))
    outputs = {o.name for o in graph.output}

    def bias(node: onnx.NodeProto, position: int) -> bool:
        other = node.input[1 - position] if len(node.input) == 2 else ""
        producer = producers.get(other)
        return (node.op_type == "Add" and producer is not None
                and producer.domain in _ONNX_DOMAINS and producer.op_type in _LAYERS)

    def read_as_weight(value: str) -> bool:
        if value in outputs or not readers[value]:
            return False
        return all(node.domain in _ONNX_DOMAINS and (
            (node.op_type, position) in _WEIGHT_READS or bias(node, position) or
            (node.op_type in _LAYOUTS and position == 0 and read_as_weight(node.output[0])))
            for node, position in readers[value])

    names = {init.name for init in graph.initializer if read_as_weight(init.name)}
    names |= {f"{node.name or index}/{COEFFICIENTS}" for index, node in enumerate(graph.node)
              if node.domain == "ai.onnx.ml" and node.op_type in _COEFFICIENT_OPS}
    return names


def _tensors(model: onnx.ModelProto, names: set[str]) -> dict[str, FloatArray]:
    """The float initializers and float-list attributes ("node/attribute") of `model` that
    `names` names, flattened."""
    found: dict[str, FloatArray] = {}
    for init in model.graph.initializer:
        if init.name in names and init.data_type in _FLOATS:
            found[init.name] = numpy_helper.to_array(init).astype(np.float64).reshape(-1)
    for index, node in enumerate(model.graph.node):
        for attribute in node.attribute:
            name = f"{node.name or index}/{attribute.name}"
            if name in names and attribute.type == onnx.AttributeProto.FLOATS:
                found[name] = np.array(attribute.floats, dtype=np.float64)
    return found


def weights(model: onnx.ModelProto) -> dict[str, FloatArray]:
    """The tensors a fingerprint moves, by name: the trained tensors (`trained_tensors`)
    of at least MIN_WEIGHTS values, float or double."""
    other_types = {init.name for init in model.graph.initializer
                   if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)}
    return {name: values for name, values in _tensors(
        model, trained_tensors(model) - other_types).items() if values.size >= MIN_WEIGHTS}


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
_CHANNEL_POOLS = {"AveragePool", "MaxPool", "LpPool", "GlobalAveragePool", "GlobalMaxPool"}
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
           onnx.TensorProto.BFLOAT16)
# (initializer name, the axis that indexes the hidden units, its entries per unit: 1, or a
# channel's pixels where a dense layer reads flattened convolution channels)
Part = tuple[str, int, int]


@dataclass(frozen=True)
class HiddenLayer:
    """One layer of hidden units (or convolution channels): the tensors that compute them
    (weight, bias), the next layer's weight that reads them, and how the ops between
    pass on a unit's gain g: g**degree, its sign kept only if all of them are odd."""
    incoming: tuple[Part, ...]
    outgoing: Part
    degree: float = 1.0
    odd: bool = True

    def passed_on(self, gains: FloatArray) -> FloatArray:
        """What the outgoing row sees of each unit's incoming gain (tanh: the sign; ReLU:
        the scale; x * x: the square)."""
        result: FloatArray = np.abs(gains) ** self.degree * (np.sign(gains) if self.odd else 1)
        return result


def _linear(node: onnx.NodeProto, constants: dict[str, FloatArray]
            ) -> tuple[str, int, int] | None:
    """(weight, its output axis, its input axis) of a MatMul or Gemm by a constant matrix or
    an ungrouped Conv by constant kernels."""
    if len(node.input) < 2 or node.input[1] not in constants:
        return None
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv" and attributes.get("group", 1) == 1:
        return node.input[1], 0, 1
    if constants[node.input[1]].ndim != 2:
        return None
    if node.op_type == "MatMul":
        return node.input[1], 1, 0
    if node.op_type == "Gemm" and not attributes.get("transA", 0):
        return (node.input[1], 0, 1) if attributes.get("transB", 0) else (node.input[1], 1, 0)
    return None


def _per_unit(node: onnx.NodeProto, value: str, constants: dict[str, FloatArray]
              ) -> tuple[float, bool] | None:
    """(degree, odd) of an op that treats each unit alone, None for any other op."""
    if node.op_type in _UNARY:
        return 1.0, node.op_type != "Abs"
    if node.op_type == "Mul" and list(node.input) == [value, value]:  # x * x
        return 2.0, False
    others = [name for name in node.input if name != value]
    if not (node.op_type in _WITH_CONSTANT and len(others) == 1 and others[0] in constants
            and constants[others[0]].size == 1):
        return None
    if node.op_type == "Pow":
        power = float(constants[others[0]].reshape(-1)[0])
        return power, power % 2 == 1
    return 1.0, True


def _flattens(node: onnx.NodeProto, constants: dict[str, FloatArray]) -> bool:
    """Flatten or Reshape of N, C, ... to N, C * ... (channel-major)."""
    if node.op_type == "Flatten":
        return all(a.i == 1 for a in node.attribute if a.name == "axis")
    shape = constants.get(node.input[1]) if node.op_type == "Reshape" else None
    return shape is not None and shape.size == 2 and int(shape[0]) in (-1, 0)


def hidden_layers(model: onnx.ModelProto) -> list[HiddenLayer]:
    """Every dense layer (or convolution) whose units (channels) reach the next one through
    ops that treat each unit alone, input to output (the graph is topologically sorted)."""
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in set(node.input):  # x * x reads x once
            readers[name].append(node)
    outputs = {o.name for o in model.graph.output}
    layers = []
    for node in model.graph.node:
        linear = _linear(node, constants)
        if linear is None:
            continue
        units = constants[linear[0]].shape[linear[1]]
        incoming: list[Part] = [(linear[0], linear[1], 1)]
        if node.op_type in ("Gemm", "Conv") and len(node.input) > 2 and node.input[2]:
            bias = constants.get(node.input[2])
            if bias is None or bias.size != units:
                continue
            incoming.append((node.input[2], bias.ndim - 1, 1))
        channels = node.op_type == "Conv"  # units on axis 1 of N, C, H, W until flattened
        degree, odd = 1.0, True
        value = node.output[0]
        while value not in outputs and len(readers[value]) == 1:
            step = readers[value][0]
            reader = _linear(step, constants)
            if reader is not None and step.input[0] == value:
                width = constants[reader[0]].shape[reader[2]]
                if (step.op_type == "Conv") == channels and width % units == 0:
                    layers.append(HiddenLayer(tuple(incoming),
                                              (reader[0], reader[2], width // units),
                                              degree, odd))
                break
            bias_name = next((n for n in step.input if n != value), "")
            if (step.op_type == "Add" and value == node.output[0] and bias_name in constants
                    and constants[bias_name].size == units and not channels):
                incoming.append((bias_name, constants[bias_name].ndim - 1, 1))
            elif channels and step.op_type in _CHANNEL_POOLS:
                pass
            elif channels and _flattens(step, constants):
                channels = False
            elif (op := _per_unit(step, value, constants)) is not None:
                degree, odd = degree * op[0], odd and op[1]
            else:
                break
            value = step.output[0]
    return layers


def _rows(tensor: FloatArray, axis: int, block: int) -> FloatArray:
    """The tensor as one row per unit (a unit's `block` entries along `axis` and all the
    entries of the other axes)."""
    moved = np.moveaxis(tensor, axis, 0)
    return moved.reshape(len(moved) // block, -1)


def _unit_rows(tensors: dict[str, FloatArray], parts: tuple[Part, ...],
               listed: dict[str, FloatArray]) -> FloatArray:
    """One row per hidden unit: its entries of every part, side by side."""
    rows = []
    for name, axis, block in parts:
        tensor, shape = tensors[name], listed[name].shape
        if (tensor.ndim != len(shape) or tensor.shape[axis] % block or
                np.delete(tensor.shape, axis).tolist() != np.delete(shape, axis).tolist()):
            raise BadInput(f"the suspect's {name} has shape {list(tensor.shape)} where the "
                           f"listed model's is {list(shape)}: it is not a copy of this model")
        if tensor.size == 0 or not np.isfinite(tensor).all():
            raise BadInput(f"the suspect's {name} is empty or holds NaN or infinite weights: "
                           f"it is not a working copy of this model")
        rows.append(_rows(tensor, axis, block))
    if len({len(r) for r in rows}) != 1:
        raise BadInput(f"the suspect's {', '.join(part[0] for part in parts)} disagree on "
                       f"their number of units: it is not a copy of this model")
    return np.concatenate(rows, axis=1)


def _moved(tensor: FloatArray, part: Part, listed: FloatArray, places: npt.NDArray[np.int64],
           picked: npt.NDArray[np.int64]) -> FloatArray:
    """The tensor in the listed shape with unit picked[k] in place places[k]; places no
    unit was put in hold zeros."""
    _, axis, block = part
    rows = _rows(tensor, axis, block)
    placed = np.zeros((len(_rows(listed, axis, block)), rows.shape[1]))
    placed[places] = rows[picked]
    result: FloatArray = np.moveaxis(placed.reshape(np.moveaxis(listed, axis, 0).shape), 0, axis)
    return result


def _rescale(tensors: dict[str, FloatArray], parts: tuple[Part, ...],
             listed: dict[str, FloatArray], factors: FloatArray) -> None:
    """Multiply every unit's entries of `parts` by its factor (units are in place)."""
    for name, axis, block in parts:
        rows = _rows(tensors[name], axis, block) * factors[:, None]
        tensors[name] = np.moveaxis(rows.reshape(np.moveaxis(listed[name], axis, 0).shape),
                                    0, axis)


def _inverse(gains: FloatArray) -> FloatArray:
    result: FloatArray = np.divide(1.0, gains, out=np.zeros_like(gains), where=gains != 0)
    return result


def _cosines(listed: FloatArray, suspect: FloatArray) -> FloatArray:
    def unit(rows: FloatArray) -> FloatArray:
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        normalized: FloatArray = rows / np.where(norms == 0, 1.0, norms)
        return normalized
    result: FloatArray = unit(listed) @ unit(suspect).T
    return result


def _gains(suspect: FloatArray, listed: FloatArray) -> FloatArray:
    """Per unit, the factor g with suspect ~ g * listed: the sign of their correlation and
    the ratio of their norms over the suspect's nonzero entries (pruned ones say nothing of
    the scale; 1 for a unit with none). Unlike a least-squares fit, it cannot go to ~0 (its
    inverse exploding) on a unit that correlates weakly."""
    listed_norm = np.sqrt(np.einsum("ij,ij->i", listed, listed * (suspect != 0)))
    ratio = np.linalg.norm(suspect, axis=1) / np.where(listed_norm == 0, 1.0, listed_norm)
    result: FloatArray = np.where(listed_norm == 0, 1.0, np.sign(
        np.einsum("ij,ij->i", suspect, listed)) * ratio)
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
    layers = [layer for layer in hidden_layers(listed)  # trace names missing tensors
              if all(part[0] in found for part in (*layer.incoming, layer.outgoing))]
    # input to output: each listed unit takes the suspect unit whose incoming weights match
    # it best (their inputs are already in place), with its outgoing row; then its incoming
    # side is divided by its gain and its outgoing row multiplied by what the activation
    # passed on of that gain, so that the next layer's incoming weights are in place too
    for layer in layers:
        _unit_rows(found, (layer.outgoing,), originals)  # its shape is checked here
        listed_rows = _unit_rows(originals, layer.incoming, originals)
        weight = layer.incoming[:1]  # (a bias alone makes dead units look alike)
        similarity = np.abs(_cosines(_unit_rows(originals, weight, originals),
                                     _unit_rows(found, weight, originals)))
        places, picked = linear_sum_assignment(similarity, maximize=True)
        # a unit whose weights are below the fingerprint's size matches nothing reliably
        # (its own copy included): scored as pruned rather than by a wrong gain
        sure = similarity[places, picked] >= MIN_MATCH
        places, picked = places[sure], picked[sure]
        for part in (*layer.incoming, layer.outgoing):
            found[part[0]] = _moved(found[part[0]], part, originals[part[0]], places, picked)
        gains = _gains(_unit_rows(found, layer.incoming, originals), listed_rows)
        _rescale(found, layer.incoming, originals, _inverse(gains))
        _rescale(found, (layer.outgoing,), originals, layer.passed_on(gains))
    # every axis now in place: refit each side's gains, which corrects outgoing rows scaled
    # otherwise than the activation passes on (a unit split in two that share its row) and
    # what a unit's poorly determined incoming gain (weights below the fingerprint's size)
    # passed on to the next layer
    for _ in range(REFITS):
        for layer in layers:
            for side in (layer.incoming, (layer.outgoing,)):
                gains = _gains(_unit_rows(found, side, originals),
                               _unit_rows(originals, side, originals))
                _rescale(found, side, originals, _inverse(gains))
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
    original = weights(listed)
    if not original:
        raise BadInput("the listed model has no trained weights a fingerprint marks: its "
                       "copies are not fingerprinted")
    # the listed model's marked tensors, read from the suspect (whose graph may differ)
    suspect = _tensors(align(suspect_model, listed), set(original))
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

"""Bident models (seed 002): two sub-networks read the same input and a merge layer joins
them; the untrusted half (one branch) runs in the normal world, the trusted half (the other
branch, the merge and everything after it) in a trusted environment.

This module finds that structure in an ONNX graph and cuts sub-graphs out of it; the
seller's `bident split` and the buyer's trusted runner both use it (onnx only, no torch).

A package is a directory:
    manifest.json         what is where, the merge, hashes, the split check
    untrusted.onnx        input -> the untrusted branch's output (plain: it runs in the open)
    trusted.locked.onnx   (input, untrusted output) -> the model's outputs, Deep-Locked
    trusted.key           its key: handed to the trusted environment only
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
from onnx import helper

from common.errors import BadInput, Unsupported

FORMAT = "gimme-bident-1"
MANIFEST = "manifest.json"
UNTRUSTED_FILE = "untrusted.onnx"
TRUSTED_FILE = "trusted.locked.onnx"
KEY_FILE = "trusted.key"
MERGE_OPS = {"Concat": "concat", "Mul": "mul", "Max": "max", "Add": "avg", "Sum": "avg",
             "Mean": "avg"}


@dataclass(frozen=True)
class Structure:
    """Where a bident graph splits: the input, the merge node and its two branch outputs."""

    input: str
    merge_node: str
    merge_op: str  # concat, mul, max or avg
    untrusted_output: str  # the untrusted branch's output tensor (an input of the merge)
    trusted_output: str  # the trusted branch's output tensor (the other input)
    outputs: tuple[str, ...]  # the model's outputs


@dataclass(frozen=True)
class Manifest:
    format: str
    structure: Structure
    untrusted_sha256: str
    trusted_locked_sha256: str
    trusted_sha256: str  # of the unlocked trusted half: the trusted runner checks it
    whole_sha256: str  # of the model that was split
    untrusted_parameters: int
    trusted_parameters: int
    key_id: str
    check_rows: int
    check_max_error: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        if not path.exists():
            raise BadInput(f"{folder} is not a bident package (no {MANIFEST}); make one with "
                           f"'gimme-seller bident split MODEL.onnx --out DIR'")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise BadInput(f"{path} is format {raw.get('format')!r}, not {FORMAT!r}")
            raw["structure"] = Structure(**{**raw["structure"],
                                            "outputs": tuple(raw["structure"]["outputs"])})
            return cls(**raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise BadInput(f"{path} is not a valid bident manifest: {exc}") from exc


def _parameter_inputs(model: onnx.ModelProto) -> set[str]:
    """Trained tensors: float initializers (and Constant nodes) with more than one value."""
    found = {i.name for i in model.graph.initializer
             if i.data_type == onnx.TensorProto.FLOAT and _size(i) > 1}
    for node in model.graph.node:
        if (node.op_type == "Constant" and node.attribute and node.attribute[0].t.dims
                and _size(node.attribute[0].t) > 1):
            found.update(node.output)
    return found


def _size(tensor: onnx.TensorProto) -> int:
    size = 1
    for d in tensor.dims:
        size *= d
    return size


def count_parameters(model: onnx.ModelProto) -> int:
    return sum(_size(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)


def find_structure(model: onnx.ModelProto, trusted: str = "second") -> Structure:
    """The merge: the first node where two branches of the input, each with trained
    parameters, meet, and through which everything after it depends on the input."""
    graph = model.graph
    constants = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in constants]
    if len(inputs) != 1:
        raise Unsupported(f"a bident model has one input; this one has {inputs}")
    source = inputs[0]
    parameters = _parameter_inputs(model)
    producer: dict[str, int] = {}
    ancestors: dict[str, frozenset[int]] = {source: frozenset()}  # nodes a tensor needs
    for index, node in enumerate(graph.node):
        needed = frozenset({index}).union(*(ancestors[t] for t in node.input
                                             if t in ancestors))
        for out in node.output:
            producer[out] = index
            if any(t in ancestors for t in node.input):
                ancestors[out] = needed
    trained = {index for index, node in enumerate(graph.node)
               if any(t in parameters for t in node.input)}
    for index, node in enumerate(graph.node):
        live = [t for t in node.input if t in ancestors]
        if node.op_type not in MERGE_OPS or len(live) != 2 or live[0] == live[1]:
            continue
        first, second = (ancestors[t] for t in live)
        if not (first - second) & trained or not (second - first) & trained:
            continue  # not two branches with weights of their own
        if not _is_cut(model, index, ancestors):
            continue
        untrusted, trusted_output = (live if trusted == "second" else live[::-1])
        return Structure(source, node.name or f"node {index}", MERGE_OPS[node.op_type],
                         untrusted, trusted_output, tuple(o.name for o in graph.output))
    raise Unsupported("no bident merge found: the model needs two branches on the same "
                      "input, each with trained layers, joined by Concat, Mul, Max or Add "
                      "(average), with every later layer after the merge")


def _is_cut(model: onnx.ModelProto, merge: int, ancestors: dict[str, frozenset[int]]) -> bool:
    """Every input-dependent node is before the merge (on a branch) or after it, reading the
    input only through it."""
    before = frozenset({merge}).union(*(ancestors[t] for t in model.graph.node[merge].input
                                        if t in ancestors))
    for index, node in enumerate(model.graph.node):
        if index in before:
            continue
        for t in node.input:
            if t in ancestors and merge not in ancestors[t]:
                return False
    return all(merge in ancestors.get(o.name, frozenset()) for o in model.graph.output)


def subgraph(model: onnx.ModelProto, inputs: list[str], outputs: list[str],
             name: str) -> onnx.ModelProto:
    """The nodes computing `outputs` from `inputs` (and constants), as a model of its own."""
    graph = model.graph
    needed: set[str] = set(outputs)
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(t for t in node.input if t and t not in inputs)
    keep.reverse()
    initializers = [i for i in graph.initializer if i.name in needed]
    types = {v.name: v for v in [*graph.input, *graph.output, *graph.value_info]}
    unresolved = needed - {i.name for i in initializers} - set(inputs) - {
        o for n in keep for o in n.output}
    if unresolved:
        raise Unsupported(f"the {name} half needs {sorted(unresolved)} from outside it")

    def info(tensor: str) -> onnx.ValueInfoProto:
        if tensor in types:
            return types[tensor]
        return helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None)

    cut = helper.make_graph(keep, f"{graph.name}-{name}", [info(t) for t in inputs],
                            [info(t) for t in outputs], initializers)
    result = helper.make_model(cut, opset_imports=list(model.opset_import),
                               producer_name="gimme bident split")
    result.ir_version = model.ir_version
    return result


def halves(model: onnx.ModelProto, structure: Structure
           ) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(untrusted: input -> untrusted output; trusted: (input, untrusted output) -> outputs)."""
    untrusted = subgraph(model, [structure.input], [structure.untrusted_output], "untrusted")
    trusted = subgraph(model, [structure.input, structure.untrusted_output],
                       list(structure.outputs), "trusted")
    return untrusted, trusted


def trusted_stages(trusted: onnx.ModelProto, structure: Structure
                   ) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The trusted half in two steps, so its branch can run while the untrusted half does:
    (input -> trusted branch output; (branch output, untrusted output) -> outputs)."""
    branch = subgraph(trusted, [structure.input], [structure.trusted_output], "branch")
    finish = subgraph(trusted, [structure.trusted_output, structure.untrusted_output],
                      list(structure.outputs), "finish")
    return branch, finish

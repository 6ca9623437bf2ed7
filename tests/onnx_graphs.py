"""Small ONNX graphs built by hand for compiler and engine tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from common.onnx_io import MAX_IR_VERSION
from common.tabular import FloatArray

RNG = np.random.default_rng(7)


def weights(rows: int, cols: int, scale: float = 0.5, rng: np.random.Generator = RNG
            ) -> FloatArray:
    return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)


def build(nodes: list[onnx.NodeProto], features: int, outputs: dict[str, int],
          initializers: dict[str, FloatArray], rank: int = 2) -> bytes:
    shape: list[int | str] = ["N", features] if rank == 2 else ["N", 1, features, features]
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", width])
         for name, width in outputs.items()],
        [numpy_helper.from_array(value, name) for name, value in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = MAX_IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def mlp(activation: str, features: int = 6, hidden: int = 5, classes: int = 3,
        rng: np.random.Generator = RNG) -> bytes:
    """Gemm -> activation -> Gemm -> Softmax; activation 'square' is Mul(h, h)."""
    act = (helper.make_node("Mul", ["h", "h"], ["a"], name="square1")
           if activation == "square" else
           helper.make_node(activation, ["h"], ["a"], name=f"{activation.lower()}1"))
    return build(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="dense1"),
         act,
         helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], name="dense2", transB=1),
         helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1)],
        features, {"probabilities": classes},
        {"w1": weights(features, hidden, rng=rng), "b1": weights(1, hidden, rng=rng)[0],
         "w2": weights(classes, hidden, rng=rng), "b2": weights(1, classes, rng=rng)[0]})


def calibration(features: int = 6, rows: int = 400, rng: np.random.Generator = RNG
                ) -> FloatArray:
    return rng.uniform(-1.5, 1.5, (rows, features))


MERGES = ("concat", "mul", "max", "avg")


def bident(merge: str, activation: str = "Relu", features: int = 6, hidden: int = 4,
           classes: int = 3) -> bytes:
    """Two branches on the same input, each Gemm -> activation, merged, then a dense head:
    the bident shape (branch 'left' untrusted, 'right' trusted)."""
    def branch(side: str) -> list[onnx.NodeProto]:
        act = (helper.make_node("Mul", [f"h_{side}", f"h_{side}"], [side], name=f"sq_{side}")
               if activation == "square" else
               helper.make_node(activation, [f"h_{side}"], [side], name=f"act_{side}"))
        return [helper.make_node("Gemm", ["x", f"w_{side}", f"b_{side}"], [f"h_{side}"],
                                 name=f"dense_{side}"), act]

    merged = {
        "concat": [helper.make_node("Concat", ["left", "right"], ["m"], name="merge", axis=1)],
        "mul": [helper.make_node("Mul", ["left", "right"], ["m"], name="merge")],
        "max": [helper.make_node("Max", ["left", "right"], ["m"], name="merge")],
        "avg": [helper.make_node("Add", ["left", "right"], ["s"], name="merge"),
                helper.make_node("Mul", ["s", "half"], ["m"], name="halve")],
    }[merge]
    width = 2 * hidden if merge == "concat" else hidden
    return build(
        [*branch("left"), *branch("right"), *merged,
         helper.make_node("Gemm", ["m", "w_head", "b_head"], ["logits"], name="head"),
         helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1)],
        features, {"probabilities": classes},
        {"w_left": weights(features, hidden), "b_left": weights(1, hidden)[0],
         "w_right": weights(features, hidden), "b_right": weights(1, hidden)[0],
         "half": np.array(0.5, dtype=np.float32),
         "w_head": weights(width, classes), "b_head": weights(1, classes)[0]})


def self_ratio() -> bytes:
    """Gemm -> Div(h, h): a division by an encrypted tensor, whose probe divides 0 by 0."""
    return build([helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="dense"),
                  helper.make_node("Div", ["h", "h"], ["y"], name="self_ratio")],
                 3, {"y": 2}, {"w": weights(3, 2), "b": weights(1, 2)[0]})


def softsign_by_division() -> bytes:
    """Gemm -> h / (1 + |h|), spelled with Abs, Add and Div."""
    return build([helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="dense"),
                  helper.make_node("Abs", ["h"], ["a"], name="magnitude"),
                  helper.make_node("Add", ["a", "one"], ["d"], name="plus_one"),
                  helper.make_node("Div", ["h", "d"], ["y"], name="softsign_ratio")],
                 3, {"y": 2}, {"w": weights(3, 2), "b": weights(1, 2)[0],
                               "one": np.ones(1, np.float32)})


def memory_hog(width: int = 3 << 20) -> bytes:
    """Tile the 3 input columns to `width` features, then add a constant: probing the Add
    needs a (1024, width) float64 array (3 M features: 25 GB), beyond any worker's memory
    limit (and any machine's RAM)."""
    return build([helper.make_node("Tile", ["x", "repeats"], ["h"], name="widen"),
                  helper.make_node("Add", ["h", "c"], ["y"], name="shift")],
                 3, {"y": width}, {"repeats": np.array([1, width // 3], dtype=np.int64),
                                   "c": np.ones(1, np.float32)})


def slow_to_compile(nodes: int) -> bytes:
    """Gemm, `nodes` Add nodes in a chain, Relu, Gemm: the compiler probes every node (a few
    ms each) once per error bound it tries, and with a tight max_error (the Relu's fit
    cannot meet) it tries all nine: about 9 x `nodes` x 2-5 ms."""
    chain = [helper.make_node("Gemm", ["x", "w", "b"], ["h0"], name="dense")]
    chain += [helper.make_node("Add", [f"h{i}", "c"], [f"h{i + 1}"], name=f"shift{i}")
              for i in range(nodes)]
    chain += [helper.make_node("Relu", [f"h{nodes}"], ["a"], name="relu"),
              helper.make_node("Gemm", ["a", "v", "b"], ["y"], name="head")]
    return build(chain, 3, {"y": 2}, {"w": weights(3, 2), "b": weights(1, 2)[0],
                                      "v": weights(2, 2), "c": np.full(2, 1e-3, np.float32)})


def max_pool_cnn(pool: dict[str, Any], side: int = 6, maps: int = 2, classes: int = 3,
                 activation: str = "Relu", op: str = "MaxPool") -> bytes:
    """Conv 3x3 (padded) -> activation -> `op` (MaxPool(**pool), GlobalMaxPool) -> Flatten
    -> Gemm."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    if activation:
        nodes.append(helper.make_node(activation, ["c"], ["a"], name="act"))
    nodes += [helper.make_node(op, ["a" if activation else "c"], ["p"], name="pool", **pool),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten")]
    pool_alone = helper.make_model(helper.make_graph(
        [nodes[-2]], "pool", [helper.make_tensor_value_info(nodes[-2].input[0],
                                                            TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, None)]),
        opset_imports=[helper.make_opsetid("", 17)])
    feeds = {nodes[-2].input[0]: np.zeros((1, maps, side, side), dtype=np.float32)}
    pooled: list[Any] = list(ReferenceEvaluator(pool_alone).run(None, feeds))
    width = int(np.asarray(pooled[0]).size)
    nodes.append(helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"], name="dense",
                                  transB=1))
    return build(nodes, side, {"logits": classes},
                 {"w": weights(maps * 9, 1).reshape(maps, 1, 3, 3), "b": weights(1, maps)[0],
                  "w2": weights(classes, width), "b2": weights(1, classes)[0]}, rank=4)

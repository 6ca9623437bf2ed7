"""Loading, saving and running ONNX models the same way on both sides."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import external_data_helper

from common.errors import BadInput

FloatArray = npt.NDArray[np.float64]
# onnxruntime 1.23 refuses the IR version onnx 1.23 writes by default.
MAX_IR_VERSION = 10


def parse_model(data: bytes, what: str) -> onnx.ModelProto:
    try:
        model = onnx.load_model_from_string(data)
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises several unrelated types
        raise BadInput(f"{what} is not a valid ONNX model: {exc}") from exc
    return model


PROTOBUF_LIMIT = 2**31 - 1  # bytes in one serialized model


def load_model_file(path: Path, root: Path) -> bytes:
    """The model at `path` as self-contained bytes. Tensors kept in external data files
    (what torch.onnx.export writes for larger models: `model.onnx.data` next to it) are
    read in from their location relative to the model, which must be a file inside `root`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read {exc.filename}: {exc.strerror}") from exc
    try:
        model = onnx.load_model_from_string(data)
    except Exception:  # not ONNX: parse_model says so where the bytes are used
        return data
    external = [t for t in external_data_helper._get_all_tensors(model)
                if external_data_helper.uses_external_data(t)]
    if not external:
        return data
    top = root.resolve()
    for tensor in external:
        location = external_data_helper.ExternalDataInfo(tensor).location
        target = (path.parent / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(top):
            raise BadInput(f"{path.name}: tensor {tensor.name!r} keeps its data in "
                           f"{location!r}, outside the catalog directory {root}; external "
                           f"data must be a file next to the model, inside the catalog")
        if not target.is_file():
            raise BadInput(f"{path.name}: tensor {tensor.name!r} keeps its data in the "
                           f"external file {location!r}, which is missing (expected at "
                           f"{target}); copy it next to the model")
    try:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:  # onnx raises ValueError, OSError, its own checker errors
        raise BadInput(f"{path.name}: cannot read its external data: {exc}") from exc
    if model.ByteSize() > PROTOBUF_LIMIT:
        raise BadInput(f"{path.name}: with its external data the model is "
                       f"{model.ByteSize() / 2**30:.1f} GiB, more than one ONNX file holds")
    return model.SerializeToString()


def save_model(model: onnx.ModelProto, path: Path) -> bytes:
    """Write `model` with an IR version onnxruntime accepts; returns the bytes written."""
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    data = model.SerializeToString()
    path.write_bytes(data)
    return data


def session(model_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BadInput(f"onnxruntime cannot load the model: {exc}") from exc


def run_model(
    model_bytes: bytes,
    rows: FloatArray,
    probability_output: str,
    class_labels: Sequence[str],
) -> FloatArray:
    """The compared output of the model on `rows`, as a (rows, outputs) float array."""
    sess = session(model_bytes)
    names = [o.name for o in sess.get_outputs()]
    if probability_output not in names:
        raise BadInput(f"the model has no output named {probability_output!r} (it has {names})")
    (value,) = sess.run([probability_output], model_feed(sess, rows))
    return _as_matrix(value, class_labels)


def model_feed(sess: ort.InferenceSession, rows: FloatArray) -> dict[str, Any]:
    """Flat rows reshaped to the model's input (e.g. [rows, 1, 28, 28]), in its float type."""
    model_input = sess.get_inputs()[0]
    dims = model_input.shape[1:]
    shape = [-1, *dims] if dims and all(isinstance(d, int) for d in dims) else [len(rows), -1]
    dtype = np.float64 if model_input.type == "tensor(double)" else np.float32
    return {model_input.name: rows.astype(dtype).reshape(shape)}


def _as_matrix(value: Any, class_labels: Sequence[str]) -> FloatArray:
    if isinstance(value, list):  # ZipMap: one {label: probability} dict per row
        order = list(class_labels)
        return np.array([[float(row_map[_key(row_map, label)]) for label in order]
                         for row_map in value], dtype=np.float64)
    matrix = np.asarray(value, dtype=np.float64)
    return matrix.reshape(matrix.shape[0], -1)


def _key(row_map: dict[Any, float], label: str) -> Any:
    for key in row_map:
        if str(key) == label:
            return key
    raise BadInput(f"model output has no class {label!r} (has {list(row_map)})")

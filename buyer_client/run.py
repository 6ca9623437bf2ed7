"""`gimme-buyer run`: predictions from a Deep-Locked model, unlocked in memory only."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console

from buyer_client.workspace import Workspace
from common.deeplock import unlock
from common.errors import BadInput
from common.evidence import LOCKED_MODEL
from common.onnx_io import session
from common.protocol import Offer
from common.tabular import FloatArray, load_table
from common.tail import predicted_labels
from common.wire import offer_from_payload


def run_locked(workspace: Workspace, console: Console, model: str, data: Path,
               key_file: Path | None, trial_id: str | None, out: Path | None) -> None:
    """Unlock (in memory), load into onnxruntime, predict; report what each step cost."""
    path = Path(model)
    if path.suffix == ".onnx" and path.exists():
        locked, offer = path.read_bytes(), None
        if key_file is None:
            raise BadInput("running a locked file needs --key-file")
    else:
        folder = workspace.trial(model, trial_id)
        if not folder.has(LOCKED_MODEL):
            raise BadInput(f"no model of {model!r} received yet: run 'gimme-buyer buy {model}'")
        locked = folder.read(LOCKED_MODEL)
        offer = offer_from_payload(folder.load_signed("offer").payload)
        key_file = key_file or folder.path / "model.key"
        if not key_file.exists():
            raise BadInput(f"{model!r} is not paid for yet: the seller releases its key on "
                           f"payment ('gimme-buyer buy {model}')")
    try:
        key = bytes.fromhex(key_file.read_text().strip())
    except ValueError:
        raise BadInput(f"{key_file} does not hold a hex key") from None
    started = time.perf_counter()
    model_bytes = unlock(locked, key)
    unlocked = time.perf_counter()
    sess = session(model_bytes)  # from bytes: the plain weights never touch the disk
    loaded = time.perf_counter()
    columns = _columns(sess, offer)
    rows = load_table(data, columns).rows
    model_input = sess.get_inputs()[0]
    dims = model_input.shape[1:]
    shape = [-1, *dims] if dims and all(isinstance(d, int) for d in dims) else [len(rows), -1]
    outputs = sess.run(None, {model_input.name: rows.astype(np.float32).reshape(shape)})
    done = time.perf_counter()
    scores = _first_float_output(outputs)
    labels = predicted_labels(scores, offer.output.class_labels if offer else ())
    if out is not None:
        with out.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["row", "prediction", *[f"score_{i}" for i in range(scores.shape[1])]])
            for i, row in enumerate(scores):
                writer.writerow([i, labels[i] if labels else "", *map(float, row)])
    else:
        for i, label in enumerate(labels[:20] if labels else []):
            console.print(f"row {i}: {label}")
    console.print(f"{len(rows)} rows; unlock {1e3 * (unlocked - started):.1f} ms, load "
                  f"{1e3 * (loaded - unlocked):.1f} ms, inference {1e3 * (done - loaded):.1f} ms"
                  + (f"; predictions in {out}" if out else ""))


def _columns(sess: ort.InferenceSession, offer: Offer | None) -> list[str]:
    """The offer's column names; a bare file's rows come from .npz X (width from the model)."""
    if offer is not None:
        return list(offer.encoding.input_columns)
    dims = [d for d in sess.get_inputs()[0].shape[1:] if isinstance(d, int)]
    return [f"x{i}" for i in range(int(np.prod(dims)) if dims else 0)]


def _first_float_output(outputs: list[object]) -> FloatArray:
    for value in outputs:
        if isinstance(value, list):  # ZipMap
            return np.array([[float(v) for v in row.values()] for row in value])
        array = np.asarray(value)
        if array.dtype.kind == "f":
            return array.reshape(len(array), -1).astype(np.float64)
    raise BadInput("the model has no float output")

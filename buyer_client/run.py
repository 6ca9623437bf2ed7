"""`gimme-buyer run`: predictions from a Deep-Locked model, unlocked in memory only, or from
a bident package (common.bident) with its trusted half in a separate process."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console

from buyer_client.trusted import TrustedHalf
from buyer_client.workspace import Workspace
from common.bident import KEY_FILE, UNTRUSTED_FILE, Manifest
from common.deeplock import unlock
from common.errors import BadInput
from common.evidence import LOCKED_MODEL
from common.onnx_io import model_feed, session
from common.protocol import Offer
from common.signing import sha256
from common.tabular import FloatArray, load_table
from common.tail import predicted_labels
from common.wire import offer_from_payload


def run_locked(workspace: Workspace, console: Console, model: str, data: Path,
               key_file: Path | None, trial_id: str | None, out: Path | None) -> None:
    """Unlock (in memory), load into onnxruntime, predict; report what each step cost."""
    path = Path(model)
    if path.is_dir():
        run_bident(console, path, data, key_file, out)
        return
    if path.suffix == ".onnx" and path.exists():
        locked, offer = path.read_bytes(), None
        if key_file is None:
            raise BadInput("running a locked file needs --key-file")
    else:
        folder = workspace.owned_trial(model, trial_id)
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
    _report(console, scores, offer.output.class_labels if offer else (), out)
    console.print(f"{len(rows)} rows; unlock {1e3 * (unlocked - started):.1f} ms, load "
                  f"{1e3 * (loaded - unlocked):.1f} ms, inference {1e3 * (done - loaded):.1f} ms"
                  + (f"; predictions in {out}" if out else ""))


def run_bident(console: Console, package: Path, data: Path, key_file: Path | None,
               out: Path | None) -> None:
    """A bident package: the untrusted half here, the trusted half in its own process
    (which alone reads the key), both at once on every batch."""
    manifest = Manifest.read(package)
    untrusted_bytes = (package / UNTRUSTED_FILE).read_bytes()
    if sha256(untrusted_bytes).hex() != manifest.untrusted_sha256:
        raise BadInput(f"{package / UNTRUSTED_FILE} is not the file the manifest names")
    key_file = key_file or package / KEY_FILE
    if not key_file.exists():
        raise BadInput(f"no key for the trusted half: pass --key-file (the seller's "
                       f"{KEY_FILE}); only the trusted runner reads it")
    started = time.perf_counter()
    untrusted = session(untrusted_bytes)
    with TrustedHalf(package, key_file) as trusted:
        loaded = time.perf_counter()
        dims = [d for d in untrusted.get_inputs()[0].shape[1:] if isinstance(d, int)]
        rows = load_table(data, [f"x{i}" for i in range(int(np.prod(dims)) if dims else 0)]
                          ).rows
        outputs = predict_bident(untrusted, trusted, manifest, rows)
        done = time.perf_counter()
    scores = _first_float_output(list(outputs.values()))
    _report(console, scores, (), out)
    console.print(f"{len(rows)} rows through the bident halves; start (both halves, trusted "
                  f"runner unlocking its half) {1e3 * (loaded - started):.1f} ms, inference "
                  f"{1e3 * (done - loaded):.1f} ms" + (f"; predictions in {out}" if out else ""))


def predict_bident(untrusted: ort.InferenceSession, trusted: TrustedHalf, manifest: Manifest,
                   rows: FloatArray, batch: int = 1024) -> dict[str, FloatArray]:
    """Model outputs for `rows`: per batch, the trusted branch starts on the input while the
    untrusted half runs here, then the trusted runner merges and finishes."""
    structure = manifest.structure
    parts: list[dict[str, FloatArray]] = []
    for index, start in enumerate(range(0, len(rows), batch)):
        feed = model_feed(untrusted, rows[start:start + batch])[structure.input]
        trusted.submit(index, structure.input, feed)
        (branch,) = untrusted.run([structure.untrusted_output], {structure.input: feed})
        parts.append(trusted.finish(index, structure.untrusted_output, branch))
    return {name: np.concatenate([p[name] for p in parts]) for name in structure.outputs}


def _report(console: Console, scores: FloatArray, class_labels: tuple[str, ...] | list[str],
            out: Path | None) -> None:
    labels = predicted_labels(scores, tuple(class_labels))
    if out is not None:
        with out.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["row", "prediction", *[f"score_{i}" for i in range(scores.shape[1])]])
            for i, row in enumerate(scores):
                writer.writerow([i, labels[i] if labels else "", *map(float, row)])
    else:
        for i, label in enumerate(labels[:20] if labels else []):
            console.print(f"row {i}: {label}")


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

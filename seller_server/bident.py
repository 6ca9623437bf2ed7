"""`gimme-seller bident split`: a trained bident model -> a package of two halves.

The split is checked before anything is written: the untrusted half, then the trusted half
on the input and the untrusted half's output, must reproduce the whole model's outputs on
the given rows (or random ones). The trusted half is Deep-Locked under a fresh key.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx

from common.bident import (
    FORMAT,
    KEY_FILE,
    MANIFEST,
    TRUSTED_FILE,
    UNTRUSTED_FILE,
    Manifest,
    count_parameters,
    find_structure,
    halves,
)
from common.deeplock import key_id, lock, new_master_key
from common.errors import BadInput, Unsupported
from common.onnx_io import model_feed, session
from common.signing import sha256
from common.tabular import FloatArray

log = logging.getLogger(__name__)
CHECK_TOLERANCE = 1e-4  # relative to the output's magnitude (float32 re-association)


def split(model_bytes: bytes, out: Path, rows: FloatArray | None = None,
          trusted: str = "second") -> Manifest:
    try:
        model = onnx.load_model_from_string(model_bytes)
    except Exception as exc:
        raise BadInput(f"not an ONNX model: {exc}") from exc
    structure = find_structure(model, trusted)
    untrusted, trusted_half = halves(model, structure)
    untrusted_bytes = untrusted.SerializeToString()
    trusted_bytes = trusted_half.SerializeToString()
    whole = session(model_bytes)
    if rows is None:  # random rows in the input's shape, if the seller gave none
        dims = [d if isinstance(d, int) else 1 for d in whole.get_inputs()[0].shape[1:]]
        rows = np.random.default_rng(0).normal(size=(64, int(np.prod(dims))))
    error = check_split(model_bytes, untrusted_bytes, trusted_bytes, structure.input,
                        structure.untrusted_output, rows)
    key = new_master_key()
    locked = lock(trusted_bytes, key)
    out.mkdir(parents=True, exist_ok=True)
    (out / UNTRUSTED_FILE).write_bytes(untrusted_bytes)
    (out / TRUSTED_FILE).write_bytes(locked)
    fd = os.open(out / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key.hex() + "\n")
    manifest = Manifest(
        FORMAT, structure, sha256(untrusted_bytes).hex(), sha256(locked).hex(),
        sha256(trusted_bytes).hex(), sha256(model_bytes).hex(), count_parameters(untrusted),
        count_parameters(trusted_half), key_id(key), len(rows), error)
    (out / MANIFEST).write_text(manifest.to_json())
    log.info("split %s at %s (%s): untrusted %d parameters, trusted %d; max |difference| "
             "%.2g on %d rows", structure.merge_node, structure.merge_op, out,
             manifest.untrusted_parameters, manifest.trusted_parameters, error, len(rows))
    return manifest


def check_split(whole: bytes, untrusted: bytes, trusted: bytes, input_name: str,
                untrusted_output: str, rows: FloatArray) -> float:
    """Max |halves - whole| over every float output; refuses a split that differs."""
    whole_session = session(whole)
    feed = model_feed(whole_session, rows)
    expected = whole_session.run(None, feed)
    (branch,) = session(untrusted).run([untrusted_output], {input_name: feed[input_name]})
    trusted_session = session(trusted)
    names = [o.name for o in whole_session.get_outputs()]
    got = trusted_session.run(names, {input_name: feed[input_name],
                                      untrusted_output: branch})
    error = 0.0
    for name, a, b in zip(names, expected, got, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind != "f":
            if not np.array_equal(a, b):
                raise Unsupported(f"the split halves disagree with the whole model on output "
                                  f"{name!r}")
            continue
        difference = float(np.max(np.abs(a - b))) if a.size else 0.0
        if difference > CHECK_TOLERANCE * max(1.0, float(np.abs(a).max())):
            raise Unsupported(f"the split halves give output {name!r} up to {difference:.3g} "
                              f"away from the whole model; not splitting")
        error = max(error, difference)
    return error

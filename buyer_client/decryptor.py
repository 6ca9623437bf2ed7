"""Decryption of the seller's results, run in a guarded child process (common.guarded):
the seller's bytes pass a byte template before OpenFHE opens them, and if they still
crash OpenFHE, only the child dies."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from common.guarded import Json, ProgressFn
from common.he import engine
from common.he.params import CkksParams

UNTRUSTED_STAGES = frozenset({"decrypting"})


def decrypt_results(request: Json, report: ProgressFn) -> Json:
    cc = engine.build_context(CkksParams(**request["params"]), int(request["security_bits"]))
    secret = engine.load_secret_key(base64.b64decode(request["secret_key"]))
    report({"stage": "checking results"})
    gate = engine.CiphertextGate(cc, request["key_tag"], int(request["level"]))
    blobs = [Path(p).read_bytes() for p in request["result_paths"]]
    for index, blob in enumerate(blobs):
        gate.check(blob, f"result ciphertext {index}")
    report({"stage": "decrypting"})
    rows = int(request["rows"])
    scores = [engine.decrypt_vector(cc, secret, gate.load(blob, f"result {i}"), rows)
              for i, blob in enumerate(blobs)]
    np.save(request["out_path"], np.array(scores, dtype=np.float64).T)
    return {}

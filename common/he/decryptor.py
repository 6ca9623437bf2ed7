"""Decryption of ciphertexts that came from another party, in a guarded child process
(common.guarded): the bytes pass a byte template before OpenFHE opens them, and if they
still crash OpenFHE, only the child dies. The buyer decrypts the seller's results with it;
an arbiter decrypts a bundle's inputs and results."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import numpy as np
import numpy.typing as npt

from common.guarded import Json, Limits, ProgressFn, run_guarded
from common.he import engine
from common.he.packing import Packing
from common.he.params import CkksParams

UNTRUSTED_STAGES = frozenset({"decrypting"})
LIMITS = Limits(memory_bytes=4 << 30, timeout_s=600)
FloatArray = npt.NDArray[np.float64]


def decrypt(params: CkksParams, secret_key: bytes, key_tag: str, level: int,
            paths: list[str], layout: Packing, rows: int, count: int,
            results: bool) -> FloatArray:
    """(rows, count): the values one batch's ciphertext files hold in `layout`; each file
    must have the byte layout of an honest ciphertext at `level` under `key_tag`.
    `results`: the files are the seller's folded results (engine.open_result), not
    inputs."""
    with tempfile.TemporaryDirectory(prefix="gimme-decrypt-") as tmp:
        out = Path(tmp) / "values.npy"
        run_guarded("common.he.decryptor:decrypt_job", {
            "params": params.to_dict(), "security_bits": params.claimed_security_bits,
            "secret_key": base64.b64encode(secret_key).decode(), "key_tag": key_tag,
            "level": level, "paths": paths, "layout": layout.to_dict(), "rows": rows,
            "count": count, "results": results, "out_path": str(out),
        }, limits=LIMITS, untrusted_phase=lambda p: p.get("stage") in UNTRUSTED_STAGES)
        values: FloatArray = np.load(out)
        return values


def decrypt_job(request: Json, report: ProgressFn) -> Json:
    cc = engine.build_context(CkksParams(**request["params"]), int(request["security_bits"]))
    secret = engine.load_secret_key(base64.b64decode(request["secret_key"]))
    report({"stage": "checking"})
    gate = engine.CiphertextGate(cc, request["key_tag"], int(request["level"]))
    blobs = [Path(p).read_bytes() for p in request["paths"]]
    for index, blob in enumerate(blobs):
        gate.check(blob, f"ciphertext {index}")
    report({"stage": "decrypting"})
    layout = Packing(**request["layout"])
    rows, count = int(request["rows"]), int(request["count"])
    period = layout.fold_period(rows, count)
    values = []
    for index, blob in enumerate(blobs):
        ct = gate.load(blob, f"ciphertext {index}")
        values.append(np.array(
            engine.open_result(cc, secret, ct, period, layout.slots) if request["results"]
            else engine.decrypt_vector(cc, secret, ct, layout.slots)))
    np.save(request["out_path"], layout.decode(values, rows, count))
    return {}

"""The trusted half of a bident model, run in a separate process that stands in for a TEE.

Only this process reads the trusted half's Deep-Lock key, unlocks the half in memory and
checks it against the package manifest; the buyer's process never sees its weights. Its
whole interface is two calls over its stdin/stdout, so a real TEE runner (an SGX enclave
under Gramine, an OP-TEE trusted application) can take its place by speaking the same
frames:

    frame    = u32 header length, u32 payload length (big-endian), JSON header, payload
    arrays   = little-endian, C order; a header lists them as {"name", "dtype", "shape"}

    -> (started with: PACKAGE_DIR KEY_FILE)
    <- {"ready": true, "outputs": [names]}          or {"error": "..."} and exit
    -> {"op": "submit", "id": N, "arrays": [input]} + bytes       (no answer: the trusted
                                                    branch starts on the input at once)
    -> {"op": "finish", "id": N, "arrays": [untrusted output]} + bytes
    <- {"id": N, "arrays": [model outputs]} + bytes or {"id": N, "error": "..."}
    -> {"op": "close"}

`submit` lets the trusted branch run while the untrusted half computes; `finish` merges
and runs the layers after the merge. Nothing else goes in or out: no weights, no
intermediate values, no key material.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import onnx

from common.bident import TRUSTED_FILE, Manifest, trusted_stages
from common.deeplock import unlock
from common.errors import BadInput, GimmeError
from common.onnx_io import session
from common.signing import sha256

Arrays = dict[str, npt.NDArray[Any]]
MAX_FRAME = 1 << 31


def write_frame(stream: IO[bytes], header: dict[str, Any], arrays: Arrays | None = None
                ) -> None:
    arrays = arrays or {}
    header = {**header, "arrays": [{"name": name, "dtype": str(a.dtype),
                                    "shape": list(a.shape)} for name, a in arrays.items()]}
    payload = b"".join(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
                       for a in arrays.values())
    encoded = json.dumps(header).encode()
    stream.write(struct.pack(">II", len(encoded), len(payload)) + encoded + payload)
    stream.flush()


def read_frame(stream: IO[bytes]) -> tuple[dict[str, Any], Arrays]:
    prefix = stream.read(8)
    if len(prefix) < 8:
        raise EOFError("the other side closed the channel")
    header_length, payload_length = struct.unpack(">II", prefix)
    if header_length > MAX_FRAME or payload_length > MAX_FRAME:
        raise BadInput("a trusted-runner frame declares more than 2 GiB")
    header = json.loads(stream.read(header_length))
    payload = stream.read(payload_length)
    arrays: Arrays = {}
    offset = 0
    for spec in header.get("arrays", []):
        dtype = np.dtype(spec["dtype"]).newbyteorder("<")
        count = int(np.prod(spec["shape"])) if spec["shape"] else 1
        arrays[spec["name"]] = np.frombuffer(payload, dtype, count, offset).reshape(
            spec["shape"])
        offset += count * dtype.itemsize
    return header, arrays


# ----- the trusted side -----

def serve(package: Path, key_file: Path, inbox: IO[bytes], outbox: IO[bytes]) -> None:
    try:
        manifest = Manifest.read(package)
        locked = (package / TRUSTED_FILE).read_bytes()
        if sha256(locked).hex() != manifest.trusted_locked_sha256:
            raise BadInput(f"{TRUSTED_FILE} is not the file the manifest names")
        try:
            key = bytes.fromhex(key_file.read_text().strip())
        except (OSError, ValueError) as exc:
            raise BadInput(f"cannot read the trusted half's key from {key_file}: {exc}") from exc
        model = unlock(locked, key)
        if sha256(model).hex() != manifest.trusted_sha256:
            raise BadInput(f"the key in {key_file} does not open the trusted half (wrong key)")
        structure = manifest.structure
        branch_model, finish_model = trusted_stages(onnx.load_model_from_string(model),
                                                    structure)
        branch = session(branch_model.SerializeToString())
        finish = session(finish_model.SerializeToString())
    except GimmeError as exc:
        write_frame(outbox, {"error": exc.message})
        return
    write_frame(outbox, {"ready": True, "outputs": list(structure.outputs)})
    pending: dict[int, Future[list[Any]]] = {}
    with ThreadPoolExecutor(1) as pool:
        while True:
            try:
                header, arrays = read_frame(inbox)
            except EOFError:
                return
            op, request = header.get("op"), int(header.get("id", -1))
            try:
                if op == "close":
                    return
                if op == "submit":
                    pending[request] = pool.submit(
                        branch.run, [structure.trusted_output],
                        {structure.input: arrays[structure.input]})
                elif op == "finish":
                    if request not in pending:
                        raise BadInput(f"finish of {request} without a submit")
                    (trusted_branch,) = pending.pop(request).result()
                    outputs = finish.run(list(structure.outputs), {
                        structure.trusted_output: trusted_branch,
                        structure.untrusted_output: arrays[structure.untrusted_output]})
                    write_frame(outbox, {"id": request}, dict(zip(
                        structure.outputs, (np.asarray(o) for o in outputs), strict=True)))
                else:
                    raise BadInput(f"unknown operation {op!r}")
            except (GimmeError, KeyError, ValueError) as exc:
                message = exc.message if isinstance(exc, GimmeError) else repr(exc)
                write_frame(outbox, {"id": request, "error": message})
            except Exception as exc:  # onnxruntime's own errors
                write_frame(outbox, {"id": request, "error": str(exc)})


def main() -> None:
    package, key_file = (Path(a) for a in sys.argv[1:3])
    serve(package, key_file, sys.stdin.buffer, sys.stdout.buffer)


# ----- the buyer's side -----

class TrustedHalf:
    """A running trusted half: `submit` the input, run the untrusted half, `finish`."""

    def __init__(self, package: Path, key_file: Path) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "buyer_client.trusted", str(package), str(key_file)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                 "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        assert self.process.stdin is not None and self.process.stdout is not None
        self.inbox, self.outbox = self.process.stdin, self.process.stdout
        try:
            header, _ = read_frame(self.outbox)
        except EOFError:
            self.close()
            raise BadInput(f"the trusted runner did not start: {self._stderr()}") from None
        if "error" in header:
            self.close()
            raise BadInput(f"the trusted runner refused to start: {header['error']}")
        self.outputs: list[str] = header["outputs"]

    def submit(self, request: int, name: str, rows: npt.NDArray[Any]) -> None:
        write_frame(self.inbox, {"op": "submit", "id": request}, {name: rows})

    def finish(self, request: int, name: str, branch: npt.NDArray[Any]) -> Arrays:
        write_frame(self.inbox, {"op": "finish", "id": request}, {name: branch})
        try:
            header, arrays = read_frame(self.outbox)
        except EOFError:
            raise BadInput(f"the trusted runner stopped: {self._stderr()}") from None
        if "error" in header:
            raise BadInput(f"the trusted half failed: {header['error']}")
        return arrays

    def _stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace").strip()[-2000:] or "no message"

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                write_frame(self.inbox, {"op": "close"})
                self.inbox.close()
            except (BrokenPipeError, ValueError):
                pass
            self.process.wait(timeout=30)
        self.log.close()

    def __enter__(self) -> TrustedHalf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    main()

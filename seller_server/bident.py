"""`gimme-seller bident train|split`.

train: PyTorch is an optional extra, so training runs seller_server.bident_train in a
Python that has torch (this one, $GIMME_TORCH_PYTHON, or the project's .venv-torch made by
`scripts/setup.sh --torch`); its options are defined here, for both sides.

split: a trained bident model -> a package of two halves (common.bident). The split is
checked before anything is written: the untrusted half, then the trusted half on the input
and the untrusted half's output, must reproduce the whole model's outputs on the given
rows (or random ones). The trusted half is Deep-Locked under a fresh key.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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
ROOT = Path(__file__).resolve().parent.parent
MERGE_CHOICES = ("concat", "mul", "max", "avg")
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


# ----- training, in a Python with torch -----

def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="training rows: .npz with X, y")
    p.add_argument("--test", type=Path, required=True, help="test rows: .npz with X, y")
    p.add_argument("--shape", default="1,8,8", help="per-row input shape, C,H,W (cnn) or F")
    p.add_argument("--scale", type=float, default=16.0, help="inputs are divided by this")
    p.add_argument("--base", choices=("cnn", "mlp"), default="cnn", help="base architecture")
    p.add_argument("--merge", choices=(*MERGE_CHOICES, "none"), default="concat",
                   help="merge layer (none: the base model itself)")
    p.add_argument("--asymmetric", action="store_true",
                   help="a smaller trusted branch (less work in the trusted environment)")
    p.add_argument("--activation", choices=("relu", "square"), default="relu",
                   help="square: exact under HE, for models buyers try encrypted")
    p.add_argument("--channels", type=int, default=8, help="maps of the first convolution")
    p.add_argument("--hidden", type=int, default=64, help="width of each branch's output")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True,
                   help="directory: model.onnx, model.pt, history.json")


def attack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="a 'train' output directory")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--test", type=Path, required=True)
    p.add_argument("--fraction", type=float, default=0.1, help="share of --data the attacker has")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)


def torch_python() -> str:
    """A Python interpreter that can import torch."""
    if os.environ.get("GIMME_TORCH_PYTHON"):
        return os.environ["GIMME_TORCH_PYTHON"]
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    candidate = ROOT / ".venv-torch" / "bin" / "python"
    if candidate.exists():
        return str(candidate)
    raise BadInput("training bident models needs PyTorch, an optional extra: run "
                   "'scripts/setup.sh --torch' (a .venv-torch with the CPU build of "
                   "torch 2.13), or set GIMME_TORCH_PYTHON to a Python that has torch")


def run_torch(step: str, arguments: list[str]) -> dict[str, Any]:
    """`python -m seller_server.bident_train STEP ...` in the torch Python; its JSON result."""
    python = torch_python()
    log.info("%s with PyTorch in %s", step, python)
    done = subprocess.run(
        [python, "-m", "seller_server.bident_train", step, *arguments], capture_output=True,
        text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"})
    if done.returncode != 0:
        raise BadInput(f"bident {step} failed: {done.stderr.strip()[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def forwarded(args: argparse.Namespace, parser_setup: Any) -> list[str]:
    """The parsed options of `parser_setup` as command-line arguments again."""
    probe = argparse.ArgumentParser()
    parser_setup(probe)
    out: list[str] = []
    for action in probe._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest)
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            out += [flag] if value else []
        elif value is not None:
            out += [flag, str(value)]
    return out

"""Finding 5: a reseller hides its copy by moving hidden units (seller_server.fingerprint).

A real daemon offers alice her copy of the digits MLP (64-32-10, tanh): OpenTrial draws
its fingerprint key, stores it and commits to the copy in the signed offer. The copy is
rebuilt from that key (what Deliver sends; its digest is the offer's commitment), then
attacked the way a reseller would: hidden units permuted with the next layer's rows,
half of them negated (tanh is odd, so incoming weights, bias and outgoing row flip
together), dummy units added, every tensor renamed. The outputs stay the same;
`gimme-seller trace` must still name her sale, and must not name anyone for an
independently trained model of the same architecture.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from skl2onnx import to_onnx
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler

from buyer_client.client import SellerClient
from common.he.packing import SLOT_PER_SAMPLE
from common.onnx_io import MAX_IR_VERSION, run_model
from common.signing import sha256
from common.wire import offer_from_payload
from examples.datasets import digits
from seller_server.cli import TRACE_Z
from seller_server.fingerprint import fingerprint
from seller_server.store import Store
from tests.conftest import BIN, Daemon

MLP = "digits-mlp"


@dataclass(frozen=True)
class Sale:
    catalog: Path
    state: Path
    trial_id: str
    copy: bytes  # what alice bought


@pytest.fixture(scope="module")
def sale(examples: Path, tls_dir: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Sale]:
    root = tmp_path_factory.mktemp("fingerprint-evasion")
    catalog = root / "catalog"
    catalog.mkdir()
    for path in (examples / "catalog").glob("digits_mlp*"):
        shutil.copy(path, catalog)
    listing = json.loads((catalog / "digits_mlp.json").read_text())
    # slot-per-sample only: the daemon loads faster and the copy is the same
    (catalog / "digits_mlp.json").write_text(json.dumps({**listing, "feature_packing": False}))
    daemon = Daemon(catalog, root / "state", tls_dir)
    try:
        daemon.wait_serving()
        client = SellerClient(daemon.address, daemon.tls("alice"))
        try:
            offer = offer_from_payload(client.open_trial(MLP, SLOT_PER_SAMPLE).payload)
        finally:
            client.close()
    finally:
        daemon.stop()
    mark = Store(daemon.state / "gimme.sqlite").fingerprint(offer.trial_id)
    assert mark is not None
    copy = fingerprint((catalog / "digits_mlp.onnx").read_bytes(), *mark)
    assert offer.model_commitment == sha256(copy)  # the very model alice is offered
    yield Sale(catalog, daemon.state, offer.trial_id, copy)


def _move_units(model_bytes: bytes, dummies: int, rename: bool = False) -> bytes:
    """The reseller's copy: same function, hidden units shuffled, half negated, padded,
    and (`rename`) every tensor and node under a new name."""
    model = onnx.load_model_from_string(model_bytes)
    inits = {i.name: i for i in model.graph.initializer}
    w1, b1, w2 = (numpy_helper.to_array(inits[n])
                  for n in ("coefficient", "intercepts", "coefficient1"))
    rng = np.random.default_rng(5)
    order = rng.permutation(w1.shape[1])
    signs = np.where(np.arange(w1.shape[1]) % 2 == 0, -1.0, 1.0)
    w1, b1, w2 = w1[:, order] * signs, b1[:, order] * signs, w2[order] * signs[:, None]
    w1 = np.concatenate([w1, rng.normal(0, w1.std(), (w1.shape[0], dummies))], axis=1)
    b1 = np.concatenate([b1, rng.normal(0, b1.std(), (1, dummies))], axis=1)
    w2 = np.concatenate([w2, np.zeros((dummies, w2.shape[1]))])
    for name, value in (("coefficient", w1), ("intercepts", b1), ("coefficient1", w2)):
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    if rename:
        names = {init.name: f"w{index}" for index, init in enumerate(model.graph.initializer)}
        for init in model.graph.initializer:
            init.name = names[init.name]
        for index, node in enumerate(model.graph.node):
            node.input[:] = [names.get(name, name) for name in node.input]
            node.name = f"n{index}"
    return model.SerializeToString()


def _trace(sale: Sale, suspect: bytes, tmp_path: Path) -> tuple[int, str]:
    leaked = tmp_path / "leaked.onnx"
    leaked.write_bytes(suspect)
    result = subprocess.run([str(BIN / "gimme-seller"), "trace", str(leaked), "--catalog",
                             str(sale.catalog), "--state", str(sale.state)],
                            capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"}, timeout=300)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize(("dummies", "rename"), [(0, False), (8, False), (8, True)],
                         ids=["permuted+flipped", "with-8-dummy-units", "padded+renamed"])
def test_a_copy_with_moved_hidden_units_is_traced_to_its_sale(
        sale: Sale, examples: Path, tmp_path: Path, dummies: int, rename: bool) -> None:
    leaked = _move_units(sale.copy, dummies, rename)
    rows = np.load(examples / "data" / "digits_mlp_test.npz")["X"]
    assert np.abs(run_model(leaked, rows, "probabilities", [])
                  - run_model(sale.copy, rows, "probabilities", [])).max() < 1e-5
    code, out = _trace(sale, leaked, tmp_path)
    assert code == 0, out
    found = re.search(rf"is the copy of trial {sale.trial_id}, sold to alice.*?z = ([\d.]+)",
                      out.replace("\n", " "))
    assert found, out
    assert float(found.group(1)) >= 4 * TRACE_Z  # ~50 (sqrt of 2538 weights) unmoved


def test_an_independently_trained_model_is_traced_to_nobody(sale: Sale,
                                                            tmp_path: Path) -> None:
    x_train, _x_test, y_train, _y_test = digits(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipeline = make_pipeline(MinMaxScaler(), MLPClassifier(
            (32,), activation="tanh", alpha=0.1, max_iter=1500, random_state=1)
        ).fit(x_train, y_train)
    model = to_onnx(pipeline, x_train[:1].astype(np.float32),
                    options={id(pipeline.steps[-1][1]): {"zipmap": False}},
                    target_opset={"": 17, "ai.onnx.ml": 3})
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    code, out = _trace(sale, _move_units(model.SerializeToString(), 0), tmp_path)
    assert code == 1, out
    assert f"no sale of {MLP} matches" in out and "is the copy of" not in out

"""Shared fixtures: the example catalog, certificates, and real seller daemons on loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

# as in the evaluator workers: one OpenMP thread (sharded evaluation forks; see engine)
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from common.certs import create_certificates
from common.rpc import CATALOG_SERVICE, SERVICE_NAME, TlsFiles, check_health
from seller_server.store import Store

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BUYERS = ["alice", "bob", "carol", "dave", "erin", "frank", "mallory"]


@pytest.fixture(scope="session")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("examples")
    subprocess.run([sys.executable, str(ROOT / "examples" / "build.py"), "--out", str(out)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def lr_catalog(examples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A catalog with only the (fast, exact) breast-cancer model."""
    catalog = tmp_path_factory.mktemp("lr-catalog")
    for path in (examples / "catalog").glob("breast_cancer_lr*"):
        shutil.copy(path, catalog)
    return catalog


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    create_certificates(directory, ["localhost", "127.0.0.1"], BUYERS)
    return directory


# Compiled listings the daemons of this session made, under the seller's own cache keys
# (engine version, model, listing file, calibration rows, security): a new daemon starts
# with them, as a restarted seller does, instead of compiling and self-testing the same
# listing again. `warm=False` starts a daemon that compiles everything itself.
_COMPILED: dict[str, bytes] = {}


def seed_compiled(state: Path) -> None:
    """A new seller state directory holding the listings compiled so far (see above)."""
    if _COMPILED and not (state / "gimme.sqlite").exists():
        state.mkdir(parents=True, exist_ok=True)
        store = Store(state / "gimme.sqlite")
        for key, payload in _COMPILED.items():
            store.save_compiled(key, payload)
        store.close()


class Daemon:
    """`gimme-seller serve` in its own process, exactly as a user runs it."""

    def __init__(self, catalog: Path, state: Path, tls_dir: Path | None,
                 extra: list[str] | None = None, *, warm: bool = True) -> None:
        self.catalog = catalog
        self.state = state
        if warm:
            seed_compiled(state)
        self.tls_dir = tls_dir
        self.log_path = state.parent / f"{state.name}.log"
        port_file = state.parent / f"{state.name}.port"
        port_file.unlink(missing_ok=True)
        args = [str(BIN / "gimme-seller"), "serve", "--catalog", str(catalog), "--state",
                str(state), "--listen", "127.0.0.1:0", "--port-file", str(port_file),
                *(["--tls-dir", str(tls_dir)] if tls_dir else ["--insecure"]), *(extra or [])]
        self.log = self.log_path.open("ab")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not port_file.exists() or not port_file.read_text():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError("seller did not bind a port")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{port_file.read_text()}"
        self.statuses: list[str] = []
        self._tokens: dict[str, str] = {}

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"seller exited ({self.process.returncode}):\n"
                               + self.log_path.read_text())

    def tls(self, identity: str = "seller") -> TlsFiles | None:
        return TlsFiles.in_dir(self.tls_dir, identity) if self.tls_dir else None

    def wait_serving(self, timeout: float = 300, whole_catalog: bool = True) -> None:
        """Until health says SERVING: once every listing is listed or refused, or (not
        `whole_catalog`) once the first listing is ready."""
        deadline = time.monotonic() + timeout
        service = CATALOG_SERVICE if whole_catalog else SERVICE_NAME
        while True:
            self._check_alive()
            try:
                status = check_health(self.address, self.tls(), timeout=2, service=service)
            except Exception:
                status = "UNREACHABLE"
            if not self.statuses or self.statuses[-1] != status:
                self.statuses.append(status)
            if status == "SERVING":
                self._keep_compiled()
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"seller not SERVING: {self.log_path.read_text()}")
            time.sleep(0.05)

    def _keep_compiled(self) -> None:
        with contextlib.closing(sqlite3.connect(self.state / "gimme.sqlite")) as db:
            _COMPILED.update(db.execute("SELECT cache_key, payload FROM compiled"))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def logs(self) -> str:
        return self.log_path.read_text()

    def token(self, buyer: str) -> str:
        if buyer not in self._tokens:
            self._tokens[buyer] = subprocess.run(
                [str(BIN / "gimme-seller"), "token", "create", buyer, "--state", str(self.state)],
                check=True, capture_output=True, text=True).stdout.strip()
        return self._tokens[buyer]


@pytest.fixture(scope="session")
def lr_seller(lr_catalog: Path, tls_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Daemon]:
    """One long-lived TLS seller of the breast-cancer model; tests use distinct buyers.
    Every buyer but mallory gets 100.00 of prepaid balance."""
    daemon = Daemon(lr_catalog, tmp_path_factory.mktemp("lr-seller") / "state", tls_dir)
    daemon.wait_serving()
    for buyer in BUYERS[:-1]:
        top_up(daemon, buyer, "100")
    yield daemon
    daemon.stop()


def top_up(daemon: Daemon, buyer: str, amount: str) -> None:
    subprocess.run([str(BIN / "gimme-seller"), "topup", buyer, amount, "--state",
                    str(daemon.state)], check=True, capture_output=True)


def buyer_command(seller: Daemon | tuple[str, Path], home: Path, identity: str, *args: str
                  ) -> list[str]:
    """The `gimme-buyer` command line a user would type, against a daemon or an
    (address, TLS dir)."""
    address, tls_dir = ((seller.address, seller.tls_dir) if isinstance(seller, Daemon)
                        else seller)
    base = [str(BIN / "gimme-buyer"), args[0], "--seller", address, "--home", str(home),
            "--identity", identity]
    if tls_dir:
        base += ["--tls-dir", str(tls_dir)]
    else:  # without TLS the seller knows buyers by API token
        assert isinstance(seller, Daemon)
        base += ["--insecure", "--token", seller.token(identity)]
    return [*base, *args[1:]]


def buyer_cli(seller: Daemon | tuple[str, Path], home: Path, identity: str, *args: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `gimme-buyer` as a user would, against a daemon or an (address, TLS dir)."""
    return subprocess.run(buyer_command(seller, home, identity, *args), capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200", **(env or {})},
                          timeout=600)


def perturbed_model(lr_catalog: Path) -> bytes:
    """The example model with every coefficient 10% larger: close, but not what was sold."""
    model = onnx.load_model_from_string((lr_catalog / "breast_cancer_lr.onnx").read_bytes())
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.name == "coefficients":
                attribute.floats[:] = [v * 1.1 for v in attribute.floats]
    return model.SerializeToString()

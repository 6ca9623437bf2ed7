"""docker-compose.yml cannot rot: run each service's own command on loopback, in
dependency order, with the container paths mapped onto a temporary directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from common.certs import create_certificates
from tests.conftest import seed_compiled

ROOT = Path(__file__).resolve().parent.parent


def test_compose_services_trade_on_loopback(examples: Path, tmp_path: Path) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"seller", "ledger", "buyer"}
    secrets = tmp_path / "secrets"
    create_certificates(secrets, ["localhost", "127.0.0.1", "seller"], ["buyer"])
    assert {f"{name}" for name in compose["secrets"]} <= {p.name for p in secrets.iterdir()}
    port_file = tmp_path / "port"

    def local(argv: list[str], port: int | None = None) -> list[str]:
        mapping = {"/app/demo": str(examples), "/data": str(tmp_path / "data"),
                   "/run/secrets": str(secrets), "0.0.0.0:50051": "127.0.0.1:0"}
        if port is not None:
            mapping |= {"localhost:50051": f"localhost:{port}",
                        "seller:50051": f"localhost:{port}"}
        out = []
        for arg in argv:
            prefixes = [c for c in mapping if arg.startswith(c)]
            longest = max(prefixes, key=len, default=None)
            out.append(mapping[longest] + arg[len(longest):] if longest else arg)
        return out

    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path}
    seller_cmd = [*local(services["seller"]["command"]), "--port-file", str(port_file)]
    seed_compiled(Path(seller_cmd[seller_cmd.index("--state") + 1]))
    seller = subprocess.Popen(seller_cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not port_file.exists() or not port_file.read_text():
            assert seller.poll() is None, seller.stdout.read() if seller.stdout else ""
            assert time.monotonic() < deadline
            time.sleep(0.1)
        port = int(port_file.read_text())
        health = local(services["seller"]["healthcheck"]["test"][1:], port)
        while subprocess.run(health, cwd=ROOT, env=env, capture_output=True).returncode != 0:
            assert seller.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        ledger = subprocess.run(local(services["ledger"]["command"], port), cwd=ROOT, env=env,
                                capture_output=True, text=True)
        assert ledger.returncode == 0, ledger.stdout + ledger.stderr
        buyer_env = {**env, **{k: local([v], port)[0]
                               for k, v in services["buyer"]["environment"].items()}}
        buyer = subprocess.run(local(services["buyer"]["command"], port), cwd=ROOT,
                               env=buyer_env, capture_output=True, text=True, timeout=600)
        assert buyer.returncode == 0, buyer.stdout + buyer.stderr
        assert [line.split()[0] for line in buyer.stdout.splitlines()
                if line.startswith(("PASS", "FAIL"))] == ["PASS", "PASS"]
        assert "every model tested, bought, verified (PASS) and run" in buyer.stdout
    finally:
        seller.send_signal(signal.SIGTERM)
        seller.wait(timeout=30)
    assert seller.returncode == 0

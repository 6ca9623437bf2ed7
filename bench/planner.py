"""The packing planner against real trials: for each model and test-set size, every offered
packing is run through a real seller daemon (TLS, 128-bit CKKS) and the planner's estimate
is printed beside what the trial measured, with the planner's choice and the packing that
was actually faster.

    python bench/planner.py [--models M1,M2] [--rows 10,100,all] [--link-mbps 100]

Builds the example catalog (with the PyTorch-exported CNNs) in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from buyer_client.client import SellerClient  # noqa: E402
from buyer_client.planner import choose  # noqa: E402
from common.rpc import TlsFiles  # noqa: E402
from common.tabular import load_table  # noqa: E402
from examples.build import build  # noqa: E402

BIN = Path(sys.executable).parent
MODELS = "breast-cancer-lr,digits-mlp,digits-square-mlp,digits-cnn,cryptonets"
BUDGET_ROWS = 100_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--rows", default="10,100,all",
                        help="test-set sizes ('all': the whole held-out set)")
    parser.add_argument("--link-mbps", type=float, default=100.0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    models = args.models.split(",")
    console = Console()
    with tempfile.TemporaryDirectory(prefix="gimme-bench-planner-") as tmp:
        run = Path(tmp)
        build(run, cnn=True)
        for spec_file in (run / "catalog").glob("*.json"):
            spec = json.loads(spec_file.read_text())
            if spec["name"] not in models:
                spec_file.unlink()
            else:  # every size in both packings, feature-packed ones charged whole folds
                spec_file.write_text(json.dumps({**spec, "trial_budget_rows": BUDGET_ROWS}))
        subprocess.run([str(BIN / "gimme-seller"), "certs", "--out", str(run / "tls")],
                       check=True, capture_output=True)
        seller = subprocess.Popen(
            [str(BIN / "gimme-seller"), "serve", "--catalog", str(run / "catalog"),
             "--state", str(run / "seller"), "--tls-dir", str(run / "tls"),
             "--listen", "127.0.0.1:0", "--port-file", str(run / "port")],
            stdout=(run / "seller.log").open("w"), stderr=subprocess.STDOUT)
        try:
            address = _wait_serving(run, seller, console)
            subprocess.run([str(BIN / "gimme-seller"), "topup", "buyer", "10000", "--state",
                            str(run / "seller")], check=True, capture_output=True)
            client = SellerClient(address, TlsFiles.in_dir(run / "tls", "buyer"))
            listings = _loaded(client, models, run, console)
            client.close()
            results = []
            for model in models:
                listing = listings[model]
                data = run / "data" / f"{model.replace('-', '_')}_test.csv"
                available = len(load_table(data, listing.input_columns, "y").rows)
                for size in args.rows.split(","):
                    rows = available if size == "all" else min(int(size), available)
                    costs = choose(listing.estimates, rows, len(listing.input_columns),
                                   max(len(listing.class_labels), 1), args.link_mbps)
                    measured = {c.packing: _trial(run, address, model, data, rows, c.packing,
                                                  args.link_mbps, console) for c in costs}
                    results.append({"model": model, "rows": rows,
                                    "chosen": costs[0].packing, "packings": measured})
        finally:
            seller.terminate()
            seller.wait(timeout=60)
    _show(console, results, args.link_mbps)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _wait_serving(run: Path, seller: subprocess.Popen[bytes], console: Console) -> str:
    with console.status("seller daemon: compiling and self-testing the models"):
        for _ in range(3600):
            if seller.poll() is not None:
                raise SystemExit((run / "seller.log").read_text())
            port = (run / "port").read_text().strip() if (run / "port").exists() else ""
            if port and subprocess.run(
                    [str(BIN / "gimme-seller"), "health", "--address", f"127.0.0.1:{port}",
                     "--tls-dir", str(run / "tls")], capture_output=True).returncode == 0:
                return f"127.0.0.1:{port}"
            time.sleep(0.5)
    raise SystemExit("the seller daemon did not start serving within 30 minutes")


def _loaded(client: SellerClient, models: list[str], run: Path, console: Console
            ) -> dict[str, Any]:
    """The listings once the catalog has loaded (it is served while it still compiles)."""
    with console.status("seller daemon: compiling and self-testing the models"):
        for _ in range(3600):
            found, _key, loading = client.catalog()
            if not loading:
                listings = {m.model_id: m for m in found}
                missing = [m for m in models if m not in listings]
                if missing:
                    raise SystemExit(f"not listed: {missing}\n{(run / 'seller.log').read_text()}")
                return listings
            time.sleep(0.5)
    raise SystemExit("the catalog did not finish loading within 30 minutes")


def _trial(run: Path, address: str, model: str, data: Path, rows: int, packing: str,
           link_mbps: float, console: Console) -> dict[str, Any]:
    home = run / "buyer"
    before = set(home.glob(f"trials/{model}/*/report.json"))
    with console.status(f"{model}: {rows} rows, {packing}"):
        done = subprocess.run(
            [str(BIN / "gimme-buyer"), "trial", model, "--seller", address, "--tls-dir",
             str(run / "tls"), "--home", str(home), "--identity", "buyer", "--data", str(data),
             "--label-column", "y", "--rows", str(rows), "--packing", packing,
             "--link-mbps", str(link_mbps)],
            capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if done.returncode:
        raise SystemExit(done.stdout + done.stderr)
    [report] = set(home.glob(f"trials/{model}/*/report.json")) - before
    measured = json.loads(report.read_text())["measurements"]
    measured["accuracy"] = json.loads(report.read_text())["metrics"]["accuracy"]
    return dict(measured)


def _show(console: Console, results: list[dict[str, Any]], link_mbps: float) -> None:
    """Trials run on loopback; the link's transfer time is added to both the estimate and
    the measurement (measured bytes) so they compare like for like."""
    def link_s(upload: float, download: float) -> float:
        return (upload + download) * 8 / (link_mbps * 1e6)

    table = Table("model", "rows", "packing", "upload MB\nest / meas.",
                  "seller s\nest / meas.", f"trial s at {link_mbps:g} Mbit/s\nest / meas.",
                  "accuracy", title="planner: estimates beside measured trials")
    for result in results:
        totals = {p: m["total_s"] + link_s(m["upload_bytes"], m["download_bytes"])
                  for p, m in result["packings"].items()}
        for packing, m in result["packings"].items():
            e = m["estimated"]
            estimated = (e["seller_compute_s"] + e["encrypt_s"]
                         + link_s(e["upload_bytes"], e["download_bytes"]))
            marks = ("planner's choice" if packing == result["chosen"] else "",
                     "fastest" if totals[packing] == min(totals.values()) else "")
            table.add_row(result["model"], str(result["rows"]),
                          packing + "".join(f"\n({mark})" for mark in marks if mark),
                          f"{e['upload_bytes'] / 1e6:.1f} / {m['upload_bytes'] / 1e6:.1f}",
                          f"{e['seller_compute_s']:.2f} / {m['evaluate_s']:.2f}",
                          f"{estimated:.2f} / {totals[packing]:.2f}", f"{m['accuracy']:.2%}")
    console.print(table)


if __name__ == "__main__":
    main()

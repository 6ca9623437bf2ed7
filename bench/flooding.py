"""What circuit privacy's flooding costs in precision, as listing measures it.

    python bench/flooding.py [--bits 2,4,8] [--workers 1]

Builds the example catalog (examples/build.py) in a temporary directory and compiles and
self-tests its two listings (breast-cancer-lr, digits-mlp) the way `serve` does
(catalog.compile_and_test: the real 128-bit CKKS parameters, the encrypted self-tests),
once with circuit privacy off and once per `--bits` value of `flooding_bits`. For each it
prints the CKKS error the self-test measured (on the plan's scores, before the tail), the
flooding noise's standard deviation (2^bits times that error), and the offer's tolerance
and plan tolerance. The run without flooding is the baseline: the ratio column is the
tolerance over the baseline's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path[:0] = [str(Path(__file__).resolve().parent.parent),
                str(Path(__file__).resolve().parent.parent / "protos")]
from common.guarded import Limits  # noqa: E402
from common.tabular import load_table  # noqa: E402
from examples.build import build  # noqa: E402
from seller_server import catalog, jobs  # noqa: E402

LISTINGS = ("breast_cancer_lr", "digits_mlp")


def measure(listing: Path, circuit_privacy: bool, bits: int, workers: int
            ) -> jobs.CompiledListing:
    spec = dataclasses.replace(catalog.read_listing(listing), circuit_privacy=circuit_privacy,
                               flooding_bits=bits)
    files = catalog.ListingFiles.read(spec)
    rows = load_table(spec.calibration_path, spec.input_columns).rows
    job = jobs.CompileListing(str(listing), files.cache_key(128, 0), 128, 0, Limits(),
                              workers)
    return catalog.compile_and_test(spec, files.model, rows, job, lambda _stage: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="2,4,8",
                        help="flooding_bits values to measure (default: 2,4,8)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes one self-test evaluation is split over (default: 1)")
    args = parser.parse_args()
    console = Console()
    table = Table("model", "circuit privacy", "CKKS error", "flooding std", "tolerance",
                  "plan tolerance", "tolerance / without",
                  title="flooding's precision cost (catalog.compile_and_test, 128-bit)")
    with tempfile.TemporaryDirectory(prefix="gimme-flooding-") as tmp:
        build(Path(tmp))
        for name in LISTINGS:
            listing = Path(tmp) / "catalog" / f"{name}.json"
            baseline = measure(listing, False, 0, args.workers)
            runs = [("off", baseline)] + [
                (f"b = {b}", measure(listing, True, int(b), args.workers))
                for b in args.bits.split(",")]
            for label, record in runs:
                m = record.measured
                table.add_row(name.replace("_", "-"), label, f"{m.computation_error:.2g}",
                              f"{m.flooding_std:.2g}" if m.flooding_std else "-",
                              f"{record.tolerance:.2g}", f"{record.plan_tolerance:.2g}",
                              f"{record.tolerance / baseline.tolerance:.1f}")
                console.log(f"{name} {label}: done")
    console.print(table)


if __name__ == "__main__":
    main()

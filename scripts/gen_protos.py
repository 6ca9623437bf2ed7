"""Regenerate the checked-in Python code for protos/gimme/v1/*.proto.

Usage: python scripts/gen_protos.py [--out DIR]
Writes *_pb2.py, *_pb2.pyi, *_pb2_grpc.py and *_pb2_grpc.pyi next to the .proto files
(or under DIR, which the staleness test uses to compare against what is checked in).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate(out: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.glob("gimme/v1/*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    out.mkdir(parents=True, exist_ok=True)
    # the mypy plugins are console scripts installed next to this interpreter
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    return sorted((out / "gimme" / "v1").glob("*_pb2*.py*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT)
    written = generate(parser.parse_args().out)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

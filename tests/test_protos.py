"""The checked-in generated code must be what the .proto files generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True)
    generated = sorted((tmp_path / "gimme" / "v1").glob("*_pb2*.py*"))
    assert [p.name for p in generated] == [
        "escrow_pb2.py", "escrow_pb2.pyi", "escrow_pb2_grpc.py", "escrow_pb2_grpc.pyi",
        "gimme_pb2.py", "gimme_pb2.pyi", "gimme_pb2_grpc.py", "gimme_pb2_grpc.pyi"]
    for fresh in generated:
        checked_in = ROOT / "protos" / "gimme" / "v1" / fresh.name
        assert checked_in.read_text() == fresh.read_text(), (
            f"{checked_in} is stale: run 'python scripts/gen_protos.py' and commit the result")

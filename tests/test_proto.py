"""The committed gRPC stubs are exactly what `make proto` generates from the .proto files."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = Path("hilm_vllm/proto/hilm/v1")


def test_generated_stubs_are_up_to_date(tmp_path):
    shutil.copytree(ROOT / PROTO_DIR, tmp_path / PROTO_DIR,
                    ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    protos = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / PROTO_DIR).glob("*.proto"))
    assert protos
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.",
                    "--pyi_out=.", "--grpc_python_out=.", *protos], cwd=tmp_path, check=True)
    generated = sorted((tmp_path / PROTO_DIR).glob("*_pb2*.py*"))
    assert len(generated) == 3 * len(protos)
    for path in generated:
        committed = ROOT / PROTO_DIR / path.name
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `make proto`"


def test_services_are_in_the_versioned_package():
    from hilm_vllm.proto.hilm.v1 import drafter_pb2, generate_pb2, verifier_pb2

    names = {s.full_name for m in (drafter_pb2, generate_pb2, verifier_pb2)
             for s in m.DESCRIPTOR.services_by_name.values()}
    assert names == {"hilm.v1.Drafter", "hilm.v1.Generator", "hilm.v1.Verifier"}

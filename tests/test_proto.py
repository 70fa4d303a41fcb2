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


def test_codec_eos_ids_follow_vllm_tokenizer_then_generation_config():
    from types import SimpleNamespace

    from hilm_vllm.codec import eos_token_ids

    cfg = SimpleNamespace(try_get_generation_config=lambda: {"eos_token_id": [7, 2, 9]},
                          hf_text_config=SimpleNamespace(eos_token_id=5))
    assert eos_token_ids(cfg, SimpleNamespace(eos_token_id=2)) == (2, 7, 9)
    assert eos_token_ids(cfg, None) == (7, 2, 9, 5)  # no tokenizer: the model config's too
    bare = SimpleNamespace(try_get_generation_config=dict,
                           hf_text_config=SimpleNamespace(eos_token_id=None))
    assert eos_token_ids(bare, SimpleNamespace(eos_token_id=None)) == ()


def test_codec_sampling_follows_vllm_conventions():
    import pytest

    from hilm_vllm import codec
    from hilm_vllm.errors import InvalidArgument
    from hilm_vllm.proto.hilm.v1 import common_pb2

    assert codec.sampling(1.0, -1, 0.9).top_k == 0  # -1 = off, as in vLLM
    assert codec.sampling_from_pb(common_pb2.SamplingParams(temperature=0.5, top_k=-1)) == \
        codec.sampling(0.5, 0, 1.0)  # top_p unset (0) = off
    for bad in (common_pb2.SamplingParams(top_p=-0.5), common_pb2.SamplingParams(top_k=-2),
                common_pb2.SamplingParams(temperature=-1)):
        with pytest.raises(InvalidArgument):
            codec.sampling_from_pb(bad)
    spec = codec.sampling(0.75, 5, 0.5, 3)  # proto floats are float32
    assert codec.sampling_from_pb(codec.sampling_to_pb(spec)) == spec
    assert codec.sampling_from_dict(codec.sampling_to_dict(spec)) == spec

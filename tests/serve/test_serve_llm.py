"""`hilm-serve --tier llm`: a real subprocess, a real gRPC channel, a real /metrics endpoint."""

from __future__ import annotations

import urllib.request

import psutil
import pytest
from grpc_health.v1 import health_pb2

from hilm_vllm.launch import TierProcess

ENGINE_FLAGS = ["--dtype", "float32", "--block-size", "32", "--kv-cache-memory-bytes", "64M",
                "--enforce-eager", "--max-model-len", "1024", "--port", "0", "--metrics-port", "0"]


@pytest.fixture
def llm_tier(tiny_zoo):
    proc = TierProcess.start("llm", ["--model", str(tiny_zoo.llm), *ENGINE_FLAGS])
    yield proc
    proc.stop()


def test_health_turns_serving_metrics_answer_and_sigterm_leaves_no_child(llm_tier):
    llm_tier.wait_listening()
    # Bound before the engine starts: it must not claim to serve yet.
    assert llm_tier.health() == health_pb2.HealthCheckResponse.NOT_SERVING
    llm_tier.wait_healthy()

    body = urllib.request.urlopen(llm_tier.metrics_url, timeout=10).read().decode()
    assert "hilm_engine_ready 1.0" in body
    assert 'hilm_tier_info{model="' in body and 'tier="llm"' in body
    assert "vllm:" in body  # the engine's own metrics share the endpoint

    children = llm_tier.descendants()
    assert children, "the engine core should run in a child process"
    assert llm_tier.stop() == 0, llm_tier.tail()
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"orphaned engine processes: {alive}"


def test_router_tier_names_its_missing_flags():
    proc = TierProcess.start("router", ["--port", "0"])
    assert proc.proc.wait(120) == 2
    assert "--model" in proc.tail() and "--llm" in proc.tail()


def test_unknown_zoo_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HILM_ZOO_DIR", str(tmp_path))
    proc = TierProcess.start("llm", ["--model", "zoo:demo/llm", "--port", "0"])
    assert proc.proc.wait(120) != 0
    assert "hilm zoo build --recipe demo" in proc.tail()

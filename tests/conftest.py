"""Shared fixtures: the demo model family is built (and cached) once per machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def tiny_zoo():
    from hilm_vllm.zoo import ensure_zoo

    return ensure_zoo("tiny", progress=False)


@pytest.fixture(scope="session")
def vocab32k_zoo():
    """The random-weight 32,000-token family (hilm_vllm/zoo/random_family.py): ~15 s to build
    the first time, nothing trained but its tokenizer (Rust), so it is built in this process."""
    from hilm_vllm.zoo import ensure_zoo

    return ensure_zoo("vocab32k", progress=False)


@pytest.fixture(scope="session")
def demo_zoo():
    """The demo family, built first if missing — in a child process: vLLM engines run in this
    process by other tests bind its OpenMP threads and disable `torch.set_num_threads`, which
    would train on one core."""
    from hilm_vllm.zoo import find_zoo

    if find_zoo("demo") is None:
        subprocess.run([sys.executable, "-m", "hilm_vllm.cli", "zoo", "build", "--recipe", "demo"],
                       check=True)
    zoo = find_zoo("demo")
    assert zoo is not None, "`hilm zoo build --recipe demo` finished without a manifest"
    return zoo


@pytest.fixture
def inproc_vllm(monkeypatch):
    """Run sync `vllm.LLM` engines in this process (1.8 s instead of 12 s to start)."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def vllm_llm(model_dir, **overrides):
    """A small-footprint `vllm.LLM` for tests (float32, so it matches transformers exactly)."""
    from vllm import LLM

    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0", "use the inproc_vllm fixture"
    kwargs = dict(model=str(model_dir), dtype="float32", enforce_eager=True, block_size=32,
                  kv_cache_memory_bytes=64 << 20, max_model_len=1024, max_num_seqs=8, seed=0)
    return LLM(**(kwargs | overrides))

"""Fixtures of the drafter tests: one tiny drafter tier shared by the modules that need one."""

from __future__ import annotations

import pytest

from hilm_vllm.launch import TierProcess

ENGINE_FLAGS = ["--dtype", "float32", "--block-size", "32", "--kv-cache-memory-bytes", "64M",
                "--enforce-eager", "--max-model-len", "1024", "--port", "0", "--metrics-port", "0"]
DRAFT_TOP_K = 64  # --draft-top-k of the shared tier: full-vocabulary drafts return <= 64 ids
BUSY_LOOP_MS = 2  # --engine-busy-loop-ms of the shared tier (not the default, so it shows)


@pytest.fixture(scope="session")
def slm_tier(tiny_zoo):
    """`hilm-serve --tier slm` on the tiny zoo's SLM, started once per test session."""
    proc = TierProcess.start("slm", ["--model", str(tiny_zoo.slm), *ENGINE_FLAGS,
                                     "--draft-top-k", str(DRAFT_TOP_K),
                                     "--engine-busy-loop-ms", str(BUSY_LOOP_MS)])
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()

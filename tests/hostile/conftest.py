"""One secured stack for the hostile-input and security tests of this directory: real llm and slm
tiers (tiny zoo) and a real router, on loopback with ports picked by the OS, all under mutual TLS
with a tier token, the router's API behind an API key. Started once per session (minutes)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest

from hilm_vllm.launch import TierProcess
from hilm_vllm.server.security import Security
from tests.certs import CA, write_pems
from tests.verifier.helpers import ENGINE_FLAGS

from tests.hostile.harness import API_KEY, MAX_OUTPUT_TOKENS, TIER_TOKEN


@dataclass
class Stack:
    ca: CA
    llm: TierProcess
    slm: TierProcess
    router: TierProcess
    client: Security  # a client certificate of the tiers' CA, with the tier token

    def security(self, cn: str, token: str | None = TIER_TOKEN) -> Security:
        return self.ca.security(cn, token, server=False)


@contextlib.contextmanager
def _started(tier: str, args: list[str], security: Security, files: dict):
    proc = TierProcess.start(tier, args, security=security, pem_files=files)
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def stack(tiny_zoo, tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = CA()
    tiers = {}
    for name in ("llm", "slm", "router"):
        s = ca.security(name, TIER_TOKEN)  # server and client certificate of the tier
        tiers[name] = (s, write_pems(s, d, name))
    with _started("llm", ["--model", str(tiny_zoo.llm), *ENGINE_FLAGS], *tiers["llm"]) as llm, \
            _started("slm", ["--model", str(tiny_zoo.slm), *ENGINE_FLAGS], *tiers["slm"]) as slm:
        args = ["--model", str(tiny_zoo.llm), "--llm", llm.grpc_address, "--slm",
                slm.grpc_address, "--policy", "spec", "--port", "0", "--metrics-port", "0",
                "--api-key", API_KEY, "--max-output-tokens", str(MAX_OUTPUT_TOKENS),
                "--rpc-timeout-s", "120"]
        with _started("router", args, *tiers["router"]) as router:
            yield Stack(ca, llm, slm, router, ca.security("fuzzer", TIER_TOKEN, server=False))


@pytest.fixture(scope="session")
def tallies(stack):
    """Each fuzz test's outcome counts; `make fuzz` writes them to bench/results/fuzz-<UTC>.json
    (HILM_FUZZ_REPORT=1)."""
    from tests.hostile.harness import Report

    report = Report()
    yield report
    alive = {t.tier: t.proc.poll() is None for t in (stack.llm, stack.slm, stack.router)}
    report.flush(tiers_alive_after=alive)
    if report.path is not None:
        print(f"\nfuzz report: {report.path}")

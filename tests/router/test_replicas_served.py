"""LLM replicas behind real routers on the tiny family: sessions spread over two replicas,
every lossless request gives the LLM's tokens at T = 0 while one replica is SIGKILLed under
load (its sessions reopen on the other from the history the router owns), and two routers
share one set of tiers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import urllib.request

import pytest

from hilm_vllm.launch import TierProcess
from hilm_vllm.sampling import SamplingSpec
from tests.router.helpers import generate
from tests.verifier.helpers import ENGINE_FLAGS

PROMPTS = [[1 + (7 * i + j) % 200 for j in range(6 + i % 5)] for i in range(32)]
GREEDY = SamplingSpec(temperature=0.0)
N = 24


@contextlib.contextmanager
def started(*procs: TierProcess):
    try:
        for p in procs:
            p.wait_healthy(300)
        yield procs
    finally:
        for p in reversed(procs):
            p.stop()


def engine(name: str, model_dir) -> TierProcess:
    return TierProcess.start(name, ["--model", str(model_dir), *ENGINE_FLAGS])


def router(zoo, llm: str, slm: str) -> TierProcess:
    return TierProcess.start("router", [
        "--model", str(zoo.llm), "--llm", llm, "--slm", slm, "--port", "0", "--grpc-port", "0",
        "--metrics-port", "0", "--down-retry-s", "30", "--no-optimistic"])


def opened(r: TierProcess) -> dict[str, float]:
    text = urllib.request.urlopen(r.metrics_url, timeout=10).read().decode()
    out = {}
    for m in re.finditer(r"^hilm_router_replica_sessions_opened_total\{([^}]*)\} (\S+)$",
                         text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        out[labels["replica"]] = float(m.group(2))
    return out


async def many(address: str, policy: str, prompts=PROMPTS, during=None) -> list:
    sem = asyncio.Semaphore(16)

    async def one(p):
        async with sem:
            try:
                return await generate(address, p, GREEDY, N, policy)
            except Exception as e:  # noqa: BLE001 - counted by the test
                return e

    side = asyncio.ensure_future(during()) if during else None
    out = await asyncio.gather(*(one(p) for p in prompts))
    if side is not None:
        await side
    return out


@pytest.mark.slow
def test_two_llm_replicas_balance_fail_over_exactly_and_serve_two_routers(tiny_zoo):
    with started(engine("slm", tiny_zoo.slm), engine("llm", tiny_zoo.llm),
                 engine("llm", tiny_zoo.llm)) as (slm, llm_a, llm_b):
        both = f"{llm_a.grpc_address},{llm_b.grpc_address}"
        with started(router(tiny_zoo, both, slm.grpc_address),
                     router(tiny_zoo, llm_a.grpc_address, slm.grpc_address)) as (r1, r2):
            # the LLM's own tokens (llm-only through the second router, one replica)
            expected = asyncio.run(many(r2.grpc_address, "llm-only"))
            assert all(isinstance(x, list) and len(x) == N for x in expected), expected[:3]

            # balance: 32 spec requests, 16 at a time, through the router with two replicas
            got = asyncio.run(many(r1.grpc_address, "spec"))
            assert got == expected  # lossless at T = 0: the LLM's tokens
            per = opened(r1)
            counts = [per.get(llm_a.grpc_address, 0), per.get(llm_b.grpc_address, 0)]
            assert sum(counts) >= 32 and max(counts) / max(1, min(counts)) <= 1.25, counts

            # two routers on one set of tiers at once
            async def both_routers():
                return await asyncio.gather(many(r1.grpc_address, "spec"),
                                            many(r2.grpc_address, "spec"))
            a, b = asyncio.run(both_routers())
            assert a == expected and b == expected

            # failover: one replica SIGKILLed under load; every lossless request still exact
            async def kill():
                await asyncio.sleep(0.5)
                os.killpg(llm_a.proc.pid, signal.SIGKILL)  # the replica and its engine

            got = asyncio.run(many(r1.grpc_address, "spec", PROMPTS * 2, during=kill))
            failed = [x for x in got if not isinstance(x, list)]
            assert not failed, failed[:3]
            assert got == expected * 2
            health = urllib.request.urlopen(r1.http_url + "/health", timeout=30).read().decode()
            assert '"replicas"' in health and "serving" in health

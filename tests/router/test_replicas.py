"""Replicas of a tier behind the router (hilm_vllm/router/replicas.py) against scripted fake
links: placement by the power of two choices, session affinity, failover of a lost replica's
sessions with the LLM's exact sequence, and the flags' address lists."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from hilm_vllm.router.engine import GenerationRequest, RequestStats, Router, RouterConfig
from hilm_vllm.router.links import TierUsage
from hilm_vllm.router.policy import Policy
from hilm_vllm.router.replicas import ReplicaSet, addresses, pick
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.tiers import Tier
from tests.router.fakes import FakeDrafter, FakeVerifier, ilm_model, llm_model, reference, slm_model

PROMPT = [3, 1, 4, 1, 5]
N = 24
LLM_SEQ = reference(llm_model, PROMPT, N)


def replica(name: str, address: str, model=llm_model) -> FakeVerifier:
    link = FakeVerifier(name, model, ())
    link.address = address
    return link


def test_addresses_and_the_power_of_two_choices():
    assert addresses("a:1, b:2,") == ["a:1", "b:2"] and addresses(None) == []
    with pytest.raises(ValueError, match="twice"):
        addresses("a:1,a:1")
    with pytest.raises(ValueError, match="twice"):
        RouterConfig(llm="a:1,a:1")
    rng = random.Random(0)
    assert pick([5], rng) == 0
    assert all(pick([0, 9], rng) == 0 for _ in range(50))  # of two, the less loaded
    loads = [0, 0, 0, 0]
    for _ in range(400):
        loads[pick(loads, rng)] += 1
    assert max(loads) - min(loads) <= 2


def test_sessions_are_balanced_and_stay_on_their_replica():
    a, b = replica("llm", "a:1"), replica("llm", "b:2")
    rs = ReplicaSet(Tier.LLM, [a, b], seed=1)

    async def main():
        opened = [await rs.open(PROMPT, SamplingSpec(), 8, TierUsage()) for _ in range(32)]
        assert rs.open_sessions == [len(a.sids), len(b.sids)] and sum(rs.open_sessions) == 32
        assert max(rs.open_sessions) / min(rs.open_sessions) <= 1.25
        for o in opened:  # each session's calls go where it was opened
            await rs.verify(o.session_id, len(PROMPT), [], [], TierUsage())
        assert len(a.calls) == len(a.sids) and len(b.calls) == len(b.sids)
        for o in opened:
            await rs.close_session(o.session_id, TierUsage())
        assert rs.open_sessions == [0, 0] and len(a.closed) + len(b.closed) == 32

    asyncio.run(main())


def run(links, policy: Policy, cfg: dict | None = None):
    router = Router(RouterConfig(llm="fake", slm="fake", ilm="fake", **(cfg or {})),
                    links=links)
    stats = RequestStats(policy.value)

    async def main():
        req = GenerationRequest(tuple(PROMPT), SamplingSpec(temperature=0.0), N, policy)
        return [i async for ids in router.generate(req, stats) for i in ids]

    return asyncio.run(main()), stats


@pytest.mark.parametrize("policy", [Policy.SPEC, Policy.CASCADE, Policy.HILM, Policy.LLM_ONLY])
def test_a_lost_llm_replica_fails_its_sessions_over_and_the_sequence_is_the_llms(policy):
    """The replica that holds the request's LLM session is lost mid-request (its calls fail
    UNAVAILABLE): the session reopens on the other replica from the router's history, the
    tokens are exactly the LLM's, nothing is degraded, and the lost replica is passed over."""
    a, b = replica("llm", "a:1"), replica("llm", "b:2")
    rs = ReplicaSet(Tier.LLM, [a, b], seed=0)
    first = a if rs._place() == 0 else b  # the seeded choice the request's open makes
    rs._rng = random.Random(0)
    for method in ("verify", "generate"):
        first.fail(method, grpc.StatusCode.UNAVAILABLE, times=100)
    links = {Tier.SLM: FakeDrafter("slm", slm_model, (), lambda ctx: 0.9),
             Tier.ILM: FakeVerifier("ilm", ilm_model, (), lambda ctx: 0.9), Tier.LLM: rs}
    out, stats = run(links, policy, {"optimistic": False})
    assert out == LLM_SEQ
    assert stats.failovers >= 1 or policy is Policy.LLM_ONLY
    assert stats.degraded == []
    assert not first.available and (a if first is b else b).available


def test_one_replica_behaves_as_the_link():
    link = replica("llm", "a:1")
    rs = ReplicaSet(Tier.LLM, [link])
    rs.mark_down(5.0)
    assert not rs.available and not link.available


def test_a_draining_store_refuses_new_sessions_and_the_set_places_them_elsewhere():
    from hilm_vllm.errors import Unavailable
    from hilm_vllm.sessions import STORES, SessionLimits, SessionStore

    store = SessionStore(SessionLimits(max_sessions=4, ttl_s=60.0))
    assert store in STORES
    store.open("client", object())
    store.draining = True
    with pytest.raises(Unavailable, match="draining"):
        store.open("client", object())
    assert len(store) == 1  # the open one is still served

    a, b = replica("llm", "a:1"), replica("llm", "b:2")
    a.fail("open", grpc.StatusCode.UNAVAILABLE, times=100)  # a draining replica's answer
    rs = ReplicaSet(Tier.LLM, [a, b], seed=0)

    async def main():
        for _ in range(6):
            try:
                await rs.open(PROMPT, SamplingSpec(), 8, TierUsage())
            except grpc.aio.AioRpcError:
                pass

    asyncio.run(main())
    assert not a.available and len(b.sids) >= 5 and not a.sids


def test_a_replica_that_reports_other_clients_sessions_gets_fewer_new_ones():
    """Replica a reports (OpenSession.other_sessions) 20 sessions other clients hold there
    (another router's): new sessions go to b until the loads meet."""
    from dataclasses import replace

    a, b = replica("llm", "a:1"), replica("llm", "b:2")
    real_open = a.open

    async def busy_open(*args, **kw):
        return replace(await real_open(*args, **kw), other_sessions=20)

    a.open = busy_open
    rs = ReplicaSet(Tier.LLM, [a, b], seed=3)

    async def main():
        for _ in range(24):
            await rs.open(PROMPT, SamplingSpec(), 8, TierUsage())

    asyncio.run(main())
    assert rs.others[0] == 20 and len(b.sids) >= 20 and 1 <= len(a.sids) <= 4

"""The round's executor against scripted fake links: every policy, degradation, recovery and
rollback case, in seconds and without engines (tests/router/fakes.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from hilm_vllm.errors import InvalidArgument, Unavailable
from hilm_vllm.router.engine import GenerationRequest, RequestStats, Router, RouterConfig
from hilm_vllm.router.policy import Policy
from hilm_vllm.thresholds import Thresholds
from hilm_vllm.router.session import sync
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.tiers import Tier
from tests.router.fakes import (FakeDrafter, FakeVerifier, SlowDrafter, ilm_model, llm_model,
                                reference, rpc_error, slm_model)

PROMPT = [3, 1, 4, 1, 5]
N = 24
GREEDY = SamplingSpec(temperature=0.0)
ALL_TO_ILM = Thresholds(-1.0, 2.0, 2.0)  # every token to the ILM, its tokens final
ALL_SKIPPED = Thresholds(2.0, 2.0, 2.0)


def tiers(slm_eos=(), ilm_eos=(), llm_eos=(), slm_u=lambda ctx: 0.5, ilm_u=lambda ctx: 0.5):
    return {Tier.SLM: FakeDrafter("slm", slm_model, slm_eos, slm_u),
            Tier.ILM: FakeVerifier("ilm", ilm_model, ilm_eos, ilm_u),
            Tier.LLM: FakeVerifier("llm", llm_model, llm_eos)}


def run(links, policy: Policy, n: int = N, thresholds: Thresholds | None = None,
        **cfg) -> tuple[list[int], RequestStats]:
    router = Router(RouterConfig(llm="fake", slm="fake", ilm="fake", **cfg), links=links)
    req = GenerationRequest(tuple(PROMPT), GREEDY, n, policy, thresholds=thresholds)
    stats = RequestStats(policy.value)

    async def main():
        out = []
        async for ids in router.generate(req, stats):
            out += ids
        await asyncio.sleep(0)  # let the sessions' closes run
        return out

    return asyncio.run(main()), stats


LLM_SEQ = reference(llm_model, PROMPT, N)


@pytest.mark.parametrize("policy", [Policy.LLM_ONLY, Policy.HLM, Policy.SPEC, Policy.CASCADE])
@pytest.mark.parametrize("optimistic", [True, False])
def test_lossless_policies_produce_the_llms_sequence(policy, optimistic):
    links = tiers()
    out, stats = run(links, policy, optimistic=optimistic, optimistic_min_keep=0.0)
    assert out == LLM_SEQ
    assert stats.tokens == N and stats.skips == 0
    if policy is not Policy.LLM_ONLY:
        # every session the request opened was closed (the fakes refuse out-of-step requests)
        for link in links.values():
            assert link.closed == link.sids, link.name
    if policy is Policy.CASCADE:
        assert stats.tiers[Tier.ILM].verifies > 0 and stats.ilm_forwarded > 0


def test_uhlm_skips_confident_tokens_and_keeps_the_drafters():
    links = tiers(slm_u=lambda ctx: 0.0)  # every token confident
    out, stats = run(links, Policy.UHLM, thresholds=Thresholds(0.3, 0.3, 0.3))
    assert out == reference(slm_model, PROMPT, N)
    assert stats.skips == N and stats.tiers[Tier.LLM].verifies == 0
    assert stats.usage()["skipped_at"] == list(range(N))


def test_hilm_bands_decide_who_verifies():
    # Every token to the ILM and its tokens final: the ILM's sequence, no LLM call.
    out, stats = run(tiers(), Policy.HILM, thresholds=ALL_TO_ILM)
    assert out == reference(ilm_model, PROMPT, N)
    assert stats.tiers[Tier.LLM].verifies == 0 and stats.tiers[Tier.ILM].verifies > 0
    # The ILM unsure of everything: all its tokens go on to the LLM -> the LLM's sequence.
    out, stats = run(tiers(), Policy.HILM, thresholds=Thresholds(-1.0, 2.0, -1.0))
    assert out == LLM_SEQ and stats.ilm_forwarded > 0
    # Every token skipped: the drafter's sequence.
    out, stats = run(tiers(), Policy.HILM, thresholds=ALL_SKIPPED)
    assert out == reference(slm_model, PROMPT, N) and stats.tiers[Tier.ILM].verifies == 0


def test_the_ilm_is_rolled_back_when_the_llm_overrules_its_tokens():
    links = tiers()
    out, _ = run(links, Policy.HILM, thresholds=Thresholds(-1.0, 2.0, -1.0))
    assert out == LLM_SEQ
    # The ILM's own wrong tokens (every 5th position) were overruled by the LLM: its next
    # Verify cut them with rollback_to (the fake checks every position).
    assert any(c["rollback_to"] is not None for c in links[Tier.ILM].calls)


def test_the_drafter_gets_rollback_and_the_correction_in_its_next_draft():
    links = tiers()
    out, _ = run(links, Policy.SPEC, optimistic=False)
    assert out == LLM_SEQ
    calls = links[Tier.SLM].calls
    fixes = [c for c in calls if c["rollback_to"] is not None]
    assert fixes and all(len(c["append"]) == 1 for c in fixes)  # the LLM's correction


def test_optimistic_drafts_are_kept_when_the_block_is_accepted():
    links = tiers()
    links[Tier.SLM].model = llm_model  # a drafter that is always right
    out, stats = run(links, Policy.SPEC, optimistic=True)
    assert out == LLM_SEQ and stats.optimistic_kept > 0


def test_the_router_drafts_ahead_only_while_drafts_ahead_are_likely_kept():
    """`--optimistic` with `--optimistic-min-keep 0.5` (the default): a drafter that always
    agrees with the LLM soon drafts ahead every round; one that is cut in every block never
    does (its drafts ahead would be thrown away); min-keep 0 drafts ahead every round; the
    request's `optimistic: true` overrides the gate. The tokens are the LLM's every time."""
    right = tiers()
    right[Tier.SLM].model = llm_model
    out, stats = run(right, Policy.SPEC, optimistic=True)
    assert out == LLM_SEQ and stats.rounds - 3 <= stats.optimistic_drafts < stats.rounds
    assert stats.optimistic_kept >= stats.optimistic_drafts - 1

    out, stats = run(tiers(), Policy.SPEC, optimistic=True)  # slm_model: cut every block
    assert out == LLM_SEQ and stats.optimistic_drafts == 0

    out, stats = run(tiers(), Policy.SPEC, optimistic=True, optimistic_min_keep=0.0)
    assert out == LLM_SEQ and stats.optimistic_drafts >= stats.rounds // 2

    router = Router(RouterConfig(llm="fake", slm="fake", ilm="fake"), links=tiers())
    stats = RequestStats(Policy.SPEC.value)

    async def forced():
        req = GenerationRequest(tuple(PROMPT), GREEDY, N, Policy.SPEC, optimistic=True)
        return [i async for ids in router.generate(req, stats) for i in ids]

    assert asyncio.run(forced()) == LLM_SEQ and stats.optimistic_drafts >= stats.rounds // 2


def test_a_rejected_draft_ahead_is_superseded_not_cancelled():
    """The round does not wait for a draft-ahead the LLM made useless, and does not cancel its
    call either (grpc.aio leaks native memory per call cancelled in flight, grpc/grpc#43360):
    the next Draft (position 0) or the session's close ends it on the drafter (ABORTED), and a
    dropped Draft never opens a session after the request."""
    class SlowVerifier(FakeVerifier):  # a reply takes a moment, as over a network
        async def verify(self, *args, **kw):
            await asyncio.sleep(0.002)
            return await super().verify(*args, **kw)

    links = tiers()
    slm = links[Tier.SLM] = SlowDrafter("slm", slm_model, (), lambda ctx: 0.5, delay=0.05)
    links[Tier.LLM] = SlowVerifier("llm", llm_model, ())
    router = Router(RouterConfig(llm="fake", slm="fake", ilm="fake", optimistic=True,
                                 optimistic_min_keep=0.0),
                    links=links)
    stats = RequestStats(Policy.SPEC.value)

    async def main():
        out = [i async for ids in router.generate(
            GenerationRequest(tuple(PROMPT), GREEDY, N, Policy.SPEC), stats) for i in ids]
        await asyncio.sleep(0.1)  # the closes run; every dropped Draft ends
        return out

    assert asyncio.run(main()) == LLM_SEQ
    assert stats.optimistic_drafts > 0 and slm.aborted > 0 and slm.cancelled == 0
    assert len(slm.sids) == 1 and slm.closed == slm.sids
    unknown = [c for c in slm.calls if c["position"] == 0]
    assert unknown and all(c["rollback_to"] is not None for c in unknown)


def test_a_dropped_draft_that_went_through_late_is_cut_back():
    """A dropped Draft ahead can reach the drafter after the Draft that dropped it and add
    tokens there; the round's next Draft then meets FAILED_PRECONDITION and cuts the session
    back to the history it owns (position 0, rollback_to) instead of failing the request."""
    class LateDrafter(FakeDrafter):
        async def draft(self, sid, position, n, usage, rollback_to=None, append=()):
            if len(self.calls) == 2 and sid in self.sessions:
                self.sessions[sid] += [1, 2]  # what the late Draft ahead added
            return await super().draft(sid, position, n, usage, rollback_to, append)

    links = tiers()
    slm = links[Tier.SLM] = LateDrafter("slm", slm_model, (), lambda ctx: 0.5)
    out, stats = run(links, Policy.SPEC, optimistic=False)
    assert out == LLM_SEQ
    assert len(slm.sids) == 1 and slm.closed == slm.sids  # the session was kept
    refused, again = slm.calls[2], slm.calls[3]
    assert refused["position"] != 0 and again["position"] == 0
    assert again["rollback_to"] == (refused["rollback_to"] if refused["rollback_to"] is not None
                                    else refused["position"])


def test_an_unreachable_ilm_is_routed_around_to_the_llm():
    links = tiers()
    links[Tier.ILM].fail("verify", grpc.StatusCode.UNAVAILABLE)
    out, stats = run(links, Policy.HILM, thresholds=Thresholds(-1.0, 2.0, -1.0))
    assert out == LLM_SEQ and "ilm-unreachable" in stats.degraded
    assert not links[Tier.ILM].available  # a lost connection marks it down for everyone


def test_a_deadline_routes_this_request_around_but_does_not_mark_the_tier_down():
    links = tiers()
    links[Tier.ILM].fail("verify", grpc.StatusCode.DEADLINE_EXCEEDED)
    out, stats = run(links, Policy.HILM, thresholds=Thresholds(-1.0, 2.0, -1.0))
    assert out == LLM_SEQ and "ilm-unreachable" in stats.degraded
    assert links[Tier.ILM].available
    ilm = links[Tier.ILM]
    assert len(ilm.sids) == 2 and ilm.closed == ilm.sids  # the abandoned session was closed


def test_an_unreachable_llm_leaves_lossy_tokens_standing():
    # Without an ILM the drafter's block stands; with one, the ILM verifies it.
    links = tiers()
    del links[Tier.ILM]
    links[Tier.LLM].fail("verify", grpc.StatusCode.UNAVAILABLE)
    out, stats = run(links, Policy.UHLM, thresholds=Thresholds(-1.0, -1.0, -1.0),
                     optimistic=False)
    assert len(out) == N and stats.degraded == ["llm-unreachable"]
    assert out[:4] == reference(slm_model, PROMPT, 4)  # the first block: the drafter's
    links = tiers()
    links[Tier.LLM].fail("verify", grpc.StatusCode.UNAVAILABLE)
    out, stats = run(links, Policy.UHLM, thresholds=Thresholds(-1.0, -1.0, -1.0))
    assert len(out) == N and stats.tiers[Tier.ILM].verifies > 0


def test_a_lossless_request_waits_for_the_llm_to_come_back():
    links = tiers()
    links[Tier.LLM].fail("verify", grpc.StatusCode.UNAVAILABLE, times=2)
    links[Tier.LLM].fail("open", grpc.StatusCode.UNAVAILABLE, times=1)
    out, stats = run(links, Policy.SPEC, recover_s=10.0, down_retry_s=0.0)
    assert out == LLM_SEQ
    assert len(links[Tier.LLM].opened) >= 2  # reopened with the history the router owns
    assert links[Tier.LLM].opened[-1][:len(PROMPT)] == PROMPT


def test_a_lossless_request_gives_up_with_503_after_recover_s():
    links = tiers()
    links[Tier.LLM].fail("verify", grpc.StatusCode.UNAVAILABLE, times=1000)
    with pytest.raises(Unavailable, match="lossless"):
        run(links, Policy.SPEC, recover_s=0.6, down_retry_s=0.0)


class DroppingLLM(FakeVerifier):
    """An LLM whose stream is cut after 5 tokens (`drops` times): it was killed."""
    drops = 1

    async def generate(self, prompt, *args, **kw):
        n = 0
        async for ids, finish, logprobs in super().generate(prompt, *args, **kw):
            yield ids, finish, logprobs
            n += 1
            if n == 5 and self.drops:
                self.drops -= 1
                raise rpc_error(grpc.StatusCode.UNAVAILABLE, "Stream removed")


def test_an_llm_only_stream_the_llm_drops_resumes_from_the_history():
    links = tiers()
    llm = links[Tier.LLM] = DroppingLLM("llm", llm_model, ())
    # the first call streams 5 tokens and is cut; the next two find it still restarting
    llm._faults["generate"] = [None, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    out, stats = run(links, Policy.LLM_ONLY, recover_s=10.0, down_retry_s=0.0)
    assert out == LLM_SEQ and stats.tokens == N
    prompts = [c["generate"] for c in llm.calls]
    assert prompts == [len(PROMPT)] * 1 + [len(PROMPT) + 5] * 3  # resumed after 5 tokens


def test_a_seeded_llm_only_stream_resumed_draws_with_a_seed_of_its_position():
    from hilm_vllm.seeds import Stream, derive_seed

    links = tiers()
    llm = links[Tier.LLM] = DroppingLLM("llm", llm_model, ())
    router = Router(RouterConfig(llm="fake", slm="fake", ilm="fake", recover_s=10.0,
                                 down_retry_s=0.0), links=links)
    req = GenerationRequest(tuple(PROMPT), SamplingSpec(1.0, seed=42), N, Policy.LLM_ONLY)

    async def main():
        return [t async for ids in router.generate(req, RequestStats("llm-only")) for t in ids]

    assert len(asyncio.run(main())) == N
    seeds = [c["seed"] for c in llm.calls]
    assert seeds == [derive_seed(42, 0, Stream.SESSION_LLM), derive_seed(42, 5, Stream.SESSION_LLM)]


def test_an_llm_only_stream_gives_up_with_503_after_recover_s():
    links = tiers()
    llm = links[Tier.LLM] = DroppingLLM("llm", llm_model, ())
    llm._faults["generate"] = [None] + [grpc.StatusCode.UNAVAILABLE] * 1000
    with pytest.raises(Unavailable, match="did not answer for 0.6 s"):
        run(links, Policy.LLM_ONLY, recover_s=0.6, down_retry_s=0.0)


def test_a_restarted_verifier_gets_a_new_session_with_the_history():
    links = tiers()
    llm = links[Tier.LLM]
    calls = 0
    verify = llm.verify

    async def restart_midway(*a, **kw):
        nonlocal calls
        calls += 1
        if calls == 3:
            llm.restart()
        return await verify(*a, **kw)

    llm.verify = restart_midway
    out, _ = run(links, Policy.SPEC)
    assert out == LLM_SEQ
    assert len(llm.opened) == 2 and len(llm.opened[1]) > len(PROMPT)


def test_a_restarted_drafter_gets_a_new_session_and_an_unreachable_one_leaves_it_to_the_llm():
    links = tiers()
    links[Tier.SLM].fail("draft", grpc.StatusCode.NOT_FOUND)
    out, stats = run(links, Policy.SPEC)
    assert out == LLM_SEQ and len(links[Tier.SLM].opened) == 2 and not stats.degraded

    links = tiers()
    links[Tier.SLM].fail("draft", grpc.StatusCode.UNAVAILABLE)
    out, stats = run(links, Policy.SPEC)
    assert out == LLM_SEQ and stats.degraded == ["slm-unreachable"]
    assert any("generate" in c for c in links[Tier.LLM].calls)


def test_a_client_error_from_a_tier_is_not_routed_around():
    links = tiers()
    links[Tier.LLM].fail("verify", grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(InvalidArgument, match="llm tier"):
        run(links, Policy.UHLM)


def test_the_stop_set_is_the_llms_whole_list():
    # The LLM stops on two ids; the drafter knows only its own. Lossless policies stop where
    # llm-only does: at the first of either.
    stop = LLM_SEQ[9]
    eos = (stop + 1) % 50, stop
    expected = reference(llm_model, PROMPT, N, set(eos))
    assert expected[-1] == stop and len(expected) < N
    for policy in (Policy.LLM_ONLY, Policy.SPEC, Policy.CASCADE, Policy.HLM):
        out, stats = run(tiers(slm_eos=(stop + 2,), llm_eos=eos), policy)
        assert out == expected and stats.finish_reason == "stop", policy


def test_max_tokens_cuts_the_last_round():
    for n in (1, 3, 5):
        out, stats = run(tiers(), Policy.SPEC, n=n)
        assert out == LLM_SEQ[:n] and stats.tokens == n and stats.finish_reason == "length"


@pytest.mark.parametrize("held, context, expected", [
    ([1, 2, 3], [1, 2, 3, 4, 5], (3, None, [4, 5])),  # lagging: append
    ([1, 2, 3, 9], [1, 2, 3, 4], (4, 3, [4])),  # ahead by an overruled token: cut, append
    ([1, 2], [1, 2], (2, None, [])),
])
def test_session_sync(held, context, expected):
    s = sync(held, context)
    assert (s.position, s.rollback_to, s.append) == expected


def test_stop_token_ids_stop_every_policy_where_llm_only_stops():
    stop = LLM_SEQ[6]
    expected = reference(llm_model, PROMPT, N, {stop})
    for policy in (Policy.LLM_ONLY, Policy.SPEC, Policy.CASCADE):
        links = tiers()
        router = Router(RouterConfig(llm="f", slm="f", ilm="f"), links=links)
        req = GenerationRequest(tuple(PROMPT), GREEDY, N, policy, stop_token_ids=(stop,))

        async def main():
            return [t async for ids in router.generate(req, RequestStats(policy.value))
                    for t in ids]

        assert asyncio.run(main()) == expected, policy


def test_request_bounds():
    with pytest.raises(InvalidArgument, match="min_tokens"):
        GenerationRequest(tuple(PROMPT), GREEDY, 3, Policy.SPEC, min_tokens=4)
    with pytest.raises(InvalidArgument, match="max_tokens"):
        GenerationRequest(tuple(PROMPT), GREEDY, 2**31, Policy.SPEC)


def test_blocks_follow_the_verifiers_max_block():
    # k = 12 asked; the LLM takes 6 per Verify and cascade forwards up to k + 1 to it.
    links = tiers()
    links[Tier.LLM].max_block = 6
    links[Tier.ILM].max_block = 8
    out, _ = run(links, Policy.CASCADE, block_size=12)
    assert out == LLM_SEQ
    assert max(len(c["draft"]) for c in links[Tier.LLM].calls) <= 6
    assert max(len(c["draft"]) for c in links[Tier.ILM].calls) <= 5


def test_a_request_longer_than_the_context_ends_at_it():
    links = tiers()
    links[Tier.LLM].max_model_len = len(PROMPT) + 10
    out, stats = run(links, Policy.SPEC, n=1000)
    # the context, a block and the next token fit at every round; the output is the LLM's
    assert out == LLM_SEQ[:9] and stats.tokens == 9 and stats.finish_reason == "length"
    links = tiers()
    links[Tier.LLM].max_model_len = len(PROMPT) + 10
    out, stats = run(links, Policy.HILM, n=1000, thresholds=Thresholds(-1.0, -1.0, -1.0))
    assert len(out) == 8 and not stats.degraded  # the ILM's block may reach the LLM + 1
    links = tiers()
    links[Tier.LLM].max_model_len = len(PROMPT) + 10
    out, stats = run(links, Policy.CASCADE, n=1000, block_size=3)
    assert out == LLM_SEQ[:8] and stats.finish_reason == "length"


@pytest.mark.parametrize("min_tokens, stops_at", [(0, 2), (2, 2), (3, 5), (6, None)])
def test_a_stop_token_counts_from_index_min_tokens_as_in_vllm(min_tokens, stops_at):
    """vLLM masks stop tokens while the output holds fewer than min_tokens tokens: the token at
    index min_tokens - 1 cannot stop a request; one at index min_tokens can."""
    from hilm_vllm.router.engine import _Run

    router = Router(RouterConfig(llm="fake"), links=tiers())
    req = GenerationRequest(tuple(PROMPT), GREEDY, 8, Policy.UHLM, min_tokens=min_tokens)
    run_ = _Run(router, req, RequestStats("uhlm"))
    run_.eos = frozenset({9})
    kept, done = run_.accept([1, 2, 9, 4, 5, 9, 7, 8])
    if stops_at is None:
        assert kept == [1, 2, 9, 4, 5, 9, 7, 8] and run_.stats.finish_reason == "length"
    else:
        assert kept == [1, 2, 9, 4, 5, 9][:stops_at + 1] and done


def test_health_is_checked_once_a_second_whoever_asks():
    """/health and /ping are polled by load balancers; each check is one RPC per tier. Ten
    callers within a second share one check; a second later there is a new one."""
    links = tiers()
    checks = []

    async def check_health(name):
        checks.append(name)
        await asyncio.sleep(0.01)
        return None

    for link in links.values():
        link.check_health = lambda name=link.name: check_health(name)
        link.limits = None
    router = Router(RouterConfig(llm="fake", slm="fake", ilm="fake"), links=links)

    async def main():
        first = await asyncio.gather(*(router.health() for _ in range(10)))
        assert all(r == (None, {"slm": "serving", "ilm": "serving", "llm": "serving"})
                   for r in first)
        assert len(checks) == 3
        await router.health()
        assert len(checks) == 3
        router._health = (router._health[0] - 1.0, router._health[1])  # a second later
        await router.health()
        assert len(checks) == 6

    asyncio.run(main())


def test_the_llms_limits_are_learned_by_one_probe_whoever_asks():
    """/tokenize and /v1/models report max_model_len: before any request it is learned from one
    probe session, shared by every caller meanwhile; after a failed probe the next is not tried
    for a while (an LLM that is down is not hammered by one session per call)."""
    links = tiers()
    llm = links[Tier.LLM]
    llm.max_model_len = 256
    llm.limits = None
    router = Router(RouterConfig(llm="fake", slm="fake", ilm="fake"), links=links)

    async def main():
        llm.fail("open", grpc.StatusCode.UNAVAILABLE)
        assert await asyncio.gather(*(router.max_model_len() for _ in range(5))) == [None] * 5
        assert await router.max_model_len() is None  # not retried at once
        assert len(llm.opened) == 0
        router._probe_failed_at -= 60  # later on
        assert await asyncio.gather(*(router.max_model_len() for _ in range(5))) == [256] * 5
        assert await router.max_model_len() == 256
        assert len(llm.opened) == 1 and llm.closed == llm.sids  # one probe, closed

    asyncio.run(main())

"""`hilm-serve --tier slm` as a real subprocess: the Drafter gRPC service end to end."""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.request

import grpc
import numpy as np
import pytest

from hilm_vllm.drafter.client import DrafterClient
from hilm_vllm.proto.hilm.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.sessions import CLIENT_METADATA_KEY
from hilm_vllm.uncertainty import Gate, UncertaintyConfig

from tests.drafter.conftest import BUSY_LOOP_MS, DRAFT_TOP_K

PROMPT = [5, 17, 99, 250, 3, 42, 42, 7, 300, 12, 64, 128, 9, 33, 401, 77, 8, 19]
Code = grpc.StatusCode


def call(coro_fn, address, client_id=""):
    """Run `coro_fn(client)` with a fresh DrafterClient (each test owns its event loop)."""
    async def main():
        async with DrafterClient(address, client_id) as client:
            return await coro_fn(client)
    return asyncio.run(main())


@pytest.fixture
def stub(slm_tier):
    with grpc.insecure_channel(slm_tier.grpc_address) as channel:
        yield drafter_pb2_grpc.DrafterStub(channel)


def open_request(ids=PROMPT, temperature=0.8, seed=3, **kw):
    sampling = common_pb2.SamplingParams(temperature=temperature, **kw)
    if seed is not None:
        sampling.seed = seed
    return drafter_pb2.OpenDrafterSessionRequest(
        prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=ids)), sampling=sampling)


def assert_valid_dists(result, k=20):
    for t in result.tokens:
        # float16 weights (the law is probs / sum): the sum is 1 within float16 rounding
        assert abs(float(t.probs.sum()) - 1) < 1e-3 and t.token_id in t.ids.tolist()
        assert np.array_equal(t.probs, t.probs.astype(np.float16).astype(np.float32))
        assert len(t.ids) <= DRAFT_TOP_K and (t.probs > 0).all()
        assert 0 <= t.uncertainty <= 1 and round(t.uncertainty * k) == pytest.approx(
            t.uncertainty * k, abs=1e-5)


def test_draft_rollback_append_close(slm_tier):
    async def flow(d: DrafterClient):
        s = await d.open_session(PROMPT, SamplingSpec(temperature=0.8, seed=1))
        assert s.position == len(PROMPT) and s.prompt_token_ids == tuple(PROMPT)
        assert s.vocab_size == 512 and s.eos_token_id == 1
        r = await d.draft(s.session_id, s.position, 6)
        assert len(r.tokens) == 6 and r.position == s.position + 6 and not r.early_stop
        assert r.total_ms > 0
        assert_valid_dists(r)
        assert await d.rollback(s.session_id, s.position + 2) == s.position + 2
        assert await d.append(s.session_id, s.position + 2, [5, 6, 7]) == s.position + 5
        r2 = await d.draft(s.session_id, s.position + 5, 3)
        assert r2.position == s.position + 8
        await d.close_session(s.session_id)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await d.draft(s.session_id, s.position + 8, 1)
        assert e.value.code() == Code.NOT_FOUND
    call(flow, slm_tier.grpc_address)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_rollback_then_redraft_reproduces_tokens_and_u(slm_tier, temperature):
    async def flow(d: DrafterClient):
        s = await d.open_session(PROMPT, SamplingSpec(temperature=temperature, seed=7))
        first = await d.draft(s.session_id, s.position, 8)
        await d.rollback(s.session_id, s.position)
        again = await d.draft(s.session_id, s.position, 8)
        assert [t.token_id for t in again.tokens] == [t.token_id for t in first.tokens]
        assert [t.uncertainty for t in again.tokens] == [t.uncertainty for t in first.tokens]
        if temperature == 0:  # into the middle: the redraft continues the same tokens
            await d.rollback(s.session_id, s.position + 3)
            tail = await d.draft(s.session_id, s.position + 3, 5)
            assert [t.token_id for t in tail.tokens] == [t.token_id for t in first.tokens[3:]]
    call(flow, slm_tier.grpc_address)


def test_text_prompt_and_request_top_k(slm_tier):
    async def flow(d: DrafterClient):
        s = await d.open_session("def add(a, b):\n    return", SamplingSpec(1.0, top_k=5))
        assert len(s.prompt_token_ids) > 3 and s.position == len(s.prompt_token_ids)
        r = await d.draft(s.session_id, s.position, 4)
        assert all(len(t.ids) <= 5 for t in r.tokens)
        assert_valid_dists(r)
    call(flow, slm_tier.grpc_address)


def test_early_stop_returns_the_first_token_over_the_bound(slm_tier):
    async def flow(d: DrafterClient):
        cfg = UncertaintyConfig(theta_max=0.5)  # the tiny model's u then spreads over (0, 1)
        # seeded: u's perturbed samples then repeat after the rollback
        s = await d.open_session(PROMPT, SamplingSpec(temperature=0.0, seed=3), uncertainty=cfg)
        full = await d.draft(s.session_id, s.position, 16)
        us = [t.uncertainty for t in full.tokens]
        bound = max(u for u in us if u < max(us))  # only the largest u is over it
        first = us.index(max(us))
        await d.rollback(s.session_id, s.position)
        r = await d.draft(s.session_id, s.position, 16, stop_uncertainty=bound)
        assert [t.token_id for t in r.tokens] == [t.token_id for t in full.tokens[:first + 1]]
        assert r.early_stop == (first < 15) and r.position == s.position + first + 1
    call(flow, slm_tier.grpc_address)


@pytest.mark.parametrize("cfg, steps", [(UncertaintyConfig(num_samples=4), 4),
                                        (UncertaintyConfig(gate=Gate.ENTROPY), None)])
def test_session_picks_its_gate(slm_tier, cfg, steps):
    async def flow(d: DrafterClient):
        s = await d.open_session(PROMPT, SamplingSpec(0.8, seed=2), uncertainty=cfg)
        r = await d.draft(s.session_id, s.position, 8)
        us = [t.uncertainty for t in r.tokens]
        assert all(0 <= u <= 1 for u in us)
        if steps:
            assert all(round(u * steps) == pytest.approx(u * steps, abs=1e-6) for u in us)
        else:  # entropy of a near-uniform tiny model: high, and not on a 1/K grid
            assert all(u > 0.5 for u in us) and len(set(us)) > 1
    call(flow, slm_tier.grpc_address)


def code_of(fn, *args, **kw):
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kw)
    return e.value.code(), e.value.details()


def test_bad_requests_get_the_right_codes_and_the_server_keeps_serving(stub):
    s = stub.OpenSession(open_request())
    pos = s.position
    bad_opens = [open_request(ids=[5, 9999]), open_request(temperature=-1.0),
                 open_request(top_p=1.5), open_request(ids=list(range(3, 500)) * 3),
                 drafter_pb2.OpenDrafterSessionRequest()]
    for request in bad_opens:
        assert code_of(stub.OpenSession, request)[0] == Code.INVALID_ARGUMENT
    big_k = open_request()
    big_k.uncertainty.num_samples = 5000
    code, details = code_of(stub.OpenSession, big_k)
    assert code == Code.INVALID_ARGUMENT and "num_samples" in details

    draft = drafter_pb2.DraftRequest
    assert code_of(stub.Draft, draft(session_id="nope", position=pos, max_tokens=2))[0] == \
        Code.NOT_FOUND
    code, details = code_of(stub.Draft, draft(session_id=s.session_id, position=3, max_tokens=2))
    assert code == Code.FAILED_PRECONDITION and f"position {pos}" in details
    for n in (0, 1000):
        assert code_of(stub.Draft, draft(session_id=s.session_id, position=pos,
                                         max_tokens=n))[0] == Code.INVALID_ARGUMENT
    assert code_of(stub.Append, drafter_pb2.AppendRequest(
        session_id=s.session_id, position=pos, token_ids=[512]))[0] == Code.INVALID_ARGUMENT
    code, details = code_of(stub.Rollback, drafter_pb2.RollbackRequest(
        session_id=s.session_id, position=pos + 1))
    assert code == Code.FAILED_PRECONDITION and f"position {pos}" in details
    other = ((CLIENT_METADATA_KEY, "someone-else"),)
    assert code_of(stub.Draft, draft(session_id=s.session_id, position=pos, max_tokens=1),
                   metadata=other)[0] == Code.PERMISSION_DENIED

    r = stub.Draft(draft(session_id=s.session_id, position=pos, max_tokens=3))
    assert len(r.tokens) == 3 and r.position == pos + 3


def test_session_length_limit(stub):
    request = open_request()
    request.max_tokens = 3
    s = stub.OpenSession(request)
    r = stub.Draft(drafter_pb2.DraftRequest(session_id=s.session_id, position=s.position,
                                            max_tokens=8))
    assert len(r.tokens) == 3
    assert code_of(stub.Draft, drafter_pb2.DraftRequest(
        session_id=s.session_id, position=r.position, max_tokens=1))[0] == Code.INVALID_ARGUMENT
    assert code_of(stub.Append, drafter_pb2.AppendRequest(
        session_id=s.session_id, position=r.position, token_ids=[5]))[0] == Code.INVALID_ARGUMENT
    stub.Rollback(drafter_pb2.RollbackRequest(session_id=s.session_id, position=r.position - 1))
    stub.Append(drafter_pb2.AppendRequest(session_id=s.session_id, position=r.position - 1,
                                          token_ids=[5]))


def test_metrics_count_drafted_tokens(slm_tier, stub):
    s = stub.OpenSession(open_request())
    stub.Draft(drafter_pb2.DraftRequest(session_id=s.session_id, position=s.position,
                                        max_tokens=2))
    body = urllib.request.urlopen(slm_tier.metrics_url, timeout=10).read().decode()
    tokens = [line for line in body.splitlines() if line.startswith("hilm_drafter_tokens_total")]
    assert tokens and float(tokens[0].split()[-1]) >= 2
    assert "hilm_drafter_draft_seconds_bucket" in body


def scrape(tier, name: str) -> float:
    text = urllib.request.urlopen(tier.metrics_url, timeout=10).read().decode()
    m = re.search(rf"^{name} ([-+\de.]+)$", text, re.M)
    assert m, f"{name} is not on {tier.metrics_url}"
    return float(m.group(1))


def test_a_draft_hands_the_engine_only_its_new_tokens(slm_tier):
    """Sessions live in the engine (issue 21): after the first Draft of a 200-token prompt,
    each Draft of 6 rounds (the router's way: cut back into the drafts, append a correction)
    hands the session's engine request at most the appended token and the context's last
    token (whose row gives the first draft token), never the history. Read from the tier's
    count of the tokens its engine sessions handed vLLM (server/engine_session.py: `Chunk.sent`,
    the length of the prompt chunk given to AsyncLLM; the same count the verifier's test checks
    on the engine core's requests, tests/verifier/test_engine_sessions.py)."""
    prompt = [(7 * i + 3) % 250 + 1 for i in range(200)]
    sent = "hilm_drafter_engine_tokens_sent_total"

    async def flow(d: DrafterClient):
        s = await d.open_session(prompt, SamplingSpec(temperature=0.8, seed=11))
        before = scrape(slm_tier, sent)
        r = await d.draft(s.session_id, s.position, 4)
        first = scrape(slm_tier, sent) - before
        per_round = []
        for i in range(6):
            keep = i % 4  # drafts the verifier kept, then its correction
            count = scrape(slm_tier, sent)
            r = await d.draft(s.session_id, r.position, 4, rollback_to=r.position - 4 + keep,
                              append=[(31 * i) % 200 + 1])
            per_round.append(scrape(slm_tier, sent) - count)
            assert len(r.tokens) == 4
        return first, per_round

    first, per_round = call(flow, slm_tier.grpc_address)
    assert first <= len(prompt), first  # the prompt once (less what the prefix cache holds)
    assert all(1 <= n <= 2 for n in per_round), per_round


def test_busy_loop_plugin_runs_in_every_engine_process(slm_tier):
    """The shm window plugin (patches/hilm_vllm_patches/shm_busy_loop.py) is active in the engine core and the
    worker, with the window --engine-busy-loop-ms gave."""
    found = [re.search(r"hilm: shm busy-loop window ([\d.]+) ms \(pid (\d+)\)", line)
             for line in slm_tier.head]
    windows = {float(m.group(1)) for m in found if m}
    pids = {int(m.group(2)) for m in found if m}
    engine_pids = {p.pid for p in slm_tier.descendants()}
    assert windows == {float(BUSY_LOOP_MS)}
    assert len(pids & engine_pids) >= 2, (pids, engine_pids)  # engine core + worker


def draft_rows(result):
    return [(t.token_id, t.uncertainty, t.ids.tolist()) for t in result.tokens]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_eight_concurrent_sessions_draft_what_one_at_a_time_drafts(slm_tier, temperature):
    """Drafts are batched by vLLM (no per-Draft RPC): same tokens, u and support as alone."""
    async def session(client, i):
        s = await client.open_session(PROMPT[:10 + i], SamplingSpec(temperature, seed=100 + i))
        rows, position = [], s.position
        for _ in range(3):
            r = await client.draft(s.session_id, position, 4)
            rows += draft_rows(r)
            position = r.position
        await client.close_session(s.session_id)
        return rows

    async def main(client):
        alone = [await session(client, i) for i in range(8)]
        together = await asyncio.gather(*(session(client, i) for i in range(8)))
        return alone, together

    alone, together = call(main, slm_tier.grpc_address)
    assert [len(r) for r in alone] == [12] * 8
    assert together == alone


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_fused_draft_equals_rollback_append_draft(slm_tier, temperature):
    async def run(client, fused: bool):
        s = await client.open_session(PROMPT, SamplingSpec(temperature, seed=21))
        base = s.position
        first = await client.draft(s.session_id, base, 4)
        keep, extra = base + 1, [11, 12, 13]
        if fused:
            second = await client.draft(s.session_id, first.position, 4, rollback_to=keep,
                                        append=extra)
        else:
            await client.rollback(s.session_id, keep)
            position = await client.append(s.session_id, keep, extra)
            second = await client.draft(s.session_id, position, 4)
        await client.close_session(s.session_id)
        return draft_rows(first), draft_rows(second), second.position

    async def main(client):
        return await run(client, False), await run(client, True)

    separate, fused = call(main, slm_tier.grpc_address)
    assert fused == separate and fused[2] == len(PROMPT) + 1 + 3 + 4


def test_fused_draft_changes_nothing_unless_it_all_checks_out(slm_tier):
    async def main(client):
        s = await client.open_session(PROMPT, SamplingSpec(0.8, seed=4))
        r = await client.draft(s.session_id, s.position, 4)
        bad = [dict(position=r.position + 1, rollback_to=r.position - 2, append=[1, 2]),
               dict(position=r.position, rollback_to=r.position + 1, append=[]),  # forward
               dict(position=r.position, rollback_to=r.position - 2, append=[1, 10**6])]
        codes = []
        for kw in bad:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.draft(s.session_id, max_tokens=2, **kw)
            codes.append(e.value.code())
        again = await client.draft(s.session_id, r.position, 2)  # still where it was
        await client.close_session(s.session_id)
        return codes, again.position - r.position

    codes, advanced = call(main, slm_tier.grpc_address)
    assert codes == [Code.FAILED_PRECONDITION, Code.FAILED_PRECONDITION, Code.INVALID_ARGUMENT]
    assert advanced == 2


def test_a_cancelled_draft_leaves_no_record_behind(slm_tier):
    """A client that cancels mid-Draft leaves no record in the API process or the worker, and
    its session stays where it was. (The tiny SLM drafts 48 tokens in tens of ms: the cancel is
    retried sooner until one lands before the draft finishes.)"""
    async def attempt(client, delay):
        s = await client.open_session(PROMPT, SamplingSpec(0.8, seed=5), max_tokens=60)
        task = asyncio.ensure_future(client.draft(s.session_id, s.position, 48))
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:  # still at the prompt (the cancel landed) or 48 further (the draft finished)?
            await client.draft(s.session_id, s.position, 1)
            landed = True
        except grpc.aio.AioRpcError as e:
            assert e.code() == Code.FAILED_PRECONDITION
            landed = False
        await client.close_session(s.session_id)
        return landed

    async def main(client):
        for delay in (0.03, 0.01, 0.003, 0.001, 0.0):
            if await attempt(client, delay):
                return True
        return False

    assert call(main, slm_tier.grpc_address), "no cancel landed before its draft finished"
    assert scrape(slm_tier, "hilm_drafter_waiting_drafts") == 0
    assert scrape(slm_tier, "hilm_drafter_worker_records") == 0


def test_a_dropped_draft_is_ended_by_the_next_draft_or_the_close(slm_tier):
    """The router drops a draft-ahead without cancelling its call (grpc.aio leaks memory per
    call cancelled in flight): a Draft with position 0 and rollback_to, or CloseSession, ends
    the running Draft here — it answers ABORTED and drafted nothing — and leaves no record.
    (Retried sooner until the second call lands while the first is still drafting.)"""
    async def attempt(client, delay, by_close):
        s = await client.open_session(PROMPT, SamplingSpec(0.8, seed=5), max_tokens=60)
        first = asyncio.ensure_future(client.draft(s.session_id, s.position, 48))
        await asyncio.sleep(delay)
        if by_close:
            await client.close_session(s.session_id)
        else:
            second = await client.draft(s.session_id, 0, 2, rollback_to=s.position)
            assert second.position == s.position + 2  # whatever the first one did
        try:
            await first
            landed = False
        except grpc.aio.AioRpcError as e:
            assert e.code() == Code.ABORTED and "superseded" in e.details(), e
            landed = True
        if not by_close:
            await client.close_session(s.session_id)
        return landed

    async def main(client):
        landed = {}
        for by_close in (False, True):
            for delay in (0.03, 0.01, 0.003, 0.001, 0.0):
                if await attempt(client, delay, by_close):
                    landed[by_close] = True
                    break
        return landed

    async def one_more(client):  # the worker reports the records it holds at each step
        s = await client.open_session(PROMPT, SamplingSpec(0.8, seed=6))
        await client.draft(s.session_id, s.position, 1)
        await client.close_session(s.session_id)

    assert call(main, slm_tier.grpc_address) == {False: True, True: True}
    call(one_more, slm_tier.grpc_address)
    assert scrape(slm_tier, "hilm_drafter_waiting_drafts") == 0
    assert scrape(slm_tier, "hilm_drafter_worker_records") == 0


def test_a_draft_after_an_unknown_outcome_cuts_back_whatever_the_session_holds(slm_tier):
    """position 0 with rollback_to: the client cancelled a Draft and cannot tell whether it
    went through; either way the session is cut back to rollback_to and drafts from there."""
    async def main(client):
        s = await client.open_session(PROMPT, SamplingSpec(0.8, seed=8))
        first = await client.draft(s.session_id, s.position, 4)
        again = await client.draft(s.session_id, 0, 4, rollback_to=s.position)  # held: +4
        third = await client.draft(s.session_id, 0, 4, rollback_to=s.position, append=[7])
        with pytest.raises(grpc.aio.AioRpcError) as e:  # without rollback_to, 0 is a position
            await client.draft(s.session_id, 0, 4)
        await client.close_session(s.session_id)
        return draft_rows(first), draft_rows(again), third.position - s.position, e.value.code()

    first, again, advanced, code = call(main, slm_tier.grpc_address)
    assert again == first and advanced == 5 and code == Code.FAILED_PRECONDITION


def test_min_tokens_masks_the_stop_tokens_in_q_until_then(slm_tier):
    """As vLLM's min_tokens: the session's stop ids (here the tokens the drafter would draw
    first, and EOS) are never drafted and have no mass in q before prompt + min_tokens
    (counted by position, so also after a rollback); from there on they are drafted again."""
    async def main(client):
        free = await client.open_session(PROMPT, SamplingSpec(0.0))
        plain = await client.draft(free.session_id, free.position, 6)
        await client.close_session(free.session_id)
        stops = sorted({t.token_id for t in plain.tokens[:2]})
        s = await client.open_session(PROMPT, SamplingSpec(0.0), max_tokens=32, min_tokens=3,
                                      stop_token_ids=stops)
        banned = await client.draft(s.session_id, s.position, 3)
        await client.close_session(s.session_id)
        # min_tokens = 1: the first position is banned; with the free draft's first token
        # appended (decided elsewhere), the next position is past the ban and drafts the free
        # session's second token again, a stop id
        s = await client.open_session(PROMPT, SamplingSpec(0.0), max_tokens=32, min_tokens=1,
                                      stop_token_ids=stops)
        first = await client.draft(s.session_id, s.position, 1)
        after = await client.draft(s.session_id, first.position, 1, rollback_to=s.position,
                                   append=[plain.tokens[0].token_id])
        await client.close_session(s.session_id)
        # T = 1 with the ban: q itself has no mass on the banned ids
        t1 = await client.open_session(PROMPT, SamplingSpec(1.0, seed=5), max_tokens=32,
                                       min_tokens=4, stop_token_ids=stops)
        sampled = await client.draft(t1.session_id, t1.position, 4)
        await client.close_session(t1.session_id)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.open_session(PROMPT, SamplingSpec(0.0), max_tokens=2, min_tokens=3)
        return stops, plain, banned, first, after, sampled, e.value

    stops, plain, banned, first, after, sampled, err = call(main, slm_tier.grpc_address)
    banned_ids = set(stops) | {1}  # the tiny family's EOS is 1
    assert plain.tokens[0].token_id in banned_ids  # the ban has something to change
    for t in banned.tokens + first.tokens + sampled.tokens:
        assert t.token_id not in banned_ids
        assert not banned_ids & set(t.ids.tolist()), "a stop token has mass in q before min_tokens"
    assert_valid_dists(banned)
    assert_valid_dists(sampled)
    assert after.tokens[0].token_id == plain.tokens[1].token_id  # a stop id, drafted again
    assert err.code() is Code.INVALID_ARGUMENT and "min_tokens" in err.details()

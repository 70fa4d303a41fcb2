"""Sessions that live in the engine (issue 21): one long-lived vLLM request per verifier session.

A real AsyncLLM (the tiny LLM, the verifier worker hook installed) and a real `Verifier` in this
process, so that what crosses into the engine can be read where it crosses: every request the
API process hands the engine core (`engine_core.add_request_async`) is recorded. Checked: a
Verify hands the engine only its new tokens on the session's one request; a cut back into a
full, cached block leaves no stale block in the prefix cache; many idle sessions on a small KV
cache are evicted, not let to exhaust it, and sessions evicted or preempted come back exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random

import numpy as np
import torch

from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.server.engine_session import ResidentSessions, kv_capacity_tokens
from hilm_vllm.verifier.core import Verifier, VerifierSettings
from hilm_vllm.verifier.session import VerifyCall
from hilm_vllm.verifier.tier import WORKER_EXTENSION

from tests.verifier.helpers import greedy_draft, heldout_prompts, next_probs

OWNER = "test"
GREEDY = SamplingSpec(temperature=0.0)
BLOCK = 32  # the engine's block size (CPU: a multiple of 32)


@contextlib.asynccontextmanager
async def verifier_on(model_dir, kv_bytes: int = 64 << 20, max_num_seqs: int | None = None):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from hilm_vllm.server import engine_env

    saved = dict(os.environ)
    engine_env.prepare(None)  # as hilm-serve does: the shm busy-loop window 0 on CPU

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(model_dir), dtype="float32", block_size=BLOCK, max_model_len=1024,
        kv_cache_memory_bytes=kv_bytes, enable_prefix_caching=True, enforce_eager=True,
        # vLLM's Prometheus metrics would clash with the router's in this test process
        disable_log_stats=True,
        **({} if max_num_seqs is None else {"max_num_seqs": max_num_seqs}),
        worker_extension_cls=WORKER_EXTENSION))
    try:
        verifier = await Verifier.start(engine, VerifierSettings(max_sessions=256,
                                                                 max_sessions_per_client=256))
        try:
            yield verifier
        finally:
            verifier.channel.close()
    finally:
        engine.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def record_requests(engine) -> list[tuple[str, bool, int]]:
    """Every request this process hands the engine core from now on, as it is handed over:
    (request id, resumable, number of prompt tokens)."""
    seen = []
    add = engine.engine_core.add_request_async

    async def spy(request):
        seen.append((request.request_id, request.resumable, len(request.prompt_token_ids)))
        return await add(request)

    engine.engine_core.add_request_async = spy
    return seen


def one_hot(token: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    return (token,), (1.0,)


async def verify(verifier: Verifier, sid: str, position: int, draft: list[int],
                 dists=None, append: tuple[int, ...] = (), target_probs: bool = False):
    dists = dists or [one_hot(t) for t in draft]
    return await verifier.verify(OWNER, sid, VerifyCall(position, tuple(append), tuple(draft),
                                                        tuple(dists), target_probs))


def test_a_verify_hands_the_engine_only_its_new_tokens(tiny_zoo):
    """A 200-token prompt, then 6 rounds of 4 drafts (half of them the LLM's greedy tokens, so
    some are accepted and some rejected): the first request carries the context and the draft;
    every later one goes to the same engine request and carries at most the correction and the
    new draft (n + 1 tokens), never the history. And the tokens are vLLM's greedy tokens."""
    prompt = (heldout_prompts(tiny_zoo, 1, 200)[0] * 4)[:200]
    n = 4

    async def main():
        async with verifier_on(tiny_zoo.llm) as verifier:
            seen = record_requests(verifier.engine)
            opened = await verifier.open_session(OWNER, prompt, GREEDY)
            history, rng = list(prompt), random.Random(7)
            for _ in range(6):
                draft = greedy_draft(tiny_zoo.llm, history, n)
                wrong = rng.randrange(n)  # spoil one draft token: the rest after it is rejected
                draft[wrong] = (draft[wrong] + 1) % 100
                reply = await verify(verifier, opened.session_id, len(history), draft)
                history += [*draft[:reply.num_accepted], reply.next_token]
                assert reply.num_accepted == wrong
            await verifier.close_session(OWNER, opened.session_id)
            return seen, history

    seen, history = asyncio.run(main())
    chunks = [r for r in seen if r[1]]
    assert len(chunks) == 6, seen
    assert len({r[0] for r in chunks}) == 1, "one engine request per session"
    assert chunks[0][2] == len(prompt) + n
    sizes = [r[2] for r in chunks[1:]]
    assert all(size <= n + 1 for size in sizes), sizes
    assert history == prompt + greedy_draft(tiny_zoo.llm, prompt, len(history) - len(prompt))


def test_a_cut_into_a_full_cached_block_leaves_no_stale_block(tiny_zoo):
    """Session A verifies 4 drafts whose first two fill block 0 (positions 30, 31): the block
    is full and cached under the hash of context + those drafts. All are rejected (T > 0, a
    one-hot q on a token outside the target's top-k), so A's next Verify cuts back to 30, into
    that block, and writes other tokens there. Session B opens on context + A's rejected drafts
    + 3 tokens before A's cut (B shares block 0: A must leave it to B and recompute its head),
    session C the same after it (block 0 is a prefix-cache hit for C exactly when its hash
    still names the drafts). The p rows of A after the cut, of B and of C must be the model's
    own (transformers, float32): a stale block would hold other tokens' KV and move them."""
    spec = SamplingSpec(temperature=1.0, top_k=2)
    context = (heldout_prompts(tiny_zoo, 1, 30)[0] * 2)[:30]

    def outside_top_k(ids):
        p = next_probs(tiny_zoo.llm, ids, spec)
        return int(torch.argmin(p + (p > 0) * 10))  # a token with p = 0

    async def probe(verifier, prompt):
        """A new session on `prompt`: its p rows of 2 greedy draft tokens."""
        opened = await verifier.open_session(OWNER, prompt, spec)
        draft = greedy_draft(tiny_zoo.llm, prompt, 2)
        reply = await verify(verifier, opened.session_id, len(prompt), draft, target_probs=True)
        return prompt, draft, reply.target_probs

    async def main():
        async with verifier_on(tiny_zoo.llm) as verifier:
            a = await verifier.open_session(OWNER, context, spec)
            rejected = [outside_top_k(context)]
            for _ in range(3):
                rejected.append((rejected[-1] + 1) % 100)
            reply = await verify(verifier, a.session_id, 30, rejected)
            assert reply.num_accepted == 0
            shared = context + rejected[:2] + [5, 6, 7]
            probes = [await probe(verifier, shared)]  # B: holds block 0 with A
            a_prompt = context + [reply.next_token]
            draft = greedy_draft(tiny_zoo.llm, a_prompt, 3)
            after = await verify(verifier, a.session_id, 31, draft, target_probs=True)
            probes.append((a_prompt, draft, after.target_probs))  # A: cut into block 0
            probes.append(await probe(verifier, shared))  # C: after A's cut
            return probes

    for prompt, draft, got in asyncio.run(main()):
        want = [float(next_probs(tiny_zoo.llm, prompt + draft[:i], spec)[t])
                for i, t in enumerate(draft)]
        assert len(got) == len(want)
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_idle_sessions_are_evicted_and_every_session_stays_exact(tiny_zoo):
    """A KV cache of 2,048 tokens (64 blocks) and 24 sessions of ~120 tokens each (~2,900 in
    all), all verified concurrently for 3 greedy rounds, then each once more after the others
    ran: idle sessions beyond half the cache are evicted (vLLM does not preempt a request that
    waits for its next chunk: held, they would stall the cache), vLLM preempts running ones
    when the running chunks need more, and every session still emits exactly the LLM's greedy
    tokens. Stalls show as this test hanging."""
    prompts = [(p * 4)[k:k + 110] for p in heldout_prompts(tiny_zoo, 8, 110) for k in (0, 7, 13)]
    n = 4

    async def session(verifier, prompt, rounds):
        opened = await verifier.open_session(OWNER, prompt, GREEDY)
        history = list(prompt)
        for _ in range(rounds):
            draft = greedy_draft(tiny_zoo.llm, history, n)
            draft[-1] = (draft[-1] + 1) % 100  # the last one is rejected
            reply = await verify(verifier, opened.session_id, len(history), draft)
            history += [*draft[:reply.num_accepted], reply.next_token]
        return opened.session_id, history

    async def main():
        async with verifier_on(tiny_zoo.llm, kv_bytes=4 << 20) as verifier:
            capacity = kv_capacity_tokens(verifier.engine)
            assert 1024 <= capacity <= 4096 and verifier.resident.max_tokens <= capacity // 2
            done = await asyncio.wait_for(
                asyncio.gather(*(session(verifier, p, 3) for p in prompts)), 120)
            evicted = verifier.resident.evicted
            held = verifier.resident.held_tokens
            again = []
            for sid, history in done:  # once more each, one at a time
                draft = greedy_draft(tiny_zoo.llm, history, n)
                reply = await verify(verifier, sid, len(history), draft)
                again.append(history + [*draft[:reply.num_accepted], reply.next_token])
            return capacity, evicted, held, again, verifier.resident.stats()

    capacity, evicted, held, again, stats = asyncio.run(main())
    assert evicted > 0, stats
    assert held <= capacity // 2, (held, capacity)
    assert stats["reopened"] > 0, stats
    for prompt, history in zip(prompts, again):
        assert history == prompt + greedy_draft(tiny_zoo.llm, prompt, len(history) - len(prompt))


def test_sessions_with_a_request_never_outnumber_the_engine_seats():
    """vLLM counts a request waiting for its next chunk against max-num-seqs: the pool keeps
    at most that many sessions with a request. A session that needs a seat evicts the least
    recently used idle one; busy ones are never evicted (the new one then waits in vLLM's queue)
    and a chunk that ends while the seats are over-subscribed gives its seat back."""
    pool = ResidentSessions(engine=None, max_tokens=0, max_sessions=2)
    a = pool.get("a")
    pool.get("b")
    assert len(pool) == 2 and pool.evicted == 0
    pool.get("c")  # a is the least recently used idle session
    assert list(pool._lru) == ["b", "c"] and a.closed and pool.evicted == 1
    pool.get("b")  # already has its seat: nothing moves
    assert list(pool._lru) == ["c", "b"] and pool.evicted == 1

    class Busy:  # a chunk in flight
        def done(self):
            return False
    pool._lru["c"]._running = pool._lru["b"]._running = Busy()
    pool.get("d")  # every seat busy: d goes over, to wait in vLLM's queue
    assert list(pool._lru) == ["c", "b", "d"] and pool.evicted == 1
    pool._lru["c"]._running = None  # c's chunk ended: its seat goes to the waiting one
    pool.trim()
    assert list(pool._lru) == ["b", "d"] and pool.evicted == 2
    assert pool.stats()["max_resident_sessions"] == 2


def test_more_sessions_than_seats_never_stall_and_stay_exact(tiny_zoo):
    """max-num-seqs 4 and 10 sessions: each opened and verified in turn (before the pool kept
    the sessions within the seats, the fifth waited forever behind four idle requests), then
    all at once for 2 greedy rounds, then each once more: every session emits exactly the LLM's
    greedy tokens, and at most 4 hold a request at the end. Stalls show as a timeout."""
    prompts = [(p * 4)[k:k + 60] for p in heldout_prompts(tiny_zoo, 5, 60) for k in (0, 7)]
    n = 3

    async def round_(verifier, sid, history, spoil=True):
        draft = greedy_draft(tiny_zoo.llm, history, n)
        if spoil:
            draft[-1] = (draft[-1] + 1) % 100
        reply = await verify(verifier, sid, len(history), draft)
        return history + [*draft[:reply.num_accepted], reply.next_token]

    async def main():
        async with verifier_on(tiny_zoo.llm, max_num_seqs=4) as verifier:
            assert verifier.resident.max_sessions == 4
            sessions = []
            for prompt in prompts:  # one after the other: the earlier ones sit idle
                opened = await verifier.open_session(OWNER, prompt, GREEDY)
                history = await asyncio.wait_for(
                    round_(verifier, opened.session_id, list(prompt)), 60)
                sessions.append([opened.session_id, history])

            async def two(entry):
                for _ in range(2):
                    entry[1] = await round_(verifier, *entry)
            await asyncio.wait_for(asyncio.gather(*(two(e) for e in sessions)), 120)
            for entry in sessions:
                entry[1] = await asyncio.wait_for(round_(verifier, *entry, spoil=False), 60)
            return sessions, verifier.resident.stats()

    sessions, stats = asyncio.run(main())
    assert stats["resident_sessions"] <= 4 and stats["evicted"] >= 6, stats
    for prompt, (_, history) in zip(prompts, sessions):
        assert history == prompt + greedy_draft(tiny_zoo.llm, prompt, len(history) - len(prompt))


def test_the_verifications_of_a_step_are_decided_in_one_batched_pass(tiny_zoo):
    """Six sessions (greedy, T = 1 with top-k, T = 0.7 with top-p: three sampling specs) verify
    at once, three rounds: each result equals the one the same session gets verifying alone
    (tokens, acceptances, target p within float tolerance), and the hook computed the logits
    of the step's verifications together (fewer compute_logits calls than verifications)."""
    prompts = heldout_prompts(tiny_zoo, 6, 40)
    specs = [GREEDY, SamplingSpec(1.0, top_k=4, seed=3), SamplingSpec(0.7, top_p=0.8, seed=9)]

    async def session(verifier, i):
        prompt, spec = prompts[i], specs[i % 3]
        opened = await verifier.open_session(OWNER, prompt, spec)
        history, out = list(prompt), []
        for r in range(3):
            draft = greedy_draft(tiny_zoo.llm, history, 3)
            draft[(i + r) % 3] = (draft[(i + r) % 3] + 1) % 100  # one spoiled token
            reply = await verify(verifier, opened.session_id, len(history), draft,
                                 target_probs=True)
            history += [*draft[:reply.num_accepted], reply.next_token]
            out.append((reply.num_accepted, reply.next_token, reply.target_probs))
        await verifier.close_session(OWNER, opened.session_id)
        return out

    async def main():
        async with verifier_on(tiny_zoo.llm) as verifier:
            alone = [await session(verifier, i) for i in range(6)]
            (before,) = await verifier.engine.collective_rpc("hilm_verify_stats")
            together = await asyncio.gather(*(session(verifier, i) for i in range(6)))
            (after,) = await verifier.engine.collective_rpc("hilm_verify_stats")
            return alone, together, before, after

    alone, together, before, after = asyncio.run(main())
    for a, t in zip(alone, together):
        assert [x[:2] for x in a] == [x[:2] for x in t]
        for x, y in zip(a, t):
            np.testing.assert_allclose(x[2], y[2], rtol=1e-4, atol=1e-6)
    verified = after["verified"] - before["verified"]
    calls = after["logits_calls"] - before["logits_calls"]
    assert verified == 18 and calls < verified, (verified, calls)

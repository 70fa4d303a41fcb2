"""Exactness of `hilm-serve --tier llm` over real gRPC: what it emits is the verifier model's own
sampling distribution at T > 0 (one token; and three tokens after a rollback and a redraft),
and exactly vLLM's greedy tokens at T = 0."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.verifier.client import VerifierClient

from tests.verifier.helpers import (BLOCK_TARGET, CONTEXT, JointModels, check_joint,
                                    chisquare_pvalue, greedy_draft, heldout_prompts, next_probs,
                                    served, sparse)

MASTER_SEED = 20240607
P_VALUE = 0.01
TRIALS = 1000  # one session + one 1-token Verify each, 32 at a time: ~20 s on 2 busy cores
CONCURRENCY = 32
TARGET = SamplingSpec(temperature=0.7, top_k=16)  # a concentrated p: 16 bins for the chi-square
DRAFTER = SamplingSpec(temperature=2.0, top_k=24)  # the SLM, flatter and wider: q != p


@pytest.fixture(scope="module")
def llm(tiny_zoo):
    with served("llm", tiny_zoo.llm) as proc:
        yield proc


def one_round_sessions(llm, drafts: list[list[int]], dists: list) -> list:
    """One fresh session per trial (seed MASTER_SEED + i), one Verify each, 32 in flight."""
    async def trial(client, i, gate):
        async with gate:
            s = await client.open_session(CONTEXT, SamplingSpec(
                TARGET.temperature, TARGET.top_k, seed=MASTER_SEED + i))
            r = await client.verify(s.session_id, s.position, drafts[i], dists[:len(drafts[i])])
            await client.close_session(s.session_id)
            return r

    async def run():
        gate = asyncio.Semaphore(CONCURRENCY)
        async with VerifierClient(llm.grpc_address) as client:
            return await asyncio.gather(*(trial(client, i, gate) for i in range(len(drafts))))

    return asyncio.run(run())


def test_first_emitted_token_follows_the_verifiers_distribution(llm, tiny_zoo):
    p = next_probs(tiny_zoo.llm, CONTEXT, TARGET).double().numpy()  # [V]
    q = next_probs(tiny_zoo.slm, CONTEXT, DRAFTER).double().numpy()  # [V]
    alpha = float(np.minimum(p, q).sum())
    assert 0.1 < alpha < 0.9, f"setup: acceptance {alpha:.2f} would test one path only"
    drafts = np.random.default_rng(MASTER_SEED).choice(q.size, size=TRIALS, p=q / q.sum())
    replies = one_round_sessions(llm, [[int(x)] for x in drafts], [sparse(torch.tensor(q))])
    first = np.array([int(drafts[i]) if r.num_accepted else r.next_token
                      for i, r in enumerate(replies)])
    counts = np.bincount(first, minlength=p.size)
    assert counts[p == 0].sum() == 0, "emitted a token outside the verifier's top-k"
    assert chisquare_pvalue(counts, p) > P_VALUE
    accept_rate = np.mean([r.num_accepted for r in replies])
    se = (alpha * (1 - alpha) / TRIALS) ** 0.5
    assert abs(accept_rate - alpha) < 4 * se, (accept_rate, alpha)


def test_next_token_of_an_empty_block_is_a_sample_of_p(llm, tiny_zoo):
    """With no draft the next token is the bonus token alone: the hook's draw from its own row
    at the last position, which must follow the same temperature / top-k transform as p."""
    p = next_probs(tiny_zoo.llm, CONTEXT, TARGET).double().numpy()  # [V]
    replies = one_round_sessions(llm, [[]] * (TRIALS // 2), [])
    counts = np.bincount([r.next_token for r in replies], minlength=p.size)
    assert counts[p == 0].sum() == 0, "sampled a token outside the verifier's top-k"
    assert chisquare_pvalue(counts, p) > P_VALUE
    assert all(r.num_accepted == 0 and r.position == len(CONTEXT) + 1 for r in replies)


GREEDY = SamplingSpec(temperature=0.0)
NEW_TOKENS = 40
K = 4


async def drive_greedy(client, slm_dir, prompt: list[int]) -> tuple[list[int], int, int]:
    """A session at T = 0 driven by the SLM's greedy drafts -> (tokens, accepted, drafted)."""
    s = await client.open_session(prompt, GREEDY)
    tokens, accepted, drafted = list(prompt), 0, 0
    while len(tokens) - len(prompt) < NEW_TOKENS:
        draft = await asyncio.to_thread(greedy_draft, slm_dir, tokens, K)
        r = await client.verify(s.session_id, len(tokens), draft, [([x], [1.0]) for x in draft])
        tokens += [*draft[:r.num_accepted], r.next_token]
        assert r.position == len(tokens)
        accepted, drafted = accepted + r.num_accepted, drafted + K
    await client.close_session(s.session_id)
    return tokens[len(prompt):len(prompt) + NEW_TOKENS], accepted, drafted


async def generate_tokens(client, prompt: list[int]) -> list[int]:
    out = []
    async for chunk in client.generate(prompt, GREEDY, max_tokens=NEW_TOKENS, ignore_eos=True):
        out += chunk.token_ids
    return out


@pytest.fixture(scope="module")
def prompts(tiny_zoo):
    return heldout_prompts(tiny_zoo, 4)


def test_greedy_session_reproduces_vllm_generate(llm, tiny_zoo, prompts):
    async def run():
        async with VerifierClient(llm.grpc_address) as client:
            return (await drive_greedy(client, tiny_zoo.slm, prompts[0]),
                    await generate_tokens(client, prompts[0]))

    (tokens, accepted, drafted), reference = asyncio.run(run())
    assert len(reference) == NEW_TOKENS
    assert tokens == reference
    assert 0 < accepted < drafted, "the drafts should be partly accepted, partly corrected"


def test_eight_concurrent_sessions_match_one_by_one(llm, tiny_zoo, prompts):
    prompts = prompts * 2  # sessions with identical content too: their caches must not mix

    async def run():
        async with VerifierClient(llm.grpc_address) as client:
            alone = [await drive_greedy(client, tiny_zoo.slm, p) for p in prompts]
            together = await asyncio.gather(*(drive_greedy(client, tiny_zoo.slm, p)
                                              for p in prompts))
            return alone, together

    alone, together = asyncio.run(run())
    assert [a[0] for a in alone] == [t[0] for t in together]
    assert alone[0][0] == alone[4][0]


def test_rates_of_the_expected_distribution_are_not_degenerate(tiny_zoo):
    """Guards the chi-square's setup: the verifier's p spreads over many bins."""
    p = next_probs(tiny_zoo.llm, CONTEXT, TARGET)
    assert int((p * TRIALS >= 5).sum()) >= 4 and float(p.max()) < 0.9
    assert torch.isclose(p.sum(), torch.tensor(1.0))


# ---- rollback then redraft, over a served tier and its sessions ------------------------------

ROLLBACK_SEED = 20240611
ROLLBACK_TRIALS = 1000  # ~4.5 RPCs each (open, 2-3 Verify, close), 32 in flight: 15-90 s
# 31 tokens: context + C fill the first KV block exactly, so a redraft after C reuses round 1's
# cached block whenever round 1 drafted C (and the rows it needs are then served from the
# prefix cache: the tier's recompute-without-cache path runs too).
LONG_CONTEXT = CONTEXT + CONTEXT[1:] + CONTEXT[1:5]


def test_rollback_then_redraft_pairs_and_triples(llm, tiny_zoo):
    """A seeded session per trial. Round 1: k = 2 drafts, the first from 0.5 q_slm + 0.5 on C
    (C is over-proposed: often drafted and rejected). Another tier overrules the first emitted
    token unless it is C: the session is cut back to the context (`rollback_to`), C is appended
    and a new block of k = 2 SLM drafts follows it. More rounds until 3 tokens follow C.
    Whichever way a trial went, the 3 tokens after C must follow p's joint given context + C
    at T = 1 with top-k and top-p (`helpers.check_joint`: p-value > 0.001; power: the same
    counts reject the joint a session that lost the appended C would emit, p-value < 1e-6).
    1000 trials resolve a wrong context, not a slightly wrong temperature: the in-engine block
    tests (test_verifier_exactness_blocks.py) do that."""
    models = JointModels(tiny_zoo, LONG_CONTEXT)
    assert len(LONG_CONTEXT) + 1 == 32
    c = int(np.argsort(models.p(()))[-2])  # the second most likely first token
    first_q = 0.5 * models.slm(()) + 0.5 * np.eye(models.slm(()).size)[c]
    paths = {"kept": 0, "rolled back": 0, "C drafted and rejected": 0}

    def draft(prefix, rng, q_first=None):
        """k = 2 tokens from the SLM's q after context + prefix (cached: no await needed)."""
        tokens, dists = [], []
        for j in range(2):
            q = q_first if j == 0 and q_first is not None else models.slm(tuple(prefix + tokens))
            tokens.append(int(rng.choice(q.size, p=q / q.sum())))
            dists.append(sparse(torch.tensor(q, dtype=torch.float32)))
        return tokens, dists

    async def trial(client, i, gate):
        rng = np.random.default_rng([ROLLBACK_SEED, i])  # per trial: order-independent
        async with gate:
            s = await client.open_session(LONG_CONTEXT, SamplingSpec(
                BLOCK_TARGET.temperature, BLOCK_TARGET.top_k, BLOCK_TARGET.top_p,
                seed=ROLLBACK_SEED + i))
            tokens, dists = draft([], rng, first_q)
            r = await client.verify(s.session_id, s.position, tokens, dists)
            held = [*tokens[:r.num_accepted], r.next_token]
            position = r.position
            if held[0] != c:  # overruled: cut back to the context, append C, redraft
                paths["rolled back"] += 1
                paths["C drafted and rejected"] += tokens[0] == c
                tokens, dists = draft([c], rng)
                r = await client.verify(s.session_id, position, tokens, dists,
                                        append=[c], rollback_to=len(LONG_CONTEXT))
                held = [c, *tokens[:r.num_accepted], r.next_token]
                position = r.position
            else:
                paths["kept"] += 1
            while len(held) < 4:
                tokens, dists = draft(held, rng)
                r = await client.verify(s.session_id, position, tokens, dists)
                held += [*tokens[:r.num_accepted], r.next_token]
                position = r.position
            assert position == len(LONG_CONTEXT) + len(held)
            await client.close_session(s.session_id)
            return tuple(held[1:4])

    async def run():
        gate = asyncio.Semaphore(CONCURRENCY)
        async with VerifierClient(llm.grpc_address) as client:
            return await asyncio.gather(*(trial(client, i, gate)
                                          for i in range(ROLLBACK_TRIALS)))

    t0 = time.perf_counter()
    sequences = asyncio.run(run())
    assert paths["kept"] > 50 and paths["rolled back"] > ROLLBACK_TRIALS / 2, paths
    assert paths["C drafted and rejected"] > 100, paths
    # power: the joint a session that lost the appended C would emit
    pvalues = check_joint(models, sequences, after=(c,), wrong=(BLOCK_TARGET, ()))
    print(f"rollback: {paths}, p-values {pvalues}, {time.perf_counter() - t0:.1f} s")

"""The worker hook (`VerifyHook`) on a scripted runner: no vLLM engine, every number known.

A fake V1 runner gives the hook what vLLM's gives it after the sampler: the step's hidden states,
a `compute_logits` (here a fixed random linear map), the batch bookkeeping and the engine's own
sampled token. That token is scripted to be one the engine could have drawn from ITS batch
logits on a GPU (bf16, another matmul shape, FlashInfer's sampler) but that has probability 0 in
the row the hook computes and ships: the case that made cascade fail with "probability 0 in the
verifier's own p". The hook must emit a token drawn from the row it ships, whatever the engine
sampled.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hilm_vllm.sampling import SamplingSpec, processed_probs, to_sparse
from hilm_vllm.uncertainty import UncertaintyConfig
from hilm_vllm.verifier.wire import EmitArgs, VerifyArgs, unpack
from hilm_vllm.verifier.worker import VerifyHook, decide
from tests.verifier.fake_device import fake_device, is_on_device, on_device, to_cpu

V, H = 40, 8
SPEC = SamplingSpec(1.0, top_k=6, top_p=0.9)
CONTEXT = [3, 17, 5, 29, 11]
EMIT = EmitArgs(UncertaintyConfig(num_samples=10), noise_seed=5)


class FakeRunner:
    """What `VerifyHook` reads of vLLM 0.32's GPUModelRunner, for one request in the batch."""

    def __init__(self, weight: torch.Tensor, device: str = "cpu"):
        self.device = torch.device(device)
        self.model = SimpleNamespace(compute_logits=lambda h: h @ weight)  # [T, H] -> [T, V]
        self.requests, self.booked = {}, []
        self.input_batch = SimpleNamespace(req_id_to_index={})
        self.query_start_loc = SimpleNamespace(np=np.zeros(2, dtype=np.int32))

    def execute_model(self, *args, **kwargs):
        return None

    def _bookkeeping_sync(self, scheduler_output, sampler_output, logits, hidden_states,
                          num_scheduled_tokens):
        self.booked.append(sampler_output.sampled_token_ids.clone())
        return self.booked[-1]


def weight(seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(H, V, generator=torch.Generator().manual_seed(seed)) * scale


def hidden(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(length, H, generator=torch.Generator().manual_seed(seed))


def rows_of(w: torch.Tensor, h: torch.Tensor, n: int) -> torch.Tensor:
    """The hook's p at the n draft positions and the bonus position: [n + 1, V]."""
    return processed_probs(h[len(h) - n - 1:] @ w, SPEC)


def step(runner: FakeRunner, hook: VerifyHook, prompt: list[int], args: VerifyArgs,
         h: torch.Tensor, engine_token: int, to_device=lambda t: t):
    """One engine step that prefills the whole prompt, with the engine's sample scripted."""
    runner.requests["r"] = SimpleNamespace(
        prompt_token_ids=prompt, num_computed_tokens=0,
        sampling_params=SimpleNamespace(extra_args=args.to_extra_args()))
    runner.input_batch.req_id_to_index = {"r": 0}
    runner.query_start_loc.np[:] = [0, len(prompt)]
    sampled = to_device(torch.tensor([[engine_token]]))
    sampler_output = SimpleNamespace(sampled_token_ids=sampled)
    hook.bookkeeping_sync(SimpleNamespace(num_scheduled_tokens={"r": len(prompt)}),
                          sampler_output, None, to_device(h), len(prompt))
    return hook.results.pop(args.key), int(to_cpu(runner.booked[-1])[0, 0])


def all_accepted_block(w, h, n):
    """Drafts = the argmax of each of the hook's rows, q = those rows: accepted w.p. 1."""
    p = rows_of(w, h, n)
    draft = [int(r.argmax()) for r in p[:n]]
    return draft, [to_sparse(r) for r in p[:n]], p


def test_the_bonus_is_drawn_from_the_row_the_hook_ships_not_the_engines_sample():
    w, n = weight(), 2
    h = hidden(len(CONTEXT) + n)
    draft, dists, p = all_accepted_block(w, h, n)
    zero = [t for t in range(V) if p[n, t] == 0]  # tokens outside the bonus row's top-k/top-p
    runner = FakeRunner(w)
    hook = VerifyHook(runner)
    for seed in range(20):
        args = VerifyArgs.build(f"k{seed}", SPEC, seed, dists, EMIT)
        result, emitted = step(runner, hook, CONTEXT + draft, args, h, zero[seed % len(zero)])
        assert result.num_accepted == n and result.recovered is None
        bonus = result.emitted[-1]
        # the shipped row: the hook's p truncated (EmitArgs.truncation), float16 weights
        ids, probs = unpack(bonus.ids, "<i4"), unpack(bonus.probs, "<f2").astype(np.float64)
        assert emitted == bonus.token, "the engine must emit the token the hook ships"
        assert bonus.token in ids.tolist() and probs[ids.tolist().index(bonus.token)] > 0, \
            f"bonus {bonus.token} has probability 0 in the shipped row"
        kept = p[n, ids].double().numpy()
        assert (kept > 0).all() and kept.sum() >= 1 - EMIT.truncation.eps - 1e-6
        assert np.allclose(probs / probs.sum(), kept / kept.sum(), rtol=2e-3)


def test_an_empty_block_emits_a_sample_of_the_shipped_row():
    w = weight(3)
    h = hidden(len(CONTEXT), 4)
    p = rows_of(w, h, 0)[0]
    zero = int((p == 0).nonzero()[0])
    runner = FakeRunner(w)
    hook = VerifyHook(runner)
    result, emitted = step(runner, hook, CONTEXT, VerifyArgs.build("e", SPEC, 9, [], EMIT), h,
                           zero)
    assert result.num_accepted == 0 and p[emitted] > 0
    assert [e.token for e in result.emitted] == [emitted]


def test_the_hooks_bonus_follows_the_shipped_row():
    """`decide` (the hook's pure part) over many draw seeds: the bonus token is distributed as
    row n (chi-square, p-value > 0.01; bins with an expected count under 5 pooled)."""
    w, n, trials = weight(5, scale=0.3), 3, 3000
    h = hidden(len(CONTEXT) + n, 6)
    draft, dists, p = all_accepted_block(w, h, n)
    assert int((p[n] * trials >= 5).sum()) >= 4, "setup: the bonus row should spread"
    rows = dict(enumerate(p))
    counts = np.zeros(V)
    for seed in range(trials):
        args = VerifyArgs.build(f"s{seed}", SPEC, seed, dists)
        outcome = decide(rows, args, draft)
        assert outcome.num_accepted == n
        counts[outcome.bonus] += 1
    expected = trials * p[n].double().numpy() / float(p[n].double().sum())
    assert counts[expected == 0].sum() == 0
    big = expected >= 5
    obs, exp = np.append(counts[big], counts[~big].sum()), np.append(expected[big],
                                                                     expected[~big].sum())
    assert chisquare(obs[exp > 0], exp[exp > 0]).pvalue > 0.01


def test_the_draws_replay_from_the_seed():
    """Draw order: n float32 uniforms, then one float64 uniform for the recovered or bonus
    token, all from a CPU generator seeded with draw_seed (`rejection` module docstring)."""
    w, n = weight(7), 2
    h = hidden(len(CONTEXT) + n, 8)
    draft, dists, p = all_accepted_block(w, h, n)
    for seed in range(10):
        outcome = decide(dict(enumerate(p)), VerifyArgs.build("d", SPEC, seed, dists), draft)
        g = torch.Generator().manual_seed(seed)
        torch.rand(n, generator=g)
        u = float(torch.rand(1, generator=g, dtype=torch.float64))
        cdf = np.cumsum(p[n].double().numpy())
        assert outcome.bonus == int(np.searchsorted(cdf, u * cdf[-1], side="right"))


@pytest.mark.parametrize("greedy", [False, True])
def test_the_hook_keeps_its_work_on_the_runners_device(greedy):
    """The hook on a fake device (tests/verifier/fake_device.py): hidden states, logits, rows and the
    sampled-token tensor on the device; the wire's q and the draw generator on the CPU."""
    spec = SamplingSpec(0.0) if greedy else SPEC
    w, n = weight(9), 3
    h = hidden(len(CONTEXT) + n, 10)
    draft, dists, _ = all_accepted_block(w, h, n)
    draft[1] = (draft[1] + 1) % V  # a likely rejection at 1, so the residual runs too
    dists[1] = ([draft[1], draft[0]], [0.5, 0.5])
    runner = FakeRunner(on_device(w), device="meta")
    hook = VerifyHook(runner)
    expected_runner = FakeRunner(w)
    expected_hook = VerifyHook(expected_runner)
    for seed in range(6):
        args = VerifyArgs.build(f"g{seed}", spec, seed, dists, EMIT)
        with fake_device():
            got, token = step(runner, hook, CONTEXT + draft, args, h, 0, on_device)
            assert is_on_device(runner.booked[-1])
        expected, expected_token = step(expected_runner, expected_hook, CONTEXT + draft, args,
                                        h, 0)
        assert (got.num_accepted, got.recovered, token) == \
            (expected.num_accepted, expected.recovered, expected_token)
        assert got.emitted == expected.emitted

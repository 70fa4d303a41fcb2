"""Every pure tensor function keeps its work on the device of the tensors it is given.

On a GPU tier the logits rows live on the GPU while the draws come from CPU generators (so that
a seed means the same draws on every device). A function that mixes the two crashes the engine
at its first drafted or verified token. No GPU here, so two stand-ins for "another device":

1. Real `meta` tensors, for functions whose output shape does not depend on values: torch
   refuses to mix meta and CPU operands ("Tensor on device cpu is not on the expected device
   meta!"), exactly like CUDA; the output must come back on meta.
2. `tests.verifier.fake_device` for functions that need values (`int(t)`, `topk` with a tensor k,
   boolean indexing, multinomial): tensors that report `device == meta` but hold CPU data, under
   a dispatch mode that raises on the same mixes CUDA raises on (CPU operand of >= 1 dim, CPU
   generator for a device output). Values are real, so each result is also compared with the
   plain CPU run: moving the work must not change the numbers or the draws.
"""

from __future__ import annotations

import math

import pytest
import torch

from hilm_vllm.rejection import (SparseRows, accept_mask, first_rejection, sample_categorical,
                                 sample_residual, verify_block)
from hilm_vllm.sampling import SamplingSpec, processed_probs, to_sparse
from hilm_vllm.uncertainty import (Gate, Perturbation, UncertaintyConfig, disagreement,
                                   draw_samples, entropy_gate, max_prob_gate, perturbed_samples,
                                   temperatures, varentropy_gate)
from tests.verifier.fake_device import fake_device, is_on_device, on_device, to_cpu

META = torch.device("meta")
V = 64
SPECS = [SamplingSpec(1.0), SamplingSpec(0.7, top_k=5), SamplingSpec(1.0, top_p=0.8),
         SamplingSpec(1.3, top_k=9, top_p=0.6), SamplingSpec(0.0)]
SPEC_IDS = ["T", "top-k", "top-p", "top-k+top-p", "greedy"]


def logits(rows: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def cpu_gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- 1. meta: shape-only functions --------------------------------------------------------

@pytest.mark.parametrize("perturbation", list(Perturbation))
def test_draw_samples_on_meta_logits_returns_meta(perturbation):
    """The K temperatures and uniforms are drawn on a CPU generator; the K x V work is not."""
    cfg = UncertaintyConfig(num_samples=20, perturbation=perturbation)
    out = draw_samples(torch.empty(V, device=META), cfg, seed=3)
    assert out.device == META and out.shape == (20,) and out.dtype == torch.int64


def test_perturbed_samples_moves_cpu_draws_to_the_logits_device():
    cfg = UncertaintyConfig(num_samples=8)
    g = cpu_gen()
    thetas = temperatures(cfg, g)  # CPU, as draw_samples makes them
    uniforms = torch.rand(8, generator=g, dtype=torch.float64)
    out = perturbed_samples(torch.empty(V, device=META), thetas, uniforms)
    assert out.device == META and out.shape == (8,)


@pytest.mark.parametrize("gate", [entropy_gate, varentropy_gate, max_prob_gate])
def test_token_free_gates_on_meta(gate):
    out = gate(torch.empty(3, V, device=META))
    assert out.device == META and out.shape == (3,)


@pytest.mark.parametrize("spec", [SamplingSpec(1.0), SamplingSpec(0.7, top_p=0.8)],
                         ids=["T", "top-p"])
def test_processed_probs_on_meta(spec):
    """Temperature and top-p are shape-only (top-k needs k's value on vLLM's CPU path, and
    greedy's one_hot checks its indices: both are in part 2)."""
    out = processed_probs(torch.empty(2, V, device=META), spec)
    assert out.device == META and out.shape == (2, V)


def test_accept_mask_on_meta():
    x = torch.empty(4, device=META)
    assert accept_mask(x, x, x).device == META


# ---- 2. fake device: functions that need values ---------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_processed_probs_stays_on_the_device_and_matches_cpu(spec):
    raw = logits()
    expected = processed_probs(raw, spec)
    with fake_device():
        out = processed_probs(on_device(raw), spec)
        assert is_on_device(out)
        ids, probs = to_sparse(out[0])
    assert torch.equal(to_cpu(out), expected)
    assert (ids, probs) == to_sparse(expected[0])


@pytest.mark.parametrize("gate", list(Gate))
def test_uncertainty_on_the_device_matches_cpu(gate):
    raw = logits(1)[0]
    cfg = UncertaintyConfig(gate=gate, num_samples=20)
    token = int(raw.argsort()[-2])  # not the argmax: u > 0 in most draws
    if cfg.needs_token:
        expected = disagreement(draw_samples(raw, cfg, seed=11), token)
        with fake_device():
            samples = draw_samples(on_device(raw), cfg, seed=11)
            assert is_on_device(samples)
            got = disagreement(samples, token)
    else:
        fn = {Gate.ENTROPY: entropy_gate, Gate.VAR_ENTROPY: varentropy_gate,
              Gate.MAX_PROB: max_prob_gate}[gate]
        expected = float(fn(raw[None])[0])
        with fake_device():
            got = float(fn(on_device(raw)[None])[0])
    assert got == expected


def _block(seed: int, n: int = 3):
    """A target p [n + 1, V] (the last row: the bonus's), a draft and its q (sparse rows)."""
    spec = SamplingSpec(1.0, top_k=12)
    p = processed_probs(logits(n + 1, seed), spec)
    q_dense = processed_probs(logits(n, seed + 100) * 0.5, SamplingSpec(1.0, top_k=20))
    draft = torch.multinomial(q_dense, 1, generator=cpu_gen(seed)).flatten()
    q = SparseRows.from_lists([to_sparse(row) for row in q_dense])
    return p, draft, q


@pytest.mark.parametrize("q_on_device", [False, True], ids=["q-from-the-wire", "q-on-device"])
def test_verify_block_on_the_device_with_a_cpu_generator_matches_cpu(q_on_device):
    """The worker's call: p and the draft on the device, q as it arrives (CPU) or moved, the
    draws from a CPU generator. Same outcome (accepted, recovered, bonus) as on the CPU."""
    outcomes = set()
    for seed in range(40):
        p, draft, q = _block(seed)
        expected = verify_block(p[:-1], draft, q, cpu_gen(seed), bonus=p[-1])
        with fake_device():
            qd = q
            if q_on_device:
                qd = SparseRows(on_device(q.ids), on_device(q.probs), on_device(q.offsets))
            got = verify_block(on_device(p[:-1]), on_device(draft), qd, cpu_gen(seed),
                               bonus=on_device(p[-1]))
            assert is_on_device(got.target_probs)
        assert (got.num_accepted, got.recovered, got.bonus) == \
            (expected.num_accepted, expected.recovered, expected.bonus)
        assert torch.equal(to_cpu(got.target_probs), expected.target_probs)
        outcomes.add(expected.recovered is None)
    assert outcomes == {True, False}, "the seeds should reach both the residual and the bonus"


def test_greedy_verify_block_on_the_device():
    p, draft, q = _block(1)
    expected = verify_block(p[:-1], draft, q, None, greedy=True, bonus=p[-1])
    with fake_device():
        got = verify_block(on_device(p[:-1]), on_device(draft), q, None, greedy=True,
                           bonus=on_device(p[-1]))
    assert (got.num_accepted, got.recovered, got.bonus) == \
        (expected.num_accepted, expected.recovered, expected.bonus)


def test_residual_and_categorical_draws_on_the_device_match_cpu():
    p, _, q = _block(2)
    qd = q.dense(0, V)
    for seed in range(20):
        with fake_device():
            got = (sample_residual(on_device(p[0]), on_device(qd), cpu_gen(seed)),
                   sample_categorical(on_device(p[1]), cpu_gen(seed)))
        assert got == (sample_residual(p[0], qd, cpu_gen(seed)),
                       sample_categorical(p[1], cpu_gen(seed)))


def test_sparse_rows_on_the_device():
    q = SparseRows.from_lists([([3, 1], [0.75, 0.25]), ([0], [1.0])])
    with fake_device():
        qd = SparseRows(on_device(q.ids), on_device(q.probs), on_device(q.offsets))
        dense = qd.dense(0, 5)
        hit = qd.prob_of(on_device(torch.tensor([1, 2])))
        first = first_rejection(on_device(torch.tensor([True, False, True])))
        assert is_on_device(dense) and is_on_device(hit)
    assert to_cpu(dense).tolist() == [0.0, 0.25, 0.0, 0.75, 0.0]
    assert to_cpu(hit).tolist() == [0.25, 0.0]
    assert first == 1


def test_the_fake_device_catches_the_bug_class():
    """Guards the stand-in: mixing a CPU operand, or a CPU generator for device output, fails."""
    with fake_device():
        x = on_device(torch.ones(3))
        with pytest.raises(RuntimeError, match="same device"):
            _ = x * torch.ones(3)
        with pytest.raises(RuntimeError, match="generator"):
            torch.multinomial(x, 1, generator=cpu_gen())
        assert is_on_device(x * torch.tensor(2.0))  # a 0-dim CPU tensor acts as a scalar
        assert is_on_device(torch.full((2,), math.pi, device=x.device))


def test_mask_tokens_stays_on_the_logits_device_and_masks_only_its_rows():
    from hilm_vllm.sampling import mask_tokens

    out = mask_tokens(torch.zeros(3, V, device=META), [1, 5], 2)
    assert out.device == META and out.shape == (3, V)
    x = logits()
    m = mask_tokens(x, [1, 5], 2)
    assert torch.isinf(m[:2, [1, 5]]).all() and not torch.isinf(m[2]).any()
    assert torch.equal(m[:, 2:5], x[:, 2:5]) and not torch.isinf(x).any()  # input untouched
    assert mask_tokens(x, [1], 0) is x and mask_tokens(x, [], 3) is x
    p = processed_probs(m, SamplingSpec(1.0, top_k=5))
    assert (p[:2, [1, 5]] == 0).all() and torch.allclose(p.sum(-1), torch.ones(3))

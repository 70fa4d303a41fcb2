"""The accept / recover math alone: table tests, then chi-square tests of what it emits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hilm_vllm.rejection import (SparseRows, accept_mask, first_rejection, sample_categorical,
                                 sample_residual, verify_block)

MASTER_SEED = 1234
P_VALUE = 0.01
TRIALS = 4000  # ~2 s per test here; the biased rule below still scores p < 1e-30


def rows(*dense: list[float]) -> SparseRows:
    """Dense rows -> their exact sparse form (support only)."""
    return SparseRows.from_lists([([i for i, v in enumerate(r) if v > 0], [v for v in r if v > 0])
                                  for r in dense])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- tables ---------------------------------------------------------------------------------

@pytest.mark.parametrize("accepted, m", [([], 0), ([True], 1), ([False], 0),
                                         ([True, True, False, True], 2), ([True] * 3, 3)])
def test_first_rejection(accepted, m):
    assert first_rejection(torch.tensor(accepted, dtype=torch.bool)) == m


@pytest.mark.parametrize("p_x, q_x, u, accept", [
    (0.5, 0.5, 0.999, True),   # p >= q: always accepted
    (0.9, 0.1, 0.999, True),
    (0.2, 0.8, 0.24, True),    # accepted iff u < p/q = 0.25
    (0.2, 0.8, 0.25, False),
    (0.0, 0.3, 0.0, False),    # p(x) = 0: never accepted, not even at u = 0
])
def test_accept_mask(p_x, q_x, u, accept):
    got = accept_mask(torch.tensor([p_x]), torch.tensor([q_x]), torch.tensor([u]))
    assert bool(got[0]) is accept


def test_sparse_rows_prob_of_and_dense():
    q = SparseRows.from_lists([([3, 1], [0.75, 0.25]), ([0], [1.0]), ([2, 4], [0.5, 0.5])])
    assert len(q) == 3
    assert q.prob_of(torch.tensor([1, 0, 3])).tolist() == [0.25, 1.0, 0.0]
    assert q.dense(0, 5).tolist() == [0.0, 0.25, 0.0, 0.75, 0.0]
    assert q.dense(2, 5).tolist() == [0.0, 0.0, 0.5, 0.0, 0.5]


def test_residual_is_the_positive_part_of_p_minus_q():
    p, q = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([1.0, 0.0, 0.0])
    assert {sample_residual(p, q, gen(s)) for s in range(50)} == {1}


def test_draft_equal_to_target_is_always_accepted():
    p = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    for seed in range(50):
        out = verify_block(p, torch.tensor([1, 0]), rows(*p.tolist()), gen(seed))
        assert (out.num_accepted, out.recovered) == (2, None)
    assert out.target_probs.tolist() == pytest.approx([0.6, 0.2])


def test_token_the_target_never_emits_is_rejected_and_recovered_elsewhere():
    p = torch.tensor([[0.0, 0.7, 0.3], [0.5, 0.5, 0.0]])
    q = rows([0.5, 0.5, 0.0], [1.0, 0.0, 0.0])
    for seed in range(50):
        out = verify_block(p, torch.tensor([0, 0]), q, gen(seed))
        assert out.num_accepted == 0 and out.recovered in (1, 2)


def test_empty_block_accepts_nothing():
    out = verify_block(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), rows(), gen())
    assert (out.num_accepted, out.recovered, out.target_probs.numel()) == (0, None, 0)


@pytest.mark.parametrize("draft, m, recovered", [
    ([2, 0, 1], 3, None),       # every draft is its row's argmax
    ([2, 1, 1], 1, 0),          # first mismatch at 1: correction = argmax of row 1
    ([0, 0, 1], 0, 2),
])
def test_greedy_accepts_argmax_only_and_corrects_with_argmax(draft, m, recovered):
    p = torch.nn.functional.one_hot(torch.tensor([2, 0, 1]), 3).float()
    q = rows([1 / 3] * 3, [1 / 3] * 3, [1 / 3] * 3)
    out = verify_block(p, torch.tensor(draft), q, generator=None, greedy=True)
    assert (out.num_accepted, out.recovered) == (m, recovered)


# ---- statistics -----------------------------------------------------------------------------

def _toy(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A target p and a drafter q that differ clearly and have different supports."""
    g = np.random.default_rng(seed)
    p = g.dirichlet(np.ones(vocab))
    q = g.dirichlet(np.ones(vocab) * 0.5)
    p[0], q[-1] = 0.0, 0.0  # the drafter proposes a token the target never emits, and vice versa
    return torch.tensor(p / p.sum(), dtype=torch.float32), torch.tensor(q / q.sum(),
                                                                       dtype=torch.float32)


def _first_tokens(p, q, trials, rule):
    g, counts, accepted = gen(MASTER_SEED), np.zeros(p.numel()), 0
    sparse = rows(q.tolist())
    for _ in range(trials):
        x = torch.multinomial(q, 1, generator=g)  # [1]
        m, token = rule(p[None], x, sparse, g)
        counts[int(x) if m else token] += 1
        accepted += m
    return counts, accepted / trials


def _exact(p, x, q, g):
    out = verify_block(p, x, q, g)
    return out.num_accepted, out.recovered


def _spececd_bug(p, x, q, g):
    """The seed prototype's rule: on rejection zero only the draft token and renormalize p."""
    out = verify_block(p, x, q, g)
    if out.num_accepted:
        return 1, None
    r = p[0].clone()
    r[x] = 0
    return 0, int(torch.multinomial(r, 1, generator=g))


def _chisquare(counts: np.ndarray, p: torch.Tensor) -> float:
    expected = counts.sum() * p.double().numpy()
    support = expected > 0
    assert counts[~support].sum() == 0, "emitted a token the target never emits"
    return chisquare(counts[support], expected[support]).pvalue


def test_first_emitted_token_is_distributed_as_the_target():
    p, q = _toy(8, MASTER_SEED)
    counts, accept_rate = _first_tokens(p, q, TRIALS, _exact)
    assert _chisquare(counts, p) > P_VALUE
    expected = float(torch.minimum(p, q).sum())
    se = (expected * (1 - expected) / TRIALS) ** 0.5
    assert abs(accept_rate - expected) < 4 * se, (accept_rate, expected)


def test_the_chi_square_catches_a_biased_recovery():
    p, q = _toy(8, MASTER_SEED)
    counts, _ = _first_tokens(p, q, TRIALS, _spececd_bug)
    assert _chisquare(counts, p) < P_VALUE


def test_acceptance_length_of_a_block_follows_the_per_position_rates():
    g = gen(MASTER_SEED)
    ps, qs = zip(*(_toy(6, MASTER_SEED + i) for i in range(3)))
    p, q = torch.stack(ps), rows(*(r.tolist() for r in qs))
    alpha = [float(torch.minimum(a, b).sum()) for a, b in zip(ps, qs)]
    trials, hist = TRIALS, np.zeros(4)
    for _ in range(trials):
        draft = torch.cat([torch.multinomial(r, 1, generator=g) for r in qs])
        hist[verify_block(p, draft, q, g).num_accepted] += 1
    # P(m = k) = alpha_1 ... alpha_k (1 - alpha_{k+1}); P(m = 3) = alpha_1 alpha_2 alpha_3
    probs = [1 - alpha[0], alpha[0] * (1 - alpha[1]), alpha[0] * alpha[1] * (1 - alpha[2]),
             alpha[0] * alpha[1] * alpha[2]]
    assert chisquare(hist, np.array(probs) * trials).pvalue > P_VALUE


# ---- the categorical draw and the bonus token ---------------------------------------------------

def test_categorical_follows_the_weights_and_never_draws_a_zero_weight():
    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.5, 0.0, 0.0, 2.0, 0.0])  # unnormalised
    g = gen(MASTER_SEED)
    counts = np.bincount([sample_categorical(weights, g) for _ in range(TRIALS)], minlength=9)
    assert _chisquare(counts, weights.double() / weights.double().sum()) > P_VALUE


def test_categorical_at_the_largest_uniform_stays_in_the_support(monkeypatch):
    """u * total can round up to the total; the last token with weight > 0 is drawn then."""
    from hilm_vllm import rejection

    monkeypatch.setattr(rejection, "uniforms",
                        lambda n, g, device, dtype=torch.float32:
                        torch.full((n,), 1 - 2**-53, dtype=dtype, device=device))
    assert sample_categorical(torch.tensor([0.3, 0.7, 0.0, 0.0]), None) == 1
    assert sample_categorical(torch.tensor([1e-30, 0.0]), None) == 0


def test_the_bonus_follows_the_row_after_the_block_and_only_when_all_are_accepted():
    p, _ = _toy(8, MASTER_SEED)
    bonus_row, _ = _toy(8, MASTER_SEED + 1)
    g, counts = gen(MASTER_SEED), np.zeros(8)
    for _ in range(TRIALS):
        out = verify_block(p[None], torch.multinomial(p, 1, generator=g), rows(p.tolist()), g,
                           bonus=bonus_row)
        assert (out.num_accepted, out.recovered) == (1, None)  # q = p: always accepted
        counts[out.bonus] += 1
        assert out.next_token == out.bonus
    assert _chisquare(counts, bonus_row) > P_VALUE
    never = verify_block(p[None], torch.tensor([0]), rows([1.0] + [0.0] * 7), g, bonus=bonus_row)
    assert never.num_accepted == 0 and never.bonus is None and never.next_token == never.recovered


def test_greedy_bonus_is_the_argmax_of_the_bonus_row():
    p = torch.nn.functional.one_hot(torch.tensor([2, 0]), 3).float()
    out = verify_block(p, torch.tensor([2, 0]), rows([1.0, 0, 0], [1.0, 0, 0]), None, greedy=True,
                       bonus=torch.tensor([0.1, 0.2, 0.7]))
    assert (out.num_accepted, out.recovered, out.bonus) == (2, None, 2)


def test_an_empty_block_with_a_bonus_row_draws_the_bonus():
    bonus_row = torch.tensor([0.0, 0.25, 0.75])
    out = verify_block(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), rows(), gen(3),
                       bonus=bonus_row)
    assert out.num_accepted == 0 and out.recovered is None and out.bonus in (1, 2)

"""The DSI cost model: sampler, closed forms, edge cases, validity rule."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from hilm_vllm.lab.dsi.model import (dsi_cost, dsi_segments, is_valid, min_servers, sample_accepted,
                                 si_cost, si_expected_cost, simulate, streams)


@pytest.mark.parametrize("k", [1, 4, 10])
def test_sampler_edges(k):
    rng = np.random.default_rng(0)
    assert (sample_accepted(rng, 0.0, k, 1000) == 0).all()
    assert (sample_accepted(rng, 1.0, k, 1000) == k).all()


@pytest.mark.parametrize("a,k", [(0.3, 2), (0.8, 5), (0.95, 10)])
def test_sampler_matches_capped_geometric(a, k):
    """P(X = j) = a^j (1 - a) for j < k and P(X = k) = a^k; mean sum_{j=1..k} a^j."""
    x = sample_accepted(np.random.default_rng(1), a, k, 200_000)
    expected_mean = sum(a**j for j in range(1, k + 1))
    assert x.mean() == pytest.approx(expected_mean, rel=0.01)
    probs = np.array([a**j * (1 - a) for j in range(k)] + [a**k])
    observed = np.bincount(x, minlength=k + 1)
    assert stats.chisquare(observed, probs * len(x)).pvalue > 1e-3


@pytest.mark.parametrize("c,a,k", [(0.1, 0.9, 5), (0.2, 0.8, 3), (0.5, 0.5, 2),
                                   (0.05, 0.99, 10), (1.0, 0.3, 1), (0.3, 0.0, 4)])
def test_si_mean_matches_closed_form(c, a, k):
    S = 1000
    si = simulate(c, a, k, S, repeats=100, seed=7).si.mean()
    assert si == pytest.approx(si_expected_cost(S, k, c, a), rel=0.02)


@pytest.mark.parametrize("c,k,S", [(0.1, 5, 1000), (1.0, 1, 17), (0.01, 20, 1)])
def test_dsi_edges_are_exact(c, k, S):
    assert (simulate(c, 0.0, k, S, 3, 0).dsi == S).all()
    assert (simulate(c, 1.0, k, S, 3, 0).dsi == (S - 1) * c + 1).all()


def test_dsi_never_slower_than_si_or_nonsi():
    for c in (0.05, 0.2, 0.5, 1.0):
        for a in (0.0, 0.3, 0.6, 0.9, 1.0):
            for k in (1, 3, 8):
                costs = simulate(c, a, k, 500, 20, 3)
                assert (costs.dsi <= 500).all()  # the target-only race bounds every run
                assert costs.dsi.mean() <= min(costs.si.mean(), 500) + 1e-9, (c, a, k)


def test_dsi_beats_si_where_drafting_is_cheap_and_accurate():
    m = simulate(0.1, 0.9, 5, 1000, 10, 42).means()
    assert 1.3 < m["speedup_dsi_over_si"] and 4 < m["speedup_dsi_over_nonsi"]


def _si_loop(x, k, c, S):
    cost, left, i = 0.0, S, 0
    while left > 0:
        kk = min(k, left - 1)
        cost += kk * c + 1
        left -= min(int(x[i]), kk) + 1
        i += 1
    return cost


def _dsi_loop(x, k, c, S):
    cost, toks, i = 0.0, 0, 0
    while toks < S:
        new, spec = 0, 0.0
        while True:
            kk = min(k, S - 1 - toks - new)
            acc = min(kk, int(x[i]))
            i, new, spec = i + 1, new + acc, spec + kk * c
            if kk == 0 or acc < kk:
                new, spec = new + 1, spec + 1
                break
        cost, toks = cost + min(spec, new), toks + new
    return cost


def test_vectorized_costs_equal_the_round_by_round_procedure():
    rng = np.random.default_rng(5)
    for _ in range(400):
        k, c, S = int(rng.integers(1, 15)), float(rng.uniform(0.01, 1)), int(rng.integers(1, 200))
        a = float(rng.choice([0.0, 1.0, rng.uniform()]))
        x = sample_accepted(rng, a, k, S)
        assert si_cost(x, k, c, S) == pytest.approx(_si_loop(x, k, c, S), rel=1e-12)
        assert dsi_cost(x, k, c, S) == pytest.approx(_dsi_loop(x, k, c, S), rel=1e-12)


def test_segments_commit_exactly_S_tokens_and_share_the_stream():
    x = streams(0.7, 4, 300, 1, 9)[0]
    segs = dsi_segments(x, 4, 300)
    assert sum(s.new_toks for s in segs) == 300
    assert sum(s.cost(0.2) for s in segs) == pytest.approx(dsi_cost(x, 4, 0.2, 300))


def test_streams_are_reproducible_and_distinct():
    a, b = streams(0.5, 3, 100, 2, 11), streams(0.5, 3, 100, 2, 11)
    assert all((u == v).all() for u, v in zip(a, b))
    assert not (a[0] == a[1]).all()


@pytest.mark.parametrize("c,k,need", [
    (0.1, 5, 2), (0.2, 5, 1), (0.1, 10, 1), (1.0, 1, 1), (0.01, 1, 100), (0.3, 3, 2),
    (0.05, 5, 4), (0.09999999999999999, 5, 2),  # a linspace's 0.1: 1/(k c) = 2.0000000000000004
])
def test_min_servers(c, k, need):
    assert min_servers(c, k) == need
    assert is_valid(c, k, need) and not is_valid(c, k, need - 1)

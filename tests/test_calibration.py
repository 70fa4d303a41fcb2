"""Calibration math on synthetic data with known answers (no engine)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hilm_vllm.calibration import (LinearFit, Rule, Thresholds, binned_r2, binned_rates,
                                   calibrate, fit_line, rejection_probability, step_edges,
                                   thresholds)


def synthetic(a: float, b: float, n: int, noise: float, k: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    u = rng.integers(0, k + 1, n) / k  # u moves in steps of 1/K
    beta = a * u + b + rng.normal(0, noise, n)
    return u, beta


@pytest.mark.parametrize("a, b", [(0.8, -0.1), (0.5, 0.05), (1.2, -0.4)])
def test_least_squares_recovers_slope_and_intercept(a, b):
    u, beta = synthetic(a, b, 20_000, noise=0.05)
    fit = fit_line(u, beta)
    assert fit.a == pytest.approx(a, abs=0.01) and fit.b == pytest.approx(b, abs=0.01)
    assert fit.n == 20_000
    expected_r2 = 1 - 0.05**2 / np.var(beta)  # noise variance / total variance
    assert fit.r2 == pytest.approx(expected_r2, abs=0.01)


def test_noiseless_line_fits_exactly_with_r2_one():
    u = np.linspace(0, 1, 21)
    fit = fit_line(u, 0.7 * u - 0.2)
    assert (fit.a, fit.b, fit.r2) == pytest.approx((0.7, -0.2, 1.0))


def test_fit_needs_two_distinct_u_values():
    with pytest.raises(ValueError):
        fit_line(np.full(10, 0.5), np.linspace(0, 1, 10))
    with pytest.raises(ValueError):
        fit_line(np.zeros(3), np.zeros(4))


@pytest.mark.parametrize("a, b, delta, averse, prone", [
    (0.8, -0.1, 0.5, 0.125, 0.75),
    (0.5, 0.05, 0.3, -0.1, 0.5),
    (2.0, -1.0, 0.2, 0.5, 0.6),
])
def test_thresholds_follow_the_formulas(a, b, delta, averse, prone):
    t = thresholds(LinearFit(a, b, 1.0, 10), delta)
    assert (t.risk_averse, t.risk_prone) == pytest.approx((averse, prone))
    assert t.pick(Rule.RISK_AVERSE) == t.risk_averse and t.pick("risk-prone") == t.risk_prone


def test_flat_fit_gives_infinite_thresholds():
    t = thresholds(LinearFit(0.0, 0.1, 0.0, 10), 0.3)
    assert t == Thresholds(-math.inf, math.inf)


def test_rejection_probability_table():
    p = np.array([0.2, 0.5, 0.0, 0.9])
    q = np.array([0.4, 0.5, 0.3, 0.3])
    assert rejection_probability(p, q).tolist() == pytest.approx([0.5, 0.0, 1.0, 0.0])
    with pytest.raises(ValueError):
        rejection_probability(p, np.array([0.4, 0.0, 0.3, 0.3]))


def test_binned_rates_group_by_u_steps():
    u = np.array([0.0, 0.0, 0.5, 0.5, 0.5, 1.0])
    accepted = np.array([1, 1, 1, 0, 0, 0])
    beta = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    bins = binned_rates(u, accepted, beta, step_edges(2))
    assert [b.count for b in bins] == [2, 3, 1]
    assert [b.rejection_rate for b in bins] == pytest.approx([0.0, 2 / 3, 1.0])
    assert [b.mean_beta for b in bins] == pytest.approx([0.1, 0.6, 1.0])
    assert step_edges(2).tolist() == pytest.approx([-0.25, 0.25, 0.75, 1.25])
    empty = binned_rates(u, accepted, beta, np.array([0.0, 0.2, 0.4, 1.0]))[1]
    assert empty.count == 0 and math.isnan(empty.rejection_rate)


def test_calibrate_end_to_end_on_simulated_speculative_sampling():
    # beta(u) = 0.6 u - 0.05 clipped at 0: choose p(x) = (1 - beta) q(x), draw accepts as
    # speculative sampling would, and check fit, Delta, acceptance and the binned rates.
    rng = np.random.default_rng(1)
    n, k = 40_000, 20
    u = rng.integers(0, k + 1, n) / k
    beta = np.clip(0.6 * u - 0.05, 0, 1)
    q = rng.uniform(0.05, 1.0, n)
    p = (1 - beta) * q
    accepted = rng.random(n) < np.minimum(1, p / q)
    cal = calibrate(u, p, q, accepted)
    assert cal.delta == pytest.approx(np.mean(beta > 0))
    assert cal.acceptance == pytest.approx(1 - beta.mean(), abs=0.01)
    assert cal.fit.a > 0.5 and cal.thresholds.risk_averse == pytest.approx(-cal.fit.b / cal.fit.a)
    for b in binned_rates(u, accepted, rejection_probability(p, q), step_edges(k)):
        assert b.rejection_rate == pytest.approx(b.mean_beta, abs=0.05)
    assert set(cal.summary()) >= {"a", "b", "r2", "r2_binned", "n", "delta", "risk_averse",
                                  "risk_prone"}
    assert cal.r2_binned > 0.9


def test_binned_r2_sees_through_per_token_noise():
    # Bernoulli-like beta: per-token R^2 is low, but the means per u lie on the line.
    rng = np.random.default_rng(2)
    u = rng.integers(0, 21, 50_000) / 20
    beta = (rng.random(50_000) < 0.2 + 0.5 * u).astype(float)
    fit = fit_line(u, beta)
    assert fit.r2 < 0.2
    assert binned_r2(u, beta, fit) > 0.98
    shuffled = rng.permutation(beta)  # no relation to u: the means do not follow a line
    assert binned_r2(u, shuffled, fit_line(u, shuffled)) < 0.7

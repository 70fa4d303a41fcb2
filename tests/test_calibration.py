"""Calibration math on synthetic data with known answers (no engine): U-HLM's line and rules,
the monotone model, the soft-label AUC, and thresholds from a risk budget or a target TR."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from hilm_vllm.lab.calibration import (LinearFit, Rule, Thresholds, best_gate, binned_r2,
                                   binned_rates, calibrate, calibrate_pair, fit_line,
                                   isotonic_fit, pava, rejection_auc, rejection_probability,
                                   risk_budget_point, rule_point, step_edges, target_tr_point,
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


def noisy_beta(truth: np.ndarray, rng) -> np.ndarray:
    """beta scattered around a known mean curve, staying in [0, 1] (mean-preserving noise)."""
    half = np.minimum(truth, 1 - truth)
    return truth + rng.uniform(-half, half)


# ---- the monotone model -------------------------------------------------------------------------

def test_pava_pools_violators_with_weights():
    assert pava([1, 3, 2, 4], [1, 1, 1, 1]).tolist() == pytest.approx([1, 2.5, 2.5, 4])
    # weights: (3 * 1 + 1 * 3) / 4 = 1.5 for the pooled pair
    assert pava([3, 1], [1, 3]).tolist() == pytest.approx([1.5, 1.5])
    assert pava([0.5], [2]).tolist() == [0.5]
    assert pava([3, 2, 1], [1, 1, 1]).tolist() == pytest.approx([2, 2, 2])


def test_isotonic_fit_matches_scikit_learn_and_keeps_the_mean():
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(3)
    for trial in range(10):
        n = int(rng.integers(5, 500))
        g = rng.integers(0, 21, n) / 20 if trial % 2 else rng.random(n)
        beta = np.clip(0.5 * g + rng.normal(0, 0.3, n), 0, 1)
        model = isotonic_fit(g, beta)
        expected = IsotonicRegression().fit(g, beta).predict(g)
        assert model.predict(g) == pytest.approx(expected)
        assert np.all(np.diff(model.levels) >= 0)
        assert np.sum(model.levels * model.counts) == pytest.approx(beta.sum())
        assert sum(b["tokens"] for b in model.blocks()) == n


def test_isotonic_fit_recovers_a_known_monotone_curve():
    rng = np.random.default_rng(4)
    u = rng.integers(0, 21, 40_000) / 20
    truth = u**2  # rejection rises slowly, then fast: not a line
    model = isotonic_fit(u, truth)
    assert model.predict(np.arange(21) / 20) == pytest.approx((np.arange(21) / 20) ** 2)
    noisy = isotonic_fit(u, noisy_beta(truth, rng))
    assert np.max(np.abs(noisy.predict(u) - truth)) < 0.03


# ---- AUC for rejection --------------------------------------------------------------------------

def brute_force_auc(g, beta):
    num = den = 0.0
    for i in range(len(g)):
        for j in range(len(g)):
            if i != j:
                w = beta[i] * (1 - beta[j])
                den += w
                num += w * ((g[i] > g[j]) + 0.5 * (g[i] == g[j]))
    return num / den


def test_soft_auc_is_the_pairwise_definition():
    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        g = rng.integers(0, 5, n) / 4
        beta = rng.random(n)
        assert rejection_auc(g, beta) == pytest.approx(brute_force_auc(g, beta))


def test_hard_labels_give_the_ordinary_auc():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(6)
    g = rng.integers(0, 21, 300) / 20
    y = (rng.random(300) < 0.2 + 0.6 * g).astype(float)
    assert rejection_auc(g, y) == pytest.approx(roc_auc_score(y, g))


def test_auc_extremes():
    g = np.linspace(0, 1, 11)
    beta = (g > 0.5).astype(float)
    assert rejection_auc(g, beta) == 1.0  # the gate separates rejections perfectly
    assert rejection_auc(1 - g, beta) == 0.0  # backwards
    assert rejection_auc(np.full(11, 0.7), beta) == 0.5  # constant: all ties
    assert math.isnan(rejection_auc(g, np.zeros(11)))  # nothing can be rejected
    assert best_gate({"a": 0.6, "b": math.nan, "c": 0.7}) == "c"
    assert best_gate({"a": math.nan, "b": 0.4}) == "a"  # NaN counts as 0.5


# ---- thresholds from a risk budget or a target TR -----------------------------------------------

def known_curve(n=60_000, k=20, seed=7):
    """u on 1/K steps, uniform; beta = u^2 exactly (a known monotone rejection curve)."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, k + 1, n) / k
    return u, u**2


def true_budget_threshold(eps: float) -> tuple[float, int, np.ndarray]:
    """For known_curve: the threshold a budget eps gives, its last skipped step j, and the
    expected beta among u <= v_j (the mean of v_0^2 .. v_j^2, u uniform on the 21 steps)."""
    values = np.arange(21) / 20
    cum = np.cumsum(values**2) / np.arange(1, 22)
    j = int(np.flatnonzero(cum <= eps)[-1])
    assert abs(cum[j] - eps) > 0.003 and abs(cum[j + 1] - eps) > 0.003  # not a sampling coin toss
    return (values[j] + values[j + 1]) / 2, j, cum


@pytest.mark.parametrize("eps", [0.04, 0.05, 0.1, 0.2, 0.3])
def test_risk_budget_recovers_the_threshold_of_a_known_curve(eps):
    u, beta = known_curve()
    threshold, j, cum = true_budget_threshold(eps)
    point = risk_budget_point(isotonic_fit(u, beta), eps)
    assert point.met
    assert point.threshold == pytest.approx(threshold)  # halfway between two steps of u
    assert point.risk <= eps and point.risk == pytest.approx(cum[j], abs=0.005)
    assert point.skipped == pytest.approx((j + 1) / 21, abs=0.01)


def test_risk_budget_on_a_continuous_gate():
    # g uniform on [0, 1] and beta = g: expected beta among g <= t is t / 2, so t* = 2 * eps.
    rng = np.random.default_rng(8)
    g = rng.random(50_000)
    for eps in (0.05, 0.1, 0.25):
        point = risk_budget_point(isotonic_fit(g, g), eps)
        assert point.met and point.threshold == pytest.approx(2 * eps, abs=0.01)
    assert risk_budget_point(isotonic_fit(g, g), 0.6).threshold == 1.0  # mean beta 0.5 fits


def test_risk_budget_on_noisy_speculative_sampling_records():
    # The whole path: p, q -> beta -> monotone model -> threshold, with noise around the curve.
    rng = np.random.default_rng(9)
    n = 80_000
    u = rng.integers(0, 21, n) / 20
    beta = noisy_beta(u**2, rng)
    q = rng.uniform(0.05, 1.0, n)
    p = (1 - beta) * q
    accepted = rng.random(n) < np.minimum(1, p / q)
    cal = calibrate_pair(u, p, q, accepted)
    for eps in (0.05, 0.1, 0.2):
        assert risk_budget_point(cal.monotone, eps).threshold == true_budget_threshold(eps)[0]
    assert 0.8 < cal.auc < 0.9 and cal.linear is not None and cal.n == n


def test_target_tr_sends_the_stated_share():
    rng = np.random.default_rng(10)
    g = rng.random(20_000)
    model = isotonic_fit(g, g)
    for tr in (0.0, 0.2, 0.5, 0.9):
        point = target_tr_point(model, tr)
        assert point.met and point.sent == pytest.approx(tr, abs=0.002)
        assert np.mean(g > point.threshold) == pytest.approx(tr, abs=0.002)
    assert target_tr_point(model, 0.0).threshold == 1.0


def test_target_tr_between_steps_gives_the_nearest_share_and_says_why():
    u = np.repeat([0.0, 0.5, 1.0], [20, 50, 30])
    model = isotonic_fit(u, u)
    point = target_tr_point(model, 0.5)  # reachable shares: 80%, 30%, 0%
    assert not point.met and point.sent == pytest.approx(0.3) and point.threshold == 0.75
    assert "jump from 30.0% to 80.0%" in point.note
    full = target_tr_point(model, 1.0)  # u = 0 tokens are skipped even at t = 0
    assert not full.met and full.threshold < 0.5 and full.sent == pytest.approx(0.8)
    assert "even t = 0 skips the 20.0% of tokens" in full.note


def test_no_threshold_meets_the_budget_gives_t0_and_the_reason():
    u = np.repeat([0.0, 0.5, 1.0], [30, 30, 40])
    beta = np.repeat([0.3, 0.3, 0.5], [30, 30, 40])
    point = risk_budget_point(isotonic_fit(u, beta), 0.05)
    assert not point.met and point.threshold == 0.0
    assert "the lowest gate value 0 (30.0% of tokens) already has expected rejection 0.300 > 0.05"\
        in point.note
    assert "no threshold in [0, 1] meets the budget" in point.note
    # Lowest value above 0: skipping nothing is in [0, 1] and meets the budget.
    shifted = risk_budget_point(isotonic_fit(u + 0.2, beta), 0.05)
    assert shifted.met and shifted.skipped == 0 and shifted.risk is None
    assert 0 <= shifted.threshold < 0.2 and "skips nothing" in shifted.note


def test_uhlm_rules_are_clipped_into_the_unit_interval_with_the_reason():
    u, beta = known_curve(2000)
    model = isotonic_fit(u, beta)
    inside = rule_point(0.4, model, Rule.RISK_AVERSE)
    assert inside.met and inside.threshold == 0.4 and inside.skipped > 0
    above = rule_point(6.5, model, "risk-prone")
    assert not above.met and above.threshold == 1.0 and above.skipped == 1.0 and "> 1" in above.note
    below = rule_point(-1.1, model, "risk-averse")
    assert not below.met and below.threshold == 0.0 and "< 0" in below.note


def test_a_gate_without_spread_still_gives_a_point():
    u = np.ones(200)  # flat models: u = 1 for every token
    q = np.full(200, 0.5)
    p = np.where(np.arange(200) % 5 == 0, 0.1, 0.6)
    cal = calibrate_pair(u, p, q, p >= q)
    assert cal.linear is None and "distinct" in cal.linear_error and cal.auc == 0.5
    point = risk_budget_point(cal.monotone, 0.05)  # mean beta 0.16 > 0.05
    assert point.threshold == 0.5 and point.skipped == 0 and point.met
    assert risk_budget_point(cal.monotone, 0.2).threshold == 1.0


@st.composite
def records(draw):
    n = draw(st.integers(1, 60))
    steps = draw(st.sampled_from([None, 1, 2, 20]))
    unit = st.floats(0, 1, allow_nan=False)
    if steps is None:
        g = draw(st.lists(unit, min_size=n, max_size=n))
    else:
        g = [k / steps for k in draw(st.lists(st.integers(0, steps), min_size=n, max_size=n))]
    beta = draw(st.lists(unit, min_size=n, max_size=n))
    return np.asarray(g), np.asarray(beta)


@settings(max_examples=300, deadline=None)
@given(records(), st.floats(0, 1, allow_nan=False), st.floats(0, 1, allow_nan=False),
       st.floats(-10, 10, allow_nan=False))
def test_thresholds_never_leave_the_unit_interval(data, eps, tr, rule_value):
    g, beta = data
    model = isotonic_fit(g, beta)
    for point in (risk_budget_point(model, eps), target_tr_point(model, tr),
                  rule_point(rule_value, model, "risk-prone")):
        assert 0.0 <= point.threshold <= 1.0
        assert 0.0 <= point.skipped <= 1.0
        # what the point reports is what the threshold does to the data
        assert point.skipped == pytest.approx(np.mean(g <= point.threshold))
        assert point.met or point.note
    budget = risk_budget_point(model, eps)
    if budget.met and budget.skipped > 0:
        assert budget.risk <= eps + 1e-9
        assert budget.risk_observed == pytest.approx(np.mean(beta[g <= budget.threshold]))
    if not budget.met:
        assert budget.threshold == 0.0 and min(g) == 0.0
    # a larger budget never lowers the threshold
    assert risk_budget_point(model, min(1.0, eps + 0.1)).threshold >= budget.threshold

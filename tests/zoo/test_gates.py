"""The gate evaluation of hilm_vllm.zoo.gates on synthetic cases with known answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hilm_vllm.zoo.gates import (
    GATES,
    ORACLE,
    PAIRS,
    SKIP_GRID,
    draft,
    format_gates,
    gate_report,
    gate_values,
    rejection,
    risk_curve,
    soft_auc,
    spearman,
)


def _brute_auc(g, b):
    num = den = 0.0
    for i, j in itertools.permutations(range(len(g)), 2):
        w = b[i] * (1 - b[j])
        den += w
        num += w * ((g[i] > g[j]) + 0.5 * (g[i] == g[j]))
    return num / den


def test_hard_labels_give_the_ordinary_auc():
    g = np.array([0.1, 0.4, 0.35, 0.8])
    b = np.array([0.0, 0.0, 1.0, 1.0])  # positives 0.35, 0.8 against negatives 0.1, 0.4
    assert soft_auc(g, b) == pytest.approx(3 / 4)
    assert soft_auc(b, b) == 1.0 and soft_auc(-b, b) == 0.0


def test_soft_auc_matches_its_definition_with_ties():
    rng = np.random.default_rng(0)
    g = rng.integers(0, 5, 40) / 4  # steps, like u
    b = rng.random(40) * (rng.random(40) < 0.6)
    assert soft_auc(g, b) == pytest.approx(_brute_auc(g, b), abs=1e-12)


def test_a_gate_equal_to_beta_is_best_and_a_constant_gate_is_a_coin():
    rng = np.random.default_rng(1)
    b = rng.random(200) ** 2
    best = soft_auc(b, b)
    assert 0.5 < best < 1  # soft labels: even the oracle is not certain
    for _ in range(20):
        assert soft_auc(rng.permutation(b) + rng.random(200) * 0.1, b) <= best + 1e-12
    assert soft_auc(np.full(200, 0.3), b) == pytest.approx(0.5)
    assert soft_auc(-b, b) == pytest.approx(1 - best)  # reversing the gate mirrors it
    assert spearman(b, b) == pytest.approx(1.0) and spearman(np.ones(200), b) == 0.0


def test_risk_curve():
    b = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    # a gate equal to beta skips the least risky tokens first
    assert risk_curve(b, b, (0.1, 0.5, 1.0)) == pytest.approx([0.0, 0.2, 0.45])
    # a constant gate: every skip fraction costs the mean (ties shared in proportion)
    assert risk_curve(np.zeros(10), b) == pytest.approx([0.45] * len(SKIP_GRID))
    # a tie across the boundary: {0, 1} tied, then 0.5
    assert risk_curve(np.array([0, 0, 1]), np.array([0.0, 1.0, 0.5]), (1 / 3,)) == \
        pytest.approx([0.5])


def test_drafts_beta_and_gates_on_known_distributions():
    # row 0: drafter certain of token 3, target agrees; row 1: drafter uniform, target certain of 0
    v = 8
    q = torch.full((2, v), -1e4)
    q[0, 3] = 10.0
    q[1] = 0.0
    p = torch.full((2, v), -1e4)
    p[0, 3] = 10.0
    p[1, 0] = 10.0
    x = draft(q, seed=0)
    assert x[0] == 3
    assert torch.equal(x, draft(q, seed=0))  # seeded
    beta = rejection(q, p, x)
    assert beta[0] == pytest.approx(0.0)
    assert beta[1] == pytest.approx(0.0 if x[1] == 0 else 1.0)
    g = gate_values(q, x, seed=0)
    assert set(g) == set(GATES)
    assert all(g[name][0] < g[name][1] for name in GATES if name != "var-entropy")
    assert g["perturbed"][0] == 0.0 and g["1-q"][1] == pytest.approx(1 - 1 / v)
    rep = gate_report(g, beta)
    assert set(rep) == {*GATES, ORACLE, "mean_beta"}
    assert len(rep["perturbed"]["risk"]) == len(SKIP_GRID)


def test_format_gates_prints_every_pair_and_gate():
    rep = gate_report({name: np.linspace(0, 1, 50) for name in GATES}, np.linspace(0, 1, 50))
    text = format_gates({"positions": 50, **{pair: rep for pair in PAIRS}})
    for word in (*PAIRS, *GATES, ORACLE, "random"):
        assert word in text

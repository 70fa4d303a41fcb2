"""Pure uncertainty math: schedules, Gumbel-max sampling, u, gates (no engine)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from hilm_vllm.seeds import derive_seed
from hilm_vllm.uncertainty import (Gate, Perturbation, UncertaintyConfig,
                                   disagreement, draw_samples, entropy_gate, max_prob_gate,
                                   perturbed_samples, temperatures, varentropy_bound,
                                   varentropy_gate)

GRID = Perturbation.GRID


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_derive_seed_is_deterministic_63_bit_and_separates_positions_and_streams():
    seeds = {derive_seed(7, pos, stream) for pos in range(1000) for stream in (0, 1)}
    assert len(seeds) == 2000
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(7, 12, 1) == derive_seed(7, 12, 1)
    assert derive_seed(7, 12, 1) != derive_seed(8, 12, 1)


@pytest.mark.parametrize("k, theta_max", [(1, 2.0), (4, 2.0), (20, 1.5)])
def test_grid_is_evenly_spaced_and_excludes_zero(k, theta_max):
    cfg = UncertaintyConfig(num_samples=k, theta_max=theta_max, perturbation=GRID)
    thetas = temperatures(cfg, gen())
    assert thetas.tolist() == pytest.approx([theta_max * (i + 1) / k for i in range(k)])


def test_uniform_temperatures_lie_in_open_closed_interval_and_follow_the_seed():
    cfg = UncertaintyConfig(num_samples=1000, theta_max=2.0)
    thetas = temperatures(cfg, gen(3))
    assert float(thetas.min()) > 0 and float(thetas.max()) <= 2.0
    assert stats.kstest(thetas.numpy() / 2.0, "uniform").pvalue > 1e-3
    assert torch.equal(thetas, temperatures(cfg, gen(3)))
    assert not torch.equal(thetas, temperatures(cfg, gen(4)))


def numpy_samples(z: np.ndarray, thetas: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """The documented inverse-CDF draw, written independently in numpy (float64)."""
    cdf = np.cumsum(np.exp((z - z.max())[None, :] * (1 / thetas)[:, None]), axis=-1)
    return np.array([np.searchsorted(c, r * c[-1], side="right") for c, r in zip(cdf, uniforms)])


def replay(cfg: UncertaintyConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = gen(seed)  # the documented draw order: K temperatures, then K uniforms
    thetas = temperatures(cfg, g)
    return thetas.numpy(), torch.rand(cfg.num_samples, generator=g, dtype=torch.float64).numpy()


def test_u_matches_a_numpy_implementation_on_the_same_draws():
    z = torch.randn(300, generator=gen(1)) * 3  # [V]
    for perturbation in Perturbation:
        cfg = UncertaintyConfig(num_samples=20, theta_max=2.0, perturbation=perturbation)
        samples = draw_samples(z, cfg, seed=99)
        expected = numpy_samples(z.double().numpy(), *replay(cfg, 99))
        assert samples.tolist() == expected.tolist()
        token = int(z.argmax())
        assert disagreement(samples, token) == np.mean(expected != token)


def test_u_moves_in_steps_of_one_over_k_within_zero_one():
    z = torch.randn(50, generator=gen(2))
    cfg = UncertaintyConfig(num_samples=7)
    for seed in range(50):
        u = disagreement(draw_samples(z, cfg, seed), token=seed % 50)
        assert 0 <= u <= 1 and abs(u * 7 - round(u * 7)) < 1e-9


def test_tiny_temperature_samples_the_argmax_and_a_huge_one_samples_uniformly():
    z = torch.tensor([0.0, 1.0, 0.5, 3.0])
    uniforms = torch.rand(4000, generator=gen(5), dtype=torch.float64)
    cold = perturbed_samples(z, torch.full((4000,), 1e-6, dtype=torch.float64), uniforms)
    assert set(cold.tolist()) == {3}
    hot = perturbed_samples(z, torch.full((4000,), 1e6, dtype=torch.float64), uniforms)
    assert stats.chisquare(np.bincount(hot.numpy(), minlength=4)).pvalue > 1e-3


def test_masked_tokens_are_never_sampled():
    z = torch.tensor([0.0, -math.inf, 1.0, -math.inf])
    uniforms = torch.rand(2000, generator=gen(8), dtype=torch.float64)
    samples = perturbed_samples(z, torch.full((2000,), 1.0, dtype=torch.float64), uniforms)
    assert set(samples.tolist()) == {0, 2}


def test_samples_at_temperature_theta_follow_softmax_z_over_theta():
    z = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    theta = 0.7
    uniforms = torch.rand(20_000, generator=gen(6), dtype=torch.float64)
    samples = perturbed_samples(z, torch.full((20_000,), theta, dtype=torch.float64), uniforms)
    observed = np.bincount(samples.numpy(), minlength=5)
    expected = torch.softmax(z.double() / theta, -1).numpy() * 20_000
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    wrong = torch.softmax(z.double(), -1).numpy() * 20_000  # theta = 1: must be rejected
    assert stats.chisquare(observed, wrong).pvalue < 1e-6


def test_expected_u_is_one_minus_mean_probability_of_the_token():
    z = torch.tensor([2.0, 1.5, 0.0, -1.0])
    cfg = UncertaintyConfig(num_samples=4, theta_max=2.0, perturbation=GRID)
    thetas = temperatures(cfg, gen())
    analytic = 1 - float(torch.softmax(z.double()[None] / thetas[:, None], -1)[:, 1].mean())
    mean_u = np.mean([disagreement(draw_samples(z, cfg, s), 1) for s in range(3000)])
    assert mean_u == pytest.approx(analytic, abs=0.015)  # SE ~ 0.005


def test_grid_without_theta_zero_does_not_penalise_a_tied_token():
    # Two equal logits, the draft is the one argmax does not pick. HiLM's grid {0, theta_max}
    # gives E[u] = (1 + 1/2) / 2 = 0.75; a grid in (0, theta_max] gives the honest 1/2.
    z = torch.zeros(2)
    cfg = UncertaintyConfig(num_samples=2, perturbation=GRID)
    mean_u = np.mean([disagreement(draw_samples(z, cfg, s), 1) for s in range(4000)])
    assert mean_u == pytest.approx(0.5, abs=0.03)


def test_entropy_gate_is_zero_for_certain_one_for_uniform():
    certain = torch.tensor([[0.0, -math.inf, -math.inf, -math.inf]])
    assert entropy_gate(certain).tolist() == [0.0]
    assert entropy_gate(torch.zeros(1, 64)).tolist() == pytest.approx([1.0])
    values = entropy_gate(torch.randn(100, 64, generator=gen(7)) * 4)
    assert bool(((values >= 0) & (values <= 1)).all())


def test_max_prob_gate_table():
    assert max_prob_gate(torch.zeros(1, 4)).tolist() == pytest.approx([0.75])
    peaked = max_prob_gate(torch.tensor([[50.0, 0.0, 0.0]]))
    assert peaked.tolist() == pytest.approx([0.0], abs=1e-6)
    p = torch.tensor([[0.5, 0.25, 0.25]])
    assert max_prob_gate(p.log()).tolist() == pytest.approx([0.5])


@pytest.mark.parametrize("vocab", [3, 512, 2048])
def test_varentropy_bound_holds_and_is_nearly_reached_by_two_level_distributions(vocab):
    # m tokens share mass a, the others 1 - a: the family that maximises varentropy
    best = 0.0
    for m in (1, 2, 5):
        for a in np.linspace(0.01, 0.99, 197):
            if m >= vocab:
                continue
            probs = np.r_[np.full(m, a / m), np.full(vocab - m, (1 - a) / (vocab - m))]
            v = float(varentropy_gate(torch.tensor(np.log(probs))[None]))
            assert v <= 1.0
            best = max(best, v)
    assert best > (0.4 if vocab == 3 else 0.95)
    assert varentropy_gate(torch.zeros(1, vocab)).tolist() == pytest.approx([0.0], abs=1e-6)
    assert varentropy_bound(vocab) > 0


def test_config_validates_and_normalises_enums():
    cfg = UncertaintyConfig(gate="entropy", perturbation="grid")
    assert cfg.gate is Gate.ENTROPY and cfg.perturbation is GRID and not cfg.needs_token
    assert UncertaintyConfig().needs_token
    for bad in (dict(num_samples=0), dict(num_samples=5000), dict(theta_max=0.0),
                dict(theta_max=float("inf")), dict(gate="nope")):
        with pytest.raises(ValueError):
            UncertaintyConfig(**bad)

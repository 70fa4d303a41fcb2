"""Threshold calibration: how well the drafter's uncertainty predicts a verifier's rejection.

For each drafted token x verified by a target, with draft probability q(x) and target
probability p(x), speculative sampling rejects with probability

    beta = max(0, 1 - p(x) / q(x)).

Calibration fits beta = a * u + b by least squares over tokens and derives two thresholds
(U-HLM): risk-averse u_th = -b / a (the u where the expected rejection reaches 0) and
risk-prone u_th = (Delta - b) / a with Delta = P(p(x) < q(x)) (the fraction of drafts that can
be rejected at all). Tokens with u <= u_th are skipped (kept without verification).

Pure numpy functions; no I/O.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass

import numpy as np


class Rule(str, enum.Enum):
    RISK_AVERSE = "risk-averse"  # u_th = -b / a
    RISK_PRONE = "risk-prone"  # u_th = (Delta - b) / a


@dataclass(frozen=True)
class LinearFit:
    a: float  # slope
    b: float  # intercept
    r2: float  # coefficient of determination (nan when beta is constant)
    n: int


@dataclass(frozen=True)
class Thresholds:
    risk_averse: float
    risk_prone: float

    def pick(self, rule: Rule) -> float:
        return self.risk_averse if Rule(rule) is Rule.RISK_AVERSE else self.risk_prone


@dataclass(frozen=True)
class Bin:
    lo: float
    hi: float
    count: int
    rejection_rate: float  # observed: 1 - accepted (nan when empty)
    mean_beta: float  # expected rejection, mean of beta (nan when empty)


@dataclass(frozen=True)
class CalibrationFit:
    fit: LinearFit
    r2_binned: float  # R^2 of the line against the mean beta per distinct u, count-weighted
    delta: float
    thresholds: Thresholds
    acceptance: float  # observed acceptance rate
    mean_beta: float  # expected rejection rate; 1 - acceptance up to sampling noise
    mean_u: float

    def summary(self) -> dict:
        return {**asdict(self.fit), "r2_binned": self.r2_binned, "delta": self.delta,
                **asdict(self.thresholds),
                "acceptance": self.acceptance, "mean_beta": self.mean_beta,
                "mean_u": self.mean_u}


def rejection_probability(p_x: np.ndarray, q_x: np.ndarray) -> np.ndarray:
    """p_x, q_x [N] -> beta [N] = max(0, 1 - p(x)/q(x)); q(x) > 0 for a drafted token."""
    p_x, q_x = np.asarray(p_x, dtype=np.float64), np.asarray(q_x, dtype=np.float64)
    if np.any(q_x <= 0):
        raise ValueError("q(x) must be > 0: a drafted token has positive draft probability")
    return np.maximum(0.0, 1.0 - p_x / q_x)


def fit_line(u: np.ndarray, beta: np.ndarray) -> LinearFit:
    """Least squares beta = a * u + b over [N] points, with R^2."""
    u, beta = np.asarray(u, dtype=np.float64), np.asarray(beta, dtype=np.float64)
    if u.shape != beta.shape or u.ndim != 1:
        raise ValueError(f"u and beta must be 1-D of equal length, got {u.shape} and {beta.shape}")
    if len(u) < 2 or np.ptp(u) == 0:
        raise ValueError("need at least two distinct u values to fit a line")
    a, b = np.polyfit(u, beta, 1)
    ss_res = float(np.sum((beta - (a * u + b)) ** 2))
    ss_tot = float(np.sum((beta - beta.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    return LinearFit(float(a), float(b), r2, len(u))


def binned_r2(u: np.ndarray, beta: np.ndarray, fit: LinearFit) -> float:
    """R^2 of the fitted line against the mean beta at each distinct u, weighted by count.

    Per-token R^2 is small whenever beta is noisy around its mean (it is: most tokens have
    beta = 0); this says how much of the variation of the *expected* rejection across u the
    line explains. With u on a 1/K grid, least squares on tokens equals weighted least squares
    on these means, so the line is the same."""
    u, beta = np.asarray(u, dtype=np.float64), np.asarray(beta, dtype=np.float64)
    values, inverse, counts = np.unique(u, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=beta) / counts
    ss_res = float(np.sum(counts * (means - (fit.a * values + fit.b)) ** 2))
    ss_tot = float(np.sum(counts * (means - beta.mean()) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan


def thresholds(fit: LinearFit, delta: float) -> Thresholds:
    """Risk-averse -b/a and risk-prone (Delta - b)/a; infinite when the slope is 0."""
    if fit.a == 0:
        return Thresholds(math.copysign(math.inf, -fit.b), math.copysign(math.inf, delta - fit.b))
    return Thresholds(-fit.b / fit.a, (delta - fit.b) / fit.a)


def binned_rates(u: np.ndarray, accepted: np.ndarray, beta: np.ndarray,
                 edges: np.ndarray) -> list[Bin]:
    """Observed rejection rate and mean beta per u bin [edges[i], edges[i+1]) (last bin closed)."""
    u = np.asarray(u, dtype=np.float64)
    rejected = 1.0 - np.asarray(accepted, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    idx = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, len(edges) - 2)
    bins = []
    for i in range(len(edges) - 1):
        sel = idx == i
        n = int(sel.sum())
        bins.append(Bin(float(edges[i]), float(edges[i + 1]), n,
                        float(rejected[sel].mean()) if n else math.nan,
                        float(beta[sel].mean()) if n else math.nan))
    return bins


def step_edges(num_samples: int) -> np.ndarray:
    """Bin edges centred on u's steps of 1/K: one bin per attainable value 0, 1/K, ..., 1."""
    return (np.arange(num_samples + 2) - 0.5) / num_samples


def calibrate(u: np.ndarray, p_x: np.ndarray, q_x: np.ndarray,
              accepted: np.ndarray) -> CalibrationFit:
    """Per-token records [N] of one drafter/verifier pair -> fit, Delta and thresholds."""
    beta = rejection_probability(p_x, q_x)
    fit = fit_line(u, beta)
    delta = float(np.mean(np.asarray(p_x) < np.asarray(q_x)))
    return CalibrationFit(fit, binned_r2(u, beta, fit), delta, thresholds(fit, delta),
                          acceptance=float(np.mean(accepted)), mean_beta=float(beta.mean()),
                          mean_u=float(np.mean(u)))

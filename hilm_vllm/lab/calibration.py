"""Threshold calibration: how well the drafter's uncertainty predicts a verifier's rejection.

For each drafted token x verified by a target, with draft probability q(x) and target
probability p(x), speculative sampling rejects with probability

    beta = max(0, 1 - p(x) / q(x)).

Calibration fits beta = a * u + b by least squares over tokens and derives two thresholds
(U-HLM): risk-averse u_th = -b / a (the u where the expected rejection reaches 0) and
risk-prone u_th = (Delta - b) / a with Delta = P(p(x) < q(x)) (the fraction of drafts that can
be rejected at all). Tokens with u <= u_th are skipped (kept without verification).

The line is U-HLM's model, not a law: on flat models its rules leave [0, 1]. Beside it (second
half of this file): a monotone model of beta against any gate value (isotonic regression), the
gate's AUC for rejection with beta as a soft label, and operating points in [0, 1] from a risk
budget or a target TR, which say why when no threshold meets the target.

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


# ---- the monotone model, AUC and operating points -----------------------------------------------
#
# U-HLM's line is a model, not a law: on flat models rejection is not linear in u and its two
# rules leave [0, 1]. Beside it, a monotone model of the expected rejection against the gate value
# g (isotonic regression, pool-adjacent-violators, weighted by tokens) gives operating points from
# what the user states:
#
# - a risk budget EPS: the largest threshold t such that the expected beta among skipped tokens
#   (g <= t) is <= EPS. With a nondecreasing model the expected beta of {g <= t} is nondecreasing
#   in t, so the feasible thresholds are an interval [0, t*] and t* is well defined; at the model's
#   block boundaries it equals the tokens' mean beta (a block's level is its tokens' mean).
#   Since TSR = 1 - mean beta among skipped tokens, a budget EPS is a target TSR >= 1 - EPS on the
#   calibration data.
# - a target TR X: the threshold at which the share of tokens sent on (g > t) is X, or the nearest
#   share the data can give (u moves in steps of 1/K: only K + 1 shares exist).
#
# A threshold is always inside [0, 1] and placed halfway between the last gate value skipped and
# the first one kept (1.0 when every value is skipped), so the float32 rounding of u on the wire
# cannot move a token across it. When no threshold in [0, 1] meets the target, the point says why
# (`met` False, `note`) and is the nearest usable one.


@dataclass(frozen=True, eq=False)
class MonotoneModel:
    """Nondecreasing step model of the expected rejection beta against a gate value.

    Arrays are [m], one entry per distinct gate value seen, ascending."""

    values: np.ndarray  # distinct gate values
    counts: np.ndarray  # tokens at each value
    means: np.ndarray  # their mean beta (the data)
    levels: np.ndarray  # the fit: isotonic (weighted least squares, nondecreasing)

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def predict(self, g) -> np.ndarray:
        """Expected beta at gate values g: the level of the largest seen value <= g (the first
        level below the first value)."""
        idx = np.searchsorted(self.values, np.asarray(g, dtype=np.float64), side="right") - 1
        return self.levels[np.clip(idx, 0, len(self.values) - 1)]

    def blocks(self) -> list[dict]:
        """Runs of equal level: {lo, hi, level, tokens} (what the JSON and YAML record)."""
        out = []
        start = 0
        for i in range(1, len(self.levels) + 1):
            if i == len(self.levels) or self.levels[i] != self.levels[start]:
                out.append({"lo": float(self.values[start]), "hi": float(self.values[i - 1]),
                            "level": float(self.levels[start]),
                            "tokens": int(self.counts[start:i].sum())})
                start = i
        return out

    def skip_curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For skipping the first j+1 values (j = 0..m-1): share of tokens skipped, expected
        beta among them by the model, and their observed mean beta. Each [m]."""
        cum_n = np.cumsum(self.counts)
        share = cum_n / cum_n[-1]
        risk = np.cumsum(self.levels * self.counts) / cum_n
        observed = np.cumsum(self.means * self.counts) / cum_n
        return share, risk, observed


def aggregate(g: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[N] gate values and labels -> distinct values [m], token counts [m], sums of y [m]."""
    g, y = np.asarray(g, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if g.shape != y.shape or g.ndim != 1 or len(g) == 0:
        raise ValueError(f"need two non-empty 1-D arrays of one length, got {g.shape}, {y.shape}")
    if not np.all(np.isfinite(g)):
        raise ValueError("gate values must be finite")
    values, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    return values, counts, np.bincount(inverse, weights=y, minlength=len(values))


def pava(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted isotonic regression (pool adjacent violators): the nondecreasing sequence that
    minimises sum w_i (y_i - f_i)^2. y, w [m] (w > 0) -> f [m]."""
    y, w = np.asarray(y, dtype=np.float64), np.asarray(w, dtype=np.float64)
    level, weight, size = [], [], []  # the current blocks
    for yi, wi in zip(y, w):
        level.append(yi)
        weight.append(wi)
        size.append(1)
        while len(level) > 1 and level[-2] > level[-1]:
            wsum = weight[-2] + weight[-1]
            level[-2] = (level[-2] * weight[-2] + level[-1] * weight[-1]) / wsum
            weight[-2] = wsum
            size[-2] += size[-1]
            del level[-1], weight[-1], size[-1]
    return np.repeat(np.asarray(level), size)


def isotonic_fit(g: np.ndarray, beta: np.ndarray) -> MonotoneModel:
    """Per-token gate values and beta [N] -> the monotone model of E[beta | g]."""
    values, counts, sums = aggregate(g, beta)
    means = sums / counts
    return MonotoneModel(values, counts, means, pava(means, counts))


def rejection_auc(g: np.ndarray, beta: np.ndarray) -> float:
    """AUC of the gate for rejection, with beta as a soft label.

    Each token counts as a positive (rejected) with weight beta and as a negative (accepted) with
    weight 1 - beta; over ordered pairs of distinct tokens i != j,

        AUC = sum beta_i (1 - beta_j) [1(g_i > g_j) + 1(g_i = g_j) / 2] / sum beta_i (1 - beta_j),

    the expected Mann-Whitney count over the expected number of (rejected, accepted) pairs when
    each token is rejected independently with probability beta (the definition of
    hilm_vllm.zoo.gates, so both report the same figure). Hard labels (beta in {0, 1}) give the
    ordinary ROC AUC with ties at 1/2. 0.5: the gate routes at random. NaN when undefined (no
    token could be rejected, or none accepted)."""
    g, beta = np.asarray(g, dtype=np.float64), np.asarray(beta, dtype=np.float64)
    values, counts, pos = aggregate(g, beta)  # per distinct value: tokens, sum of beta
    neg = counts - pos  # sum of 1 - beta
    self_pairs = float(np.sum(beta * (1.0 - beta)))  # i = j terms, all ties
    den = float(pos.sum() * neg.sum()) - self_pairs
    if den <= 1e-12:
        return math.nan
    below = np.cumsum(neg) - neg  # negative weight at lower gate values
    num = float(np.sum(pos * (below + 0.5 * neg))) - 0.5 * self_pairs
    return num / den


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold t in [0, 1] (skip when gate <= t) and what it does on the calibration data."""

    threshold: float
    met: bool  # the stated target is met by a threshold in [0, 1]
    target: str  # "risk-budget 0.05", "target-tr 0.2", "risk-prone", ...
    skipped: float  # share of tokens with gate <= t
    risk: float | None  # expected beta among them, by the monotone model (None: none skipped)
    risk_observed: float | None  # their mean beta
    note: str  # what the point means; why the target is not met when it is not

    @property
    def sent(self) -> float:
        """Share of tokens sent on to the verifier (gate > t)."""
        return 1.0 - self.skipped

    def summary(self) -> dict:
        return {**asdict(self), "sent": self.sent}


def _cut_threshold(values: np.ndarray, j: int) -> float:
    """Threshold that skips values[0..j] (j = -1: none) and keeps the rest, in [0, 1]."""
    if j >= len(values) - 1:
        return 1.0
    lo = 0.0 if j < 0 else float(values[j])
    return float(min(1.0, max(0.0, (lo + float(values[j + 1])) / 2)))


def _point(model: MonotoneModel, j: int, met: bool, target: str, note: str,
           threshold: float | None = None) -> OperatingPoint:
    share, risk, observed = model.skip_curve()
    t = _cut_threshold(model.values, j) if threshold is None else threshold
    if j < 0:
        return OperatingPoint(t, met, target, 0.0, None, None, note)
    return OperatingPoint(t, met, target, float(share[j]), float(risk[j]), float(observed[j]),
                          note)


def _fmt_share(x: float) -> str:
    return f"{100 * x:.1f}%"


def risk_budget_point(model: MonotoneModel, eps: float) -> OperatingPoint:
    """The largest threshold whose skipped tokens have expected beta <= eps (monotone model)."""
    if not 0 <= eps <= 1 or math.isnan(eps):
        raise ValueError(f"a risk budget is an expected rejection rate in [0, 1], got {eps}")
    target = f"risk-budget {eps:g}"
    _, risk, _ = model.skip_curve()
    ok = np.flatnonzero(risk <= eps + 1e-12)  # a prefix: risk is nondecreasing
    lowest = float(model.values[0])
    if len(ok) == len(risk):
        return _point(model, len(risk) - 1, True, target,
                      f"every token fits the budget (expected rejection {risk[-1]:.3f} <= "
                      f"{eps:g}): t = 1 skips everything")
    if len(ok):
        j = int(ok[-1])
        nxt = float(model.values[j + 1])
        return _point(model, j, True, target,
                      f"skips gate <= {float(model.values[j]):.4g} (expected rejection "
                      f"{risk[j]:.3f} <= {eps:g}); adding the next value {nxt:.4g} would give "
                      f"{risk[j + 1]:.3f}")
    why = (f"the lowest gate value {lowest:.4g} ({_fmt_share(model.counts[0] / model.n)} of "
           f"tokens) already has expected rejection {model.levels[0]:.3f} > {eps:g}")
    if lowest > 0:
        return _point(model, -1, True, target,
                      f"skips nothing: {why}; every token is sent on")
    return _point(model, 0, False, target,
                  f"no threshold in [0, 1] meets the budget: {why}, and no threshold in [0, 1] "
                  f"lies below it. Nearest usable point: t = 0, which skips those tokens at "
                  f"expected rejection {model.levels[0]:.3f}; to verify every token use a "
                  f"lossless policy (spec, hlm)", threshold=0.0)


def target_tr_point(model: MonotoneModel, tr: float, tol: float = 0.01) -> OperatingPoint:
    """The threshold at which the share of tokens sent on (gate > t) is closest to tr; met when
    within tol."""
    if not 0 <= tr <= 1 or math.isnan(tr):
        raise ValueError(f"a target TR is a share of tokens in [0, 1], got {tr}")
    target = f"target-tr {tr:g}"
    share, _, _ = model.skip_curve()
    cuts = list(range(len(share)))  # skip values[0..j]
    sent = [1.0 - float(s) for s in share]
    if model.values[0] > 0:  # a threshold in [0, values[0]) skips nothing
        cuts.insert(0, -1)
        sent.insert(0, 1.0)
    errors = np.abs(np.asarray(sent) - tr)
    best = int(np.flatnonzero(errors == errors.min())[-1])  # ties: the cheaper (fewer sent)
    j, got = cuts[best], sent[best]
    if errors[best] <= tol:
        return _point(model, j, True, target,
                      f"sends {_fmt_share(got)} of tokens on (target {_fmt_share(tr)})")
    if tr > max(sent):
        why = (f"even t = 0 skips the {_fmt_share(1 - max(sent))} of tokens at gate "
               f"{float(model.values[0]):.4g}: at most {_fmt_share(max(sent))} can be sent on with "
               f"a threshold in [0, 1]")
    else:
        lower = max((s for s in sent if s < tr), default=None)
        upper = min((s for s in sent if s > tr), default=None)
        why = (f"the gate takes {len(model.values)} distinct values, so the shares sent on jump "
               f"from {_fmt_share(lower) if lower is not None else '-'} to "
               f"{_fmt_share(upper) if upper is not None else '-'}")
    return _point(model, j, False, target,
                  f"no threshold sends {_fmt_share(tr)} on: {why}. Nearest: "
                  f"{_fmt_share(got)}")


def rule_point(value: float, model: MonotoneModel, rule: Rule | str) -> OperatingPoint:
    """U-HLM's rule value as an operating point, clipped into [0, 1] when the line puts it
    outside (met False, with the reason)."""
    rule = Rule(rule)
    if math.isnan(value):
        raise ValueError(f"{rule.value} threshold is NaN")
    t = min(1.0, max(0.0, value))
    j = int(np.searchsorted(model.values, t, side="right")) - 1
    share, risk, observed = model.skip_curve()
    if 0 <= value <= 1:
        met, note = True, f"{rule.value} rule of the linear fit: u_th = {value:.4g}"
    elif value > 1:
        met, note = False, (f"the {rule.value} rule gives {value:.4g} > 1 (the fitted line does "
                            f"not reach its target on [0, 1]); clipped to 1: skips everything")
    else:
        met, note = False, (f"the {rule.value} rule gives {value:.4g} < 0; clipped to 0")
    if j < 0:
        return OperatingPoint(t, met, rule.value, 0.0, None, None, note)
    return OperatingPoint(t, met, rule.value, float(share[j]), float(risk[j]),
                          float(observed[j]), note)


def best_gate(auc: dict[str, float]) -> str:
    """The gate with the highest AUC (NaN counts as 0.5, ties: the first named)."""
    if not auc:
        raise ValueError("no gate to choose from")
    return max(auc, key=lambda g: 0.5 if math.isnan(auc[g]) else auc[g])


@dataclass(frozen=True, eq=False)
class PairCalibration:
    """One gate on one drafter -> verifier pair: U-HLM's line (None when the gate has fewer
    than two distinct values), the monotone model and the AUCs."""

    linear: CalibrationFit | None
    linear_error: str | None  # why there is no line
    monotone: MonotoneModel
    auc: float  # beta as a soft label
    auc_observed: float  # observed rejections as hard labels
    delta: float
    acceptance: float
    mean_beta: float
    mean_gate: float
    n: int

    def summary(self) -> dict:
        lin = self.linear.summary() if self.linear is not None else {}
        return {"auc": self.auc, "auc_observed": self.auc_observed, "delta": self.delta,
                "acceptance": self.acceptance, "mean_beta": self.mean_beta,
                "mean_gate": self.mean_gate, "n": self.n,
                "linear": lin or None, "linear_error": self.linear_error,
                "monotone": self.monotone.blocks()}


def calibrate_pair(g: np.ndarray, p_x: np.ndarray, q_x: np.ndarray,
                   accepted: np.ndarray) -> PairCalibration:
    """Per-token records [N] of one gate on one pair -> line, monotone model, AUCs."""
    g = np.asarray(g, dtype=np.float64)
    beta = rejection_probability(p_x, q_x)
    accepted = np.asarray(accepted, dtype=bool)
    try:
        linear, error = calibrate(g, p_x, q_x, accepted), None
    except ValueError as e:
        linear, error = None, str(e)
    return PairCalibration(
        linear, error, isotonic_fit(g, beta), rejection_auc(g, beta),
        rejection_auc(g, (~accepted).astype(np.float64)),
        delta=float(np.mean(np.asarray(p_x) < np.asarray(q_x))),
        acceptance=float(accepted.mean()), mean_beta=float(beta.mean()),
        mean_gate=float(g.mean()), n=len(g))

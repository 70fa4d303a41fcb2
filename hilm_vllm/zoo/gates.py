"""How well each uncertainty gate predicts the larger model's rejection of a draft.

For a tier pair drafter -> target (SLM->ILM, SLM->LLM, ILM->LLM), at held-out positions:

- the drafter drafts `x ~ q` at T = 1 (one fixed-seed draw per position and drafter, so SLM->ILM
  and SLM->LLM judge the same SLM drafts);
- `beta = max(0, 1 - p(x) / q(x))` is the target's rejection probability of that draft under exact
  speculative sampling (p: the target's distribution at T = 1);
- each gate scores the draft: the perturbed-temperature `u` (the default `UncertaintyConfig`,
  seeded per position with `seeds.derive_seed`), `entropy`, `var-entropy`, `max-prob` (all from
  hilm_vllm.uncertainty, on the drafter's raw logits), and `1-q` = 1 - q(x).

Figures per gate (a gate routes a token to the target when it is high, skips it when low):

- `auc`: AUC for rejection with beta as a soft label. Each position is a positive with weight beta
  and a negative with weight 1 - beta; AUC = sum over ordered pairs i != j of
  beta_i (1 - beta_j) [1(g_i > g_j) + 1/2 1(g_i = g_j)], divided by sum over i != j of
  beta_i (1 - beta_j). It is the ratio of the expected Mann-Whitney counts under independent
  accept/reject draws with P(reject) = beta, with no sampling noise. A constant gate scores 0.5;
  beta itself (the `oracle` entry) scores the best any gate can on these positions (below 1,
  since a soft label is never certain).
- `spearman`: rank correlation of the gate with beta (average ranks for ties).
- `risk`: for each skip fraction s of `SKIP_GRID`, the mean beta among the skipped tokens when
  the fraction s with the lowest gate is skipped (ties at the boundary shared in proportion, i.e.
  the expectation over random tie-breaking). Skipping at random gives `mean_beta` at every s.

Everything here but `evaluate_gates` is a pure function of arrays or tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from hilm_vllm.uncertainty import (
    TOKEN_FREE_GATES,
    Gate,
    UncertaintyConfig,
    disagreement,
    draw_samples,
)

from hilm_vllm.seeds import Stream, derive_seed
from hilm_vllm.zoo.train import exit_logits, sample_windows

PAIRS = ("slm->ilm", "slm->llm", "ilm->llm")
GATES = (Gate.PERTURBED.value, Gate.ENTROPY.value, Gate.VAR_ENTROPY.value, Gate.MAX_PROB.value,
         "1-q")
ORACLE = "oracle"  # beta itself: the ceiling for any gate
SKIP_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def soft_auc(gate: np.ndarray, beta: np.ndarray) -> float:
    """AUC for rejection with soft labels (see the module doc). gate, beta: [N] -> float."""
    g = np.asarray(gate, dtype=np.float64)
    pos = np.asarray(beta, dtype=np.float64)
    neg = 1.0 - pos
    order = np.argsort(g, kind="stable")
    g, pos, neg = g[order], pos[order], neg[order]
    # group equal gate values; negative weight strictly below and within each group
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    group = np.cumsum(np.r_[True, g[1:] != g[:-1]]) - 1
    neg_in = np.add.reduceat(neg, starts)
    neg_below = np.r_[0.0, np.cumsum(neg_in)[:-1]]
    # ties count 1/2, excluding the position paired with itself
    num = (pos * (neg_below[group] + 0.5 * (neg_in[group] - neg))).sum()
    den = pos.sum() * neg.sum() - (pos * neg).sum()
    return float(num / den) if den > 0 else 0.5


def spearman(gate: np.ndarray, beta: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); 0 when either side is constant."""
    from scipy.stats import rankdata

    a, b = rankdata(gate), rankdata(beta)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def risk_curve(gate: np.ndarray, beta: np.ndarray, grid=SKIP_GRID) -> list[float]:
    """Mean beta among the skipped tokens when the lowest-gate fraction s is skipped, per s."""
    g = np.asarray(gate, dtype=np.float64)
    b = np.asarray(beta, dtype=np.float64)
    n = len(g)
    order = np.argsort(g, kind="stable")
    g, b = g[order], b[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    ends = np.r_[starts[1:], n]
    sums = np.add.reduceat(b, starts)
    cum_n = np.r_[0, ends]  # tokens below each group, then the total
    cum_b = np.r_[0.0, np.cumsum(sums)]
    out = []
    for s in grid:
        m = s * n
        k = int(np.searchsorted(cum_n, m, side="right")) - 1  # the group the boundary falls in
        k = min(k, len(starts) - 1)
        part = (m - cum_n[k]) / (ends[k] - starts[k])  # share of that group skipped
        total = cum_b[k] + part * sums[k]
        out.append(float(total / m) if m > 0 else 0.0)
    return out


def draft(q_logits: torch.Tensor, seed: int) -> torch.Tensor:
    """One token per row drawn from softmax(q_logits) (T = 1), from a generator seeded by
    `seed`. q_logits: [N, V] -> [N] int64."""
    gen = torch.Generator().manual_seed(derive_seed(seed, 0, Stream.ZOO_DRAFT))
    probs = torch.softmax(q_logits.double(), dim=-1)
    return torch.multinomial(probs, 1, generator=gen).view(-1)


def rejection(q_logits: torch.Tensor, p_logits: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """beta = max(0, 1 - p(x) / q(x)) per row. [N, V], [N, V], [N] -> [N] float64."""
    q = torch.softmax(q_logits.double(), -1).gather(-1, x[:, None]).view(-1)
    p = torch.softmax(p_logits.double(), -1).gather(-1, x[:, None]).view(-1)
    return (1.0 - p / q).clamp_min(0.0).numpy()


def gate_values(q_logits: torch.Tensor, x: torch.Tensor, seed: int,
                cfg: UncertaintyConfig | None = None) -> dict[str, np.ndarray]:
    """Every gate's score of the drafted tokens: name -> [N] float64 (high = uncertain)."""
    cfg = cfg or UncertaintyConfig()
    u = np.array([disagreement(draw_samples(q_logits[i], cfg,
                                            derive_seed(seed, i, Stream.ZOO_PERTURBATION)), int(x[i]))
                  for i in range(len(x))])
    out = {Gate.PERTURBED.value: u}
    for gate, fn in TOKEN_FREE_GATES.items():
        out[gate.value] = fn(q_logits).double().numpy()
    q = torch.softmax(q_logits.double(), -1).gather(-1, x[:, None]).view(-1)
    out["1-q"] = (1.0 - q).numpy()
    return out


def gate_report(gates: dict[str, np.ndarray], beta: np.ndarray, grid=SKIP_GRID) -> dict:
    """{gate: {auc, spearman, risk}} for each gate and the oracle, plus mean_beta."""
    def one(g: np.ndarray) -> dict:
        return {"auc": round(soft_auc(g, beta), 4), "spearman": round(spearman(g, beta), 4),
                "risk": [round(r, 4) for r in risk_curve(g, beta, grid)]}

    report = {name: one(g) for name, g in gates.items()}
    report[ORACLE] = one(beta)
    report["mean_beta"] = round(float(np.mean(beta)), 4)
    return report


def evaluate_gates(model, heldout: np.ndarray, recipe,
                   cfg: UncertaintyConfig | None = None) -> dict:
    """The manifest's "gates" section: every pair and gate on `recipe.eval_windows` held-out
    windows (other windows than the losses'), drafts and perturbations seeded from the recipe."""

    cfg = cfg or UncertaintyConfig()
    rng = np.random.default_rng(recipe.seed + 2)
    windows = sample_windows(heldout, recipe.eval_windows, recipe.seq_len + 1, rng)
    depths = (recipe.slm_layers, recipe.ilm_layers, recipe.num_layers)
    parts: dict[str, list[torch.Tensor]] = {"slm": [], "ilm": [], "llm": []}
    with torch.no_grad():
        for chunk in windows.split(8):
            for name, lg in zip(parts, exit_logits(model, chunk[:, :-1], depths)):
                parts[name].append(lg.reshape(-1, lg.shape[-1]).float())
    logits = {name: torch.cat(v) for name, v in parts.items()}
    drafts, scores = {}, {}
    for index, name in enumerate(("slm", "ilm")):  # one seed per drafting model
        seed = derive_seed(recipe.seed, index, Stream.DRAFT_SAMPLE)
        drafts[name] = draft(logits[name], seed)
        scores[name] = gate_values(logits[name], drafts[name], seed, cfg)
    result = {
        "positions": int(drafts["slm"].numel()),
        "temperature": 1.0,
        "uncertainty": {"num_samples": cfg.num_samples, "theta_max": cfg.theta_max,
                        "perturbation": cfg.perturbation.value},
        "auc": "soft-label AUC for rejection: each position a positive of weight beta and a "
               "negative of weight 1-beta (noise-free; no sampled accept/reject)",
        "risk": "mean beta among skipped tokens when the lowest-gate fraction s is skipped",
        "skip_grid": list(SKIP_GRID),
    }
    for pair in PAIRS:
        d, t = pair.split("->")
        beta = rejection(logits[d], logits[t], drafts[d])
        result[pair] = gate_report(scores[d], beta)
    return result


def format_gates(gates: dict) -> str:
    """The manifest's "gates" section as text tables, one per pair: AUC, Spearman and the
    risk-vs-skip curve of each gate, the oracle, and the random-skip baseline."""
    grid = gates.get("skip_grid", list(SKIP_GRID))
    head = f"{'gate':<12} {'AUC':>6} {'rho':>6}  " + " ".join(f"s={s:<4.1f}" for s in grid)
    lines = [f"gates: rejection of a T = 1 draft, {gates.get('positions', '?')} held-out positions "
             f"(AUC with beta as soft label; risk = mean beta among the skipped, skipping the "
             f"lowest-gate fraction s)"]
    for pair in PAIRS:
        if pair not in gates:
            continue
        rows = gates[pair]
        lines += ["", f"{pair}", head]
        for name in (*GATES, ORACLE):
            if name in rows:
                r = rows[name]
                lines.append(f"{name:<12} {r['auc']:>6.3f} {r['spearman']:>6.3f}  "
                             + " ".join(f"{v:<6.3f}" for v in r["risk"]))
        mb = rows.get("mean_beta")
        if mb is not None:
            lines.append(f"{'random':<12} {0.5:>6.3f} {0.0:>6.3f}  "
                         + " ".join(f"{mb:<6.3f}" for _ in grid))
    return "\n".join(lines)

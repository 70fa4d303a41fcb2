"""Drafter uncertainty: the perturbed-temperature disagreement of U-HLM, and cheaper gates.

Pure functions of tensors (no I/O, no vLLM): the drafter's logits processor calls them on the raw
logits of each drafted position, and the tests call them directly. Each keeps its work on the
device of the logits it is given (on a GPU tier: the GPU); random numbers come from CPU
generators, so a seed means the same draws on every device, and are moved there.

Perturbed temperature (the default gate). For a drafted token `x` with raw logits `z`:

    u = (1/K) * sum_k 1[x_k != x],      x_k ~ softmax(z / theta_k)

drawn by inverse CDF in float64: one uniform per sample, searched in the cumulative sums of
exp((z - max z) * (1 / theta_k)) (Gumbel-max would need K x V noise draws; this is 3x cheaper). `u`
moves in steps of 1/K (K = 20: 0, 0.05, ..., 1), so thresholds between two steps are
equivalent; calibration works on those steps.

Temperature schedules:
- `uniform` (U-HLM): theta_k ~ U(0, theta_max], redrawn for every token.
- `grid` (HiLM, for comparison): theta_k = theta_max * k / K, k = 1..K. HiLM's grid started at
  theta = 0, where the "sample" is the argmax: every non-argmax draft then disagrees with at least
  one sample, so u >= 1/K for it whatever the distribution looks like. Starting at theta_max / K
  avoids that; the uniform schedule draws theta = theta_max * (1 - U) with U in [0, 1), which is
  never 0 either (small theta still behave like argmax, as they should).

Other gates are functions of the model's own distribution softmax(z) (temperature 1, like the
perturbed gate they ignore the request's temperature), each scaled to [0, 1]:
- `entropy`: H / log V (1 = uniform).
- `var-entropy`: Var[-log p(X)] / (log^2(V - 1) / 4 + 1), clipped to [0, 1]. The denominator is
  an upper bound on the varentropy of a distribution over V outcomes (two-level distributions
  come within 0.1% of it for V >= 512; see tests).
- `max-prob`: 1 - max_x p(x).
They do not depend on the drafted token and are continuous, not steps of 1/K.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

MAX_SAMPLES = 1024  # K above this costs K*V noise per token for no measurable gain
LSE_CHUNK = 8192  # vocabulary columns per step of the perturbed gate's sums (cache-sized)


class Gate(str, enum.Enum):
    PERTURBED = "perturbed"  # (1/K) sum 1[x_k != x] at perturbed temperatures
    ENTROPY = "entropy"
    VAR_ENTROPY = "var-entropy"
    MAX_PROB = "max-prob"


class Perturbation(str, enum.Enum):
    UNIFORM = "uniform"  # theta_k ~ U(0, theta_max] per token (U-HLM)
    GRID = "grid"  # theta_k = theta_max * k / K (HiLM, without its theta = 0)


@dataclass(frozen=True)
class UncertaintyConfig:
    gate: Gate = Gate.PERTURBED
    num_samples: int = 20  # K (U-HLM's default)
    theta_max: float = 2.0  # U-HLM's default
    perturbation: Perturbation = Perturbation.UNIFORM

    def __post_init__(self) -> None:
        object.__setattr__(self, "gate", Gate(self.gate))
        object.__setattr__(self, "perturbation", Perturbation(self.perturbation))
        if not 1 <= self.num_samples <= MAX_SAMPLES:
            raise ValueError(f"num_samples (K) must be in [1, {MAX_SAMPLES}], "
                             f"got {self.num_samples}")
        if not (0 < self.theta_max <= 100 and math.isfinite(self.theta_max)):
            raise ValueError(f"theta_max must be in (0, 100], got {self.theta_max}")

    @property
    def needs_token(self) -> bool:
        """True when u depends on the drafted token (known only after it is sampled)."""
        return self.gate is Gate.PERTURBED


def temperatures(cfg: UncertaintyConfig, generator: torch.Generator) -> torch.Tensor:
    """The K perturbation temperatures of one token: [K] float64, all in (0, theta_max]."""
    k = cfg.num_samples
    if cfg.perturbation is Perturbation.GRID:
        return cfg.theta_max * torch.arange(1, k + 1, dtype=torch.float64) / k
    return cfg.theta_max * (1.0 - torch.rand(k, generator=generator, dtype=torch.float64))


def perturbed_samples(logits: torch.Tensor, thetas: torch.Tensor,
                      uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF samples x_k ~ softmax(z / theta_k).

    logits: [V] raw; thetas: [K]; uniforms: [K] in [0, 1) -> samples [K] (int64), on the
    logits' device (thetas and uniforms may come from a CPU generator: they are moved there)."""
    z = logits.double()
    z = z - z.max()
    thetas = thetas.to(z.device, torch.float64)
    uniforms = uniforms.to(z.device, torch.float64)
    cdf = torch.outer(thetas.reciprocal(), z).exp_().cumsum_(-1)  # [K, V], unnormalised
    picks = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)  # [K, 1]
    return picks.view(-1).clamp_max_(logits.shape[-1] - 1)


def draw_samples(logits: torch.Tensor, cfg: UncertaintyConfig, seed: int) -> torch.Tensor:
    """logits [V] raw -> the K perturbed samples [K], from a generator seeded by `seed`.

    Draw order (K temperatures, then K uniforms, float64) is part of the contract: tests
    replay it. The 2K numbers are drawn on a CPU generator (the same draws on every device),
    then moved to the logits' device, where the K x V work runs."""
    gen = torch.Generator().manual_seed(seed)
    thetas = temperatures(cfg, gen)
    uniforms = torch.rand(cfg.num_samples, generator=gen, dtype=torch.float64)
    return perturbed_samples(logits, thetas, uniforms)


def noise(cfg: UncertaintyConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K temperatures and K uniforms of one token ([K] float64 each, CPU), drawn in
    `draw_samples`' order from a generator seeded by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    thetas = temperatures(cfg, gen)
    return thetas, torch.rand(cfg.num_samples, generator=gen, dtype=torch.float64)


def perturbed_disagreement(logits: torch.Tensor, tokens: torch.Tensor, thetas: torch.Tensor,
                           uniforms: torch.Tensor) -> torch.Tensor:
    """The perturbed gate for B tokens at once, without drawing K x V samples.

    logits [B, V] raw; tokens [B] (the drafted tokens); thetas, uniforms [B, K] -> u [B]
    float64 on the logits' device. u has exactly the law of (1/K) sum_k 1[x_k != x] with
    x_k ~ softmax(z / theta_k): x_k equals x with probability pi_k = softmax(z / theta_k)[x],
    so 1[x_k == x] is drawn as 1[U_k < pi_k]. One sum of exponentials over V per (row, k) in
    float32, in cache-sized column chunks (the inverse-CDF draw needs a float64 cumulative sum of
    K x V instead: ~3x the work; the drafted token is known when this runs)."""
    z = logits.float()
    inv = thetas.to(z.device, torch.float32).reciprocal()  # [B, K]
    uniforms = uniforms.to(z.device, torch.float64)
    tokens = tokens.to(z.device, torch.long)
    out = torch.empty(z.shape[0], dtype=torch.float64, device=z.device)
    for i in range(z.shape[0]):
        zs = z[i] - z[i].max()  # <= 0: exp(inv * zs) cannot overflow
        # sum_v exp(z_v / theta_k) over the vocabulary in column chunks: a [K, V] temporary of
        # a 128k vocabulary (10 MB) falls out of cache and costs 3x the arithmetic
        sums = torch.zeros(inv.shape[1], dtype=torch.float32, device=z.device)
        for lo in range(0, zs.shape[0], LSE_CHUNK):
            sums += torch.exp(inv[i][:, None] * zs[None, lo:lo + LSE_CHUNK]).sum(-1)
        log_pi = inv[i] * zs.gather(0, tokens[i:i + 1]) - sums.log()  # [K]
        same = uniforms[i] < log_pi.double().exp()
        # (K - agreeing) / K in float64, as disagreement() computes it; no host sync
        out[i] = (~same).sum(dtype=torch.float64) / same.numel()
    return out


def perturbed_u(logits: torch.Tensor, token: int, cfg: UncertaintyConfig, seed: int) -> float:
    """logits [V] raw -> u of `token` (the perturbed gate; noise from `noise(cfg, seed)`)."""
    thetas, uniforms = noise(cfg, seed)
    tokens = torch.tensor([token])
    return float(perturbed_disagreement(logits[None, :], tokens, thetas[None], uniforms[None])[0])


def disagreement(samples: torch.Tensor, token: int) -> float:
    """samples [K] -> u = fraction of samples that differ from the drafted token (steps of 1/K)."""
    return float((samples != token).sum()) / samples.numel()


def entropy_gate(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] raw -> H(softmax(z)) / log V, [B] in [0, 1]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)  # 0 * log 0 = 0
    return (h / math.log(logits.shape[-1])).clamp(0.0, 1.0)


def varentropy_bound(vocab: int) -> float:
    """Upper bound on Var[-log p(X)] over distributions on `vocab` outcomes."""
    return math.log(max(vocab - 1, 1)) ** 2 / 4 + 1


def varentropy_gate(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] raw -> Var[-log p(X)] / varentropy_bound(V), [B] clipped to [0, 1]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    logp = logp.nan_to_num(neginf=0.0)  # 0 * log 0 = 0 for masked tokens
    h = -(p * logp).sum(-1, keepdim=True)
    var = (p * (logp + h) ** 2).sum(-1)
    return (var / varentropy_bound(logits.shape[-1])).clamp(0.0, 1.0)


def max_prob_gate(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] raw -> 1 - max_x softmax(z)(x), [B] in [0, 1 - 1/V]."""
    return 1.0 - torch.softmax(logits.float(), dim=-1).amax(-1)


TOKEN_FREE_GATES = {
    Gate.ENTROPY: entropy_gate,
    Gate.VAR_ENTROPY: varentropy_gate,
    Gate.MAX_PROB: max_prob_gate,
}

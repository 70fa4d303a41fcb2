"""Exact speculative sampling of one draft block: the accept / recover step as pure tensor math.

Vocabulary, as in vLLM's `v1/sample/rejection_sampler.py`. A block holds n draft tokens
x_1..x_n, x_i drawn by the drafter from q_i; p_i is the verifier's distribution at the same
position, after the request's temperature / top-k / top-p (`sampling.processed_probs`).

    output = accepted + recovered    when some x_i is rejected (m < n)
    output = accepted + bonus        when all n are accepted   (m = n)

- accepted: x_1..x_m. x_i is accepted iff u_i * q_i(x_i) < p_i(x_i) with u_i ~ U[0, 1), that is
  with probability min(1, p_i(x_i) / q_i(x_i)); m is the index of the first rejection.
- recovered: one sample of normalize(max(0, p_m - q_m)) at the first rejected position.
- bonus: one sample of p_{n+1}, the row after the last draft position (given as `bonus`).
- Greedy (temperature 0): x_i is accepted iff it is the argmax of p_i; recovered = argmax p_m,
  bonus = argmax p_{n+1}.

With these rules every output token is an exact sample of p (Leviathan et al. 2023; Chen et al.
2023). q only travels sparse (its support); a row is made dense only where it is needed.

Randomness: one generator per block, used in a fixed order: n uniforms (float32), then exactly
one categorical draw (the recovered or the bonus token), by inverse CDF from one float64
uniform. Draws happen on the generator's own device (a CPU generator gives the same numbers on
every device) and are moved to p's device; all the work on rows of p stays on p's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SparseRows:
    """n sparse distributions in one flat table: row i is ids/probs[offsets[i]:offsets[i + 1]]."""

    ids: torch.Tensor  # [total] int64
    probs: torch.Tensor  # [total] float32
    offsets: torch.Tensor  # [n + 1] int64, offsets[0] == 0

    @classmethod
    def from_lists(cls, rows: Sequence[tuple[Sequence[int], Sequence[float]]]) -> SparseRows:
        """Rows given as (ids, probs) pairs of numpy arrays or sequences: concatenated with
        numpy, never entry by entry."""
        lengths = np.array([len(ids) for ids, _ in rows], dtype=np.int64)
        ids = (np.concatenate([np.asarray(i, np.int64) for i, _ in rows]) if rows
               else np.zeros(0, np.int64))
        probs = (np.concatenate([np.asarray(p, np.float32) for _, p in rows]) if rows
                 else np.zeros(0, np.float32))
        offsets = np.concatenate([[0], lengths.cumsum()]).astype(np.int64)
        return cls(torch.from_numpy(ids), torch.from_numpy(probs), torch.from_numpy(offsets))

    def normalised(self) -> SparseRows:
        """Each row divided by its sum (float64 sums): the law of a row sent as weights (a
        drafter's float16 row sums to 1 only within 1e-3)."""
        row_of = torch.searchsorted(self.offsets[1:], torch.arange(
            self.ids.numel(), device=self.ids.device), right=True)
        sums = torch.zeros(len(self), dtype=torch.float64, device=self.probs.device)
        sums.index_add_(0, row_of, self.probs.double())
        return SparseRows(self.ids, (self.probs.double() / sums[row_of]).float(), self.offsets)

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def to(self, device: torch.device) -> SparseRows:
        return SparseRows(self.ids.to(device), self.probs.to(device), self.offsets.to(device))

    def dense(self, i: int, vocab_size: int) -> torch.Tensor:
        """Row i as a dense [vocab_size] float32 vector."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        row = torch.zeros(vocab_size, dtype=torch.float32, device=self.probs.device)
        return row.index_put_((self.ids[lo:hi],), self.probs[lo:hi], accumulate=True)

    def prob_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [n] -> q_i(tokens[i]) [n] (0 where a token is not in its row's support)."""
        entries = torch.arange(self.ids.numel(), device=self.ids.device)  # [total]
        # row of each entry (searchsorted: repeat_interleave takes ~10 ms on CPU in torch 2.13)
        row_of = torch.searchsorted(self.offsets[1:], entries, right=True)  # [total]
        hit = self.ids == tokens[row_of]  # [total]
        out = torch.zeros(len(self), dtype=torch.float32, device=tokens.device)
        return out.index_add_(0, row_of[hit], self.probs[hit])


@dataclass(frozen=True)
class BlockOutcome:
    num_accepted: int  # m
    recovered: int | None  # the token at position m when m < n; None when all were accepted
    target_probs: torch.Tensor  # [n] p_i(x_i), for calibration
    bonus: int | None = None  # the token at position n when m = n and a bonus row was given

    @property
    def next_token(self) -> int | None:
        """The token after the accepted ones: the recovered or the bonus token."""
        return self.recovered if self.recovered is not None else self.bonus


def _device_of(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def uniforms(n: int, generator: torch.Generator | None, device: torch.device,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n uniforms in [0, 1), drawn on the generator's device (default: the CPU's default
    generator), then moved to `device`."""
    return torch.rand(n, generator=generator, dtype=dtype, device=_device_of(generator)).to(device)


def sample_categorical(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """weights [V] >= 0 (not all 0, unnormalised) -> one index i drawn w.p. weights[i] / sum.

    Inverse CDF: one float64 uniform u (see `uniforms`), the first i whose cumulative sum
    exceeds u * total, on the weights' device. A zero weight is never drawn: its cumulative sum
    equals its predecessor's, and u * total is kept below the total."""
    cdf = weights.double().cumsum(0)  # [V]
    total = cdf[-1:]  # [1]
    x = uniforms(1, generator, cdf.device, torch.float64) * total
    x = torch.minimum(x, torch.nextafter(total, torch.zeros_like(total)))
    return int(torch.searchsorted(cdf, x, right=True)[0])


def first_rejection(accepted: torch.Tensor) -> int:
    """accepted [n] bool -> index of the first False, or n when all are True."""
    rejected = (~accepted).nonzero()
    return int(rejected[0]) if rejected.numel() else int(accepted.numel())


def accept_mask(p_x: torch.Tensor, q_x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """p_x, q_x, u [n] -> [n] bool: accept iff u * q(x) < p(x), i.e. w.p. min(1, p(x)/q(x))."""
    return u * q_x < p_x


def sample_residual(p: torch.Tensor, q: torch.Tensor,
                    generator: torch.Generator | None) -> int:
    """p, q [V] -> one sample of normalize(max(0, p - q))."""
    residual = (p - q).clamp_min(0)
    if not float(residual.sum()) > 0:
        # Unreachable in exact arithmetic: a rejection implies q(x) > p(x), hence mass elsewhere.
        # Rounding can leave nothing when p == q; then p itself is the residual's limit.
        residual = p
    return sample_categorical(residual, generator)


def verify_block(p: torch.Tensor, draft: torch.Tensor, q: SparseRows,
                 generator: torch.Generator | None, greedy: bool = False,
                 bonus: torch.Tensor | None = None) -> BlockOutcome:
    """p [n, V] processed target probabilities at the n draft positions; draft [n] int64;
    q: the n draft distributions (sparse); bonus [V]: p_{n+1}, the processed row after the last
    draft position (None: no bonus token is drawn). Returns m and the recovered or bonus token
    (see module doc). The work runs on p's device; draft and q are moved there.

    The generator is used only when not greedy: n uniforms, then one categorical draw (the
    residual at m < n, or the bonus at m = n when a bonus row is given)."""
    n = draft.numel()
    device = p.device
    draft = draft.to(device)
    target_probs = p.gather(1, draft[:, None]).squeeze(1) if n else p.new_zeros(0)  # [n]
    if greedy:
        argmax = p.argmax(-1)  # [n]
        m = first_rejection(draft == argmax)
        recovered = int(argmax[m]) if m < n else None
        bonus_token = int(bonus.argmax()) if m == n and bonus is not None else None
        return BlockOutcome(m, recovered, target_probs, bonus_token)
    u = uniforms(n, generator, device)  # [n]
    q = q.to(device)
    m = first_rejection(accept_mask(target_probs, q.prob_of(draft), u))
    recovered = bonus_token = None
    if m < n:
        recovered = sample_residual(p[m], q.dense(m, p.shape[-1]), generator)
    elif bonus is not None:
        bonus_token = sample_categorical(bonus, generator)
    return BlockOutcome(m, recovered, target_probs, bonus_token)

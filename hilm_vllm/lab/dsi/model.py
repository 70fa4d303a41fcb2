"""The DSI cost model: pure math over numpy, no I/O.

Time unit = one target forward. A run generates `S` tokens.

- non-SI: one target forward per token, cost `S`.
- SI: each round drafts `k` tokens (cost `k*c`) and verifies them (cost 1); the round commits the
  accepted drafts plus the target's correction (or bonus) token: `X + 1` tokens.
- DSI: the drafter never waits; every block of `k` drafts goes to a free target server. Only the
  verification that rejects sits on the critical path. A *segment* is a run of fully accepted
  blocks closed by one rejecting block; it costs `min(drafting + 1, tokens)`: the speculative path
  races a target-only path that produces one token per forward, so DSI is never slower than
  non-SI. DSI's bound assumes enough servers that no block waits: `N >= ceil(1 / (k*c))`.

Accepted drafts per round: `X = min(Geom(1 - a) - 1, k)`, the successes before the first failure.
SI and DSI read the same stream of `X` (one value per round / per block), so their difference
is the algorithm, not the dice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# 1 / (k*c) is often an integer in exact arithmetic but not in floats: a grid's c = 0.1 may be
# 0.09999999999999999, and k = 5 then gives 2.0000000000000004; without the slack, ceil would
# demand one server too many.
_CEIL_SLACK = 1e-9


def min_servers(c: float, k: int) -> int:
    """Smallest number of target servers such that no drafted block waits for a server.

    A block is ready every `k*c`, and a verification takes 1, so at most `ceil(1 / (k*c))` run
    at once."""
    return max(1, math.ceil(1.0 / (k * c) - _CEIL_SLACK))


def is_valid(c: float, k: int, n_servers: int) -> bool:
    return n_servers >= min_servers(c, k)


def sample_accepted(rng: np.random.Generator, a: float, k: int, size: int) -> np.ndarray:
    """`size` draws of X = min(Geom(1 - a) - 1, k): accepted drafts per round. -> [size] int64"""
    if a >= 1.0:  # Geom(0) is undefined; every draft is accepted
        return np.full(size, k, dtype=np.int64)
    return np.minimum(rng.geometric(1.0 - a, size) - 1, k).astype(np.int64)


def nonsi_cost(S: int) -> float:
    return float(S)


def si_expected_cost(S: int, k: int, c: float, a: float) -> float:
    """E[SI cost] ignoring the shorter last rounds: rounds cost `k c + 1` and commit
    `E[X] + 1 = (1 - a^(k+1)) / (1 - a)` tokens."""
    if a >= 1.0:
        return S * (k * c + 1) / (k + 1)
    return S * (k * c + 1) * (1 - a) / (1 - a ** (k + 1))


def si_cost(x: np.ndarray, k: int, c: float, S: int) -> float:
    """SI cost over the stream `x` ([>= S] accepted drafts per round, each in [0, k]).

    Rounds whose `k` drafts all fit before the last token are summed at once; the last few
    rounds (lookahead shortened to the tokens left) run in a loop of at most `k + 1` steps."""
    adv = x[:S] + 1  # [S] tokens committed by each full-lookahead round
    start = np.cumsum(adv) - adv  # [S] tokens committed before each round
    n = int(np.searchsorted(start, S - 1 - k, side="right"))
    cost = n * (k * c + 1.0)
    toks = int(start[n - 1] + adv[n - 1]) if n else 0
    i = n
    while toks < S:
        kk = min(k, S - 1 - toks)  # never draft the position the target must produce itself
        cost += kk * c + 1.0
        toks += min(int(x[i]), kk) + 1
        i += 1
    return cost


@dataclass(frozen=True)
class Segment:
    """One DSI segment: blocks drafted until one is rejected.

    `blocks[i]` is the lookahead of block i (k, or less near the end); the last block is the
    rejecting one (a block of 0 drafts is the target producing the final token itself)."""

    blocks: tuple[int, ...]
    new_toks: int  # accepted drafts + the target's correction token

    @property
    def n_iters(self) -> int:
        return len(self.blocks)

    def spec_cost(self, c: float) -> float:
        return sum(self.blocks) * c + 1.0

    def cost(self, c: float) -> float:
        """The speculative path races a target-only path that makes one token per forward."""
        return min(self.spec_cost(c), float(self.new_toks))


def dsi_segment(x: np.ndarray, i: int, pos: int, k: int, S: int) -> Segment:
    """The segment that starts at stream index `i` with `pos` tokens already committed."""
    blocks: list[int] = []
    new = 0
    while True:
        kk = min(k, S - 1 - pos - new)
        acc = min(kk, int(x[i + len(blocks)]))
        blocks.append(kk)
        new += acc
        if kk == 0 or acc < kk:
            return Segment(tuple(blocks), new + 1)


def dsi_segments(x: np.ndarray, k: int, S: int) -> list[Segment]:
    """All segments of a run, in order (the online mode replays them in wall time)."""
    segs: list[Segment] = []
    i = toks = 0
    while toks < S:
        seg = dsi_segment(x, i, toks, k, S)
        segs.append(seg)
        i, toks = i + seg.n_iters, toks + seg.new_toks
    return segs


def dsi_cost(x: np.ndarray, k: int, c: float, S: int) -> float:
    """DSI cost over the stream `x` ([>= S] accepted drafts per block, each in [0, k]).

    Complete segments of full-size blocks are summed at once; the rest goes segment by
    segment. Each block commits at least one token, so `S` draws always suffice."""
    full = x[:S] >= k  # [S] block fully accepted: its segment goes on
    adv = np.where(full, k, x[:S] + 1)  # [S] tokens committed by each full-size block
    start = np.cumsum(adv) - adv
    n = int(np.searchsorted(start, S - 1 - k, side="right"))
    rejects = np.flatnonzero(~full[:n])
    cost, i, toks = 0.0, 0, 0
    if rejects.size:
        m = int(rejects[-1]) + 1  # stop the vector part on a segment boundary
        closes = (~full[:m]).astype(np.int64)
        seg_id = np.cumsum(closes) - closes  # [m] segment of each block
        iters = np.bincount(seg_id)  # [n_segments] blocks per segment
        toks_per = np.bincount(seg_id, weights=adv[:m])  # [n_segments] tokens per segment
        cost = float(np.minimum(iters * k * c + 1.0, toks_per).sum())
        i, toks = m, int(start[m - 1] + adv[m - 1])
    while toks < S:
        seg = dsi_segment(x, i, toks, k, S)
        cost += seg.cost(c)
        i, toks = i + seg.n_iters, toks + seg.new_toks
    return cost


@dataclass(frozen=True)
class Costs:
    """Costs per repeat, in target forwards. Each array is [repeats]."""

    nonsi: np.ndarray
    si: np.ndarray
    dsi: np.ndarray

    def means(self) -> dict[str, float]:
        nonsi, si, dsi = (float(v.mean()) for v in (self.nonsi, self.si, self.dsi))
        return {"nonsi": nonsi, "si": si, "dsi": dsi,
                "speedup_dsi_over_si": si / dsi, "speedup_dsi_over_nonsi": nonsi / dsi,
                "speedup_si_over_nonsi": nonsi / si}


def streams(a: float, k: int, S: int, repeats: int, seed: int) -> list[np.ndarray]:
    """One stream of accepted-draft counts per repeat ([S] each), reproducible from `seed`."""
    seqs = np.random.SeedSequence(seed).spawn(repeats)
    return [sample_accepted(np.random.default_rng(s), a, k, S) for s in seqs]


def simulate(c: float, a: float, k: int, S: int, repeats: int, seed: int) -> Costs:
    """Non-SI, SI and DSI over `repeats` runs; SI and DSI share each run's stream."""
    xs = streams(a, k, S, repeats, seed)
    return Costs(nonsi=np.full(repeats, nonsi_cost(S)),
                 si=np.array([si_cost(x, k, c, S) for x in xs]),
                 dsi=np.array([dsi_cost(x, k, c, S) for x in xs]))

"""Wall-time DSI: the offline model acted out by threads, a forward being a sleep.

Non-SI and SI run on the calling thread. DSI runs each segment (blocks until a rejection) as a
race between two paths:

- speculative: a drafter thread drafts block after block (`c * target_ms` per token, never
  waiting) and submits each block to a pool of `N` target workers (`target_ms` per verification);
  the segment ends when the rejecting block's verification finishes;
- target-only: one more thread runs target forwards back to back from the segment's start and
  ends the segment once it has produced the segment's tokens (accepted drafts + correction).

The first path to finish wins; the segment's `cancel` event then stops everything still running
for it (drafts past the rejection, later verifications, the losing path). Every sleep is an
`Event.wait`, so cancelled work returns at once and threads are reused: nothing is killed and
nothing leaks. Outcomes come from the same acceptance streams as the offline mode, so each run
has an exact offline prediction to compare with.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from hilm_vllm.lab.dsi.config import OnlineConfig
from hilm_vllm.lab.dsi.model import Segment, dsi_cost, dsi_segments, si_cost, streams


class _Race:
    """One segment's two paths: the first to `finish` wins, `cancel` stops the rest."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.winner: str | None = None
        self._lock = threading.Lock()

    def finish(self, who: str) -> None:
        with self._lock:
            if self.winner is None:
                self.winner = who
                self.done.set()


def _forward(cancel: threading.Event, seconds: float) -> bool:
    """Sleep like a forward pass; False (at once) when cancelled."""
    return not cancel.wait(seconds)


@dataclass(frozen=True)
class _Timing:
    target_s: float  # one target forward
    draft_s: float  # one drafter forward (c * target_s)
    k: int
    S: int


def run_nonsi(t: _Timing) -> float:
    never = threading.Event()
    start = time.perf_counter()
    for _ in range(t.S):
        _forward(never, t.target_s)
    return time.perf_counter() - start


def run_si(x: np.ndarray, t: _Timing) -> float:
    """x: [>= S] accepted drafts per round. Each round commits accepted + 1 tokens: the
    target's correction (or bonus) token is always credited."""
    never = threading.Event()
    start, toks, i = time.perf_counter(), 0, 0
    while toks < t.S:
        kk = min(t.k, t.S - 1 - toks)
        _forward(never, kk * t.draft_s)  # the block's kk drafts, back to back
        _forward(never, t.target_s)  # one verification forward over the whole block
        toks += min(int(x[i]), kk) + 1
        i += 1
    return time.perf_counter() - start


def _verify(race: _Race, rejects: bool, t: _Timing) -> None:
    if _forward(race.cancel, t.target_s) and rejects:
        race.finish("speculative")


def _target_only(race: _Race, n_tokens: int, t: _Timing) -> None:
    for _ in range(n_tokens):
        if not _forward(race.cancel, t.target_s):
            return
    race.finish("target-only")


def _draft(race: _Race, seg: Segment, pos: int, t: _Timing, pool: ThreadPoolExecutor) -> None:
    """Draft blocks and hand each to the pool. Past the rejecting block the drafter cannot know
    it was rejected, so it keeps drafting (and occupying servers) until cancelled."""
    i, drafted = 0, 0
    while True:
        kk = seg.blocks[i] if i < seg.n_iters else min(t.k, t.S - 1 - pos - drafted)
        if i >= seg.n_iters and kk <= 0:
            return  # nothing left to draft: wait for the verifications
        # One sleep per block: a block is only submitted once complete, and one wake-up per
        # block rather than per token keeps the threads' overhead out of the measurement.
        if not _forward(race.cancel, kk * t.draft_s):
            return
        pool.submit(_verify, race, i == seg.n_iters - 1, t)
        i, drafted = i + 1, drafted + kk


def _prestart(pool: ThreadPoolExecutor, n: int) -> None:
    """Start the pool's `n` threads before the clock does: the executor creates them lazily,
    and starting one costs milliseconds on a busy machine (measured: 2-3 ms on 2 loaded cores)."""
    barrier = threading.Barrier(n + 1)
    for _ in range(n):
        pool.submit(barrier.wait)
    barrier.wait()


def run_dsi(x: np.ndarray, t: _Timing, n_servers: int) -> tuple[float, int]:
    """Wall seconds of one DSI run, and how many segments the target-only path won."""
    segs = dsi_segments(x, t.k, t.S)
    # 2 paths per segment, plus slack for the previous segment's threads, which return within
    # microseconds of its cancel but must not delay the next segment's start.
    with ThreadPoolExecutor(n_servers, "dsi-target") as pool, \
            ThreadPoolExecutor(4, "dsi-path") as paths:
        _prestart(pool, n_servers)
        _prestart(paths, 4)
        start, pos, target_wins = time.perf_counter(), 0, 0
        for seg in segs:
            race = _Race()
            paths.submit(_draft, race, seg, pos, t, pool)
            paths.submit(_target_only, race, seg.new_toks, t)
            race.done.wait()
            race.cancel.set()
            pos += seg.new_toks
            target_wins += race.winner == "target-only"
        elapsed = time.perf_counter() - start
    return elapsed, target_wins


def run_online(cfg: OnlineConfig) -> dict:
    """Mean wall seconds of non-SI, SI and DSI, in seconds and in target forwards, next to the
    offline costs of the very same streams."""
    t = _Timing(cfg.target_ms / 1e3, cfg.c * cfg.target_ms / 1e3, cfg.k, cfg.S)
    rows = []
    for x in streams(cfg.a, cfg.k, cfg.S, cfg.repeats, cfg.seed):
        dsi_s, target_wins = run_dsi(x, t, cfg.N)
        rows.append((run_nonsi(t), run_si(x, t), dsi_s,
                     si_cost(x, cfg.k, cfg.c, cfg.S), dsi_cost(x, cfg.k, cfg.c, cfg.S),
                     target_wins, len(dsi_segments(x, cfg.k, cfg.S))))
    nonsi, si, dsi, off_si, off_dsi, wins, n_segs = (np.array(col, dtype=float)
                                                     for col in zip(*rows))
    means = {"nonsi": float(nonsi.mean()), "si": float(si.mean()), "dsi": float(dsi.mean())}
    return {
        **means,
        "speedup_dsi_over_si": means["si"] / means["dsi"],
        "speedup_dsi_over_nonsi": means["nonsi"] / means["dsi"],
        "units": {key: value / t.target_s for key, value in means.items()},
        "offline": {"nonsi": float(cfg.S), "si": float(off_si.mean()),
                    "dsi": float(off_dsi.mean())},
        "dsi_segments": int(n_segs.sum()), "dsi_target_only_wins": int(wins.sum()),
    }

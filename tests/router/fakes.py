"""Scripted tier links for the round executor's unit tests (no engines, no sockets).

Each fake "model" is a deterministic function of the context (greedy), so a lossless policy must
produce exactly the LLM's sequence, and every session keeps its own token list and checks the
position / rollback / append protocol the real tiers enforce (a request out of step fails with
FAILED_PRECONDITION, which fails the test). Faults are scripted per method: `link.fail("verify",
grpc.StatusCode.UNAVAILABLE, times=2)`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from hilm_vllm.drafter.wire import DraftResult
from hilm_vllm.router.links import TierUsage, VerifyOutcome
from hilm_vllm.sampling import ScoredToken, TokenLogprob

VOCAB = 50
Model = Callable[[list[int]], int]


def llm_model(ctx: list[int]) -> int:
    return (sum(ctx) * 7 + len(ctx) * 3) % VOCAB


def ilm_model(ctx: list[int]) -> int:
    """The LLM's token, except at every 5th position."""
    t = llm_model(ctx)
    return (t + 1) % VOCAB if len(ctx) % 5 == 0 else t


def slm_model(ctx: list[int]) -> int:
    """The LLM's token, except at every 3rd position."""
    t = llm_model(ctx)
    return (t + 2) % VOCAB if len(ctx) % 3 == 0 else t


def reference(model: Model, prompt: list[int], n: int, eos: set[int] = frozenset()) -> list[int]:
    """What `model` generates alone (greedy), stopping after an EOS."""
    ctx, out = list(prompt), []
    while len(out) < n:
        t = model(ctx)
        ctx.append(t)
        out.append(t)
        if t in eos:
            break
    return out


def rpc_error(code: grpc.StatusCode, details: str = "scripted fault") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def one_hot(token: int, u: float) -> ScoredToken:
    return ScoredToken(token, u, np.array([token], np.int32), np.array([1.0], np.float32))


@dataclass
class Opened:
    session_id: str
    eos_token_id: int
    eos_token_ids: tuple[int, ...]
    max_block: int = 16
    max_model_len: int = 0
    other_sessions: int = 0  # sessions other clients hold on the tier, as it reports them


@dataclass
class FakeLink:
    """What the router needs of a link: availability, sessions, scripted faults."""

    name: str
    model: Model
    eos: tuple[int, ...] = ()
    uncertainty: Callable[[list[int]], float] = lambda ctx: 0.5
    max_block: int = 16
    max_model_len: int = 0  # 0: no context limit
    sessions: dict[str, list[int]] = field(default_factory=dict)
    opened: list[list[int]] = field(default_factory=list)  # every prompt a session opened with
    sids: list[str] = field(default_factory=list)  # every session id handed out
    closed: list[str] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)  # every Verify / Draft request
    down_until: float = 0.0
    _faults: dict[str, list[grpc.StatusCode]] = field(default_factory=dict)
    _ids = itertools.count()

    def fail(self, method: str, code: grpc.StatusCode, times: int = 1) -> None:
        self._faults.setdefault(method, []).extend([code] * times)

    def _fault(self, method: str) -> None:
        if self._faults.get(method) and (code := self._faults[method].pop(0)) is not None:
            raise rpc_error(code)  # (None: this call goes through)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self.down_until

    def mark_down(self, for_s: float) -> None:
        self.down_until = time.monotonic() + for_s

    async def close(self) -> None:
        pass

    async def check_health(self, timeout_s: float = 2.0) -> str | None:
        return None if self.available else f"the {self.name} tier is marked down"

    async def open(self, prompt, spec, max_tokens, *rest) -> Opened:
        self._fault("open")
        sid = f"{self.name}-{next(self._ids)}"
        self.sessions[sid] = list(prompt)
        self.opened.append(list(prompt))
        self.sids.append(sid)
        return Opened(sid, self.eos[0] if self.eos else -1, self.eos, self.max_block,
                      self.max_model_len)

    async def close_session(self, sid: str, usage: TierUsage) -> None:
        self.closed.append(sid)
        self.sessions.pop(sid, None)

    def _session(self, sid: str, position: int, rollback_to: int | None) -> list[int]:
        if sid not in self.sessions:
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"session {sid} not found")
        held = self.sessions[sid]
        if position != len(held) and not (position == 0 and rollback_to is not None):
            raise rpc_error(grpc.StatusCode.FAILED_PRECONDITION,
                            f"{self.name}: session at {len(held)}, request says {position}")
        if rollback_to is not None:
            if rollback_to > len(held):
                raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "rollback past the end")
            del held[rollback_to:]
        return held

    def restart(self) -> None:
        """The tier lost every session (a restart)."""
        self.sessions.clear()


class FakeDrafter(FakeLink):
    async def draft(self, sid, position, n, usage, rollback_to=None, append=()):
        self.calls.append({"position": position, "n": n, "rollback_to": rollback_to,
                           "append": list(append)})
        self._fault("draft")
        held = self._session(sid, position, rollback_to)
        held += append
        tokens = []
        for _ in range(n):
            t = self.model(held)
            tokens.append(one_hot(t, self.uncertainty(held)))
            held.append(t)
        usage.verifies += 1
        usage.messages += 1
        return DraftResult(tokens, len(held))


class FakeVerifier(FakeLink):
    async def verify(self, sid, position, append, block, usage, want_emitted=False,
                     rollback_to=None, logprobs=None) -> VerifyOutcome:
        self.calls.append({"position": position, "rollback_to": rollback_to,
                           "append": list(append), "draft": [t.token_id for t in block]})
        self._fault("verify")
        held = self._session(sid, position, rollback_to)
        if len(block) > self.max_block:
            raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, f"block of {len(block)} > "
                            f"max_block {self.max_block}")
        if self.max_model_len and len(held) + len(append) + len(block) + 1 > self.max_model_len:
            raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "over max-model-len")
        held += append
        emitted, m = [], 0
        for t in block:
            if self.model(held) != t.token_id:
                break
            emitted.append(one_hot(t.token_id, self.uncertainty(held)))
            held.append(t.token_id)
            m += 1
        nxt = self.model(held)
        emitted.append(one_hot(nxt, self.uncertainty(held)))
        held.append(nxt)
        usage.verifies += 1
        usage.messages += 1
        # the fake's model is deterministic: every token it decides has logprob 0
        return VerifyOutcome(m, nxt, len(held), emitted if want_emitted else [],
                             [] if logprobs is None else [TokenLogprob(0.0)] * (m + 1))

    async def generate(self, prompt, spec, max_tokens, ignore_eos, usage, stop_token_ids=(),
                       min_tokens=0, stop=(), penalties=None, logprobs=None, structured=None,
                       prompt_logprobs=None, prompt_sink=None):
        self.calls.append({"generate": len(prompt), "stop_token_ids": list(stop_token_ids),
                           "seed": spec.seed})
        self._fault("generate")
        ctx = list(prompt)
        stops = set(stop_token_ids) | (set() if ignore_eos else set(self.eos))
        for _ in range(max_tokens):
            t = self.model(ctx)
            ctx.append(t)
            lps = [] if logprobs is None else [TokenLogprob(0.0)]
            if t in stops:
                yield [t], "stop", lps
                return
            yield [t], "", lps


class SlowDrafter(FakeDrafter):
    """A drafter whose Draft takes `delay` s and that, like the real one, ends a running Draft
    when a Draft with position 0 and rollback_to (the client dropped it) or the session's close
    arrives: the dropped one answers ABORTED. Counts Drafts aborted that way and Drafts
    cancelled (which the router must not do: grpc.aio leaks memory per cancelled call)."""

    def __init__(self, *args, delay: float = 0.05, **kw):
        super().__init__(*args, **kw)
        self.delay, self.aborted, self.cancelled = delay, 0, 0
        self._running: dict[str, asyncio.Event] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _supersede(self, sid: str) -> None:
        if (ev := self._running.get(sid)) is not None:
            ev.set()

    async def draft(self, sid, position, n, usage, rollback_to=None, append=()):
        if position == 0 and rollback_to is not None:
            self._supersede(sid)
        async with self._locks.setdefault(sid, asyncio.Lock()):
            self._running[sid] = ev = asyncio.Event()
            try:
                await asyncio.wait_for(ev.wait(), self.delay)
                self.aborted += 1
                raise rpc_error(grpc.StatusCode.ABORTED, "superseded")
            except asyncio.TimeoutError:
                pass
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            finally:
                self._running.pop(sid, None)
            return await super().draft(sid, position, n, usage, rollback_to, append)

    async def close_session(self, sid: str, usage: TierUsage) -> None:
        self._supersede(sid)
        await super().close_session(sid, usage)

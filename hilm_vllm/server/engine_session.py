"""A session that lives in the engine: one long-lived (resumable) vLLM request per session.

vLLM 0.32's streaming-input requests (`AsyncLLM.generate` fed an async generator of
`StreamingInput`) keep one request and its KV alive across chunks: each chunk appends tokens and
samples up to its own `max_tokens`, and the request then waits for the next chunk. A tier's call
(a Draft, a Verify) is one chunk. `EngineSession.run` is handed the whole context the call needs
and sends the engine only what it does not hold: it cuts the request back to the longest prefix
the two share (the plugin `hilm_vllm_patches.session_cut`: rejected drafts leave in place, and
the prefix-cache blocks past the cut are made safe) and appends the rest. Nothing before the cut
is sent, hashed or computed again.

What the request holds after a chunk: every token of the chunk and every output but the last
(the last sampled token was never fed to the model; vLLM drops it, and the next call's context
carries whatever token the tier decided instead).

A call cancelled mid-chunk (the client hung up, a superseded Draft) does not end the request:
the chunk runs to its end in the background and the next call waits for it, then cuts it back.
An engine failure, an abort or `close` ends the request; the session's owner opens a new one
from its history (the first chunk of a request is an ordinary new request: it reads the prefix
cache).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from hilm_vllm_patches.session_cut import CUT_ARG


class SessionLost(Exception):
    """The engine request ended (aborted, engine error, closed): open a new one."""


@dataclass(frozen=True)
class Chunk:
    token_ids: tuple[int, ...]  # what the chunk sampled (its outputs)
    finish_reason: str | None  # "length" at max_tokens, "stop" on a stop token
    output: object  # the chunk's last RequestOutput (vLLM's request stats ride on it)
    sent: int  # tokens the chunk handed the engine (what the engine did not hold)
    cut: int  # tokens the request kept of what it held


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix (the cut)."""
    n = min(len(a), len(b))
    if n and a[n - 1] == b[n - 1] and list(a[:n]) == list(b[:n]):
        return n  # the common case: one extends the other
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class EngineSession:
    def __init__(self, engine, request_id: str):
        self.engine = engine  # vllm AsyncLLM (the session_cut plugin installed in its core)
        self.request_id = request_id
        self.held: list[int] = []  # tokens whose KV the request holds, in order
        self.closed = False
        self.chunks = 0
        self._inputs: asyncio.Queue | None = None
        self._stream = None  # the generate() async generator, once the first chunk went in
        self._running: asyncio.Task | None = None  # the chunk being collected
        self.on_idle = None  # called when a chunk has ended (the pool trims the idle sessions)

    @property
    def busy(self) -> bool:
        return self._running is not None and not self._running.done()

    async def run(self, tokens: Sequence[int], params, max_keep: int | None = None) -> Chunk:
        """Run one chunk so that the request ends up having seen `tokens` (then `params`'
        outputs). `max_keep`: the request keeps at most this many of its tokens, so the ones
        after are computed in this chunk's forward (a verifier needs the rows of its draft).
        `params` must stream (DELTA); it is given `CUT_ARG`."""
        if self._running is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(self._running)  # an interrupted chunk: let it end first
            self._running = None
        if self.closed:
            raise SessionLost(f"engine request {self.request_id} has ended")
        from vllm.engine.protocol import StreamingInput
        from vllm.inputs.engine import tokens_input

        cut = common_prefix(self.held, tokens) if self._stream is not None else 0
        if max_keep is not None:
            cut = max(0, min(cut, max_keep))
        if cut >= len(tokens):
            raise ValueError("a chunk must hand the engine at least one token")
        params.extra_args = {**(params.extra_args or {}), CUT_ARG: cut}
        # Built for this call and never touched again: vLLM's copies may be shallow (its deep
        # copy per chunk was 2-4% of a tier's API process under load).
        params.skip_clone = True
        chunk = list(tokens[cut:])
        if self._stream is None:
            self._inputs = asyncio.Queue()
            self._stream = self.engine.generate(self._input_stream(), params, self.request_id)
        self._inputs.put_nowait(StreamingInput(tokens_input(chunk), params))
        self.chunks += 1
        self._running = asyncio.ensure_future(self._collect(list(tokens), len(chunk), cut))
        return await asyncio.shield(self._running)

    async def _input_stream(self):
        while (item := await self._inputs.get()) is not None:
            yield item

    async def _collect(self, tokens: list[int], sent: int, cut: int) -> Chunk:
        ids: list[int] = []
        try:
            while True:
                out = await anext(self._stream)
                completion = out.outputs[0]
                ids += completion.token_ids
                if completion.finish_reason is not None:
                    break
                if out.finished:
                    raise SessionLost(f"engine request {self.request_id} finished mid-chunk")
        except StopAsyncIteration:
            self._lose()
            raise SessionLost(f"engine request {self.request_id} has ended") from None
        except BaseException:
            self._lose()
            raise
        if completion.finish_reason == "abort":
            self._lose()
            raise SessionLost(f"engine request {self.request_id} was aborted")
        self.held = [*tokens, *ids][:-1]
        if self.on_idle is not None:  # once this task is done (then this session counts idle)
            asyncio.get_running_loop().call_soon(self.on_idle)
        return Chunk(tuple(ids), completion.finish_reason, out, sent, cut)

    def _lose(self) -> None:
        self.closed = True
        self.held = []

    def close(self) -> None:
        """End the request now (its blocks return to the pool; full ones stay cached)."""
        if self.closed and self._stream is None:
            return
        self._lose()
        if self.busy:
            self._running.cancel()  # generate() aborts the request on CancelledError
        elif self._stream is not None:
            stream, self._stream = self._stream, None
            task = asyncio.ensure_future(stream.aclose())  # GeneratorExit: generate() aborts
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        if self._inputs is not None:
            self._inputs.put_nowait(None)


# Idle sessions hold their KV, and vLLM does not preempt a request that waits for its next
# chunk: held past what the running chunks need, the cache would stall. So idle sessions may
# hold at most this share of the engine's KV cache, and never more than what leaves room for
# one request of max-model-len; before each chunk the least recently used idle sessions past
# that are closed (evicted): their next call opens a new request from the history the tier
# keeps, reading what is left of it in the prefix cache.
# A paused request also keeps its seat: vLLM 0.32's scheduler counts requests waiting for
# their next chunk against max-num-seqs (`Scheduler.schedule`: "Paused streaming sessions ...
# still hold a model-runner request slot"). With max-num-seqs idle sessions resident, a new
# session's request would never be scheduled (and, when those sessions' clients wait for it,
# nothing would move again). So the sessions with a request are also at most max-num-seqs: a
# call that needs a seat evicts the least recently used idle session, and a chunk that ends
# while the seats are over-subscribed gives its seat back.
RESIDENT_KV_SHARE = 0.5


def request_slots(engine) -> int:
    """max-num-seqs of the engine's scheduler (0: not known)."""
    sched = getattr(getattr(engine, "vllm_config", None), "scheduler_config", None)
    return int(getattr(sched, "max_num_seqs", 0) or 0)


def kv_capacity_tokens(engine) -> int:
    """Tokens the engine's KV cache holds (0: not known)."""
    cache = getattr(getattr(engine, "vllm_config", None), "cache_config", None)
    if cache is None:
        return 0
    return int(cache.num_gpu_blocks or 0) * int(cache.block_size or 0)


def resident_budget(capacity: int, max_model_len: int, share: float = RESIDENT_KV_SHARE) -> int:
    """The tokens idle sessions may hold (0 = not bounded: the capacity is not known)."""
    if capacity <= 0:
        return 0
    return max(1, min(int(capacity * share), capacity - max_model_len))


class ResidentSessions:
    """A tier's engine sessions by session id, least recently used first, bounded in the tokens
    they hold (`max_tokens`; 0 = unbounded) and in number (`max_sessions`, the engine's request
    slots; 0 = unbounded)."""

    def __init__(self, engine, max_tokens: int, max_sessions: int = 0):
        self.engine = engine
        self.max_tokens = max_tokens
        self.max_sessions = max_sessions
        self._lru: collections.OrderedDict[str, EngineSession] = collections.OrderedDict()
        self._opened: dict[str, int] = {}
        self.evicted = 0  # sessions closed to stay within max_tokens
        self.reopened = 0  # requests opened again for a session that had one

    @classmethod
    def of(cls, engine) -> ResidentSessions:
        model = getattr(engine, "model_config", None)
        return cls(engine, resident_budget(kv_capacity_tokens(engine),
                                           int(getattr(model, "max_model_len", 0) or 0)),
                   request_slots(engine))

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def held_tokens(self) -> int:
        return sum(len(s.held) for s in self._lru.values())

    def get(self, sid: str) -> EngineSession:
        """The session's engine request (a new one if it has none), marked most recent; idle
        sessions past the budget are evicted first (`trim`)."""
        self.trim(keep=sid)
        session = self._lru.get(sid)
        if session is None or session.closed:
            n = self._opened.get(sid, 0)
            self.reopened += n > 0
            self._opened[sid] = n + 1
            session = self._lru[sid] = EngineSession(self.engine, f"{sid}-{n}")
            session.on_idle = self.trim
        self._lru.move_to_end(sid)
        return session

    def drop(self, sid: str) -> None:
        """Close the session's engine request (the session closed or expired)."""
        self._opened.pop(sid, None)
        if (session := self._lru.pop(sid, None)) is not None:
            session.close()

    def reopen(self, sid: str) -> EngineSession:
        """A new engine request for the session (its request was lost or must be redone)."""
        if (session := self._lru.pop(sid, None)) is not None:
            session.close()
        return self.get(sid)

    def trim(self, keep: str | None = None) -> None:
        """Evict idle sessions, least recently used first, until the idle ones hold at most
        `max_tokens` and the sessions with a request (`keep`, about to run, counted whether it
        has one yet or not) are at most `max_sessions`; `keep` stays. Runs before each chunk and
        after each one ends, so the running chunks always have the rest of the cache and a
        request waiting for a seat gets the one a finished chunk leaves."""
        if not self.max_tokens and not self.max_sessions:
            return
        idle = {sid: s for sid, s in self._lru.items() if not s.busy}
        held = sum(len(s.held) for s in idle.values())
        seats = len(self._lru) + (keep is not None and keep not in self._lru)
        for sid, session in idle.items():
            over_tokens = bool(self.max_tokens) and held > self.max_tokens
            over_seats = bool(self.max_sessions) and seats > self.max_sessions
            if not (over_tokens or over_seats):
                break
            if sid == keep:
                continue
            held -= len(session.held)
            seats -= 1
            del self._lru[sid]
            session.close()
            self.evicted += 1

    def stats(self) -> dict:
        return {"resident_sessions": len(self._lru), "resident_tokens": self.held_tokens,
                "max_resident_tokens": self.max_tokens,
                "max_resident_sessions": self.max_sessions, "evicted": self.evicted,
                "reopened": self.reopened,
                "chunks": sum(s.chunks for s in self._lru.values())}

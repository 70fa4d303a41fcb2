"""Fair admission at the router's front doors: a bounded number of choices run at once, the
rest wait in one queue per client and are let in round-robin across clients; a client whose
queue is full (or a router whose whole queue is) gets 429 with `Retry-After`.

Why: the router is one client of each tier, and every running choice holds a session on each
tier it uses. Without admission the first clients to arrive take every session and the others
are refused by the tiers; with it, a client sending 100 requests and one sending 1 each get a
turn at the next free slot. A client is its API key when it sends one, else its address (the
front doors say which); `n` choices of one request take `n` slots and are admitted together.

Pure asyncio, no I/O: `FairAdmission.acquire(client, n)` -> a `Slot` to release (idempotent)
when the request ends, or `TooBusy` (with `retry_after_s`) at once.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from hilm_vllm.errors import ResourceExhausted

# Retry-After bounds (seconds): at least 1 (HTTP's unit), at most a minute.
RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S = 1, 60
HOLD_EWMA = 0.1  # weight of the newest request's hold time in the running mean


@dataclass(frozen=True)
class AdmissionLimits:
    """The router's admission settings (router flags of the same names)."""

    max_active_choices: int = 256  # choices running at once (each holds a session per tier)
    max_queued_requests: int = 1024  # requests waiting, all clients together
    max_queued_per_client: int = 256  # requests waiting from one client

    def __post_init__(self) -> None:
        for name in ("max_active_choices", "max_queued_requests", "max_queued_per_client"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")


class TooBusy(ResourceExhausted):
    """429 / RESOURCE_EXHAUSTED, with how long to wait before retrying."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Slot:
    """`n` admitted choices; `release()` (idempotent) gives them back."""

    def __init__(self, admission: FairAdmission, n: int):
        self._admission, self.n = admission, n
        self._t0 = time.monotonic()
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._release(self.n, time.monotonic() - self._t0)

    async def __aenter__(self) -> Slot:
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()


@dataclass
class _Waiter:
    n: int
    future: asyncio.Future


class FairAdmission:
    def __init__(self, limits: AdmissionLimits = AdmissionLimits()):
        self.limits = limits
        self.refused = 0  # requests answered TooBusy
        self.active = 0  # choices running
        self._queues: OrderedDict[str, deque[_Waiter]] = OrderedDict()  # round-robin order
        self.queued = 0
        self.mean_hold_s = 1.0  # running mean of a request's hold time (for Retry-After)

    def retry_after_s(self) -> int:
        """A guess at when a slot frees for a new waiter: the queue ahead, served
        max_active_choices at a time, each for the mean hold time."""
        rounds = (self.queued + 1) / self.limits.max_active_choices
        guess = math.ceil(rounds * self.mean_hold_s)
        return max(RETRY_AFTER_MIN_S, min(RETRY_AFTER_MAX_S, guess))

    async def acquire(self, client: str, n: int = 1) -> Slot:
        """Admit `n` choices of `client`'s request: at once when slots are free and nobody
        waits, else after the clients queued before it have had their turn. Raises TooBusy
        when the client's queue or the router's is full, or n exceeds what can ever run."""
        cap = self.limits.max_active_choices
        if n > cap:
            self.refused += 1
            raise TooBusy(f"this request asks for {n} choices; the router runs at most {cap} "
                          f"at once (--max-active-choices): ask for fewer", RETRY_AFTER_MAX_S)
        if self.queued == 0 and self.active + n <= cap:
            self.active += n
            return Slot(self, n)
        queue = self._queues.get(client)
        if queue is not None and len(queue) >= self.limits.max_queued_per_client:
            self.refused += 1
            raise TooBusy(f"this client has {len(queue)} requests waiting, the most one client "
                          f"may (--max-queued-per-client); retry after the Retry-After delay",
                          self.retry_after_s())
        if self.queued >= self.limits.max_queued_requests:
            self.refused += 1
            raise TooBusy(f"the router is at capacity: {self.active} choices running and "
                          f"{self.queued} requests waiting (--max-queued-requests); retry after "
                          f"the Retry-After delay", self.retry_after_s())
        waiter = _Waiter(n, asyncio.get_running_loop().create_future())
        if queue is None:
            queue = self._queues[client] = deque()
        queue.append(waiter)
        self.queued += 1
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release(n, 0.0, record=False)  # admitted as we were cancelled
            else:
                self._forget(client, waiter)
            raise
        return Slot(self, n)

    def _forget(self, client: str, waiter: _Waiter) -> None:
        queue = self._queues.get(client)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self.queued -= 1
            if not queue:
                del self._queues[client]
        self._grant()  # a large waiter leaving may let smaller ones in

    def _release(self, n: int, held_s: float, record: bool = True) -> None:
        self.active -= n
        if record:
            self.mean_hold_s += HOLD_EWMA * (held_s - self.mean_hold_s)
        self._grant()

    def _grant(self) -> None:
        """Let waiters in, one request per client in turn (the client served goes to the back
        of the rotation); the head of the rotation waits until its request fits, so a request
        of many choices is not passed over forever."""
        cap = self.limits.max_active_choices
        while self._queues:
            client, queue = next(iter(self._queues.items()))
            waiter = queue[0]
            if self.active + waiter.n > cap:
                return
            queue.popleft()
            self.queued -= 1
            self._queues.move_to_end(client)
            if not queue:
                del self._queues[client]
            self.active += waiter.n
            waiter.future.set_result(None)

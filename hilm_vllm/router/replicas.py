"""Several replicas of one tier behind the router, as one port (`ports.DraftPort` /
`ports.VerifyPort`): `--llm A,B` gives the LLM tier two replicas.

- **Affinity.** A request's session on a tier lives on one replica: the session id the replica
  answered names it, and every call of that session goes there.
- **Placement.** A new session goes to the replica with the fewest open sessions of two picked
  at random among those that answer (the power of two choices, as Ray Serve's LLM router
  places requests): the sessions this router holds there (counted from the placement) plus the
  sessions other clients (other routers) held there when it last answered an OpenSession
  (`other_sessions`). A router holds nothing between
  requests, so several routers may share the same replicas.
- **Failover.** A call that finds its replica gone (the connection lost, or the replica
  draining) marks that replica down for everyone and fails as it would with one replica; the
  round's recovery (`engine._Run`) then opens the session again from the history the router
  owns, and the set places it on a replica that answers. The set as a whole is down only when
  none of its replicas is available, so lossless requests wait (up to `--recover-s`) only then.

With one address the set holds one link, and behaves as the link itself.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence

import grpc

from hilm_vllm.router import metrics
from hilm_vllm.router.links import CONNECTION_LOST, TierUsage

DOWN_S = 10.0  # how long a replica that lost its connection is passed over (--down-retry-s)


def addresses(spec: str | Sequence[str] | None) -> list[str]:
    """`A,B` (a flag's value) or a list -> the replica addresses; duplicates are an error."""
    if spec is None:
        return []
    items = [a.strip() for a in (spec.split(",") if isinstance(spec, str) else spec)]
    items = [a for a in items if a]
    if len(set(items)) != len(items):
        raise ValueError(f"a replica address is given twice: {','.join(items)}")
    return items


def pick(loads: Sequence[int], rng: random.Random) -> int:
    """The power of two choices: of two replicas drawn at random, the less loaded (pure)."""
    if len(loads) == 1:
        return 0
    a, b = rng.sample(range(len(loads)), 2)
    return a if loads[a] <= loads[b] else b


class ReplicaSet:
    """One tier's replicas (links), as one link."""

    def __init__(self, tier, links: Sequence, down_s: float = DOWN_S, seed: int | None = None):
        if not links:
            raise ValueError(f"the {tier.value} tier has no address")
        self.tier, self.name = tier, tier.value
        self.replicas = list(links)
        self.down_s = down_s
        self.open_sessions = [0] * len(self.replicas)  # this router's, open now
        self.others = [0] * len(self.replicas)  # other clients', as last reported
        self._where: dict[str, int] = {}  # session id -> replica index
        self._rng = random.Random(seed)
        self.limits = None  # (max_block, max_model_len), as a link's (replicas serve one model)
        for link in self.replicas:
            metrics.REPLICA_SESSIONS.labels(self.name, link.address).set(0)

    # -- the port's members -------------------------------------------------------------

    @property
    def address(self) -> str:
        return ",".join(link.address for link in self.replicas)

    @property
    def available(self) -> bool:
        return any(link.available for link in self.replicas)

    def mark_down(self, for_s: float) -> None:
        """The round saw this tier fail: the replica that failed is already marked (`_call`);
        the set is down only when every replica is."""
        if len(self.replicas) == 1:
            self.replicas[0].mark_down(for_s)

    async def check_health(self, timeout_s: float = 2.0) -> str | None:
        """None when any replica serves, else every replica's reason."""
        reasons = [await link.check_health(timeout_s) for link in self.replicas]
        if any(r is None for r in reasons):
            return None
        return "; ".join(r for r in reasons if r)

    async def replica_health(self, timeout_s: float = 2.0) -> dict[str, str]:
        return {link.address: (await link.check_health(timeout_s)) or "serving"
                for link in self.replicas}

    async def close(self) -> None:
        for link in self.replicas:
            await link.close()

    async def open(self, *args, **kw):
        i = self._place()
        self._count(i, +1)  # counted from the placement: concurrent opens see each other
        try:
            reply = await self._call(i, self.replicas[i].open(*args, **kw))
        except BaseException:
            self._count(i, -1)
            raise
        self._where[reply.session_id] = i
        self.others[i] = max(0, getattr(reply, "other_sessions", 0))  # other clients' load
        metrics.REPLICA_OPENED.labels(self.name, self.replicas[i].address).inc()
        return reply

    async def close_session(self, sid: str, usage: TierUsage) -> None:
        i = self._where.pop(sid, None)
        if i is None:
            return
        self._count(i, -1)
        await self._call(i, self.replicas[i].close_session(sid, usage))

    async def draft(self, sid: str, *args, **kw):
        i = self._replica_of(sid)
        return await self._call(i, self.replicas[i].draft(sid, *args, **kw))

    async def verify(self, sid: str, *args, **kw):
        i = self._replica_of(sid)
        return await self._call(i, self.replicas[i].verify(sid, *args, **kw))

    async def generate(self, *args, **kw) -> AsyncIterator[tuple[list[int], str]]:
        """The LLM's own generation (llm-only) on one replica, placed as a session is."""
        i = self._place()
        self._count(i, +1)
        metrics.REPLICA_OPENED.labels(self.name, self.replicas[i].address).inc()
        try:
            async for item in self.replicas[i].generate(*args, **kw):
                yield item
        except grpc.aio.AioRpcError as e:
            self._failed(i, e)
            raise
        finally:
            self._count(i, -1)

    # -- placement and failure ----------------------------------------------------------

    def _place(self) -> int:
        up = [i for i, link in enumerate(self.replicas) if link.available]
        if not up:  # every replica is down: try them anyway (the call reports the error)
            up = list(range(len(self.replicas)))
        return up[pick([self.open_sessions[i] + self.others[i] for i in up], self._rng)]

    def _replica_of(self, sid: str) -> int:
        i = self._where.get(sid)
        if i is None:  # not opened through this set (cannot happen in the round)
            raise KeyError(f"session {sid!r} was not opened on the {self.name} tier's replicas")
        return i

    def _count(self, i: int, delta: int) -> None:
        self.open_sessions[i] = max(0, self.open_sessions[i] + delta)
        metrics.REPLICA_SESSIONS.labels(self.name, self.replicas[i].address).set(
            self.open_sessions[i])

    async def _call(self, i: int, call):
        try:
            return await call
        except grpc.aio.AioRpcError as e:
            self._failed(i, e)
            raise

    def _failed(self, i: int, e: grpc.aio.AioRpcError) -> None:
        """A replica that lost its connection (or is draining: UNAVAILABLE too) is passed
        over for `down_s` (with one replica the round marks the tier down itself)."""
        if e.code() in CONNECTION_LOST and len(self.replicas) > 1:
            self.replicas[i].mark_down(self.down_s)

"""Sessions: bounded in number, expiring after a TTL of inactivity, owned by a client.

A session's state is whatever the tier keeps (token history, last reply for idempotent
retries). The store is pure bookkeeping: no I/O, an injectable clock for tests.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from hilm_vllm.errors import NotFound, PermissionDenied, ResourceExhausted

T = TypeVar("T")

# gRPC metadata key naming the client that owns a session. Sessions opened without it belong
# to the anonymous client "" and are refused to callers that do send one, and vice versa.
CLIENT_METADATA_KEY = "hilm-client-id"


@dataclass
class Session(Generic[T]):
    id: str
    owner: str
    state: T
    last_used: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one call at a time per session


@dataclass(frozen=True)
class SessionLimits:
    max_sessions: int = 256
    ttl_s: float = 600.0


class SessionStore(Generic[T]):
    def __init__(self, limits: SessionLimits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self._clock = clock
        self._sessions: dict[str, Session[T]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, owner: str, state: T) -> Session[T]:
        self.sweep()
        if len(self._sessions) >= self.limits.max_sessions:
            raise ResourceExhausted(
                f"{len(self._sessions)} sessions are open, the limit is "
                f"{self.limits.max_sessions}: close finished sessions (CloseSession) or retry later")
        sid = secrets.token_hex(8)
        session = Session(sid, owner, state, self._clock())
        self._sessions[sid] = session
        return session

    def get(self, sid: str, owner: str) -> Session[T]:
        session = self._sessions.get(sid)
        if session is not None and self._expired(session):
            del self._sessions[sid]
            session = None
        if session is None:
            raise NotFound(f"session {sid!r} does not exist or expired after "
                           f"{self.limits.ttl_s:g} s idle: open a new one")
        if session.owner != owner:
            raise PermissionDenied(f"session {sid!r} belongs to another client "
                                   f"(metadata {CLIENT_METADATA_KEY!r})")
        session.last_used = self._clock()
        return session

    def close(self, sid: str, owner: str) -> T:
        session = self.get(sid, owner)
        del self._sessions[sid]
        return session.state

    def sweep(self) -> list[T]:
        """Drop expired sessions; returns their states (for the tier to release)."""
        dead = [s for s in self._sessions.values() if self._expired(s)]
        for s in dead:
            del self._sessions[s.id]
        return [s.state for s in dead]

    def _expired(self, session: Session[T]) -> bool:
        return self._clock() - session.last_used > self.limits.ttl_s

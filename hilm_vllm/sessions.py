"""Sessions: bounded in number (in all and per client), expiring after a TTL of inactivity,
owned by a client.

A session's state is whatever the tier keeps (token history, last reply for idempotent
retries). The store is pure bookkeeping: no I/O, an injectable clock for tests.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from hilm_vllm.errors import NotFound, PermissionDenied, ResourceExhausted, Unavailable

T = TypeVar("T")

# gRPC metadata key naming the client that owns a session. Sessions opened without it belong
# to the anonymous client "" and are refused to callers that do send one, and vice versa.
CLIENT_METADATA_KEY = "hilm-client-id"


class Owner(str):
    """A session owner: the client id the caller sends, bound to the identity it proved (its
    client certificate under mutual TLS), as one string; `principal` is whom the per-client cap
    counts (the certificate when there is one: a peer cannot multiply its quota by inventing
    client ids; else the client id)."""

    principal: str

    def __new__(cls, client_id: str, peer: str | None = None) -> Owner:
        principal = f"x509:{peer}" if peer else client_id
        self = super().__new__(cls, f"{principal}|{client_id}" if peer else client_id)
        self.principal = principal
        return self


def principal_of(owner: str) -> str:
    return getattr(owner, "principal", owner)


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
    # One client may hold at most this many (None: max_sessions): no client can take them all.
    max_sessions_per_client: int | None = None
    # Principals the per-client cap does not count (a principal matches "name" or "name-...")
    exempt_principals: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.ttl_s <= 0:
            raise ValueError("max_sessions must be >= 1 and ttl_s > 0")
        if self.max_sessions_per_client is not None and self.max_sessions_per_client < 1:
            raise ValueError("max_sessions_per_client must be >= 1")

    def exempt(self, principal: str) -> bool:
        return any(principal == p or principal.startswith(p + "-")
                   for p in self.exempt_principals)

    @property
    def per_client(self) -> int:
        return min(self.max_sessions_per_client or self.max_sessions, self.max_sessions)


# Every session store of this process: a tier that drains (SIGTERM) stops them all opening.
STORES: weakref.WeakSet = weakref.WeakSet()


class SessionStore(Generic[T]):
    def __init__(self, limits: SessionLimits, clock: Callable[[], float] = time.monotonic,
                 on_drop: Callable[[Session[T]], None] | None = None):
        STORES.add(self)
        self.draining = False  # set when the tier shuts down: no new sessions
        self.limits = limits
        self._clock = clock
        self.on_drop = on_drop  # called for every session closed or expired (to release it)
        self._sessions: dict[str, Session[T]] = {}
        self._per_client: dict[str, int] = {}  # open sessions per principal

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, owner: str, state: T) -> Session[T]:
        if self.draining:
            raise Unavailable("this tier is draining (shutting down): open the session on "
                              "another replica")
        self.sweep()
        if len(self._sessions) >= self.limits.max_sessions:
            raise ResourceExhausted(
                f"{len(self._sessions)} sessions are open, the limit is "
                f"{self.limits.max_sessions} (--max-sessions): close finished sessions "
                f"(CloseSession) or retry later")
        principal = principal_of(owner)
        held = self._per_client.get(principal, 0)
        if held >= self.limits.per_client and not self.limits.exempt(principal):
            raise ResourceExhausted(
                f"this client holds {held} open sessions, the limit per client is "
                f"{self.limits.per_client} (--max-sessions-per-client): close finished sessions "
                f"(CloseSession) or retry later")
        sid = secrets.token_hex(8)
        session = Session(sid, owner, state, self._clock())
        self._sessions[sid] = session
        self._per_client[principal] = held + 1
        return session

    def held_by(self, owner: str) -> int:
        """Open sessions counted against `owner`'s principal (expired ones until swept)."""
        return self._per_client.get(principal_of(owner), 0)

    def _drop(self, session: Session[T]) -> None:
        del self._sessions[session.id]
        if self.on_drop is not None:
            self.on_drop(session)
        principal = principal_of(session.owner)
        left = self._per_client.get(principal, 1) - 1
        if left > 0:
            self._per_client[principal] = left
        else:
            self._per_client.pop(principal, None)

    def get(self, sid: str, owner: str) -> Session[T]:
        session = self._sessions.get(sid)
        if session is not None and self._expired(session):
            self._drop(session)
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
        self._drop(session)
        return session.state

    def sweep(self) -> list[T]:
        """Drop expired sessions; returns their states (for the tier to release)."""
        dead = [s for s in self._sessions.values() if self._expired(s)]
        for s in dead:
            self._drop(s)
        return [s.state for s in dead]

    def _expired(self, session: Session[T]) -> bool:
        return self._clock() - session.last_used > self.limits.ttl_s

"""One request's session on one tier, and how it is kept in step with the router's history.

The router owns the request's token history (the source of truth). A tier's session holds a
copy that may lag (tokens it has not seen ride on its next request: a SKIP costs no message) or
run ahead by tokens another tier overruled (cut back by `rollback_to` on its next request).
`sync` computes that one request's (position, rollback_to, append); `verify` sends it and
records what the tier now holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from hilm_vllm.router.links import TierUsage, VerifyOutcome
from hilm_vllm.router.policy import common_prefix
from hilm_vllm.sampling import ScoredToken
from hilm_vllm.tiers import Tier


@dataclass(frozen=True)
class Sync:
    """What a tier's next request must do before its own work."""

    position: int  # where the session is (the request's `position`)
    rollback_to: int | None  # cut back to this length first (None: nothing to cut)
    append: list[int]  # then take these tokens without verifying them


def sync(held: Sequence[int], context: Sequence[int]) -> Sync:
    """The request that brings a session holding `held` to `context` (pure)."""
    keep = common_prefix(held, context)
    return Sync(len(held), keep if keep < len(held) else None, list(context[keep:]))


@dataclass
class TierSession:
    """A tier's session of one request and the tokens it holds (prompt included). Opening
    starts at once and is awaited on first use (`ready`), so the three tiers open in parallel."""

    tier: Tier
    link: object  # a DrafterLink / VerifierLink (or a test's fake with the same methods)
    usage: TierUsage
    held: list[int]
    opening: asyncio.Future | None = None
    sid: str = ""
    eos_token_ids: tuple[int, ...] = ()
    max_block: int = 0  # the tier's draft-block limit (0: the tier names none)
    max_model_len: int = 0  # the tier's context length (0: not told)
    fresh: bool = True  # holds exactly what it was opened with (no request sent yet)
    closed: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, tier: Tier, link, usage: TierUsage, prompt: list[int],
             opener: Callable[[], Awaitable]) -> TierSession:
        return cls(tier, link, usage, list(prompt), asyncio.ensure_future(opener()))

    async def ready(self) -> TierSession:
        """The session, opened (raises the opening's error)."""
        if self.opening is not None:
            r = await self.opening
            self.opening = None
            self.sid = r.session_id
            ids = tuple(getattr(r, "eos_token_ids", ()) or ())
            eos = getattr(r, "eos_token_id", -1)
            self.eos_token_ids = ids or ((eos,) if eos >= 0 else ())
            self.max_block = getattr(r, "max_block", 0)
            self.max_model_len = getattr(r, "max_model_len", 0)
        return self

    async def verify(self, context: list[int], block: Sequence[ScoredToken],
                     want_emitted: bool, logprobs: int | None = None) -> VerifyOutcome:
        """Verify `block` after `context` (the history and this round's tokens so far)."""
        s = sync(self.held, context)
        out = await self.link.verify(self.sid, s.position, s.append, block, self.usage,
                                     want_emitted=want_emitted, rollback_to=s.rollback_to,
                                     logprobs=logprobs)
        self.held = list(context) + out.tokens([t.token_id for t in block])
        self.fresh = False
        return out

    async def close(self) -> None:
        """Close it on the tier, best effort (a tier that is gone expires it by its TTL)."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            if self.opening is not None:
                self.sid = (await self.opening).session_id
            if self.sid:
                await self.link.close_session(self.sid, TierUsage())

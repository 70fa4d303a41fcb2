"""The policy loop: one generation request, round by round, across the tiers.

The router owns the request's token history (the source of truth). Each tier's session holds a
copy that may lag (tokens it has not seen ride on its next request: a SKIP costs no message) or
run ahead by tokens that another tier overruled (cut back by `rollback_to` on its next request).

One round (DESIGN.md, "One round"):
1. the drafter drafts up to k tokens with (u, q) each;
2. `policy.plan` keeps the leading SKIPs and sends the rest of the block to the ILM or the LLM;
3. the verifier returns m accepted drafts and one more token; under `hilm` the ILM's emitted
   tokens whose own u exceeds T_ilm (and the rest of its block) go on to the LLM with the ILM's
   distributions as the draft (so the LLM's verification is exact); under `cascade` all of them;
4. the drafter is rolled back to the longest prefix of its drafts that survived and given the
   rest.

Degradation: an ILM that does not answer is routed around (its blocks go to the LLM, exactly);
an LLM that does not answer under a lossy policy leaves the ILM's (or, without an ILM, the
drafter's) tokens final. Both are marked in the result (`degraded`). Under a lossless policy an
unreachable LLM ends the request with an error; tokens already streamed stay delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from hilm_vllm.errors import HilmError, InvalidArgument, Unavailable
from hilm_vllm.netmodel import NetworkModel, Site
from hilm_vllm.router import metrics
from hilm_vllm.router.links import UNREACHABLE, DrafterLink, TierUsage, VerifierLink
from hilm_vllm.router.policy import Policy, Route, Thresholds, common_prefix, ilm_forward_from, plan
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.uncertainty import UncertaintyConfig, derive_seed

logger = logging.getLogger("hilm.router")

# Per-tier seed streams: the drafter's sampling and a verifier's acceptance uniforms must be
# independent even when both derive them from the request's one seed and the same positions.
_SEED_STREAM = {"slm": 1, "ilm": 2, "llm": 3, "rand": 4}


@dataclass(frozen=True)
class RouterConfig:
    llm: str  # host:port of each tier
    slm: str | None = None
    ilm: str | None = None
    policy: Policy = Policy.HILM  # default policy of requests that name none
    thresholds: Thresholds = Thresholds()
    block_size: int = 4  # k: tokens drafted per round (hlm always uses 1)
    skip_rate: float = 0.5  # `rand`: probability of skipping a token
    uncertainty: UncertaintyConfig | None = None  # None: the drafter's own defaults
    network: NetworkModel = NetworkModel()
    optimistic: bool = True  # draft the next block while this one is verified
    lookahead: int | None = None  # tokens drafted optimistically; None = the block size
    rpc_timeout_s: float = 60.0
    down_retry_s: float = 10.0  # an unreachable tier is retried after this long
    client_id: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.block_size <= 64:
            raise ValueError(f"block size k must be in [1, 64], got {self.block_size}")
        if not 0.0 <= self.skip_rate <= 1.0:
            raise ValueError(f"--skip-rate must be in [0, 1], got {self.skip_rate}")
        if self.lookahead is not None and not 1 <= self.lookahead <= 64:
            raise ValueError(f"--lookahead must be in [1, 64], got {self.lookahead}")


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    spec: SamplingSpec
    max_tokens: int
    policy: Policy
    ignore_eos: bool = False
    skip_rate: float | None = None  # `rand` only; None = the router's
    block_size: int | None = None  # None = the router's
    thresholds: Thresholds | None = None  # None = the router's
    optimistic: bool | None = None  # None = the router's

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise InvalidArgument("the prompt is empty: give at least one token")
        if self.max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.skip_rate is not None and not 0.0 <= self.skip_rate <= 1.0:
            raise InvalidArgument(f"skip_rate must be in [0, 1], got {self.skip_rate}")
        if self.block_size is not None and not 1 <= self.block_size <= 64:
            raise InvalidArgument(f"block_size must be in [1, 64], got {self.block_size}")


@dataclass
class RequestStats:
    """The round's statistics of one request (the `usage.hilm` object of the API)."""

    policy: str
    tokens: int = 0
    rounds: int = 0
    skips: int = 0
    ilm_messages: int = 0  # Verify calls to the ILM
    llm_messages: int = 0  # Verify (or Generate) calls to the LLM
    ilm_drafted: int = 0
    ilm_accepted: int = 0
    llm_drafted: int = 0
    llm_accepted: int = 0
    llm_forwards: int = 0  # LLM forward passes (one per Verify; one per token for llm-only)
    ilm_forwarded: int = 0  # ILM-emitted tokens sent on to the LLM
    skipped_at: list[int] = field(default_factory=list)  # completion indexes of the SKIPs
    token_ids: list[int] = field(default_factory=list)  # the completion's token ids
    optimistic_drafts: int = 0  # Drafts made while a block was being verified
    optimistic_kept: int = 0  # of which the tokens became the next block
    degraded: list[str] = field(default_factory=list)
    tiers: dict[str, TierUsage] = field(default_factory=lambda: {
        t: TierUsage() for t in ("slm", "ilm", "llm")})

    def degrade(self, reason: str) -> None:
        if reason not in self.degraded:
            self.degraded.append(reason)
            metrics.DEGRADED.labels(reason).inc()

    def usage(self) -> dict:
        t = self.tiers
        return {
            "policy": self.policy, "rounds": self.rounds, "skips": self.skips,
            "ilm_messages": self.ilm_messages, "llm_messages": self.llm_messages,
            "ilm_drafted": self.ilm_drafted, "ilm_accepted": self.ilm_accepted,
            "llm_drafted": self.llm_drafted, "llm_accepted": self.llm_accepted,
            "llm_forwards": self.llm_forwards, "ilm_forwarded": self.ilm_forwarded,
            "optimistic_drafts": self.optimistic_drafts,
            "optimistic_kept": self.optimistic_kept,
            # which completion tokens were kept unverified (for TSR, scored off the critical
            # path by the benchmarks); only tokens actually returned
            "skipped_at": [i for i in self.skipped_at if i < self.tokens],
            "token_ids": list(self.token_ids),  # what skipped_at indexes (no re-tokenizing)
            "messages": {k: v.messages for k, v in t.items()},
            "uplink_bytes": {k: v.uplink_bytes for k, v in t.items()},
            "downlink_bytes": {k: v.downlink_bytes for k, v in t.items()},
            "model_ms": {k: round(v.model_ms, 3) for k, v in t.items()},
            "rtt_ms": {k: round(v.rtt_ms, 3) for k, v in t.items()},
            "network_ms": round(sum(v.network_ms for v in t.values()), 3),
            "degraded": list(self.degraded),
        }


def optimistic_start(drafted: list[int], kept: list[int], ahead: list[int]) -> int | None:
    """Where the optimistic draft's tokens valid as the next block begin, or None.

    `ahead` was drafted after `drafted` as if all of it would be accepted; the round made
    `kept` final. If kept == drafted (every token skipped or accepted, no extra token), all of
    `ahead` was drafted from the decided context (0); if kept == drafted + [x] (all accepted,
    then the bonus x) and `ahead` starts with x, the rest of it was (1). Otherwise none is."""
    if kept == drafted:
        return 0
    if kept[:-1] == drafted and ahead and ahead[0] == kept[-1]:
        return 1
    return None


@dataclass
class _Session:
    """A tier's session of one request and the tokens it holds (prompt included)."""

    sid: str = ""
    held: list[int] = field(default_factory=list)
    opening: asyncio.Task | None = None


class Router:
    """Owns the tier links; `generate` runs one request."""

    def __init__(self, cfg: RouterConfig):
        self.cfg = cfg
        cid = cfg.client_id or f"hilm-router-{os.getpid()}"
        net, timeout = cfg.network, cfg.rpc_timeout_s
        self.llm = VerifierLink("llm", cfg.llm, Site.CLOUD, net, cid, timeout)
        self.ilm = VerifierLink("ilm", cfg.ilm, Site.EDGE, net, cid, timeout) if cfg.ilm else None
        self.slm = DrafterLink("slm", cfg.slm, Site.DEVICE, net, cid, timeout) if cfg.slm else None

    async def close(self) -> None:
        for link in (self.llm, self.ilm, self.slm):
            if link is not None:
                await link.close()

    def check_policy(self, policy: Policy) -> None:
        if policy.uses_drafter and self.slm is None:
            raise InvalidArgument(f"policy {policy.value!r} needs a drafter: start the router "
                                  f"with --slm HOST:PORT, or use policy 'llm-only'")
        if policy.uses_ilm and self.ilm is None:
            raise InvalidArgument(f"policy {policy.value!r} needs an ILM: start the router "
                                  f"with --ilm HOST:PORT")

    async def generate(self, req: GenerationRequest,
                       stats: RequestStats) -> AsyncIterator[list[int]]:
        """Yield the request's new tokens as they become final; fills `stats` as it goes.

        Stops at max_tokens or after the EOS token (unless ignore_eos)."""
        self.check_policy(req.policy)
        run = _Run(self, req, stats)
        outcome = "error"
        try:
            if req.policy is Policy.LLM_ONLY:
                async for ids in run.llm_only():
                    yield ids
            else:
                async for ids in run.rounds():
                    yield ids
            outcome = "ok"
        finally:
            metrics.REQUESTS.labels(req.policy.value, outcome).inc()
            metrics.TOKENS.labels(req.policy.value).inc(stats.tokens)
            if stats.tokens:
                for tier in ("ilm", "llm"):
                    msgs = stats.ilm_messages if tier == "ilm" else stats.llm_messages
                    metrics.TRANSMISSION_RATE.labels(tier).observe(msgs / stats.tokens)
            run.close_sessions()


class _Run:
    """The state of one request."""

    def __init__(self, router: Router, req: GenerationRequest, stats: RequestStats):
        self.r, self.req, self.stats = router, req, stats
        self.cfg = router.cfg
        self.th = req.thresholds or router.cfg.thresholds
        self.history: list[int] = list(req.prompt_ids)
        self.n_prompt = len(req.prompt_ids)
        self.eos: int | None = None
        seed = req.spec.seed
        self.rng = random.Random(None if seed is None else derive_seed(seed, 0, _SEED_STREAM["rand"]))
        self.sessions: dict[str, _Session] = {}
        # Sessions may add the request's tokens plus one round's overshoot.
        k = self.block_size
        self.session_max_tokens = req.max_tokens + k + 2 + (self.lookahead if self.optimistic
                                                            else 0)

    @property
    def block_size(self) -> int:
        if self.req.policy is Policy.HLM:
            return 1
        return self.req.block_size or self.cfg.block_size

    def spec_for(self, tier: str) -> SamplingSpec:
        s = self.req.spec
        if s.seed is None:
            return s
        return SamplingSpec(s.temperature, s.top_k, s.top_p,
                            derive_seed(s.seed, 0, _SEED_STREAM[tier]))

    @property
    def generated(self) -> int:
        return len(self.history) - self.n_prompt

    def accept(self, tokens: list[int]) -> tuple[list[int], bool]:
        """Make `tokens` final (cut at max_tokens and after EOS): (kept, done)."""
        room = self.req.max_tokens - self.generated
        kept = tokens[:room]
        done = len(kept) >= room
        if not self.req.ignore_eos and self.eos is not None and self.eos in kept:
            kept = kept[:kept.index(self.eos) + 1]
            done = True
        self.history += kept
        self.stats.tokens += len(kept)
        self.stats.token_ids += kept
        return kept, done

    # -- sessions ---------------------------------------------------------------------------

    def _link(self, tier: str):
        return {"slm": self.r.slm, "ilm": self.r.ilm, "llm": self.r.llm}[tier]

    def start_open(self, tier: str) -> None:
        link = self._link(tier)
        usage = self.stats.tiers[tier]
        prompt = list(self.history)

        async def open_():
            if tier == "slm":
                r = await link.open(prompt, self.spec_for(tier), self.session_max_tokens,
                                    self.cfg.uncertainty, usage)
            else:
                r = await link.open(prompt, self.spec_for(tier), self.session_max_tokens, usage)
            if r.eos_token_id >= 0:
                self.eos = r.eos_token_id
            return r

        self.sessions[tier] = _Session(held=prompt, opening=asyncio.ensure_future(open_()))

    async def session(self, tier: str) -> _Session:
        s = self.sessions[tier]
        if s.opening is not None:
            try:
                r = await s.opening
            except grpc.aio.AioRpcError as e:
                del self.sessions[tier]
                raise _translate(tier, e) from None
            s.sid, s.opening = r.session_id, None
        return s

    def close_sessions(self) -> None:
        for tier, s in list(self.sessions.items()):
            asyncio.ensure_future(self._close(tier, s))
        self.sessions.clear()

    async def _close(self, tier: str, s: _Session) -> None:
        with contextlib.suppress(Exception):
            if s.opening is not None:
                s.sid = (await s.opening).session_id
            if s.sid:
                await self._link(tier).close_session(s.sid, TierUsage())

    # -- llm-only ---------------------------------------------------------------------------

    async def llm_only(self) -> AsyncIterator[list[int]]:
        """The LLM's own streaming generation. Its model time is the stream's duration less
        the network delay charged on it (the tier reports no timings for a stream)."""
        usage = self.stats.tiers["llm"]
        self.stats.rounds = 1
        self.stats.llm_messages = 1
        stream = self.r.llm.generate(self.history, self.spec_for("llm"), self.req.max_tokens,
                                     self.req.ignore_eos, usage)
        t0 = time.perf_counter()
        try:
            async for ids in stream:
                self.stats.llm_forwards += len(ids)
                kept, done = self.accept(ids)
                if kept:
                    yield kept
                if done:
                    break
        except grpc.aio.AioRpcError as e:
            raise _translate("llm", e) from None
        finally:
            await stream.aclose()
            usage.model_ms = max(0.0, (time.perf_counter() - t0) * 1e3 - usage.network_ms)

    # -- speculative rounds -----------------------------------------------------------------

    @property
    def optimistic(self) -> bool:
        return self.cfg.optimistic if self.req.optimistic is None else self.req.optimistic

    async def rounds(self) -> AsyncIterator[list[int]]:
        """Draft, route, verify, until done. Optimistic drafting (DSI's idea on live tiers):
        while a block is verified the drafter goes on as if all of it were accepted; the
        tokens it drafted become the next block only if the verifier accepted the whole block
        and its bonus token is the drafter's next token, else the next Draft rolls them back.
        Those tokens were sampled from the drafter's q given exactly the context that was
        decided, so verifying (or skipping) them is what a fresh Draft would have led to: the
        output distribution does not change."""
        policy = self.req.policy
        self.start_open("slm")
        if policy.uses_ilm and self._ilm_usable():
            self.start_open("ilm")
        self.start_open("llm")
        drafter = await self.session("slm")
        usage = self.stats.tiers["slm"]
        # Where the drafter's session is, and what its next Draft must first do to it (one
        # device call per round).
        position, rollback_to, append = len(self.history), None, []
        ready: list = []  # tokens drafted optimistically that are this round's block
        ahead: asyncio.Future | None = None
        try:
            while True:
                base = len(self.history)
                n = min(self.block_size, self.req.max_tokens - self.generated)
                if ready:
                    tokens, ready = ready[:n], ready[n:]
                else:
                    d = await self._draft(drafter.sid, position, n, usage, rollback_to, append)
                    position, tokens = d.position, d.tokens
                    if not tokens:  # the drafter's session is full: nothing more to generate
                        return
                self.stats.rounds += 1
                drafted = [t.token_id for t in tokens]
                # Draft ahead only from exactly this block's end (not when a longer optimistic
                # draft was cut to the block), and only if more tokens will be wanted.
                if (self.optimistic and not ready and position == base + len(drafted)
                        and self.generated + len(drafted) < self.req.max_tokens):
                    ahead = asyncio.ensure_future(self._draft(
                        drafter.sid, position, self.lookahead, usage))
                    self.stats.optimistic_drafts += 1
                final = await self.verify_round(tokens)
                kept, done = self.accept(final)
                if kept:
                    yield kept
                if done:
                    return
                keep = common_prefix(drafted, kept)
                if ahead is not None and not ahead.done() and not (
                        kept[:len(drafted)] == drafted and len(kept) <= len(drafted) + 1):
                    # A rejection: nothing drafted ahead can be used. Stop it rather than wait;
                    # whether it went through is unknown, so the next Draft cuts back to what
                    # survived whatever the session holds (position 0 = not known).
                    ahead.cancel()
                    ahead, position = None, 0
                if ahead is not None:
                    extra, ahead = await self._settle(ahead), None
                    if extra is not None:
                        position = extra.position
                        start = optimistic_start(drafted, kept,
                                                 [t.token_id for t in extra.tokens])
                        if start is not None:  # the drafter holds history + ready exactly
                            self.stats.optimistic_kept += 1
                            ready, rollback_to, append = list(extra.tokens[start:]), None, []
                            continue
                # The drafter holds base + drafted (+ what it drafted ahead): keep what
                # survived, give it the rest with the next Draft.
                ready = []
                rollback_to = base + keep if position == 0 or position > base + keep else None
                append = kept[keep:]
        finally:
            if ahead is not None:
                ahead.cancel()

    @property
    def lookahead(self) -> int:
        """Tokens drafted ahead: one more than a block, so that a kept optimistic draft (its
        first token is the verifier's bonus) leaves a whole block."""
        return self.cfg.lookahead or self.block_size + 1

    @staticmethod
    async def _settle(ahead: asyncio.Future):
        """The optimistic Draft's result, or None if it failed (it changed nothing then; the
        next Draft reports a drafter that is really gone)."""
        try:
            return await ahead
        except HilmError as e:
            logger.debug("optimistic draft failed: %s", e)
            return None

    async def _draft(self, sid: str, position: int, n: int, usage: TierUsage,
                     rollback_to: int | None = None, append=()):
        try:
            return await self.r.slm.draft(sid, position, n, usage, rollback_to, append)
        except grpc.aio.AioRpcError as e:
            raise _translate("slm", e) from None

    async def verify_round(self, tokens) -> list[int]:
        """Route one drafted block; return the tokens it makes final (before cutting)."""
        stats, policy = self.stats, self.req.policy
        us = [t.uncertainty for t in tokens]
        p = plan(policy, us, self.th, self._skip_rate(), self.rng)
        for i in range(len(tokens)):
            route = Route.SKIP if i < p.skips else p.route
            metrics.ROUTES.labels(route.value).inc()
        stats.skips += p.skips
        first = len(self.history) - self.n_prompt  # completion index of this block's token 0
        stats.skipped_at += range(first, min(first + p.skips, self.req.max_tokens))
        final = [t.token_id for t in tokens[:p.skips]]
        block = tokens[p.skips:]
        if not block:
            return final
        route = p.route
        if route is Route.ILM and not self._ilm_usable():
            stats.degrade("ilm-unreachable")
            route = Route.LLM
        draft = [t.token_id for t in block]
        dists = [(t.ids, t.probs) for t in block]
        if route is Route.ILM:
            try:
                out = await self._verify("ilm", final, draft, dists,
                                         want_emitted=policy in (Policy.HILM, Policy.CASCADE))
            except _TierDown:
                stats.degrade("ilm-unreachable")
                route = Route.LLM
            else:
                return final + await self._after_ilm(final, out)
        try:
            out = await self._verify("llm", final, draft, dists)
        except _TierDown:
            if policy.lossless:
                raise Unavailable("the LLM tier is unreachable and the policy "
                                  f"{policy.value!r} is lossless: retry later") from None
            stats.degrade("llm-unreachable")
            if self._ilm_usable():
                try:
                    out = await self._verify("ilm", final, draft, dists)
                    return final + draft[:out.num_accepted] + [out.next_token_id]
                except _TierDown:
                    stats.degrade("ilm-unreachable")
            return final + draft  # the drafter's tokens stand
        return final + draft[:out.num_accepted] + [out.next_token_id]

    async def _after_ilm(self, final: list[int], out) -> list[int]:
        """The ILM's emitted tokens: final, or (from the first it is unsure of) the LLM's draft."""
        emitted = out.emitted
        ids = [e.token_id for e in emitted]
        if not emitted:  # the tier did not return them (not asked): its tokens are final
            return ids or []
        policy = self.req.policy
        start = 0 if policy is Policy.CASCADE else ilm_forward_from(
            [e.uncertainty for e in emitted], self.th.t_ilm)
        if start is None:
            return ids
        if not self.r.llm.available:
            if policy.lossless:
                raise Unavailable("the LLM tier is unreachable and the policy "
                                  f"{policy.value!r} is lossless: retry later")
            self.stats.degrade("llm-unreachable")
            return ids
        head, tail = ids[:start], emitted[start:]
        self.stats.ilm_forwarded += len(tail)
        try:
            out2 = await self._verify("llm", final + head, [e.token_id for e in tail],
                                      [(e.ids, e.probs) for e in tail])
        except _TierDown:
            if policy.lossless:
                raise Unavailable("the LLM tier is unreachable and the policy "
                                  f"{policy.value!r} is lossless: retry later") from None
            self.stats.degrade("llm-unreachable")
            return ids
        return head + [e.token_id for e in tail[:out2.num_accepted]] + [out2.next_token_id]

    def _skip_rate(self) -> float:
        return self.cfg.skip_rate if self.req.skip_rate is None else self.req.skip_rate

    def _ilm_usable(self) -> bool:
        return self.r.ilm is not None and self.r.ilm.available

    async def _verify(self, tier: str, pending: list[int], draft, dists,
                      want_emitted: bool = False):
        """Verify `draft` on `tier`, after the history and `pending` (this round's tokens so
        far). The tier gets the tokens it has not seen and, if it holds tokens that were
        overruled, is cut back first. One retry after reopening a session the tier lost."""
        link = self._link(tier)
        usage = self.stats.tiers[tier]
        context = self.history + pending
        for attempt in (0, 1):
            if tier not in self.sessions:
                self.start_open(tier)
            try:
                s = await self.session(tier)
                keep = common_prefix(s.held, context)
                rollback_to = keep if keep < len(s.held) else None
                out = await link.verify(s.sid, len(s.held), context[keep:], draft, dists, usage,
                                        want_emitted=want_emitted, rollback_to=rollback_to)
            except grpc.aio.AioRpcError as e:
                if e.code() in UNREACHABLE:
                    link.mark_down(self.cfg.down_retry_s)
                    self.sessions.pop(tier, None)
                    raise _TierDown(tier) from None
                if e.code() is grpc.StatusCode.NOT_FOUND and attempt == 0:
                    self.sessions.pop(tier, None)  # the tier restarted or expired it: re-send
                    continue
                raise _translate(tier, e) from None
            except _TierDown:
                raise
            except HilmError as e:
                if isinstance(e, Unavailable):
                    link.mark_down(self.cfg.down_retry_s)
                    raise _TierDown(tier) from None
                raise
            s.held = context + draft[:out.num_accepted] + [out.next_token_id]
            n = len(draft)
            if tier == "ilm":
                self.stats.ilm_messages += 1
                self.stats.ilm_drafted += n
                self.stats.ilm_accepted += out.num_accepted
            else:
                self.stats.llm_messages += 1
                self.stats.llm_drafted += n
                self.stats.llm_accepted += out.num_accepted
                self.stats.llm_forwards += 1
            metrics.DRAFTED.labels(tier).inc(n)
            metrics.ACCEPTED.labels(tier).inc(out.num_accepted)
            return out
        raise AssertionError("unreachable")


class _TierDown(Exception):
    def __init__(self, tier: str):
        super().__init__(f"the {tier} tier is unreachable")
        self.tier = tier


def _translate(tier: str, e: grpc.aio.AioRpcError) -> HilmError:
    """A tier's gRPC error -> the router's domain error (HTTP status), naming the tier."""
    from hilm_vllm import errors

    by_code = {grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
               grpc.StatusCode.NOT_FOUND: errors.NotFound,
               grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
               grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
               grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted}
    cls = by_code.get(e.code(), errors.Unavailable)
    return cls(f"{tier} tier: {e.details()}")


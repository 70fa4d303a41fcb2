"""The policy loop: one generation request, round by round, across the tiers.

The router owns the request's token history (the source of truth); each tier's session follows
it (`router.session`). One round (DESIGN.md, "One round"), `_Run.execute`:
1. the drafter drafts up to k tokens with (u, q) each;
2. `policy.plan` turns the block into a `RoundPlan`: the leading SKIPs, the tier the rest goes
   to, how the ILM's result is forwarded, what an unreachable LLM means;
3. the verifier returns m accepted drafts and one more token; under `hilm` the ILM's emitted
   tokens whose own u exceeds T_ilm (and the rest of its block) go on to the LLM with the ILM's
   distributions as the draft (so the LLM's verification is exact); under `cascade` all of them;
4. the drafter is rolled back to the longest prefix of its drafts that survived and given the
   rest (with its next Draft: one device call per round).

Faults. A tier that cannot be reached (connection lost) is marked down for everyone for a while;
a call that gets no answer (deadline, cancelled) routes this request around the tier. Either
way the session is closed and, when the tier answers again, reopened with the history the router
owns (a restarted tier answers NOT_FOUND: the session is reopened and the call re-sent once).
An unreachable ILM is routed around (its blocks go to the LLM, exactly); an unreachable drafter
leaves the rest of the request to the LLM's own generation (exact); an unreachable LLM under a
lossy policy leaves the ILM's (else the drafter's) tokens final. Each is marked in the result
(`degraded`). Under a lossless policy the request waits up to `recover_s` for the LLM to answer
again, then ends with 503; tokens already streamed stay delivered.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from hilm_vllm import codec, errors
from hilm_vllm.errors import HilmError, InvalidArgument, Unavailable
from hilm_vllm.netmodel import NetworkModel
from hilm_vllm.router import metrics
from hilm_vllm.router.admission import AdmissionLimits, FairAdmission
from hilm_vllm.router.links import (CONNECTION_LOST, UNREACHABLE, DrafterLink, TierUsage,
                                    VerifierLink)
from hilm_vllm.router.ports import DraftPort, VerifyPort
from hilm_vllm.router.replicas import ReplicaSet, addresses
from hilm_vllm.router.policy import (Forward, LlmDown, Policy, RoundPlan, Route, common_prefix,
                                     forward_rule, plan)
from hilm_vllm.router.session import TierSession
from hilm_vllm.sampling import INT32_MAX, Penalties, SamplingSpec, ScoredToken, TokenLogprob
from hilm_vllm.seeds import Stream, derive_seed
from hilm_vllm.server.grpc_util import too_large, too_large_message
from hilm_vllm.thresholds import Thresholds
from hilm_vllm.tiers import MODEL_TIERS, Tier
from hilm_vllm.uncertainty import UncertaintyConfig

logger = logging.getLogger("hilm.router")

# Each tier's session seed from the request's one seed: the drafter's sampling and a
# verifier's acceptance uniforms must be independent.
_SESSION_STREAM = {Tier.SLM: Stream.SESSION_SLM, Tier.ILM: Stream.SESSION_ILM,
                   Tier.LLM: Stream.SESSION_LLM}


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
    # ... when the request's estimated chance that a draft-ahead is kept is at least this
    # (`optimistic_keep_chance`); 0 = every round
    optimistic_min_keep: float = 0.5
    lookahead: int | None = None  # tokens drafted optimistically; None = the block size
    rpc_timeout_s: float = 60.0  # deadline of one call to a tier
    down_retry_s: float = 10.0  # a tier whose connection was lost is retried after this long
    recover_s: float = 30.0  # how long a lossless request waits for the LLM to come back
    client_id: str = ""
    admission: AdmissionLimits = AdmissionLimits()  # the front doors' fair queue

    def __post_init__(self) -> None:
        if not 1 <= self.block_size <= 64:
            raise ValueError(f"block size k must be in [1, 64], got {self.block_size}")
        if not 0.0 <= self.skip_rate <= 1.0:
            raise ValueError(f"--skip-rate must be in [0, 1], got {self.skip_rate}")
        if self.lookahead is not None and not 1 <= self.lookahead <= 64:
            raise ValueError(f"--lookahead must be in [1, 64], got {self.lookahead}")
        for spec in (self.llm, self.ilm, self.slm):
            addresses(spec)  # a replica named twice is an error
        if not 0.0 <= self.optimistic_min_keep <= 1.0:
            raise ValueError(f"--optimistic-min-keep must be in [0, 1], got "
                             f"{self.optimistic_min_keep}")
        for name in ("rpc_timeout_s", "down_retry_s", "recover_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")


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
    stop_token_ids: tuple[int, ...] = ()  # also stop after any of these (vLLM's meaning)
    min_tokens: int = 0  # no stop token before this many (vLLM masks them; so do verifiers)
    stop: tuple[str, ...] = ()  # stop strings: llm-only passes them to the tier
    # vLLM's sampler transforms (codec.PENALTY_FIELDS as SamplingParams takes them): the LLM's
    # own sampler applies them under llm-only, the drafter and verifiers under the others
    # (`sampling_spec`; bad_words as bad_words_ids)
    penalties: dict = field(default_factory=dict)
    # each token's logprob under the distribution that decided it and this many top tokens
    # there (None: none)
    logprobs: int | None = None
    # vLLM's StructuredOutputsParams fields (codec.structured_outputs): the LLM's own
    # structured-output backend applies them under llm-only, the drafter and verifiers mask
    # their rows with the same grammar under the others (`sampling_spec`, server/grammar.py)
    structured: dict | None = None
    # penalties["bad_words"] as token-id sequences, tokenized as vLLM does
    # (codec.bad_words_token_ids): what the drafter and verifiers apply
    bad_words_ids: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise InvalidArgument("the prompt is empty: give at least one token")
        if not 1 <= self.max_tokens <= INT32_MAX:
            raise InvalidArgument(f"max_tokens must be in [1, {INT32_MAX}], got "
                                  f"{self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidArgument(f"min_tokens must be in [0, max_tokens], got "
                                  f"{self.min_tokens}")
        if (self.penalties.get("bad_words") and not self.bad_words_ids
                and self.policy is not Policy.LLM_ONLY):
            raise InvalidArgument("bad_words: give the router's tokenization of them "
                                  "(codec.bad_words_token_ids) as bad_words_ids")
        self.sampling_spec(0)  # the transforms' values are checked here, whatever the policy
        if self.skip_rate is not None and not 0.0 <= self.skip_rate <= 1.0:
            raise InvalidArgument(f"skip_rate must be in [0, 1], got {self.skip_rate}")
        if self.block_size is not None and not 1 <= self.block_size <= 64:
            raise InvalidArgument(f"block_size must be in [1, 64], got {self.block_size}")

    def sampling_spec(self, output_start: int) -> SamplingSpec:
        """`spec` with the sampler transforms the tiers apply themselves (every policy but
        llm-only, whose LLM gets them as vLLM's SamplingParams), the completion's output
        counted from absolute position `output_start`."""
        p = self.penalties
        try:
            pen = Penalties(p.get("presence_penalty", 0.0), p.get("frequency_penalty", 0.0),
                            p.get("repetition_penalty", 1.0), p.get("min_p", 0.0),
                            tuple(p.get("logit_bias", {}).items()),
                            tuple(p.get("allowed_token_ids", ())), output_start,
                            self.bad_words_ids)
        except (TypeError, ValueError) as e:
            raise InvalidArgument(str(e)) from None
        if self.policy is Policy.LLM_ONLY:
            return self.spec
        return dataclasses.replace(self.spec, penalties=pen,
                                   structured=codec.structured_spec(self.structured, output_start))


Note = tuple[str, "TokenLogprob | None"]  # a final token's deciding tier and its logprob there


@dataclass
class RequestStats:
    """The round's statistics of one request (the `usage.hilm` object of the API). What each
    tier did is in `tiers` (TierUsage); the rest is the router's own."""

    policy: str
    tokens: int = 0
    rounds: int = 0
    skips: int = 0
    ilm_forwarded: int = 0  # ILM-emitted tokens sent on to the LLM
    skipped_at: list[int] = field(default_factory=list)  # completion indexes of the SKIPs
    token_ids: list[int] = field(default_factory=list)  # the completion's token ids
    optimistic_drafts: int = 0  # Drafts made while a block was being verified
    optimistic_kept: int = 0  # of which the tokens became the next block
    failovers: int = 0  # sessions reopened on another replica after theirs was lost
    # per completion token: the tier whose distribution decided it, and (when the request
    # asked for logprobs) its logprob there
    deciders: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop token) or "length" (max_tokens, context)
    tiers: dict[Tier, TierUsage] = field(default_factory=lambda: {
        t: TierUsage() for t in MODEL_TIERS})

    def degrade(self, reason: str) -> None:
        if reason not in self.degraded:
            self.degraded.append(reason)
            metrics.DEGRADED.labels(reason).inc()

    def verified(self, tier: Tier, drafted: int, accepted: int) -> None:
        u = self.tiers[tier]
        u.drafted += drafted
        u.accepted += accepted
        u.forwards += 1
        u.drafts += 1
        metrics.observe_verification(tier.value, drafted, accepted)

    def usage(self) -> dict:
        t = {tier.value: u for tier, u in self.tiers.items()}
        ilm, llm = self.tiers[Tier.ILM], self.tiers[Tier.LLM]
        return {
            "policy": self.policy, "rounds": self.rounds, "skips": self.skips,
            "ilm_messages": ilm.verifies, "llm_messages": llm.verifies,
            "ilm_drafted": ilm.drafted, "ilm_accepted": ilm.accepted,
            "llm_drafted": llm.drafted, "llm_accepted": llm.accepted,
            "llm_forwards": llm.forwards, "ilm_forwarded": self.ilm_forwarded,
            # vLLM's mean acceptance length per verifier: 1 + accepted / drafts (tokens made
            # final per verification; None where the tier verified nothing)
            "ilm_drafts": ilm.drafts, "llm_drafts": llm.drafts,
            "acceptance_length": {k: (1 + v.accepted / v.drafts if v.drafts else None)
                                  for k, v in t.items() if k != Tier.SLM.value},
            "optimistic_drafts": self.optimistic_drafts,
            "optimistic_kept": self.optimistic_kept,
            "failovers": self.failovers,
            # which completion tokens were kept unverified (for TSR, scored off the critical
            # path by the benchmarks); only tokens actually returned
            "skipped_at": [i for i in self.skipped_at if i < self.tokens],
            "token_ids": list(self.token_ids),  # what skipped_at indexes (no re-tokenizing)
            "deciders": list(self.deciders),  # per token: slm, ilm or llm
            "messages": {k: v.messages for k, v in t.items()},
            "uplink_bytes": {k: v.uplink_bytes for k, v in t.items()},
            "downlink_bytes": {k: v.downlink_bytes for k, v in t.items()},
            "model_ms": {k: round(v.model_ms, 3) for k, v in t.items()},
            "rtt_ms": {k: round(v.rtt_ms, 3) for k, v in t.items()},
            "network_ms": round(sum(v.network_ms for v in t.values()), 3),
            "degraded": list(self.degraded),
        }


def optimistic_keep_chance(blocks: int, whole: int, drafted: int, accepted: int) -> float:
    """The chance that a draft made ahead of the next block is kept, from the request so far.

    A draft-ahead becomes the next block only when the verifier accepts the whole block
    (`whole` of `blocks` rounds so far) and its bonus token is the drafter's next token, taken
    to be as likely as a drafted token's acceptance (`accepted` of `drafted`). Both rates are
    Laplace estimates (a new request starts at 1/2 x 1/2), so a request whose drafter keeps
    agreeing with the verifier turns drafting ahead on within a few rounds, and one where most
    blocks are cut does not pay for drafts that are thrown away."""
    return (whole + 1) / (blocks + 2) * (accepted + 1) / (drafted + 2)


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


HEALTH_CACHE_S = 1.0  # one health check of the tiers answers /health and /ping this long
PROBE_RETRY_S = 5.0  # after a failed limits probe of the LLM, none for this long
MAX_FAILOVERS = 3  # a request's session moved to another replica at most this often per call


class Router:
    """Owns the tier links; `generate` runs one request. `links` replaces the gRPC links (a
    test's scripted fakes)."""

    def __init__(self, cfg: RouterConfig,
                 links: Mapping[Tier, DraftPort | VerifyPort] | None = None):
        self.cfg = cfg
        if links is None:
            cid = cfg.client_id or f"hilm-router-{os.getpid()}"
            args = (cfg.network, cid, cfg.rpc_timeout_s)
            links = {}
            for tier, spec, kind in ((Tier.LLM, cfg.llm, VerifierLink),
                                     (Tier.ILM, cfg.ilm, VerifierLink),
                                     (Tier.SLM, cfg.slm, DrafterLink)):
                replicas = [kind(tier, a, *args) for a in addresses(spec)]
                if len(replicas) == 1:
                    links[tier] = replicas[0]
                elif replicas:  # --llm A,B: sessions placed and failed over (replicas.py)
                    links[tier] = ReplicaSet(tier, replicas, down_s=cfg.down_retry_s)
        self.links = dict(links)
        self._health: tuple[float, asyncio.Future] | None = None  # (when, the check's result)
        self._probe: asyncio.Future | None = None  # the LLM limits probe in flight
        self._probe_failed_at = -math.inf
        # tier -> replica address -> state, for tiers with several (as of the last check)
        self.replica_states: dict[str, dict[str, str]] = {}
        self.admission = adm = FairAdmission(cfg.admission)
        metrics.ADMITTED_CHOICES.set_function(lambda: adm.active)
        metrics.QUEUED_REQUESTS.set_function(lambda: adm.queued)
        metrics.REFUSED_REQUESTS.set_function(lambda: adm.refused)

    @property
    def llm(self):
        return self.links[Tier.LLM]

    @property
    def ilm(self):
        return self.links.get(Tier.ILM)

    @property
    def slm(self):
        return self.links.get(Tier.SLM)

    async def close(self) -> None:
        for link in self.links.values():
            await link.close()

    async def max_model_len(self, timeout_s: float = 10.0) -> int | None:
        """The LLM's context length, from its OpenSession (a link remembers it); before the
        first request, one one-token session is opened and closed to learn it, whoever asks
        meanwhile waits for that one, and after a failed probe none is tried for
        PROBE_RETRY_S. None when the LLM does not answer."""
        link = self.llm
        limits = getattr(link, "limits", None)
        if limits is None and hasattr(link, "close_session"):
            if self._probe is None:
                if time.monotonic() - self._probe_failed_at < PROBE_RETRY_S:
                    return None
                self._probe = asyncio.ensure_future(self._probe_limits(link, timeout_s))
            probe = self._probe
            try:
                await asyncio.shield(probe)
            finally:
                if probe.done() and self._probe is probe:
                    self._probe = None
            limits = getattr(link, "limits", None)
        return (limits[1] or None) if limits else None

    async def _probe_limits(self, link, timeout_s: float) -> None:
        async def probe():
            usage = TierUsage()
            r = await link.open([0], SamplingSpec(), 1, usage)
            link.limits = (getattr(r, "max_block", 0), getattr(r, "max_model_len", 0))
            await link.close_session(r.session_id, usage)

        try:
            await asyncio.wait_for(probe(), timeout_s)
        except (asyncio.TimeoutError, grpc.aio.AioRpcError) as e:
            self._probe_failed_at = time.monotonic()
            logger.debug("max_model_len probe failed: %s", e)

    async def health(self) -> tuple[str | None, dict[str, str | None]]:
        """(why the router cannot serve, or None; each configured tier's state). Every policy
        needs the LLM (lossless ones fail without it, lossy ones lose their quality), so an LLM
        that does not answer SERVING makes the router unhealthy; an ILM or drafter that is down
        is routed around and only reported. One check of every tier serves every caller for
        HEALTH_CACHE_S (load balancers poll /health and /ping often; each check is one RPC per
        tier), and callers that arrive while it runs wait for it."""
        now = time.monotonic()
        if self._health is None or now - self._health[0] >= HEALTH_CACHE_S:
            self._health = (now, asyncio.ensure_future(self._check_health()))
        return await asyncio.shield(self._health[1])

    async def _check_health(self) -> tuple[str | None, dict[str, str | None]]:
        tiers = [t for t in MODEL_TIERS if t in self.links]
        reasons = await asyncio.gather(*(self.links[t].check_health() for t in tiers))
        states = {t.value: (r or "serving") for t, r in zip(tiers, reasons)}
        self.replica_states = {t.value: await self.links[t].replica_health() for t in tiers
                               if hasattr(self.links[t], "replica_health")}
        down = reasons[tiers.index(Tier.LLM)] if Tier.LLM in tiers else "no LLM tier"
        return down, states

    def check_policy(self, policy: Policy) -> None:
        if policy.uses_drafter and self.slm is None:
            raise InvalidArgument(f"policy {policy.value!r} needs a drafter: start the router "
                                  f"with --slm HOST:PORT, or use policy 'llm-only'")
        if policy.uses_ilm and self.ilm is None:
            raise InvalidArgument(f"policy {policy.value!r} needs an ILM: start the router "
                                  f"with --ilm HOST:PORT")

    async def prompt_logprobs(self, prompt_ids: Sequence[int], top: int,
                              stats: RequestStats) -> list[TokenLogprob]:
        """The LLM's logprobs of the prompt's tokens after the first and the `top` tokens at
        each (vLLM's prompt_logprobs, for `echo` with logprobs): one Generate of one token on
        the LLM tier, counted in `stats` as LLM traffic."""
        sink: list[TokenLogprob] = []
        try:
            async for _ in self.llm.generate(prompt_ids, SamplingSpec(temperature=0.0), 1, True,
                                             stats.tiers[Tier.LLM], prompt_logprobs=top,
                                             prompt_sink=sink):
                pass
        except grpc.aio.AioRpcError as e:
            raise _translate(Tier.LLM, e) from None
        return sink

    async def generate(self, req: GenerationRequest,
                       stats: RequestStats) -> AsyncIterator[list[int]]:
        """Yield the request's new tokens as they become final; fills `stats` as it goes.

        Stops at max_tokens or after an EOS token (unless ignore_eos)."""
        self.check_policy(req.policy)
        run = _Run(self, req, stats)
        outcome = "error"
        policy, name = req.policy.value, metrics.model_name()
        t0 = last = time.perf_counter()
        metrics.RUNNING.inc()
        metrics.V_RUNNING.labels(name).inc()
        source = run.llm_only() if req.policy is Policy.LLM_ONLY else run.rounds()
        try:
            async for ids in source:
                now = time.perf_counter()
                if last > t0:  # not the first output: its gap is an inter-token latency
                    metrics.ITL.labels(policy).observe(now - last)
                    metrics.V_ITL.labels(name).observe(now - last)
                else:
                    metrics.V_TTFT.labels(name).observe(now - t0)
                last = now
                yield ids
            outcome = "ok"
        finally:
            metrics.RUNNING.dec()
            metrics.V_RUNNING.labels(name).dec()
            if outcome == "ok":
                metrics.E2E.labels(policy).observe(time.perf_counter() - t0)
                metrics.V_E2E.labels(name).observe(time.perf_counter() - t0)
            metrics.REQUESTS.labels(req.policy.value, outcome).inc()
            metrics.TOKENS.labels(req.policy.value).inc(stats.tokens)
            metrics.ROUNDS.labels(policy).inc(stats.rounds)
            metrics.observe_request_end(
                stats.tokens, stats.tiers[Tier.ILM].verifies + stats.tiers[Tier.LLM].verifies,
                stats.skips)
            if stats.tokens:
                for tier in (Tier.ILM, Tier.LLM):
                    metrics.TRANSMISSION_RATE.labels(tier.value).observe(
                        stats.tiers[tier].verifies / stats.tokens)
            run.close_sessions()
            await source.aclose()


class _TierDown(Exception):
    def __init__(self, tier: Tier):
        super().__init__(f"the {tier.value} tier is unreachable")
        self.tier = tier


class _AheadFailed(Exception):
    """A Draft ahead failed (or was superseded); the round goes on without it."""


_dropped: set[asyncio.Future] = set()


def _drop(ahead: asyncio.Future) -> None:
    """Leave a Draft ahead to end by itself, its result unread. Not cancelled: grpc.aio leaks
    native memory for every call cancelled in flight (grpc/grpc#43360; ~1 KB per call here,
    the router's linear RSS growth in the soak). The drafter ends it as soon as the next Draft
    (position 0) or the session's close arrives, and it answers ABORTED."""
    _dropped.add(ahead)
    ahead.add_done_callback(_forget)


def _forget(ahead: asyncio.Future) -> None:
    _dropped.discard(ahead)
    if not ahead.cancelled():
        ahead.exception()  # read, so asyncio does not log "never retrieved"


class _Run:
    """The state of one request."""

    def __init__(self, router: Router, req: GenerationRequest, stats: RequestStats):
        self.r, self.req, self.stats = router, req, stats
        self.cfg = router.cfg
        self.th = req.thresholds or router.cfg.thresholds
        self.history: list[int] = list(req.prompt_ids)
        self.n_prompt = len(req.prompt_ids)
        self.eos: frozenset[int] | None = None  # the stop ids, once a session reported them
        seed = req.spec.seed
        self.rng = random.Random(None if seed is None
                                 else derive_seed(seed, 0, Stream.RAND_POLICY))
        self.sessions: dict[Tier, TierSession] = {}
        self.block_cap = 64  # the tiers' max_block, once known (`negotiate`)
        # rounds, rounds whose whole block was kept, drafted tokens, kept drafted tokens
        self.agreement = (0, 0, 0, 0)
        # Sessions may add the request's tokens plus one round's overshoot.
        k = self.block_size
        self.session_max_tokens = min(INT32_MAX, req.max_tokens + k + 2 + (
            self.lookahead if self.optimistic else 0))
        self.max_tokens = req.max_tokens  # capped by the LLM's context once it is known

    # -- the request's parameters -----------------------------------------------------------

    @property
    def block_size(self) -> int:
        if self.req.policy is Policy.HLM:
            return 1
        return min(self.req.block_size or self.cfg.block_size, self.block_cap)

    @property
    def optimistic(self) -> bool:
        return self.cfg.optimistic if self.req.optimistic is None else self.req.optimistic

    def draft_ahead_now(self) -> bool:
        """Whether this round drafts ahead: always when the request asks for it (`optimistic:
        true`), never when it or the router turned it off, else when the request's
        `optimistic_keep_chance` reaches `--optimistic-min-keep`."""
        if self.req.optimistic is not None:
            return self.req.optimistic
        if not self.cfg.optimistic:
            return False
        return optimistic_keep_chance(*self.agreement) >= self.cfg.optimistic_min_keep

    @property
    def lookahead(self) -> int:
        """Tokens drafted ahead: one more than a block, so that a kept optimistic draft (its
        first token is the verifier's bonus) leaves a whole block."""
        return self.cfg.lookahead or self.block_size + 1

    def _skip_rate(self) -> float:
        return self.cfg.skip_rate if self.req.skip_rate is None else self.req.skip_rate

    def spec_for(self, tier: Tier, position: int = 0) -> SamplingSpec:
        """The request's spec with the tier's own seed for a session (or stream) that starts
        `position` tokens into the completion: a stream resumed after a restart must not draw
        its tokens with the noise of the first ones."""
        s = self.req.sampling_spec(self.n_prompt)
        if s.seed is None:
            return s
        return dataclasses.replace(s, seed=derive_seed(s.seed, position, _SESSION_STREAM[tier]))

    @property
    def generated(self) -> int:
        return len(self.history) - self.n_prompt

    def accept(self, tokens: list[int], notes: list[Note] | None = None
               ) -> tuple[list[int], bool]:
        """Make `tokens` final (cut at max_tokens and after a stop token): (kept, done).
        `notes`: per token, the tier that decided it and its logprob there (None: the LLM's
        own generation without logprobs)."""
        room = self.max_tokens - self.generated
        kept = tokens[:room]
        done = len(kept) >= room
        stops = set(self.req.stop_token_ids)
        if not self.req.ignore_eos:
            stops |= self.eos or set()
        # As vLLM: stop tokens are masked while the output holds fewer than min_tokens tokens,
        # so the first index that may stop is min_tokens (0-based; a verified token cannot be
        # one before it: p = 0 there)
        first = self.req.min_tokens - self.generated  # index of the (min_tokens + 1)-th token
        stop = next((i for i, t in enumerate(kept) if t in stops and i >= first), None)
        if stop is not None:
            kept, done = kept[:stop + 1], True
            self.stats.finish_reason = "stop"
        elif done:
            self.stats.finish_reason = "length"
        self.history += kept
        self.stats.tokens += len(kept)
        self.stats.token_ids += kept
        notes = (notes or [])[:len(kept)]
        notes += [(Tier.LLM.value, None)] * (len(kept) - len(notes))
        self.stats.deciders += [tier for tier, _ in notes]
        if self.req.logprobs is not None:
            self.stats.logprobs += [lp for _, lp in notes]
        return kept, done

    # -- sessions ---------------------------------------------------------------------------

    def usable(self, tier: Tier) -> bool:
        link = self.r.links.get(tier)
        return link is not None and link.available

    def fails_over(self, tier: Tier, e: BaseException) -> bool:
        """A tier with several replicas lost the one this request's session was on, and
        another answers: open the session there from the history (exact; `replicas.py`)."""
        lost = (isinstance(e, Unavailable) or  # its opening could not connect
                isinstance(e, grpc.aio.AioRpcError) and e.code() in CONNECTION_LOST)
        return (lost and len(getattr(self.r.links.get(tier), "replicas", ())) > 1
                and self.usable(tier))

    def start_open(self, tier: Tier) -> TierSession:
        link, usage = self.r.links[tier], self.stats.tiers[tier]
        prompt = list(self.history)
        # vLLM's min_tokens, counted from this session's prompt (a session reopened
        # mid-request starts later): every tier masks the stop tokens until then
        min_tokens = max(0, self.req.min_tokens - self.generated)
        if tier is Tier.SLM:
            def opener():
                return link.open(prompt, self.spec_for(tier), self.session_max_tokens,
                                 self.cfg.uncertainty, usage, min_tokens,
                                 self.req.stop_token_ids, self.req.logprobs)
        else:
            def opener():
                return link.open(prompt, self.spec_for(tier), self.session_max_tokens, usage,
                                 min_tokens, self.req.stop_token_ids)
        s = self.sessions[tier] = TierSession.open(tier, link, usage, prompt, opener)
        return s

    async def session(self, tier: Tier) -> TierSession:
        s = self.sessions.get(tier) or self.start_open(tier)
        try:
            await s.ready()
        except grpc.aio.AioRpcError as e:
            self.abandon(tier, e)
            raise _translate(tier, e) from None
        return s

    async def stop_set(self) -> frozenset[int]:
        """The LLM's stop ids (lossless policies stop where llm-only stops); the drafter's
        when the LLM's session cannot be opened (a lossy request goes on without it)."""
        for tier in (Tier.LLM, Tier.SLM):
            if tier in self.sessions:
                try:
                    return frozenset((await self.session(tier)).eos_token_ids)
                except HilmError:
                    continue
        return frozenset()

    def abandon(self, tier: Tier, e: grpc.aio.AioRpcError | None = None) -> None:
        """Drop a tier's session after a failure (closed on the tier, best effort); a tier
        whose connection was lost is marked down for everyone."""
        s = self.sessions.pop(tier, None)
        if s is not None:
            asyncio.ensure_future(s.close())
        if e is not None and e.code() in CONNECTION_LOST:
            self.r.links[tier].mark_down(self.cfg.down_retry_s)

    def close_sessions(self) -> None:
        for s in self.sessions.values():
            asyncio.ensure_future(s.close())
        self.sessions.clear()

    # -- llm-only ---------------------------------------------------------------------------

    async def llm_only(self) -> AsyncIterator[list[int]]:
        """The LLM's own streaming generation, from the history so far. Its model time is the
        stream's duration less the network delay charged on it (a stream reports no timings).
        A stream the LLM drops (it restarted, or stalled past the link's timeout) is started
        again from the history the router owns once the LLM answers, for up to `recover_s`
        (exact: the LLM continues its own sequence); then 503, with what was streamed kept."""
        usage = self.stats.tiers[Tier.LLM]
        deadline, wait = None, 0.25
        while True:
            if self.req.structured and self.generated:
                # vLLM's grammar reads a request's own output: from this history it would
                # start over in the middle of the structure
                raise Unavailable(
                    f"a structured output cannot go on as the LLM's own generation after "
                    f"{self.generated} tokens (its grammar would start over): retry")
            self.stats.rounds += 1
            # the LLM's own sampler applies the transforms (req.penalties), not the spec's copy
            spec = dataclasses.replace(self.spec_for(Tier.LLM, self.generated), penalties=None)
            stream = self.r.llm.generate(self.history, spec,
                                         self.max_tokens - self.generated, self.req.ignore_eos,
                                         usage, self.req.stop_token_ids,
                                         max(0, self.req.min_tokens - self.generated),
                                         self.req.stop, self.req.penalties or None,
                                         self.req.logprobs, self.req.structured)
            t0 = time.perf_counter()
            try:
                async for ids, finish, logprobs in stream:
                    deadline, wait = None, 0.25  # it answers
                    usage.forwards += len(ids)
                    kept, done = self.accept(ids, [(Tier.LLM.value, lp) for lp in logprobs])
                    if kept:
                        yield kept
                    if finish and not done:  # the tier's own stop (EOS, stop string, context)
                        self.stats.finish_reason = finish
                    if done or finish:
                        return
                return  # a stream that ended without a finish: as the tier ended it
            except grpc.aio.AioRpcError as e:
                if e.code() not in UNREACHABLE:
                    raise _translate(Tier.LLM, e) from None
                if e.code() in CONNECTION_LOST:
                    self.r.llm.mark_down(self.cfg.down_retry_s)
                now = time.monotonic()
                deadline = deadline or now + self.cfg.recover_s
                if now + wait > deadline:
                    raise Unavailable(f"the llm tier did not answer for {self.cfg.recover_s:g} s "
                                      f"({e.code().name}: {e.details()}): retry later") from None
                logger.info("llm stream lost (%s); resuming from %d tokens when it answers",
                            e.code().name, len(self.history))
            finally:
                await stream.aclose()
                usage.model_ms += max(0.0, (time.perf_counter() - t0) * 1e3 - usage.network_ms)
            await asyncio.sleep(wait)
            wait = min(2 * wait, 2.0)

    # -- speculative rounds -----------------------------------------------------------------

    async def rounds(self) -> AsyncIterator[list[int]]:
        """Draft, plan, execute, until done. Optimistic drafting (DSI's idea on live tiers):
        while a block is verified the drafter goes on as if all of it were accepted; the
        tokens it drafted become the next block only if the verifier accepted the whole block
        and its bonus token is the drafter's next token, else the next Draft rolls them back.
        Those tokens were sampled from the drafter's q given exactly the context that was
        decided, so verifying (or skipping) them is what a fresh Draft would have led to: the
        output distribution does not change. A drafter that stops answering leaves the rest
        to the LLM's own generation."""
        self.start_open(Tier.SLM)
        if self.req.policy.uses_ilm and self.usable(Tier.ILM):
            self.start_open(Tier.ILM)
        self.start_open(Tier.LLM)
        try:
            async for ids in self._rounds():
                yield ids
        except _TierDown as down:
            if down.tier is not Tier.SLM:
                raise
            self.stats.degrade("slm-unreachable")
            async for ids in self.llm_only():
                yield ids

    async def _rounds(self) -> AsyncIterator[list[int]]:
        # Where the drafter's session is, and what its next Draft must first do to it (one
        # device call per round).
        position, rollback_to, append = len(self.history), None, []
        ready: list[ScoredToken] = []  # tokens drafted optimistically that are this block
        ahead: asyncio.Future | None = None
        await self.negotiate()
        try:
            while True:
                base = len(self.history)
                n = min(self.block_size, self.max_tokens - self.generated)
                if ready:
                    tokens, ready = ready[:n], ready[n:]
                else:
                    d = await self._draft(position, n, rollback_to, append)
                    position, tokens = d.position, d.tokens
                    if not tokens:  # the drafter's session is full: nothing more to generate
                        self.stats.finish_reason = "length"
                        return
                self.stats.rounds += 1
                drafted = [t.token_id for t in tokens]
                # Draft ahead only from exactly this block's end (not when a longer optimistic
                # draft was cut to the block), and only if more tokens will be wanted.
                if (self.optimistic and not ready and position == base + len(drafted)
                        and self.generated + len(drafted) < self.max_tokens):
                    if not self.draft_ahead_now():
                        metrics.OPTIMISTIC.labels("gated").inc()
                    else:
                        ahead = asyncio.ensure_future(self._draft(
                            position, self.lookahead, recover=False))
                        self.stats.optimistic_drafts += 1
                        metrics.OPTIMISTIC.labels("drafted").inc()
                final, notes = await self.execute(self.plan(tokens), tokens)
                if self.eos is None:
                    self.eos = await self.stop_set()
                kept, done = self.accept(final, notes)
                if kept:
                    yield kept
                if done:
                    return
                keep = common_prefix(drafted, kept)
                blocks, whole, n_drafted, n_kept = self.agreement
                self.agreement = (blocks + 1, whole + (keep == len(drafted)),
                                  n_drafted + len(drafted), n_kept + keep)
                if ahead is not None and not ahead.done() and not (
                        kept[:len(drafted)] == drafted and len(kept) <= len(drafted) + 1):
                    # A rejection: nothing drafted ahead can be used. Do not wait for it: the
                    # next Draft says position 0 (not known), which ends it on the drafter and
                    # cuts back to what survived whatever the session holds.
                    _drop(ahead)
                    ahead, position = None, 0
                if ahead is not None:
                    extra, ahead = await self._settle(ahead), None
                    if extra is not None:
                        position = extra.position
                        start = optimistic_start(drafted, kept,
                                                 [t.token_id for t in extra.tokens])
                        if start is not None:  # the drafter holds history + ready exactly
                            self.stats.optimistic_kept += 1
                            metrics.OPTIMISTIC.labels("kept").inc()
                            ready, rollback_to, append = list(extra.tokens[start:]), None, []
                            continue
                # The drafter holds base + drafted (+ what it drafted ahead): keep what
                # survived, give it the rest with the next Draft.
                ready = []
                rollback_to = base + keep if position == 0 or position > base + keep else None
                append = kept[keep:]
        finally:
            if ahead is not None:
                _drop(ahead)  # the session's close ends it on the drafter

    async def negotiate(self) -> None:
        """The verifiers' limits, from their OpenSession replies (a link remembers them, so
        only a link's first request waits for its session): blocks no larger than any
        verifier takes (a forwarded ILM block has one token more), and no more tokens than
        the LLM's context holds (then the request ends with finish_reason "length", as
        vLLM's does)."""
        forwards = forward_rule(self.req.policy) is not Forward.NONE
        caps = []
        for tier in (Tier.LLM, Tier.ILM):
            if tier not in self.sessions:
                continue
            link = self.r.links[tier]
            if getattr(link, "limits", None) is None:
                try:
                    s = await self.session(tier)
                except HilmError:
                    continue  # routed around (or failing) when it is used
                link.limits = (s.max_block, s.max_model_len)
            max_block, max_model_len = link.limits
            if max_block:
                caps.append(max_block - (1 if tier is Tier.LLM and forwards else 0))
            if tier is Tier.LLM and max_model_len:
                # context + block (+ the ILM's extra token, forwarded) + next token fit the
                # LLM's max_model_len at every round
                room = max_model_len - self.n_prompt - 1 - (1 if forwards else 0)
                self.max_tokens = min(self.max_tokens, room)
                if self.max_tokens < 1:
                    raise InvalidArgument(
                        f"the prompt has {self.n_prompt} tokens; with a token after it, it "
                        f"must fit the LLM's max-model-len {max_model_len}: shorten it")
        self.block_cap = max(1, min(caps, default=64))

    def plan(self, tokens: list[ScoredToken]) -> RoundPlan:
        p = plan(self.req.policy, [t.uncertainty for t in tokens], self.th, self._skip_rate(),
                 self.rng)
        for i in range(len(tokens)):
            metrics.ROUTES.labels(Route.SKIP.value if i < p.skips else p.target.value).inc()
        self.stats.skips += p.skips
        first = self.generated  # completion index of this block's token 0
        self.stats.skipped_at += range(first, min(first + p.skips, self.max_tokens))
        return p

    async def execute(self, p: RoundPlan, tokens: list[ScoredToken]
                      ) -> tuple[list[int], list[Note]]:
        """One round's verification: the tokens it makes final (before cutting at max_tokens
        or EOS), each with its note (the tier that decided it, its logprob there). The skipped
        head is final; the rest goes to the plan's tier, an unreachable ILM's to the LLM; the
        ILM's unsure tokens go on to the LLM."""
        final = [t.token_id for t in tokens[:p.skips]]
        notes: list[Note] = [(Tier.SLM.value, t.logprob) for t in tokens[:p.skips]]
        block = tokens[p.skips:]
        if not block:
            return final, notes
        if p.target is Tier.ILM:
            out = await self._verify(Tier.ILM, final, block, p.want_emitted)
            if out is not None:
                ids, more = await self._after_ilm(p, final, block, out)
                return final + ids, notes + more
            self.stats.degrade("ilm-unreachable")
        out = await self._verify(Tier.LLM, final, block, False, p.llm_down)
        if out is not None:
            return final + out.tokens([t.token_id for t in block]), notes + out.notes(Tier.LLM)
        ids, more = await self._without_llm(final, block)
        return final + ids, notes + more

    async def _after_ilm(self, p: RoundPlan, final: list[int], block: list[ScoredToken],
                         out) -> tuple[list[int], list[Note]]:
        """The ILM's emitted tokens: final, or (from the first it is unsure of) the LLM's draft
        with the ILM's p as q."""
        ids = ([e.token_id for e in out.emitted] if out.emitted
               else out.tokens([t.token_id for t in block]))
        notes = out.notes(Tier.ILM)
        start = p.forward_from([e.uncertainty for e in out.emitted])
        if start is None:
            return ids, notes
        head, tail = ids[:start], out.emitted[start:]
        self.stats.ilm_forwarded += len(tail)
        out2 = await self._verify(Tier.LLM, final + head, tail, False, p.llm_down)
        if out2 is None:  # lossy, LLM unreachable: the ILM's tokens stand
            return ids, notes
        return head + out2.tokens([e.token_id for e in tail]), notes[:start] + out2.notes(
            Tier.LLM)

    async def _without_llm(self, final: list[int], block: list[ScoredToken]
                           ) -> tuple[list[int], list[Note]]:
        """A lossy round whose LLM did not answer: the ILM verifies the block if it can, else
        the drafter's tokens stand."""
        if self.usable(Tier.ILM):
            out = await self._verify(Tier.ILM, final, block, False)
            if out is not None:
                return out.tokens([t.token_id for t in block]), out.notes(Tier.ILM)
            self.stats.degrade("ilm-unreachable")
        return [t.token_id for t in block], [(Tier.SLM.value, t.logprob) for t in block]

    async def _verify(self, tier: Tier, pending: list[int], block: list[ScoredToken],
                      want_emitted: bool, llm_down: LlmDown = LlmDown.KEEP):
        """Verify `block` on `tier` after the history and `pending` (this round's tokens so
        far); None when the tier does not answer and the caller routes around it. A session
        the tier lost (restart, expiry) is reopened and the call re-sent once; under
        `LlmDown.FAIL` an LLM that does not answer is retried until `recover_s`, then 503."""
        deadline = time.monotonic() + self.cfg.recover_s
        reopened, wait, failovers = False, 0.25, 0
        while True:
            if not self.usable(tier) and llm_down is LlmDown.KEEP:
                self.stats.degrade(f"{tier.value}-unreachable")
                return None
            try:
                s = await self.session(tier)
                out = await s.verify(self.history + pending, block, want_emitted,
                                     self.req.logprobs)
            except grpc.aio.AioRpcError as e:
                self.abandon(tier, e)
                if e.code() is grpc.StatusCode.NOT_FOUND and not reopened:
                    reopened = True  # the tier restarted or expired it: re-send the history
                    continue
                if failovers < MAX_FAILOVERS and self.fails_over(tier, e):
                    failovers += 1
                    self.stats.failovers += 1
                    continue
                if e.code() not in UNREACHABLE:
                    raise _translate(tier, e) from None
            except Unavailable as e:  # its opening failed to connect (session() translated it)
                if failovers < MAX_FAILOVERS and self.fails_over(tier, e):
                    failovers += 1
                    self.stats.failovers += 1
                    continue
            else:
                self.stats.verified(tier, len(block), out.num_accepted)
                return out
            if llm_down is LlmDown.KEEP:
                self.stats.degrade(f"{tier.value}-unreachable")
                return None
            if time.monotonic() + wait > deadline:
                raise Unavailable(f"the {tier.value} tier did not answer for "
                                  f"{self.cfg.recover_s:g} s and the policy "
                                  f"{self.req.policy.value!r} is lossless: retry later")
            await asyncio.sleep(wait)
            wait = min(2 * wait, 2.0)

    # -- the drafter ------------------------------------------------------------------------

    @staticmethod
    async def _settle(ahead: asyncio.Future):
        """The optimistic Draft's result, or None if it failed (it changed nothing then; the
        next Draft reports a drafter that is really gone)."""
        try:
            return await ahead
        except (HilmError, _TierDown, _AheadFailed) as e:
            logger.debug("optimistic draft failed: %s", e)
            return None

    async def _draft(self, position: int, n: int, rollback_to: int | None = None,
                     append=(), recover: bool = True):
        """One Draft (after a rollback and an append). A session opened with the history (a
        new one) drafts from its end. A drafter that lost the session (it restarted) gets a
        new one and the Draft is re-sent (unless `recover` is off: a Draft ahead); one that
        holds more than it should (a dropped Draft ahead went through late) is cut back; one
        that does not answer is _TierDown."""
        for attempt in (0, 1):
            try:
                held = self.sessions.get(Tier.SLM)
                if not recover and (held is None or held.closed):
                    raise _AheadFailed(None)  # the request is over: a Draft ahead opens nothing
                s = await self.session(Tier.SLM)
                if s.fresh:
                    position, rollback_to, append = len(s.held), None, ()
                d = await self.r.slm.draft(s.sid, position, n, self.stats.tiers[Tier.SLM],
                                           rollback_to, append)
                s.fresh = False
                return d
            except (grpc.aio.AioRpcError, Unavailable) as e:
                code = e.code() if isinstance(e, grpc.aio.AioRpcError) else None
                if not recover:
                    # A Draft ahead touches no session state when it fails: it may have been
                    # dropped (ABORTED, or NOT_FOUND after the close); the round's own next
                    # Draft finds out whether the drafter is really in trouble.
                    raise _AheadFailed(code) from None
                if (code is grpc.StatusCode.FAILED_PRECONDITION and attempt == 0
                        and position != 0):
                    # The session holds more than this request believes: a dropped Draft ahead
                    # that reached the drafter after the Draft that dropped it. Cut back to
                    # what the request knows (it owns the history) and draft again.
                    position, rollback_to = 0, position if rollback_to is None else rollback_to
                    continue
                self.abandon(Tier.SLM, e if code is not None else None)
                if code is grpc.StatusCode.NOT_FOUND and attempt == 0 and recover:
                    continue  # the next session() opens one with the history
                if attempt == 0 and self.fails_over(Tier.SLM, e):
                    self.stats.failovers += 1
                    position, rollback_to, append = 0, None, ()  # a new session: from its end
                    continue
                if code is None or code in UNREACHABLE:
                    raise _TierDown(Tier.SLM) from None
                raise _translate(Tier.SLM, e) from None
        raise AssertionError("unreachable")


def _translate(tier: Tier, e: grpc.aio.AioRpcError) -> HilmError:
    """A tier's gRPC error -> the router's domain error (HTTP status), naming the tier."""
    by_code = {grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
               grpc.StatusCode.NOT_FOUND: errors.NotFound,
               grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
               grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
               grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted}
    if too_large(e):
        return errors.HilmError(too_large_message(f"{tier.value} tier"))
    if e.code() is grpc.StatusCode.UNAUTHENTICATED:
        return errors.HilmError(f"{tier.value} tier refused the router: {e.details()} (start "
                                f"the router with the tier's --tier-token and TLS settings)")
    cls = by_code.get(e.code(), errors.Unavailable)
    return cls(f"{tier.value} tier: {e.details()}")

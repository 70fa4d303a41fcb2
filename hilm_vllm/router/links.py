"""The router's gRPC links to the tiers: each call is one message, sized, delayed by the network
model, counted and timed. The router is on the device; the drafter is local (no network cost),
the ILM at the edge, the LLM in the cloud.

Request protos are built here (not in the tiers' convenience clients) so that their real
serialized size is what the network model charges and what `uplink_bytes` counts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from hilm_vllm import codec
from hilm_vllm.drafter import wire as drafter_wire
from hilm_vllm.drafter.wire import DraftResult, draft_result
from hilm_vllm.netmodel import NetworkModel, Site
from hilm_vllm.proto.hilm.v1 import drafter_pb2_grpc, generate_pb2_grpc, verifier_pb2_grpc
from hilm_vllm.router import metrics
from hilm_vllm.sampling import SamplingSpec, ScoredToken, TokenLogprob
from hilm_vllm.server.security import make_channel
from hilm_vllm.sessions import CLIENT_METADATA_KEY
from hilm_vllm.tiers import Tier
from hilm_vllm.uncertainty import UncertaintyConfig
from hilm_vllm.verifier import messages as verifier_messages

# A tier that cannot be reached: marked down for everyone for a while (routed around).
CONNECTION_LOST = (grpc.StatusCode.UNAVAILABLE,)
# A call that got no answer (its deadline passed, it was cut, the tier failed inside): this
# request routes around the tier, others keep using it.
NO_ANSWER = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.UNKNOWN)
UNREACHABLE = CONNECTION_LOST + NO_ANSWER


@dataclass
class TierUsage:
    """What one request cost on one tier."""

    messages: int = 0  # every message sent to the tier (sessions included)
    verifies: int = 0  # Verify / Draft / Generate calls
    drafted: int = 0  # draft tokens sent to the tier (verifiers)
    accepted: int = 0  # of which it accepted
    drafts: int = 0  # drafted blocks it verified (vLLM's "drafts")
    forwards: int = 0  # forward passes (one per Verify; one per token of a Generate stream)
    uplink_bytes: int = 0  # serialized bytes sent to the tier
    downlink_bytes: int = 0
    model_ms: float = 0.0  # time the tier reports for its calls
    network_ms: float = 0.0  # simulated delay charged on this hop (both directions)
    rtt_ms: float = 0.0  # measured round trips, network delay included


@dataclass
class VerifyOutcome:
    num_accepted: int
    next_token_id: int
    position: int
    emitted: list[ScoredToken] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # m + 1, when asked

    def tokens(self, draft: Sequence[int]) -> list[int]:
        """What the verification makes final: the accepted drafts, then the next token."""
        return [*draft[:self.num_accepted], self.next_token_id]

    def notes(self, tier: Tier) -> list[tuple[str, TokenLogprob | None]]:
        """Per token of `tokens`: the tier that decided it and its logprob there."""
        lps = self.logprobs or [None] * (self.num_accepted + 1)
        return [(tier.value, lp) for lp in lps]


class TierLink:
    """One tier as seen from the router: a channel, its site, the network between them."""

    def __init__(self, tier: Tier, address: str, network: NetworkModel, client_id: str,
                 timeout_s: float):
        self.tier, self.address = tier, address
        self.name, self.site = tier.value, tier.site
        self.network, self.timeout_s = network, timeout_s
        # TLS and the tier token as this process was started with (hilm-serve --tls-*,
        # --tier-token): the one channel-making function every client uses.
        self.channel = make_channel(address)
        self.metadata = ((CLIENT_METADATA_KEY, client_id),)
        self.down_until = 0.0  # monotonic time before which the tier is considered unreachable
        # (max_block, max_model_len) from the tier's last OpenSession; None until one opened
        self.limits: tuple[int, int] | None = None

    async def close(self) -> None:
        await self.channel.close()

    async def check_health(self, timeout_s: float = 2.0) -> str | None:
        """None when the tier answers SERVING to a gRPC health check, else why not."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            r = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(), metadata=self.metadata, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            return f"the {self.name} tier at {self.address} does not answer ({e.code().name})"
        if r.status != health_pb2.HealthCheckResponse.SERVING:
            return (f"the {self.name} tier at {self.address} is "
                    f"{health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)}")
        return None

    @property
    def available(self) -> bool:
        return time.monotonic() >= self.down_until

    def mark_down(self, for_s: float) -> None:
        self.down_until = time.monotonic() + for_s
        metrics.TIER_DOWN.labels(self.name).inc()

    async def unary(self, method, request, usage: TierUsage, verify: bool = False):
        """One request/reply through the network model."""
        up = request.ByteSize()
        t0 = time.perf_counter()
        d_up = self.network.delay(Site.DEVICE, self.site, up)
        if d_up:
            await asyncio.sleep(d_up)
        reply = await method(request, metadata=self.metadata, timeout=self.timeout_s)
        down = reply.ByteSize()
        d_down = self.network.delay(self.site, Site.DEVICE, down)
        if d_down:
            await asyncio.sleep(d_down)
        rtt = time.perf_counter() - t0
        usage.messages += 1
        usage.verifies += int(verify)
        usage.uplink_bytes += up
        usage.downlink_bytes += down
        usage.network_ms += (d_up + d_down) * 1e3
        usage.rtt_ms += rtt * 1e3
        if hasattr(reply, "timings"):
            usage.model_ms += reply.timings.total_ms
        metrics.RTT.labels(self.name).observe(rtt)
        metrics.UPLINK_BYTES.labels(self.name).inc(up)
        metrics.MESSAGES.labels(self.name).inc()
        return reply


class DrafterLink(TierLink):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.stub = drafter_pb2_grpc.DrafterStub(self.channel)

    async def open(self, prompt: Sequence[int], spec: SamplingSpec, max_tokens: int,
                   uncertainty: UncertaintyConfig | None, usage: TierUsage,
                   min_tokens: int = 0, stop_token_ids: Sequence[int] = (),
                   logprobs: int | None = None):
        return await self.unary(self.stub.OpenSession, drafter_wire.open_request(
            prompt, spec, uncertainty, max_tokens, min_tokens, stop_token_ids, logprobs),
            usage)

    async def draft(self, sid: str, position: int, n: int, usage: TierUsage,
                    rollback_to: int | None = None, append: Sequence[int] = ()) -> DraftResult:
        """One device call per round: cut back to `rollback_to`, append, then draft."""
        request = drafter_wire.draft_request(sid, position, n, rollback_to=rollback_to,
                                             append=append)
        return draft_result(await self.unary(self.stub.Draft, request, usage, verify=True))

    async def close_session(self, sid: str, usage: TierUsage) -> None:
        await self.unary(self.stub.CloseSession, drafter_wire.close_request(sid), usage)


class VerifierLink(TierLink):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.stub = verifier_pb2_grpc.VerifierStub(self.channel)
        self.generator = generate_pb2_grpc.GeneratorStub(self.channel)

    async def open(self, prompt: Sequence[int], spec: SamplingSpec, max_tokens: int,
                   usage: TierUsage, min_tokens: int = 0, stop_token_ids: Sequence[int] = ()):
        return await self.unary(self.stub.OpenSession, verifier_messages.open_request(
            prompt, spec, max_tokens, min_tokens, stop_token_ids), usage)

    async def verify(self, sid: str, position: int, append: Sequence[int],
                     block: Sequence[ScoredToken], usage: TierUsage,
                     want_emitted: bool = False, rollback_to: int | None = None,
                     logprobs: int | None = None) -> VerifyOutcome:
        """Verify `block` (its tokens, each with the q it was sampled from) after appending
        `append`, having first cut the session back to `rollback_to`."""
        request = verifier_messages.verify_request(
            sid, position, [t.token_id for t in block], [(t.ids, t.probs) for t in block],
            append, want_emitted=want_emitted, rollback_to=rollback_to, logprobs=logprobs)
        r = await self.unary(self.stub.Verify, request, usage, verify=True)
        return VerifyOutcome(r.num_accepted, r.next_token_id, r.position,
                             [codec.scored_from_pb(e) for e in r.emitted],
                             [codec.logprob_from_pb(t) for t in r.logprobs])

    async def close_session(self, sid: str, usage: TierUsage) -> None:
        await self.unary(self.stub.CloseSession, verifier_messages.close_request(sid), usage)

    async def generate(self, prompt: Sequence[int], spec: SamplingSpec, max_tokens: int,
                       ignore_eos: bool, usage: TierUsage, stop_token_ids: Sequence[int] = (),
                       min_tokens: int = 0, stop: Sequence[str] = (),
                       penalties: Mapping | None = None, logprobs: int | None = None,
                       structured: Mapping | None = None, prompt_logprobs: int | None = None,
                       prompt_sink: list | None = None
                       ) -> AsyncIterator[tuple[list[int], str, list[TokenLogprob]]]:
        """The LLM-only baseline: the tier's own streaming generation. The request pays the
        uplink delay; streamed chunks each arrive one downlink delay after they were sent
        (pipelined: delays overlap, order is kept). Yields (token ids, the tier's finish
        reason on the last chunk, else ""). A stream that sends nothing for the link's
        timeout ends with DEADLINE_EXCEEDED (the deadline is per chunk: a long generation is
        not cut, a stalled tier is). `prompt_logprobs`: the prompt's, appended to
        `prompt_sink` when the first chunk brings them."""
        request = verifier_messages.generate_request(prompt, spec, max_tokens, ignore_eos,
                                                     stop_token_ids, min_tokens, stop,
                                                     penalties, logprobs, structured,
                                                     prompt_logprobs)
        up = request.ByteSize()
        t0 = time.perf_counter()
        d_up = self.network.delay(Site.DEVICE, self.site, up)
        if d_up:
            await asyncio.sleep(d_up)
        usage.messages += 1
        usage.verifies += 1
        usage.uplink_bytes += up
        usage.network_ms += d_up * 1e3
        metrics.UPLINK_BYTES.labels(self.name).inc(up)
        metrics.MESSAGES.labels(self.name).inc()
        call = self.generator.Generate(request, metadata=self.metadata)
        # Chunks are read as they arrive and delivered one downlink delay later: the delays of
        # a stream overlap (a pipe of fixed latency), they do not add up chunk after chunk.
        arrivals: asyncio.Queue = asyncio.Queue()

        async def pump():
            try:
                async for chunk in call:
                    arrivals.put_nowait((time.perf_counter(), chunk))
            except grpc.aio.AioRpcError as e:
                arrivals.put_nowait((time.perf_counter(), e))
            arrivals.put_nowait(None)

        reader = asyncio.ensure_future(pump())
        finished = False
        try:
            while (item := await self._next(arrivals)) is not None:
                received, chunk = item
                if isinstance(chunk, grpc.aio.AioRpcError):
                    raise chunk
                down = chunk.ByteSize()
                usage.downlink_bytes += down
                wait = received + self.network.delay(self.site, Site.DEVICE, down) \
                    - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                    usage.network_ms += wait * 1e3
                finished = finished or bool(chunk.finish_reason)
                if prompt_sink is not None and chunk.prompt_logprobs:
                    prompt_sink += [codec.logprob_from_pb(t) for t in chunk.prompt_logprobs]
                if chunk.token_ids or chunk.finish_reason:
                    yield (list(chunk.token_ids), chunk.finish_reason,
                           [codec.logprob_from_pb(t) for t in chunk.logprobs])
        finally:
            if finished and not reader.done():
                # The tier ends its stream right after the finish: read that end rather than
                # cancel the call (grpc.aio leaks native memory for every call cancelled in
                # flight, grpc/grpc#43360). Only a stream cut short is cancelled.
                await asyncio.wait({reader}, timeout=min(self.timeout_s, 5.0))
            if not call.done():
                call.cancel()
            reader.cancel()
            usage.rtt_ms += (time.perf_counter() - t0) * 1e3

    async def _next(self, arrivals: asyncio.Queue):
        try:
            return await asyncio.wait_for(arrivals.get(), self.timeout_s)
        except asyncio.TimeoutError:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                f"no token from the {self.name} tier for {self.timeout_s:g} s "
                f"(--rpc-timeout-s)") from None

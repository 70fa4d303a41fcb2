"""The router's gRPC links to the tiers: each call is one message, sized, delayed by the network
model, counted and timed. The router is on the device; the drafter is local (no network cost),
the ILM at the edge, the LLM in the cloud.

Request protos are built here (not in the tiers' convenience clients) so that their real
serialized size is what the network model charges and what `uplink_bytes` counts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from hilm_vllm.drafter.client import draft_result
from hilm_vllm.drafter.core import DraftResult
from hilm_vllm.netmodel import NetworkModel, Site
from hilm_vllm.proto.hilm.v1 import (common_pb2, drafter_pb2, drafter_pb2_grpc, generate_pb2,
                                     generate_pb2_grpc, verifier_pb2, verifier_pb2_grpc)
from hilm_vllm.router import metrics
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.server.client import CHANNEL_OPTIONS, sampling_pb, uncertainty_pb
from hilm_vllm.server.security import make_channel
from hilm_vllm.sessions import CLIENT_METADATA_KEY
from hilm_vllm.uncertainty import UncertaintyConfig

# A tier that does not answer: the router routes around it (degradation) instead of failing.
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
               grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)


@dataclass
class TierUsage:
    """What one request cost on one tier."""

    messages: int = 0  # every message sent to the tier (sessions included)
    verifies: int = 0  # Verify / Draft / Generate calls
    uplink_bytes: int = 0  # serialized bytes sent to the tier
    downlink_bytes: int = 0
    model_ms: float = 0.0  # time the tier reports for its calls
    network_ms: float = 0.0  # simulated delay charged on this hop (both directions)
    rtt_ms: float = 0.0  # measured round trips, network delay included


@dataclass
class Emitted:
    """A token a verifier emitted, with the distribution it is an exact sample of and its u."""

    token_id: int
    uncertainty: float
    ids: np.ndarray
    probs: np.ndarray


@dataclass
class VerifyOutcome:
    num_accepted: int
    next_token_id: int
    position: int
    emitted: list[Emitted] = field(default_factory=list)


class TierLink:
    """One tier as seen from the router: a channel, its site, the network between them."""

    def __init__(self, name: str, address: str, site: Site, network: NetworkModel,
                 client_id: str, timeout_s: float):
        self.name, self.address, self.site = name, address, site
        self.network, self.timeout_s = network, timeout_s
        # TLS and the tier token as this process was started with (hilm-serve --tls-*,
        # --tier-token): the one channel-making function every client uses.
        self.channel = make_channel(address, options=CHANNEL_OPTIONS)
        self.metadata = ((CLIENT_METADATA_KEY, client_id),)
        self.down_until = 0.0  # monotonic time before which the tier is considered unreachable

    async def close(self) -> None:
        await self.channel.close()

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


def prompt_pb(ids: Sequence[int]) -> common_pb2.Prompt:
    return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=list(ids)))


class DrafterLink(TierLink):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.stub = drafter_pb2_grpc.DrafterStub(self.channel)

    async def open(self, prompt: Sequence[int], spec: SamplingSpec, max_tokens: int,
                   uncertainty: UncertaintyConfig | None, usage: TierUsage):
        request = drafter_pb2.OpenDrafterSessionRequest(prompt=prompt_pb(prompt),
                                                        sampling=sampling_pb(spec),
                                                        max_tokens=max_tokens)
        if uncertainty is not None:
            request.uncertainty.CopyFrom(uncertainty_pb(uncertainty))
        return await self.unary(self.stub.OpenSession, request, usage)

    async def draft(self, sid: str, position: int, n: int, usage: TierUsage,
                    rollback_to: int | None = None, append: Sequence[int] = ()) -> DraftResult:
        """One device call per round: cut back to `rollback_to`, append, then draft."""
        request = drafter_pb2.DraftRequest(session_id=sid, position=position, max_tokens=n,
                                           append_token_ids=list(append))
        if rollback_to is not None:
            request.rollback_to = rollback_to
        r = await self.unary(self.stub.Draft, request, usage, verify=True)
        return draft_result(r)

    async def rollback(self, sid: str, position: int, usage: TierUsage) -> int:
        r = await self.unary(self.stub.Rollback, drafter_pb2.RollbackRequest(
            session_id=sid, position=position), usage)
        return r.position

    async def append(self, sid: str, position: int, ids: Sequence[int], usage: TierUsage) -> int:
        r = await self.unary(self.stub.Append, drafter_pb2.AppendRequest(
            session_id=sid, position=position, token_ids=list(ids)), usage)
        return r.position

    async def close_session(self, sid: str, usage: TierUsage) -> None:
        await self.unary(self.stub.CloseSession,
                         drafter_pb2.CloseDrafterSessionRequest(session_id=sid), usage)


class VerifierLink(TierLink):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.stub = verifier_pb2_grpc.VerifierStub(self.channel)
        self.generator = generate_pb2_grpc.GeneratorStub(self.channel)

    async def open(self, prompt: Sequence[int], spec: SamplingSpec, max_tokens: int,
                   usage: TierUsage):
        return await self.unary(self.stub.OpenSession, verifier_pb2.OpenVerifierSessionRequest(
            prompt=prompt_pb(prompt), sampling=sampling_pb(spec), max_tokens=max_tokens), usage)

    async def verify(self, sid: str, position: int, append: Sequence[int],
                     draft: Sequence[int], dists: Sequence[tuple[np.ndarray, np.ndarray]],
                     usage: TierUsage, want_emitted: bool = False,
                     rollback_to: int | None = None) -> VerifyOutcome:
        request = verifier_pb2.VerifyRequest(
            session_id=sid, position=position, append_token_ids=list(append),
            draft_token_ids=list(draft),
            draft_dists=[common_pb2.SparseDistribution(token_ids=ids.tolist(),
                                                       probs=probs.tolist())
                         for ids, probs in dists])
        if want_emitted:
            request.return_emitted = True
        if rollback_to is not None:
            request.rollback_to = rollback_to
        r = await self.unary(self.stub.Verify, request, usage, verify=True)
        emitted = [Emitted(e.token_id, e.uncertainty, np.asarray(e.dist.token_ids, np.int32),
                           np.asarray(e.dist.probs, np.float32)) for e in r.emitted]
        return VerifyOutcome(r.num_accepted, r.next_token_id, r.position, emitted)

    async def close_session(self, sid: str, usage: TierUsage) -> None:
        await self.unary(self.stub.CloseSession,
                         verifier_pb2.CloseVerifierSessionRequest(session_id=sid), usage)

    async def generate(self, prompt: Sequence[int], spec: SamplingSpec, max_tokens: int,
                       ignore_eos: bool, usage: TierUsage) -> AsyncIterator[list[int]]:
        """The LLM-only baseline: the tier's own streaming generation. The request pays the
        uplink delay; streamed chunks each arrive one downlink delay after they were sent
        (pipelined: delays overlap, order is kept)."""
        request = generate_pb2.GenerateRequest(prompt=prompt_pb(prompt),
                                               sampling=sampling_pb(spec),
                                               max_tokens=max_tokens, ignore_eos=ignore_eos)
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
        try:
            while (item := await arrivals.get()) is not None:
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
                if chunk.token_ids:
                    yield list(chunk.token_ids)
        finally:
            call.cancel()
            reader.cancel()
            usage.rtt_ms += (time.perf_counter() - t0) * 1e3

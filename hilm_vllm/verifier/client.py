"""A small typed async client of a verifier tier (for the router, tests and benchmarks).

    async with VerifierClient("127.0.0.1:50051", client_id="router-1") as v:
        s = await v.open_session([0, 5, 7], SamplingSpec(temperature=0.8, seed=1))
        r = await v.verify(s.session_id, s.position, draft=[9], dists=[([9, 4], [0.75, 0.25])],
                           want_emitted=True)
        for e in r.emitted: e.token_id, e.uncertainty, (e.ids, e.probs)  # this tier's p and u
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import grpc

from hilm_vllm import codec
from hilm_vllm.proto.hilm.v1 import generate_pb2_grpc, verifier_pb2_grpc
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.server.client import TierClient
from hilm_vllm.uncertainty import UncertaintyConfig
from hilm_vllm.verifier import messages
from hilm_vllm.verifier.messages import Dist, GenerateChunk, OpenedSession, Prompt
from hilm_vllm.verifier.session import Timings, VerifyReply


@dataclass
class VerifierClient(TierClient):
    def _init_stubs(self, channel: grpc.aio.Channel) -> None:
        self._verifier = verifier_pb2_grpc.VerifierStub(channel)
        self._generator = generate_pb2_grpc.GeneratorStub(channel)

    async def open_session(self, prompt: Prompt, spec: SamplingSpec, max_tokens: int = 0,
                           min_tokens: int = 0,
                           stop_token_ids: Sequence[int] = ()) -> OpenedSession:
        r = await self._verifier.OpenSession(
            messages.open_request(prompt, spec, max_tokens, min_tokens, stop_token_ids),
            metadata=self._metadata)
        return messages.opened_session(r)

    async def verify(self, session_id: str, position: int, draft: Sequence[int] = (),
                     dists: Sequence[Dist] = (), append: Sequence[int] = (),
                     want_target_probs: bool = False, timeout: float | None = None,
                     want_emitted: bool = False, uncertainty: UncertaintyConfig | None = None,
                     rollback_to: int | None = None, logprobs: int | None = None
                     ) -> VerifyReply:
        """One round. `want_emitted`: fill `reply.emitted` with the m + 1 emitted tokens, each
        with this tier's sparse p at its position (send them to the next tier as a draft with
        q = p) and its uncertainty, measured as `uncertainty` says (None: the tier's flags)."""
        request = messages.verify_request(session_id, position, draft, dists, append,
                                          want_target_probs, want_emitted, uncertainty,
                                          rollback_to, logprobs)
        r = await self._verifier.Verify(request, metadata=self._metadata, timeout=timeout)
        t = r.timings
        return VerifyReply(r.num_accepted, r.next_token_id, r.position, tuple(r.target_probs),
                           Timings(t.queue_ms, t.forward_ms, t.total_ms),
                           tuple(codec.scored_from_pb(e) for e in r.emitted),
                           tuple(codec.logprob_from_pb(t) for t in r.logprobs))

    async def close_session(self, session_id: str) -> None:
        await self._verifier.CloseSession(messages.close_request(session_id),
                                          metadata=self._metadata)

    async def generate(self, prompt: Prompt, spec: SamplingSpec, max_tokens: int = 0,
                       ignore_eos: bool = False, stop_token_ids: Sequence[int] = (),
                       min_tokens: int = 0, stop: Sequence[str] = (),
                       penalties: Mapping | None = None, logprobs: int | None = None,
                       structured: Mapping | None = None) -> AsyncIterator[GenerateChunk]:
        call = self._generator.Generate(
            messages.generate_request(prompt, spec, max_tokens, ignore_eos, stop_token_ids,
                                      min_tokens, stop, penalties, logprobs, structured),
            metadata=self._metadata)
        try:
            async for r in call:
                yield GenerateChunk(tuple(r.token_ids), r.text, r.finish_reason or None,
                                    tuple(codec.logprob_from_pb(t) for t in r.logprobs))
        finally:
            call.cancel()  # no-op once finished; stops the server's stream if we stop early

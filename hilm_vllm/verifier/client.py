"""A small typed async client of a verifier tier (for the router, tests and benchmarks).

    async with VerifierClient("127.0.0.1:50051", client_id="router-1") as v:
        s = await v.open_session([0, 5, 7], SamplingSpec(temperature=0.8, seed=1))
        r = await v.verify(s.session_id, s.position, draft=[9], dists=[([9, 4], [0.75, 0.25])],
                           want_emitted=True)
        for e in r.emitted: e.token_id, e.uncertainty, (e.ids, e.probs)  # this tier's p and u
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from hilm_vllm.proto.hilm.v1 import (common_pb2, generate_pb2, generate_pb2_grpc, verifier_pb2,
                                     verifier_pb2_grpc)
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.sessions import CLIENT_METADATA_KEY
from hilm_vllm.uncertainty import Gate, Perturbation, UncertaintyConfig
from hilm_vllm.verifier.core import GenerateChunk, OpenedSession, Prompt
from hilm_vllm.verifier.session import EmittedToken, Timings, VerifyReply

Dist = tuple[Sequence[int], Sequence[float]]

# Emitted distributions are sparse but, without top-k, up to the whole vocabulary per token
# (~1 MB for 128k ids): gRPC's default 4 MB receive limit would cut long blocks off.
MAX_RECEIVE_BYTES = 256 << 20

_GATES = {Gate.PERTURBED: common_pb2.PERTURBED_TEMPERATURE, Gate.ENTROPY: common_pb2.ENTROPY,
          Gate.VAR_ENTROPY: common_pb2.VAR_ENTROPY, Gate.MAX_PROB: common_pb2.MAX_PROB}
_PERTURBATIONS = {Perturbation.UNIFORM: common_pb2.UNIFORM, Perturbation.GRID: common_pb2.GRID}


def uncertainty_pb(cfg: UncertaintyConfig) -> common_pb2.UncertaintyConfig:
    return common_pb2.UncertaintyConfig(gate=_GATES[cfg.gate], num_samples=cfg.num_samples,
                                        theta_max=cfg.theta_max,
                                        perturbation=_PERTURBATIONS[cfg.perturbation])


def emitted_from(pb) -> tuple[EmittedToken, ...]:
    return tuple(EmittedToken(e.token_id, e.uncertainty, np.asarray(e.dist.token_ids, np.int32),
                              np.asarray(e.dist.probs, np.float32)) for e in pb)


def sampling_pb(spec: SamplingSpec) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(temperature=spec.temperature, top_k=spec.top_k,
                                   top_p=spec.top_p)
    if spec.seed is not None:
        pb.seed = spec.seed
    return pb


def prompt_pb(prompt: Prompt) -> common_pb2.Prompt:
    if isinstance(prompt, str):
        return common_pb2.Prompt(text=prompt)
    return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=list(prompt)))


@dataclass
class VerifierClient:
    address: str
    client_id: str = ""

    def __post_init__(self):
        self.channel = grpc.aio.insecure_channel(
            self.address, options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)])
        self._verifier = verifier_pb2_grpc.VerifierStub(self.channel)
        self._generator = generate_pb2_grpc.GeneratorStub(self.channel)
        self._metadata = ((CLIENT_METADATA_KEY, self.client_id),) if self.client_id else ()

    async def __aenter__(self) -> VerifierClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def open_session(self, prompt: Prompt, spec: SamplingSpec,
                           max_tokens: int = 0) -> OpenedSession:
        r = await self._verifier.OpenSession(verifier_pb2.OpenVerifierSessionRequest(
            prompt=prompt_pb(prompt), sampling=sampling_pb(spec), max_tokens=max_tokens),
            metadata=self._metadata)
        return OpenedSession(r.session_id, r.position, tuple(r.prompt_token_ids),
                             r.eos_token_id, r.vocab_size, r.max_block)

    async def verify(self, session_id: str, position: int, draft: Sequence[int] = (),
                     dists: Sequence[Dist] = (), append: Sequence[int] = (),
                     want_target_probs: bool = False, timeout: float | None = None,
                     want_emitted: bool = False, uncertainty: UncertaintyConfig | None = None
                     ) -> VerifyReply:
        """One round. `want_emitted`: fill `reply.emitted` with the m + 1 emitted tokens, each
        with this tier's sparse p at its position (send them to the next tier as a draft with
        q = p) and its uncertainty, measured as `uncertainty` says (None: the tier's flags)."""
        request = verifier_pb2.VerifyRequest(
            session_id=session_id, position=position, append_token_ids=list(append),
            draft_token_ids=list(draft), return_target_probs=want_target_probs,
            draft_dists=[common_pb2.SparseDistribution(token_ids=list(i), probs=list(p))
                         for i, p in dists], return_emitted=want_emitted)
        if uncertainty is not None:
            request.uncertainty.CopyFrom(uncertainty_pb(uncertainty))
        r = await self._verifier.Verify(request, metadata=self._metadata, timeout=timeout)
        t = r.timings
        return VerifyReply(r.num_accepted, r.next_token_id, r.position, tuple(r.target_probs),
                           Timings(t.queue_ms, t.forward_ms, t.total_ms), emitted_from(r.emitted))

    async def close_session(self, session_id: str) -> None:
        await self._verifier.CloseSession(
            verifier_pb2.CloseVerifierSessionRequest(session_id=session_id),
            metadata=self._metadata)

    async def generate(self, prompt: Prompt, spec: SamplingSpec, max_tokens: int = 0,
                       ignore_eos: bool = False) -> AsyncIterator[GenerateChunk]:
        call = self._generator.Generate(generate_pb2.GenerateRequest(
            prompt=prompt_pb(prompt), sampling=sampling_pb(spec), max_tokens=max_tokens,
            ignore_eos=ignore_eos), metadata=self._metadata)
        try:
            async for r in call:
                yield GenerateChunk(tuple(r.token_ids), r.text, r.finish_reason or None)
        finally:
            call.cancel()  # no-op once finished; stops the server's stream if we stop early

"""A small typed async client of a drafter tier (for the router, calibration, tests, benchmarks).

    async with DrafterClient("127.0.0.1:50052", client_id="router-1") as d:
        s = await d.open_session("def f(x):", SamplingSpec(temperature=0.8, seed=1))
        r = await d.draft(s.session_id, s.position, 4, stop_uncertainty=0.5)
        for t in r.tokens: t.token_id, t.uncertainty, (t.ids, t.probs)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from hilm_vllm.drafter.core import DraftedToken, DraftResult
from hilm_vllm.proto.hilm.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.sessions import CLIENT_METADATA_KEY
from hilm_vllm.uncertainty import Gate, Perturbation, UncertaintyConfig

_GATES = {Gate.PERTURBED: common_pb2.PERTURBED_TEMPERATURE, Gate.ENTROPY: common_pb2.ENTROPY,
          Gate.VAR_ENTROPY: common_pb2.VAR_ENTROPY, Gate.MAX_PROB: common_pb2.MAX_PROB}
_PERTURBATIONS = {Perturbation.UNIFORM: common_pb2.UNIFORM, Perturbation.GRID: common_pb2.GRID}


@dataclass(frozen=True)
class OpenedDraftSession:
    session_id: str
    position: int
    prompt_token_ids: tuple[int, ...]
    eos_token_id: int  # -1 when the model names none
    vocab_size: int


def sampling_pb(spec: SamplingSpec) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(temperature=spec.temperature, top_k=spec.top_k,
                                   top_p=spec.top_p)
    if spec.seed is not None:
        pb.seed = spec.seed
    return pb


def uncertainty_pb(cfg: UncertaintyConfig) -> common_pb2.UncertaintyConfig:
    return common_pb2.UncertaintyConfig(gate=_GATES[cfg.gate], num_samples=cfg.num_samples,
                                        theta_max=cfg.theta_max,
                                        perturbation=_PERTURBATIONS[cfg.perturbation])


def draft_result(r: drafter_pb2.DraftResponse) -> DraftResult:
    tokens = [DraftedToken(t.token_id, t.uncertainty, np.asarray(t.dist.token_ids, np.int32),
                           np.asarray(t.dist.probs, np.float32)) for t in r.tokens]
    return DraftResult(tokens, r.position, r.stopped_early, queue_ms=r.timings.queue_ms,
                       forward_ms=r.timings.forward_ms, total_ms=r.timings.total_ms)


@dataclass
class DrafterClient:
    address: str
    client_id: str = ""

    def __post_init__(self):
        self.channel = grpc.aio.insecure_channel(self.address)
        self._stub = drafter_pb2_grpc.DrafterStub(self.channel)
        self._metadata = ((CLIENT_METADATA_KEY, self.client_id),) if self.client_id else ()

    async def __aenter__(self) -> DrafterClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def open_session(self, prompt: Sequence[int] | str, spec: SamplingSpec,
                           uncertainty: UncertaintyConfig | None = None,
                           max_tokens: int = 0) -> OpenedDraftSession:
        prompt_pb = (common_pb2.Prompt(text=prompt) if isinstance(prompt, str) else
                     common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=list(prompt))))
        request = drafter_pb2.OpenDrafterSessionRequest(prompt=prompt_pb,
                                                        sampling=sampling_pb(spec),
                                                        max_tokens=max_tokens)
        if uncertainty is not None:
            request.uncertainty.CopyFrom(uncertainty_pb(uncertainty))
        r = await self._stub.OpenSession(request, metadata=self._metadata)
        return OpenedDraftSession(r.session_id, r.position, tuple(r.prompt_token_ids),
                                  r.eos_token_id, r.vocab_size)

    async def draft(self, session_id: str, position: int, max_tokens: int,
                    stop_uncertainty: float | None = None,
                    timeout: float | None = None) -> DraftResult:
        request = drafter_pb2.DraftRequest(session_id=session_id, position=position,
                                           max_tokens=max_tokens)
        if stop_uncertainty is not None:
            request.stop_uncertainty = stop_uncertainty
        r = await self._stub.Draft(request, metadata=self._metadata, timeout=timeout)
        return draft_result(r)

    async def rollback(self, session_id: str, position: int) -> int:
        r = await self._stub.Rollback(drafter_pb2.RollbackRequest(
            session_id=session_id, position=position), metadata=self._metadata)
        return r.position

    async def append(self, session_id: str, position: int, token_ids: Sequence[int]) -> int:
        r = await self._stub.Append(drafter_pb2.AppendRequest(
            session_id=session_id, position=position, token_ids=list(token_ids)),
            metadata=self._metadata)
        return r.position

    async def close_session(self, session_id: str) -> None:
        await self._stub.CloseSession(drafter_pb2.CloseDrafterSessionRequest(
            session_id=session_id), metadata=self._metadata)

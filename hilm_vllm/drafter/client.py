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

from hilm_vllm import codec
from hilm_vllm.drafter.wire import DraftResult, draft_result
from hilm_vllm.proto.hilm.v1 import drafter_pb2, drafter_pb2_grpc
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.server.client import TierClient
from hilm_vllm.uncertainty import UncertaintyConfig

@dataclass(frozen=True)
class OpenedDraftSession:
    session_id: str
    position: int
    prompt_token_ids: tuple[int, ...]
    eos_token_id: int  # -1 when the model names none
    vocab_size: int


@dataclass
class DrafterClient(TierClient):
    def _init_stubs(self, channel: grpc.aio.Channel) -> None:
        self._stub = drafter_pb2_grpc.DrafterStub(channel)

    async def open_session(self, prompt: Sequence[int] | str, spec: SamplingSpec,
                           uncertainty: UncertaintyConfig | None = None,
                           max_tokens: int = 0, min_tokens: int = 0,
                           stop_token_ids: Sequence[int] = ()) -> OpenedDraftSession:
        request = drafter_pb2.OpenDrafterSessionRequest(
            prompt=codec.prompt_to_pb(prompt), sampling=codec.sampling_to_pb(spec),
            max_tokens=max_tokens, min_tokens=min_tokens, stop_token_ids=list(stop_token_ids))
        if uncertainty is not None:
            request.uncertainty.CopyFrom(codec.uncertainty_to_pb(uncertainty))
        r = await self._stub.OpenSession(request, metadata=self._metadata)
        return OpenedDraftSession(r.session_id, r.position, tuple(r.prompt_token_ids),
                                  r.eos_token_id, r.vocab_size)

    async def draft(self, session_id: str, position: int, max_tokens: int,
                    stop_uncertainty: float | None = None,
                    timeout: float | None = None, rollback_to: int | None = None,
                    append: Sequence[int] = ()) -> DraftResult:
        """Draft after cutting the session to `rollback_to` and appending `append`;
        `position` is where the session is before both (as in Verify)."""
        request = drafter_pb2.DraftRequest(session_id=session_id, position=position,
                                           max_tokens=max_tokens,
                                           append_token_ids=list(append))
        if stop_uncertainty is not None:
            request.stop_uncertainty = stop_uncertainty
        if rollback_to is not None:
            request.rollback_to = rollback_to
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

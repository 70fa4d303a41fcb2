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

from hilm_vllm.drafter import wire
from hilm_vllm.drafter.wire import DraftResult, OpenedDraftSession, draft_result
from hilm_vllm.proto.hilm.v1 import drafter_pb2, drafter_pb2_grpc
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.server.client import TierClient
from hilm_vllm.uncertainty import UncertaintyConfig

@dataclass
class DrafterClient(TierClient):
    def _init_stubs(self, channel: grpc.aio.Channel) -> None:
        self._stub = drafter_pb2_grpc.DrafterStub(channel)

    async def open_session(self, prompt: Sequence[int] | str, spec: SamplingSpec,
                           uncertainty: UncertaintyConfig | None = None,
                           max_tokens: int = 0, min_tokens: int = 0,
                           stop_token_ids: Sequence[int] = ()) -> OpenedDraftSession:
        r = await self._stub.OpenSession(
            wire.open_request(prompt, spec, uncertainty, max_tokens, min_tokens, stop_token_ids),
            metadata=self._metadata)
        return wire.opened_session(r)

    async def draft(self, session_id: str, position: int, max_tokens: int,
                    stop_uncertainty: float | None = None,
                    timeout: float | None = None, rollback_to: int | None = None,
                    append: Sequence[int] = ()) -> DraftResult:
        """Draft after cutting the session to `rollback_to` and appending `append`;
        `position` is where the session is before both (as in Verify)."""
        request = wire.draft_request(session_id, position, max_tokens, stop_uncertainty,
                                     rollback_to, append)
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
        await self._stub.CloseSession(wire.close_request(session_id), metadata=self._metadata)

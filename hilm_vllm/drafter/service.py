"""gRPC `hilm.v1.Drafter`: protobuf <-> domain objects; the work is in `core.Drafter`."""

from __future__ import annotations

from hilm_vllm import codec
from hilm_vllm.drafter.core import Drafter, DrafterSettings, DraftResults, ModelInfo
from hilm_vllm.drafter.wire import draft_response
from hilm_vllm.errors import Unavailable
from hilm_vllm.proto.hilm.v1 import drafter_pb2, drafter_pb2_grpc
from hilm_vllm.server.grpc_util import client_id, translate_errors

SERVICE_NAME = drafter_pb2.DESCRIPTOR.services_by_name["Drafter"].full_name

class DrafterServicer(drafter_pb2_grpc.DrafterServicer):
    def __init__(self, runtime, settings: DrafterSettings):
        self._runtime, self._settings = runtime, settings
        self._core: Drafter | None = None
        self.results: DraftResults | None = None  # set by the tier once the engine is up

    @property
    def core(self) -> Drafter:
        if self._core is None:
            engine = self._runtime.engine
            if engine is None or self.results is None:
                raise Unavailable("the drafter's engine is still starting: retry once health "
                                  "reports SERVING")
            self._core = Drafter(engine, ModelInfo.from_engine(engine), self._settings,
                                 results=self.results)
        return self._core

    @translate_errors
    async def OpenSession(self, request, context):
        core = self.core
        uq = (codec.uncertainty_from_pb(request.uncertainty, self._settings.uncertainty,
                                        self._settings.max_client_samples)
              if request.HasField("uncertainty") else None)
        session = core.open(client_id(context), codec.prompt_from_pb(request.prompt),
                            codec.sampling_from_pb(request.sampling, core.info.vocab_size), uq,
                            request.max_tokens,
                            request.min_tokens, tuple(request.stop_token_ids),
                            codec.check_logprobs(request.logprobs if request.HasField(
                                "logprobs") else None))
        info = core.info
        return drafter_pb2.OpenDrafterSessionResponse(
            session_id=session.id, position=len(session.state.tokens),
            eos_token_id=-1 if info.eos_token_id is None else info.eos_token_id,
            vocab_size=info.vocab_size, prompt_token_ids=session.state.tokens,
            eos_token_ids=info.eos_token_ids, max_model_len=info.max_model_len,
            other_sessions=len(core.sessions) - core.sessions.held_by(client_id(context)))

    @translate_errors
    async def Draft(self, request, context):
        stop = request.stop_uncertainty if request.HasField("stop_uncertainty") else None
        rollback_to = request.rollback_to if request.HasField("rollback_to") else None
        result = await self.core.draft(client_id(context), request.session_id, request.position,
                                       request.max_tokens, stop, rollback_to,
                                       request.append_token_ids)
        return draft_response(result)

    @translate_errors
    async def Rollback(self, request, context):
        position = await self.core.rollback(client_id(context), request.session_id,
                                            request.position)
        return drafter_pb2.RollbackResponse(position=position)

    @translate_errors
    async def Append(self, request, context):
        position = await self.core.append(client_id(context), request.session_id,
                                          request.position, list(request.token_ids))
        return drafter_pb2.AppendResponse(position=position)

    @translate_errors
    async def CloseSession(self, request, context):
        self.core.close(client_id(context), request.session_id)
        return drafter_pb2.CloseDrafterSessionResponse()

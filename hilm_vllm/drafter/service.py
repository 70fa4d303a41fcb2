"""gRPC `hilm.v1.Drafter`: protobuf <-> domain objects; the work is in `core.Drafter`."""

from __future__ import annotations

from hilm_vllm.drafter.core import Drafter, DrafterSettings, DraftResult, DraftResults, ModelInfo
from hilm_vllm.errors import InvalidArgument, Unavailable
from hilm_vllm.proto.hilm.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.server.flags import DEFAULT_MAX_CLIENT_SAMPLES, check_client_samples
from hilm_vllm.server.grpc_util import client_id, translate_errors
from hilm_vllm.uncertainty import Gate, Perturbation, UncertaintyConfig

SERVICE_NAME = drafter_pb2.DESCRIPTOR.services_by_name["Drafter"].full_name

GATES = {common_pb2.PERTURBED_TEMPERATURE: Gate.PERTURBED, common_pb2.ENTROPY: Gate.ENTROPY,
         common_pb2.VAR_ENTROPY: Gate.VAR_ENTROPY, common_pb2.MAX_PROB: Gate.MAX_PROB}
PERTURBATIONS = {common_pb2.UNIFORM: Perturbation.UNIFORM, common_pb2.GRID: Perturbation.GRID}


def sampling_spec(msg: common_pb2.SamplingParams) -> SamplingSpec:
    return SamplingSpec(temperature=msg.temperature, top_k=msg.top_k,
                        top_p=msg.top_p if msg.top_p else 1.0,
                        seed=msg.seed if msg.HasField("seed") else None)


def uncertainty_config(msg: common_pb2.UncertaintyConfig, default: UncertaintyConfig,
                       max_samples: int = DEFAULT_MAX_CLIENT_SAMPLES) -> UncertaintyConfig:
    """Unset (0) fields take the drafter's defaults (its --uncertainty-* flags); K over
    `max_samples` (--max-uncertainty-samples) is INVALID_ARGUMENT."""
    check_client_samples(msg.num_samples, max_samples)
    unknown = ((msg.gate and msg.gate not in GATES)
               or (msg.perturbation and msg.perturbation not in PERTURBATIONS))
    if unknown:
        raise InvalidArgument("unknown uncertainty gate or perturbation: use the values of "
                              "hilm.v1.UncertaintyGate / hilm.v1.Perturbation")
    return UncertaintyConfig(
        gate=GATES[msg.gate] if msg.gate else default.gate,
        num_samples=msg.num_samples or default.num_samples,
        theta_max=msg.theta_max or default.theta_max,
        perturbation=PERTURBATIONS[msg.perturbation] if msg.perturbation else default.perturbation)


def prompt_of(msg: common_pb2.Prompt) -> list[int] | str:
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("prompt is missing: set prompt.token_ids or prompt.text")
    return list(msg.token_ids.ids) if kind == "token_ids" else msg.text


def draft_response(result: DraftResult) -> drafter_pb2.DraftResponse:
    tokens = [drafter_pb2.DraftedToken(
        token_id=t.token_id, uncertainty=t.uncertainty,
        dist=common_pb2.SparseDistribution(token_ids=t.ids.tolist(), probs=t.probs.tolist()))
        for t in result.tokens]
    return drafter_pb2.DraftResponse(
        tokens=tokens, position=result.position, stopped_early=result.early_stop,
        timings=common_pb2.Timings(queue_ms=result.queue_ms, forward_ms=result.forward_ms,
                                   total_ms=result.total_ms))


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
        uq = (uncertainty_config(request.uncertainty, self._settings.uncertainty,
                                 self._settings.max_client_samples)
              if request.HasField("uncertainty") else None)
        session = core.open(client_id(context), prompt_of(request.prompt),
                            sampling_spec(request.sampling), uq, request.max_tokens)
        info = core.info
        return drafter_pb2.OpenDrafterSessionResponse(
            session_id=session.id, position=len(session.state.tokens),
            eos_token_id=-1 if info.eos_token_id is None else info.eos_token_id,
            vocab_size=info.vocab_size, prompt_token_ids=session.state.tokens)

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

"""gRPC shells of the verifier tiers: protobuf <-> domain objects, nothing more.

`hilm.v1.Verifier` (OpenSession, Verify, CloseSession) and `hilm.v1.Generator` (Generate, the
LLM-only baseline). Domain errors leave as status codes through `translate_errors`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import grpc

from hilm_vllm.errors import HilmError, InvalidArgument
from hilm_vllm.proto.hilm.v1 import (common_pb2, generate_pb2, generate_pb2_grpc, verifier_pb2,
                                     verifier_pb2_grpc)
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.server.flags import DEFAULT_MAX_CLIENT_SAMPLES, check_client_samples
from hilm_vllm.server.grpc_util import client_id, is_engine_client_error, translate_errors
from hilm_vllm.uncertainty import MAX_SAMPLES, Gate, Perturbation, UncertaintyConfig
from hilm_vllm.verifier.core import Prompt, Verifier
from hilm_vllm.verifier.session import VerifyCall, VerifyReply

VerifierGetter = Callable[[], Verifier]  # raises Unavailable until the engine is ready

ENGINE_TIER_POLICIES = ("", "llm-only")  # an engine tier generates with its own model only


# ---- protobuf -> domain -----------------------------------------------------------------------

def spec_from(pb: common_pb2.SamplingParams) -> SamplingSpec:
    """Proto defaults mean "off": top_p 0 is 1, an unset seed is no seed."""
    return SamplingSpec(temperature=pb.temperature, top_k=pb.top_k, top_p=pb.top_p or 1.0,
                        seed=pb.seed if pb.HasField("seed") else None)


def prompt_from(pb: common_pb2.Prompt) -> Prompt:
    kind = pb.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("prompt is empty: set prompt.token_ids or prompt.text")
    return list(pb.token_ids.ids) if kind == "token_ids" else pb.text


GATES = {common_pb2.PERTURBED_TEMPERATURE: Gate.PERTURBED, common_pb2.ENTROPY: Gate.ENTROPY,
         common_pb2.VAR_ENTROPY: Gate.VAR_ENTROPY, common_pb2.MAX_PROB: Gate.MAX_PROB}
PERTURBATIONS = {common_pb2.UNIFORM: Perturbation.UNIFORM, common_pb2.GRID: Perturbation.GRID}


def uncertainty_from(pb: common_pb2.UncertaintyConfig, default: UncertaintyConfig,
                     max_samples: int = DEFAULT_MAX_CLIENT_SAMPLES) -> UncertaintyConfig:
    """Unset (0) fields take the tier's defaults (its --uncertainty-* flags); a bad value is
    INVALID_ARGUMENT saying what to send instead; K over `max_samples` names
    --max-uncertainty-samples."""
    if pb.gate and pb.gate not in GATES:
        raise InvalidArgument(f"uncertainty.gate {pb.gate} is unknown: send one of "
                              f"hilm.v1.UncertaintyGate's values, or 0 for this tier's default "
                              f"({default.gate.value})")
    if pb.perturbation and pb.perturbation not in PERTURBATIONS:
        raise InvalidArgument(f"uncertainty.perturbation {pb.perturbation} is unknown: send one "
                              f"of hilm.v1.Perturbation's values, or 0 for this tier's default "
                              f"({default.perturbation.value})")
    if pb.num_samples and not 1 <= pb.num_samples <= MAX_SAMPLES:
        raise InvalidArgument(f"uncertainty.num_samples (K) must be in [1, {MAX_SAMPLES}], got "
                              f"{pb.num_samples}: send 0 for this tier's default "
                              f"({default.num_samples})")
    check_client_samples(pb.num_samples, max_samples)
    if pb.theta_max and not 0 < pb.theta_max <= 100:  # also NaN
        raise InvalidArgument(f"uncertainty.theta_max must be in (0, 100], got {pb.theta_max}: "
                              f"send 0 for this tier's default ({default.theta_max})")
    return UncertaintyConfig(
        gate=GATES[pb.gate] if pb.gate else default.gate,
        num_samples=pb.num_samples or default.num_samples,
        theta_max=pb.theta_max or default.theta_max,
        perturbation=PERTURBATIONS[pb.perturbation] if pb.perturbation else default.perturbation)


def call_from(pb: verifier_pb2.VerifyRequest,
              default_uncertainty: UncertaintyConfig | None = None,
              max_samples: int = DEFAULT_MAX_CLIENT_SAMPLES) -> VerifyCall:
    default_uncertainty = default_uncertainty or UncertaintyConfig()
    uncertainty = (uncertainty_from(pb.uncertainty, default_uncertainty, max_samples)
                   if pb.HasField("uncertainty") else None)
    return VerifyCall(position=pb.position, append=tuple(pb.append_token_ids),
                      draft=tuple(pb.draft_token_ids),
                      dists=tuple((tuple(d.token_ids), tuple(d.probs)) for d in pb.draft_dists),
                      want_target_probs=pb.return_target_probs,
                      want_emitted=pb.return_emitted,
                      uncertainty=uncertainty if pb.return_emitted else None,
                      rollback_to=pb.rollback_to if pb.HasField("rollback_to") else None)


# ---- domain -> protobuf -----------------------------------------------------------------------

def reply_to(reply: VerifyReply) -> verifier_pb2.VerifyResponse:
    t = reply.timings
    return verifier_pb2.VerifyResponse(
        num_accepted=reply.num_accepted, next_token_id=reply.next_token, position=reply.position,
        target_probs=reply.target_probs,
        timings=common_pb2.Timings(queue_ms=t.queue_ms, forward_ms=t.forward_ms,
                                   total_ms=t.total_ms),
        emitted=[verifier_pb2.EmittedToken(
            token_id=e.token_id, uncertainty=e.uncertainty,
            dist=common_pb2.SparseDistribution(token_ids=e.ids.tolist(), probs=e.probs.tolist()))
            for e in reply.emitted])


# ---- servicers --------------------------------------------------------------------------------

class VerifierServicer(verifier_pb2_grpc.VerifierServicer):
    def __init__(self, verifier: VerifierGetter):
        self._verifier = verifier

    @translate_errors
    async def OpenSession(self, request, context):
        opened = await self._verifier().open_session(
            client_id(context), prompt_from(request.prompt), spec_from(request.sampling),
            request.max_tokens)
        return verifier_pb2.OpenVerifierSessionResponse(
            session_id=opened.session_id, position=opened.position,
            eos_token_id=opened.eos_token_id, vocab_size=opened.vocab_size,
            max_block=opened.max_block, prompt_token_ids=opened.prompt_token_ids)

    @translate_errors
    async def Verify(self, request, context):
        verifier = self._verifier()
        reply = await verifier.verify(client_id(context), request.session_id,
                                      call_from(request, verifier.settings.uncertainty,
                                                verifier.settings.max_client_samples))
        return reply_to(reply)

    @translate_errors
    async def CloseSession(self, request, context):
        await self._verifier().close_session(client_id(context), request.session_id)
        return verifier_pb2.CloseVerifierSessionResponse()


def translate_stream_errors(method):
    """`translate_errors` for a server-streaming method (an async generator)."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            async for item in method(self, request, context):
                yield item
        except HilmError as e:
            await context.abort(e.code, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:
            if not is_engine_client_error(e):
                raise
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the engine refused: {e}")

    return wrapper


class GeneratorServicer(generate_pb2_grpc.GeneratorServicer):
    def __init__(self, verifier: VerifierGetter):
        self._verifier = verifier

    @translate_stream_errors
    async def Generate(self, request, context):
        if request.policy not in ENGINE_TIER_POLICIES:
            raise InvalidArgument(f"policy {request.policy!r} is a router option; this tier "
                                  f"generates with its own model only (policy '' or 'llm-only')")
        chunks = self._verifier().generate(prompt_from(request.prompt),
                                           spec_from(request.sampling), request.max_tokens,
                                           request.ignore_eos)
        async for chunk in chunks:
            yield generate_pb2.GenerateResponse(token_ids=chunk.token_ids, text=chunk.text,
                                                finish_reason=chunk.finish_reason or "")


def add_services(server: grpc.aio.Server, verifier: VerifierGetter) -> list[str]:
    verifier_pb2_grpc.add_VerifierServicer_to_server(VerifierServicer(verifier), server)
    generate_pb2_grpc.add_GeneratorServicer_to_server(GeneratorServicer(verifier), server)
    return [verifier_pb2.DESCRIPTOR.services_by_name["Verifier"].full_name,
            generate_pb2.DESCRIPTOR.services_by_name["Generator"].full_name]

"""gRPC shells of the verifier tiers: protobuf <-> domain objects, nothing more.

`hilm.v1.Verifier` (OpenSession, Verify, CloseSession) and `hilm.v1.Generator` (Generate, the
LLM-only baseline). Domain errors leave as status codes through `translate_errors`.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from hilm_vllm import codec
from hilm_vllm.errors import InvalidArgument
from hilm_vllm.proto.hilm.v1 import (common_pb2, generate_pb2, generate_pb2_grpc, verifier_pb2,
                                     verifier_pb2_grpc)
from hilm_vllm.server.caps import DEFAULT_MAX_CLIENT_SAMPLES
from hilm_vllm.server.grpc_util import client_id, translate_errors, translate_stream_errors
from hilm_vllm.uncertainty import UncertaintyConfig
from hilm_vllm.verifier.core import Verifier
from hilm_vllm.verifier.session import VerifyCall, VerifyReply

VerifierGetter = Callable[[], Verifier]  # raises Unavailable until the engine is ready

ENGINE_TIER_POLICIES = ("", "llm-only")  # an engine tier generates with its own model only


# ---- protobuf -> domain -----------------------------------------------------------------------

def call_from(pb: verifier_pb2.VerifyRequest,
              default_uncertainty: UncertaintyConfig | None = None,
              max_samples: int = DEFAULT_MAX_CLIENT_SAMPLES) -> VerifyCall:
    default_uncertainty = default_uncertainty or UncertaintyConfig()
    uncertainty = (codec.uncertainty_from_pb(pb.uncertainty, default_uncertainty, max_samples)
                   if pb.HasField("uncertainty") else None)
    return VerifyCall(position=pb.position, append=tuple(pb.append_token_ids),
                      draft=tuple(pb.draft_token_ids),
                      dists=tuple(codec.dist_from_pb(d) for d in pb.draft_dists),
                      want_target_probs=pb.return_target_probs,
                      want_emitted=pb.return_emitted,
                      uncertainty=uncertainty if pb.return_emitted else None,
                      rollback_to=pb.rollback_to if pb.HasField("rollback_to") else None,
                      logprobs=codec.check_logprobs(
                          pb.logprobs if pb.HasField("logprobs") else None))


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
            dist=codec.dist_to_pb(e.ids, e.probs))
            for e in reply.emitted],
        logprobs=[codec.logprob_to_pb(t) for t in reply.logprobs])


# ---- servicers --------------------------------------------------------------------------------

class VerifierServicer(verifier_pb2_grpc.VerifierServicer):
    def __init__(self, verifier: VerifierGetter):
        self._verifier = verifier

    @translate_errors
    async def OpenSession(self, request, context):
        verifier = self._verifier()
        opened = await verifier.open_session(
            client_id(context), codec.prompt_from_pb(request.prompt),
            codec.sampling_from_pb(request.sampling, verifier.facts.vocab_size),
            request.max_tokens, request.min_tokens, request.stop_token_ids)
        return verifier_pb2.OpenVerifierSessionResponse(
            session_id=opened.session_id, position=opened.position,
            eos_token_id=opened.eos_token_id, vocab_size=opened.vocab_size,
            max_block=opened.max_block, prompt_token_ids=opened.prompt_token_ids,
            eos_token_ids=opened.eos_token_ids, max_model_len=opened.max_model_len,
            other_sessions=len(verifier.sessions) - verifier.sessions.held_by(
                client_id(context)))

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


class GeneratorServicer(generate_pb2_grpc.GeneratorServicer):
    def __init__(self, verifier: VerifierGetter):
        self._verifier = verifier

    @translate_stream_errors
    async def Generate(self, request, context):
        if request.policy not in ENGINE_TIER_POLICIES:
            raise InvalidArgument(f"policy {request.policy!r} is a router option; this tier "
                                  f"generates with its own model only (policy '' or 'llm-only')")
        verifier = self._verifier()
        chunks = verifier.generate(codec.prompt_from_pb(request.prompt),
                                   codec.generate_sampling_from_pb(request.sampling),
                                   request.max_tokens, request.ignore_eos,
                                   request.stop_token_ids, request.min_tokens, request.stop,
                                   codec.penalties_from_pb(request.penalties,
                                                           verifier.facts.vocab_size),
                                   codec.check_logprobs(request.logprobs if request.HasField(
                                       "logprobs") else None),
                                   codec.structured_from_json(request.structured_outputs),
                                   codec.check_logprobs(request.prompt_logprobs if request.HasField(
                                       "prompt_logprobs") else None, "prompt_logprobs"))
        async for chunk in chunks:
            yield generate_pb2.GenerateResponse(
                token_ids=chunk.token_ids, text=chunk.text,
                finish_reason=chunk.finish_reason or "",
                logprobs=[codec.logprob_to_pb(t) for t in chunk.logprobs],
                prompt_logprobs=[codec.logprob_to_pb(t) for t in chunk.prompt_logprobs])


def add_services(server: grpc.aio.Server, verifier: VerifierGetter) -> list[str]:
    verifier_pb2_grpc.add_VerifierServicer_to_server(VerifierServicer(verifier), server)
    generate_pb2_grpc.add_GeneratorServicer_to_server(GeneratorServicer(verifier), server)
    return [verifier_pb2.DESCRIPTOR.services_by_name["Verifier"].full_name,
            generate_pb2.DESCRIPTOR.services_by_name["Generator"].full_name]

"""gRPC `hilm.v1.Generator` on the router: the policy loop as a token stream."""

from __future__ import annotations

import hashlib

from hilm_vllm import codec
from hilm_vllm.proto.hilm.v1 import generate_pb2, generate_pb2_grpc
from hilm_vllm.router.admission import TooBusy
from hilm_vllm.router.engine import GenerationRequest, RequestStats
from hilm_vllm.router.frontdoor import generation_request, prompt_ids, text_chunks
from hilm_vllm.router.openai_api import RouterAPI
from hilm_vllm.router.policy import Policy
from hilm_vllm.server.grpc_util import translate_stream_errors
from hilm_vllm.server.security import AUTH_METADATA_KEY

SERVICE_NAME = "hilm.v1.Generator"
RETRY_AFTER_METADATA = "retry-after-s"  # trailing metadata of a RESOURCE_EXHAUSTED Generate


class RouterGenerator(generate_pb2_grpc.GeneratorServicer):
    def __init__(self, api: RouterAPI):
        self.api = api

    def _request(self, request: generate_pb2.GenerateRequest) -> GenerationRequest:
        api = self.api
        ids = prompt_ids(codec.prompt_from_pb(request.prompt), api.tokenizer, api.limits)
        policy = Policy.parse(request.policy) if request.policy else api.router.cfg.policy
        return generation_request(
            api.router, api.tokenizer, api.limits, ids,
            codec.generate_sampling_from_pb(request.sampling), request.max_tokens or 16, policy, request.ignore_eos,
            block_size=request.block_size if request.HasField("block_size") else None,
            optimistic=request.optimistic if request.HasField("optimistic") else None,
            stop_token_ids=request.stop_token_ids, min_tokens=request.min_tokens,
            stop=request.stop,
            penalties=codec.penalties_from_pb(request.penalties, len(api.tokenizer)),
            logprobs=request.logprobs if request.HasField("logprobs") else None,
            structured=codec.structured_from_json(request.structured_outputs))

    @translate_stream_errors
    async def Generate(self, request, context):
        req = self._request(request)
        prompt_top = codec.check_logprobs(request.prompt_logprobs if request.HasField(
            "prompt_logprobs") else None, "prompt_logprobs")
        try:
            slot = await self.api.router.admission.acquire(grpc_client(context))
        except TooBusy as e:
            await context.abort(e.code, str(e), trailing_metadata=(
                (RETRY_AFTER_METADATA, str(e.retry_after_s)),))
        try:
            stats = RequestStats(req.policy.value)
            if prompt_top is not None:  # the LLM's, in a first message of their own
                found = await self.api.router.prompt_logprobs(req.prompt_ids, prompt_top, stats)
                yield generate_pb2.GenerateResponse(
                    prompt_logprobs=[codec.logprob_to_pb(t) for t in found])
            async for chunk in text_chunks(self.api.router, req, stats, self.api.tokenizer):
                yield generate_pb2.GenerateResponse(
                    token_ids=chunk.token_ids, text=chunk.text,
                    finish_reason=chunk.finish_reason or "", deciders=chunk.deciders,
                    logprobs=[codec.logprob_to_pb(t) for t in chunk.logprobs if t is not None])
        finally:
            slot.release()


def grpc_client(context) -> str:
    """Whom the fair queue serves: the bearer key the call sends (as a digest, so a key is one
    client on both front doors), else the peer's address without its port."""
    for key, value in context.invocation_metadata() or ():
        if key == AUTH_METADATA_KEY:
            value = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                return "key:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    peer = context.peer() or ""  # "ipv4:127.0.0.1:4321", "ipv6:[::1]:4321", "unix:..."
    return "addr:" + (peer.rsplit(":", 1)[0].split(":", 1)[-1].strip("[]")
                      if peer.startswith(("ipv4:", "ipv6:")) else peer)

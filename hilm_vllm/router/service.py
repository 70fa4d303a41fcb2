"""gRPC `hilm.v1.Generator` on the router: the policy loop as a token stream."""

from __future__ import annotations

import hashlib

import grpc

from hilm_vllm import codec
from hilm_vllm.errors import HilmError
from hilm_vllm.proto.hilm.v1 import generate_pb2, generate_pb2_grpc
from hilm_vllm.router.admission import TooBusy
from hilm_vllm.router.engine import GenerationRequest, RequestStats
from hilm_vllm.router.openai_api import RouterAPI, StopScanner, TextStream
from hilm_vllm.router.policy import Policy
from hilm_vllm.server.security import AUTH_METADATA_KEY

SERVICE_NAME = "hilm.v1.Generator"
RETRY_AFTER_METADATA = "retry-after-s"  # trailing metadata of a RESOURCE_EXHAUSTED Generate


class RouterGenerator(generate_pb2_grpc.GeneratorServicer):
    def __init__(self, api: RouterAPI):
        self.api = api

    def _request(self, request: generate_pb2.GenerateRequest) -> GenerationRequest:
        tok, limits = self.api.tokenizer, self.api.limits
        prompt = codec.prompt_from_pb(request.prompt)
        if isinstance(prompt, str):
            limits.check_text(prompt)
            ids = tok.encode(prompt)
        else:
            ids = prompt
            codec.check_token_ids(ids, len(tok), "prompt")
        limits.check_prompt(len(ids))
        limits.check_output(request.max_tokens)
        spec = codec.sampling_from_pb(request.sampling)
        policy = Policy.parse(request.policy) if request.policy else self.api.router.cfg.policy
        self.api.router.check_policy(policy)
        limits.check_stops(list(request.stop), request.stop_token_ids)
        codec.check_token_ids(request.stop_token_ids, len(tok), "stop_token_ids")
        return GenerationRequest(
            tuple(ids), spec, request.max_tokens or 16, policy, request.ignore_eos,
            block_size=request.block_size if request.HasField("block_size") else None,
            optimistic=request.optimistic if request.HasField("optimistic") else None,
            stop_token_ids=tuple(request.stop_token_ids), min_tokens=request.min_tokens,
            stop=tuple(request.stop))

    async def Generate(self, request, context):
        try:
            req = self._request(request)
            try:
                slot = await self.api.router.admission.acquire(grpc_client(context))
            except TooBusy as e:
                await context.abort(e.code, str(e), trailing_metadata=(
                    (RETRY_AFTER_METADATA, str(e.retry_after_s)),))
            try:
                async for response in self._generate(req):
                    yield response
            finally:
                slot.release()
        except HilmError as e:
            await context.abort(e.code, str(e))
        except ValueError as e:  # a value no message to a tier can carry
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def _generate(self, req: GenerationRequest):
        stats = RequestStats(req.policy.value)
        text = TextStream(self.api.tokenizer)
        stop = StopScanner(list(req.stop), min_tokens=req.min_tokens)
        gen = self.api.router.generate(req, stats)
        try:
            async for ids in gen:
                yield generate_pb2.GenerateResponse(token_ids=ids, text=stop.feed(text, ids))
                if stop.hit:  # the text ends before the stop string; so does generation
                    break
        finally:
            await gen.aclose()
        tail = "" if stop.hit else stop.push(text.flush())
        tail += "" if stop.hit else stop.flush()
        finish = "stop" if stop.hit else stats.finish_reason or (
            "length" if stats.tokens >= req.max_tokens else "stop")
        yield generate_pb2.GenerateResponse(text=tail, finish_reason=finish)


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

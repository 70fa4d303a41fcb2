"""gRPC `hilm.v1.Generator` on the router: the policy loop as a token stream."""

from __future__ import annotations

import grpc

from hilm_vllm.errors import HilmError
from hilm_vllm.proto.hilm.v1 import generate_pb2, generate_pb2_grpc
from hilm_vllm.router.engine import GenerationRequest, RequestStats
from hilm_vllm.router.openai_api import RouterAPI, TextStream
from hilm_vllm.router.policy import Policy
from hilm_vllm.sampling import SamplingSpec

SERVICE_NAME = "hilm.v1.Generator"


class RouterGenerator(generate_pb2_grpc.GeneratorServicer):
    def __init__(self, api: RouterAPI):
        self.api = api

    def _request(self, request: generate_pb2.GenerateRequest) -> GenerationRequest:
        tok, limits = self.api.tokenizer, self.api.limits
        kind = request.prompt.WhichOneof("kind")
        if kind == "text":
            limits.check_text(request.prompt.text)
            ids = tok.encode(request.prompt.text)
        elif kind == "token_ids":
            ids = list(request.prompt.token_ids.ids)
            bad = [t for t in ids if not 0 <= t < len(tok)]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                                 f"[0, {len(tok)})")
        else:
            raise ValueError("prompt is missing: set prompt.text or prompt.token_ids")
        limits.check_prompt(len(ids))
        limits.check_output(request.max_tokens)
        s = request.sampling
        spec = SamplingSpec(s.temperature, s.top_k, s.top_p if s.top_p > 0 else 1.0,
                            s.seed if s.HasField("seed") else None)
        policy = Policy.parse(request.policy) if request.policy else self.api.router.cfg.policy
        self.api.router.check_policy(policy)
        return GenerationRequest(
            tuple(ids), spec, request.max_tokens or 16, policy, request.ignore_eos,
            block_size=request.block_size if request.HasField("block_size") else None,
            optimistic=request.optimistic if request.HasField("optimistic") else None)

    async def Generate(self, request, context):
        try:
            req = self._request(request)
            stats = RequestStats(req.policy.value)
            text = TextStream(self.api.tokenizer)
            gen = self.api.router.generate(req, stats)
            try:
                async for ids in gen:
                    yield generate_pb2.GenerateResponse(token_ids=ids, text=text.push(ids))
            finally:
                await gen.aclose()
            finish = "length" if stats.tokens >= req.max_tokens else "stop"
            yield generate_pb2.GenerateResponse(text=text.flush(), finish_reason=finish)
        except HilmError as e:
            await context.abort(e.code, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

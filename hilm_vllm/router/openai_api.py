"""OpenAI-compatible HTTP API of the router (FastAPI, as vLLM's own server).

`/v1/completions`, `/v1/chat/completions` (the model's chat template), SSE streaming, `/v1/models`,
`/health`. The policy is chosen per request by the `model` field (the served model name for the
router's default policy, or a policy name: `hilm`, `llm-only`, ...) or the extra body field
`policy`. `usage` carries the OpenAI counts plus `usage.hilm`, the round's statistics
(`RequestStats.usage`). Errors are OpenAI-style bodies (`{"error": {"message", "type", "param",
"code"}}`) with a 4xx status for bad requests; a response completed around an unreachable tier
says so in `usage.hilm.degraded` and the `x-hilm-degraded` header.

Hostile input: every size a client controls is capped (`RequestLimits`, flags `--max-*`), and
with `--api-key` (or $VLLM_API_KEY) /v1/* needs `Authorization: Bearer KEY`, answering 401 with
an OpenAI-style body otherwise; /health stays open, as in `vllm serve`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from hilm_vllm import codec
from hilm_vllm.errors import HilmError, InvalidArgument, NotFound
from hilm_vllm.router import metrics
from hilm_vllm.router.engine import GenerationRequest, RequestStats, Router
from hilm_vllm.router.policy import Policy, Thresholds
from hilm_vllm.server.security import bearer_ok
from hilm_vllm.tiers import MODEL_TIERS

logger = logging.getLogger("hilm.router.api")


@dataclass(frozen=True)
class RequestLimits:
    """Caps on what one request may ask for (router flags `--max-*`)."""

    max_output_tokens: int = 4096  # --max-output-tokens
    max_prompt_tokens: int = 8192  # --max-prompt-tokens
    max_stop_sequences: int = 16  # --max-stop-sequences
    max_stop_length: int = 256  # --max-stop-length (characters)
    max_request_bytes: int = 1 << 20  # --max-request-bytes (HTTP body; gRPC prompt text)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")

    def check_output(self, max_tokens: int) -> None:
        if max_tokens > self.max_output_tokens:
            raise InvalidArgument(f"max_tokens is {max_tokens}; this server allows at most "
                                  f"{self.max_output_tokens} (--max-output-tokens)")

    def check_prompt(self, n: int) -> None:
        if n > self.max_prompt_tokens:
            raise InvalidArgument(f"the prompt has {n} tokens; this server allows at most "
                                  f"{self.max_prompt_tokens} (--max-prompt-tokens)")

    def check_text(self, text: str, what: str = "prompt") -> None:
        if len(text) > self.max_request_bytes:  # characters >= bytes / 4: a cheap first bound
            raise InvalidArgument(f"the {what} has {len(text)} characters; this server allows "
                                  f"at most {self.max_request_bytes} bytes (--max-request-bytes)")

    def check_stops(self, stops: list[str]) -> None:
        if len(stops) > self.max_stop_sequences:
            raise InvalidArgument(f"stop has {len(stops)} strings; this server allows at most "
                                  f"{self.max_stop_sequences} (--max-stop-sequences)")
        longest = max((len(s) for s in stops), default=0)
        if longest > self.max_stop_length:
            raise InvalidArgument(f"a stop string has {longest} characters; this server allows "
                                  f"at most {self.max_stop_length} (--max-stop-length)")


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Base):
    include_usage: bool = False


class ThresholdsBody(_Base):
    """Per-request thresholds (research use): unset ones take the router's."""

    t1: float | None = None
    t2: float | None = None
    t_ilm: float | None = None


class _Sampling(_Base):
    model: str
    max_tokens: int | None = Field(default=None)
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # vLLM's extra parameter (0 or -1 = off)
    seed: int | None = Field(default=None, ge=0, lt=2 ** 63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's extra parameters
    min_tokens: int = 0
    n: int = 1
    user: str | None = None
    # hilm-vllm's extra parameters
    policy: str | None = None
    ignore_eos: bool = False
    skip_rate: float | None = None  # `rand`
    block_size: int | None = None
    thresholds: ThresholdsBody | None = None
    optimistic: bool | None = None  # None = the router's --optimistic


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    echo: bool = False
    logprobs: int | None = None


class ChatMessage(_Base):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    logprobs: bool = False


def stops(body: _Sampling) -> list[str]:
    """The request's stop strings (a string or a list)."""
    return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])


def error_body(status: int, message: str, type_: str = "BadRequestError",
               param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": status}}, status_code=status)


_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                404: "NotFoundError", 409: "ConflictError", 413: "RequestTooLargeError",
                429: "RateLimitError", 503: "ServiceUnavailableError"}


def _hilm_error(e: HilmError) -> JSONResponse:
    return error_body(e.http_status, str(e), _ERROR_TYPES.get(e.http_status, "InternalServerError"))


class TextStream:
    """Incremental detokenization: text appears once its bytes are complete.

    vLLM's own incremental detokenizer (`IncrementalDetokenizer`: `tokenizers`' DecodeStream for
    fast tokenizers, else vLLM's Python fallback) decodes each new token against a few tokens of
    context, so a chunk costs O(its tokens), not O(the whole output). Not primed with the prompt:
    the text is exactly `tokenizer.decode(output ids, skip_special_tokens=True)`, chunk by chunk.
    `flush` (the end) decodes the whole output once to emit what an incomplete multi-byte
    character still held back, as that decode does (U+FFFD)."""

    def __init__(self, tokenizer):
        from types import SimpleNamespace

        from vllm import SamplingParams
        from vllm.v1.engine.detokenizer import IncrementalDetokenizer

        self.tokenizer, self.sent = tokenizer, 0
        request = SimpleNamespace(request_id="router", prompt_token_ids=None, prompt_embeds=None,
                                  sampling_params=SamplingParams(skip_special_tokens=True))
        self._detok = IncrementalDetokenizer.from_new_request(tokenizer, request)

    @property
    def ids(self) -> list[int]:
        return self._detok.output_token_ids

    def push(self, ids: list[int]) -> str:
        self._detok.update(list(ids), False)
        delta = self._detok.get_next_output_text(False, True)
        self.sent += len(delta)
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta, self.sent = text[self.sent:], len(text)
        return delta


class StopScanner:
    """OpenAI `stop` strings: text is held back while it could still be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.hit = self.pending[:cut], "", True
            return out
        hold = max(len(s) - 1 for s in self.stops)
        safe = max(0, len(self.pending) - hold)
        out, self.pending = self.pending[:safe], self.pending[safe:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class RouterAPI:
    def __init__(self, router: Router, tokenizer, served_model_name: str,
                 limits: RequestLimits | None = None):
        self.router, self.tokenizer, self.name = router, tokenizer, served_model_name
        self.limits = limits or RequestLimits()

    # -- request -> GenerationRequest ----------------------------------------------------------

    def policy_of(self, body: _Sampling) -> Policy:
        if body.policy is not None:
            policy = Policy.parse(body.policy)
        elif body.model in (self.name, ""):
            policy = self.router.cfg.policy
        else:
            try:
                policy = Policy(body.model)
            except ValueError:
                raise NotFound(f"The model `{body.model}` does not exist: use "
                               f"{self.name!r} or a policy name "
                               f"({', '.join(p.value for p in Policy)})") from None
        self.router.check_policy(policy)
        return policy

    def generation_request(self, body: _Sampling, prompt_ids: list[int]) -> GenerationRequest:
        if body.n != 1:
            raise InvalidArgument("n must be 1: the router generates one choice per request")
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = 16  # OpenAI's default for completions
        if max_tokens < 1:
            raise InvalidArgument(f"max_tokens must be >= 1, got {max_tokens}")
        self.limits.check_output(max_tokens)
        spec = codec.sampling(body.temperature, body.top_k, body.top_p, body.seed)
        th = None
        if body.thresholds is not None:
            base = self.router.cfg.thresholds
            t = body.thresholds
            th = Thresholds(base.t1 if t.t1 is None else t.t1, base.t2 if t.t2 is None else t.t2,
                            base.t_ilm if t.t_ilm is None else t.t_ilm)
        stop_ids = tuple(body.stop_token_ids or ())
        codec.check_token_ids(stop_ids, len(self.tokenizer), "stop_token_ids")
        return GenerationRequest(tuple(prompt_ids), spec, max_tokens, self.policy_of(body),
                                 body.ignore_eos, body.skip_rate, body.block_size, th,
                                 body.optimistic, stop_ids, body.min_tokens, tuple(stops(body)))

    def prompt_ids(self, body: CompletionRequest | ChatCompletionRequest) -> list[int]:
        ids = self._prompt_ids(body)
        self.limits.check_prompt(len(ids))
        return ids

    def _prompt_ids(self, body: CompletionRequest | ChatCompletionRequest) -> list[int]:
        if isinstance(body, ChatCompletionRequest):
            if not body.messages:
                raise InvalidArgument("messages is empty: give at least one message")
            if body.logprobs:
                raise InvalidArgument("logprobs are not supported by the router")
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            try:
                return list(self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=False))
            except Exception as e:  # a template that rejects the conversation
                raise InvalidArgument(f"the chat template rejected the messages: {e}") from None
        if body.echo or body.logprobs:
            raise InvalidArgument("echo and logprobs are not supported by the router")
        if isinstance(body.prompt, str):
            if not body.prompt:
                raise InvalidArgument("prompt is empty")
            self.limits.check_text(body.prompt)
            return self.tokenizer.encode(body.prompt)  # BOS as `vllm serve` adds it
        self.limits.check_prompt(len(body.prompt))  # before scanning it
        codec.check_token_ids(body.prompt, len(self.tokenizer), "prompt")
        return list(body.prompt)

    # -- running ---------------------------------------------------------------------------------

    async def run(self, body: CompletionRequest | ChatCompletionRequest, chat: bool):
        try:
            self.limits.check_stops(stops(body))
            ids = self.prompt_ids(body)
            req = self.generation_request(body, ids)
        except HilmError as e:
            return _hilm_error(e)
        except ValueError as e:
            return error_body(400, str(e))
        stats = RequestStats(req.policy.value)
        events = self._events(req, stats, list(req.stop))
        t0 = time.perf_counter()
        try:
            first = await events.__anext__()  # errors before the first token become 4xx/5xx
        except HilmError as e:
            return _hilm_error(e)
        except ValueError as e:  # a value no message to a tier can carry
            return error_body(400, str(e))
        except StopAsyncIteration:
            first = None
        metrics.TTFT.labels(req.policy.value).observe(time.perf_counter() - t0)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._sse(rid, created, body.model, chat, first, events, stats, req,
                          include_usage), media_type="text/event-stream")
        text, finish = "", "length"
        try:
            ev = first
            while ev is not None:
                kind, value = ev
                if kind == "text":
                    text += value
                else:
                    finish = value
                ev = await anext(events, None)
        except HilmError as e:
            return _hilm_error(e)
        usage = self._usage(req, stats)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": finish, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        headers = {"x-hilm-degraded": ",".join(stats.degraded)} if stats.degraded else None
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": body.model,
                             "choices": [choice], "usage": usage}, headers=headers)

    def _usage(self, req: GenerationRequest, stats: RequestStats) -> dict:
        return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": stats.tokens,
                "total_tokens": len(req.prompt_ids) + stats.tokens, "hilm": stats.usage()}

    async def _events(self, req: GenerationRequest, stats: RequestStats,
                      stops: list[str]) -> AsyncIterator[tuple[str, str]]:
        """("text", delta)... then ("finish", reason)."""
        text, stop = TextStream(self.tokenizer), StopScanner(stops)
        gen = self.router.generate(req, stats)
        finish = "length"
        try:
            async for ids in gen:
                delta = stop.push(text.push(ids))
                if delta:
                    yield "text", delta
                if stop.hit:
                    finish = "stop"
                    break
            else:
                tail = stop.push(text.flush())
                if stop.hit:
                    finish = "stop"
                tail += stop.flush() if not stop.hit else ""
                if tail:
                    yield "text", tail
                if not stop.hit:  # a stop token, max_tokens or the context's end
                    finish = stats.finish_reason or (
                        "length" if stats.tokens >= req.max_tokens else "stop")
        finally:
            await gen.aclose()
        yield "finish", finish

    async def _sse(self, rid, created, model, chat, first, events, stats, req,
                   include_usage) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish,
                          "logprobs": None}
            payload = {"id": rid, "object": obj, "created": created, "model": model,
                       "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        if chat:
            yield chunk(None, None, role=True)
        try:
            ev = first
            while ev is not None:
                kind, value = ev
                yield chunk(value, None) if kind == "text" else chunk(None, value)
                ev = await anext(events, None)
        except HilmError as e:  # after the first token: tokens sent stay sent; say why it ended
            err = {"error": {"message": str(e), "type": _ERROR_TYPES.get(e.http_status,
                                                                         "InternalServerError"),
                             "param": None, "code": e.http_status}}
            yield f"data: {json.dumps(err)}\n\n"
        if include_usage:
            payload = {"id": rid, "object": obj, "created": created, "model": model,
                       "choices": [], "usage": self._usage(req, stats)}
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"


DISCONNECT_POLL_S = 0.5


async def until_disconnected(request: Request, work):
    """Run `work` (a request's handler) unless the client hangs up first: a non-streaming
    generation must not run on for nobody. Cancelling it closes the request's sessions on
    every tier. (A stream's generator is closed by the server when its client leaves.)"""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                logger.info("client left before the response: generation stopped")
                return Response(status_code=499)  # nginx's "client closed request"; unread
    finally:
        task.cancel()


GUARDED_PREFIXES = ("/v1",)  # as vLLM's AuthenticationMiddleware: /health stays open


class APIKeyMiddleware:
    """Pure ASGI: /v1/* needs `Authorization: Bearer <one of the keys>`, else 401 with an
    OpenAI-style body (vLLM answers `{"error": "Unauthorized"}`; OpenAI clients read
    `error.message`). OPTIONS passes, as in vLLM."""

    def __init__(self, app, keys: Sequence[str]):
        self.app = app
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") != "OPTIONS":
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            if path.startswith(GUARDED_PREFIXES):
                header = next((v.decode("latin-1") for k, v in scope.get("headers", ())
                               if k == b"authorization"), None)
                if not bearer_ok(header, self._digests):
                    response = error_body(401, "Incorrect or missing API key: send "
                                               "`Authorization: Bearer <key>` with a key the "
                                               "router was started with (--api-key / "
                                               "$VLLM_API_KEY)", "AuthenticationError")
                    response.headers["WWW-Authenticate"] = "Bearer"
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Pure ASGI: a request body over `limit` bytes is refused with 413 before it is read into
    memory (a Content-Length over it at once; a chunked body once it passes it)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = (f"the request body is over {self.limit} bytes (--max-request-bytes): send a "
                   f"shorter prompt")
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.limit
                except ValueError:
                    too_big = False  # the server itself refuses a malformed length
                if too_big:
                    await error_body(413, message, "RequestTooLargeError")(scope, receive, send)
                    return
        seen = 0
        refused = started = False

        async def guarded_send(msg):
            nonlocal started
            if refused:
                return  # the app's own answer to the cut-off body: 413 was sent instead
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        async def limited_receive():
            nonlocal seen, refused
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit and not refused and not started:
                    refused = True
                    await error_body(413, message, "RequestTooLargeError")(scope, receive, send)
                    return {"type": "http.disconnect"}
            return msg

        await self.app(scope, limited_receive, guarded_send)


def build_app(api: RouterAPI, api_keys: Sequence[str] = ()) -> FastAPI:
    app = FastAPI(title="hilm-vllm router", docs_url=None, redoc_url=None)
    # Added last = outermost: the key is checked before the body is read.
    app.add_middleware(BodyLimitMiddleware, limit=api.limits.max_request_bytes)
    if api_keys:
        app.add_middleware(APIKeyMiddleware, keys=list(api_keys))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        # OpenAI answers 400 (not FastAPI's 422) with a readable message.
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
        return error_body(400, "; ".join(parts) or "invalid request body")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await until_disconnected(request, api.run(body, chat=False))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await until_disconnected(request, api.run(body, chat=True))

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        ids = [api.name] + [p.value for p in Policy]
        return {"object": "list", "data": [
            {"id": i, "object": "model", "created": created, "owned_by": "hilm-vllm",
             "root": api.name} for i in ids]}

    @app.get("/health")
    async def health():
        links = api.router.links
        return {"status": "ok", "tiers": {
            t.value: links[t].available if t in links else None for t in MODEL_TIERS}}

    return app

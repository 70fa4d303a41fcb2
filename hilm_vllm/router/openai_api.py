"""OpenAI-compatible HTTP API of the router (FastAPI, as vLLM's own server).

`/v1/completions`, `/v1/chat/completions` (the model's chat template), SSE streaming, `/v1/models`,
`/health`, `/ping`, `/version`, `/tokenize`, `/detokenize` and `/metrics` (Prometheus, as
`vllm serve` serves them on its API port). Each of vLLM's request fields is applied, refused
with a 400 when set to a value that would change the output (no policy applies it yet), or
ignored when it cannot change the output (`fields.py`, docs/api-fields.md); fields vLLM does not
know are accepted, logged and ignored, as in vLLM; the response lists what was ignored in
`usage.hilm.ignored_fields`. The policy is chosen per request by the `model` field (the served model name for the
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
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hilm_vllm import codec
from hilm_vllm.errors import HilmError, InvalidArgument, NotFound
from hilm_vllm.router import fields, metrics
from hilm_vllm.router.admission import Slot, TooBusy
from hilm_vllm.router.engine import GenerationRequest, RequestStats, Router
from hilm_vllm.router.frontdoor import (RequestLimits, TextChunk, generation_request,
                                        prompt_ids, text_chunks)
from hilm_vllm.router.policy import Policy
from hilm_vllm.thresholds import Thresholds
from hilm_vllm.seeds import Stream, derive_seed
from hilm_vllm.server.security import bearer_ok

logger = logging.getLogger("hilm.router.api")


class _Base(BaseModel):
    """As vLLM's OpenAIBaseModel: fields the router does not know are accepted and ignored
    (OpenAI SDKs and `vllm bench serve` send vLLM's sampling extras); `ignored_fields` names
    them, and the request logs them."""

    model_config = ConfigDict(extra="allow")

    def ignored_fields(self, prefix: str = "") -> list[str]:
        out = [prefix + k for k in (self.model_extra or {})]
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, _Base):
                out += value.ignored_fields(f"{prefix}{name}.")
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, _Base):
                        out += item.ignored_fields(f"{prefix}{name}[{i}].")
        return out


class StreamOptions(_Base):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # usage on every chunk (vLLM's extension)


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
    include_stop_str_in_output: bool = False
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


class ContentPart(_Base):
    """One part of a message's content; the router's models read text only."""

    type: str
    text: str | None = None


class ChatMessage(_Base):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def template_dict(self) -> dict:
        """The message as the chat template takes it: text parts joined by newlines, as
        vLLM's default content format ("string") joins them."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise InvalidArgument(f"content part of type {part.type!r}: the router's "
                                          f"models read text only (type 'text' with 'text')")
                texts.append(part.text)
            content = "\n".join(texts)
        out = {"role": self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True


PROMPT_DECIDER = "prompt"  # hilm_tiers of an echoed prompt's tokens (their logprobs: the LLM's)


def _lp(lp) -> float | None:
    """A logprob as JSON: -inf (a masked token) as vLLM writes it, -9999.0."""
    return None if lp is None else max(lp.logprob, -9999.0)


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
    if isinstance(e, TooBusy):
        return too_busy_response(e)
    return error_body(e.http_status, str(e), _ERROR_TYPES.get(e.http_status, "InternalServerError"))


def too_busy_response(e: TooBusy) -> JSONResponse:
    """429, OpenAI-style, with `Retry-After` (seconds), as a rate-limited OpenAI client expects."""
    response = error_body(429, str(e), "RateLimitError")
    response.headers["Retry-After"] = str(e.retry_after_s)
    return response


class AdmittedStream(StreamingResponse):
    """A streamed response that holds its admission slot until it has been sent, or failed, or
    its client left; also if the server never sends it (the slot is released when the response
    is collected)."""

    def __init__(self, content, *, slot: Slot, **kw):
        super().__init__(content, **kw)
        self.slot = slot
        weakref.finalize(self, slot.release)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


_warned_fields: set[str] = set()
MAX_WARNED_FIELDS = 1024  # names remembered; past it (clients inventing names) new ones log at debug


def log_ignored(fields: list[str]) -> None:
    """vLLM logs the fields it ignores; a warning the first time each is seen, then debug (a
    benchmark sends the same ones with every request). The names remembered are bounded."""
    if not fields:
        return
    new = [f for f in fields if f not in _warned_fields]
    if new and len(_warned_fields) < MAX_WARNED_FIELDS:
        _warned_fields.update(new[:MAX_WARNED_FIELDS - len(_warned_fields)])
        logger.warning("request fields ignored by the router (accepted, as vLLM does; listed "
                       "in usage.hilm.ignored_fields): %s", ", ".join(new))
    else:
        logger.debug("request fields ignored: %s", ", ".join(fields))


@dataclass
class _Choice:
    """One of a request's n generations."""

    index: int
    req: GenerationRequest
    stats: RequestStats
    events: AsyncIterator[tuple[str, Any]]  # ("text", TextChunk)..., ("finish", reason)
    first: tuple[str, Any] | None = None


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

    def default_max_tokens(self, n_prompt: int) -> int:
        """A chat request without max_tokens: the rest of the context, as vLLM (bounded by
        --max-output-tokens). Before the LLM's context is known, the bound itself: the engine
        cuts at the context and ends with finish_reason "length"."""
        limits = getattr(self.router.llm, "limits", None)
        bound = self.limits.max_output_tokens
        if limits and limits[1]:
            return max(1, min(bound, limits[1] - n_prompt))
        return bound

    def generation_request(self, body: _Sampling, prompt_ids: list[int],
                           chat: bool = False, choice: int = 0) -> GenerationRequest:
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            # OpenAI's (and vLLM's) default for completions is 16; chat: the rest of the context
            max_tokens = self.default_max_tokens(len(prompt_ids)) if chat else 16
        seed = body.seed
        if seed is not None and choice:
            seed = derive_seed(seed, choice, Stream.CHOICE)  # n independent, reproducible
        spec = codec.sampling(body.temperature, body.top_k, body.top_p, seed)
        th = None
        if body.thresholds is not None:
            base = self.router.cfg.thresholds
            t = body.thresholds
            th = Thresholds(base.t1 if t.t1 is None else t.t1, base.t2 if t.t2 is None else t.t2,
                            base.t_ilm if t.t_ilm is None else t.t_ilm)
        return generation_request(
            self.router, self.tokenizer, self.limits, prompt_ids, spec, max_tokens,
            self.policy_of(body), body.ignore_eos, body.skip_rate, body.block_size, th,
            body.optimistic, tuple(body.stop_token_ids or ()), body.min_tokens, stops(body),
            codec.penalties(fields.transform_values(body.model_extra or {})),
            self.logprobs_wanted(body), self.structured(body))

    def prompt_ids(self, body: CompletionRequest | ChatCompletionRequest) -> list[int]:
        ids = self._prompt_ids(body)
        self.limits.check_prompt(len(ids))
        return ids

    def chat_ids(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        if not messages:
            raise InvalidArgument("messages is empty: give at least one message")
        for m in messages:
            if isinstance(m.content, str):
                self.limits.check_text(m.content, "message")
        try:
            return list(self.tokenizer.apply_chat_template(
                [m.template_dict() for m in messages], add_generation_prompt=add_generation_prompt,
                tokenize=True, return_dict=False))
        except Exception as e:  # a template that rejects the conversation
            raise InvalidArgument(f"the chat template rejected the messages: {e}") from None

    def _prompt_ids(self, body: CompletionRequest | ChatCompletionRequest) -> list[int]:
        if isinstance(body, ChatCompletionRequest):
            return self.chat_ids(body.messages, body.add_generation_prompt)
        return prompt_ids(body.prompt, self.tokenizer, self.limits)

    @staticmethod
    def structured(body: CompletionRequest | ChatCompletionRequest) -> dict | None:
        """The request's structured output (response_format, structured_outputs), if any."""
        extra = body.model_extra or {}
        return codec.structured_outputs(extra.get("response_format"),
                                        extra.get("structured_outputs"))

    @staticmethod
    def logprobs_wanted(body: CompletionRequest | ChatCompletionRequest) -> int | None:
        """How many top logprobs per token the request asks for (None: no logprobs)."""
        if isinstance(body, ChatCompletionRequest):
            if body.top_logprobs is not None and not body.logprobs:
                raise InvalidArgument("top_logprobs needs logprobs: true")
            if not body.logprobs:
                return None
            return codec.check_logprobs(body.top_logprobs or 0, "top_logprobs")
        return codec.check_logprobs(body.logprobs)

    def logprobs_object(self, chat: bool, tokens: list[int], logprobs: list,
                        deciders: list[str], offset: int = 0) -> dict | None:
        """OpenAI's logprobs object for these tokens (vLLM's shapes), with each token's
        deciding tier (`hilm_tiers` / `hilm_tier`, an extension). None without logprobs."""
        if not logprobs:
            return None
        decode = self._token_text
        if chat:
            return {"content": [
                {"token": decode(t), "logprob": _lp(lp), "bytes": list(decode(t).encode()),
                 "hilm_tier": tier,
                 "top_logprobs": [] if lp is None else [
                     {"token": decode(i), "logprob": max(v, -9999.0),
                      "bytes": list(decode(i).encode())}
                     for i, v in zip(lp.top_ids, lp.top_logprobs)]}
                for t, lp, tier in zip(tokens, logprobs, deciders)], "refusal": None}
        texts = [decode(t) for t in tokens]
        offsets = []
        for s in texts:
            offsets.append(offset)
            offset += len(s)
        return {"tokens": texts, "token_logprobs": [_lp(lp) for lp in logprobs],
                "top_logprobs": [None if lp is None else {
                    decode(i): max(v, -9999.0) for i, v in zip(
                        (*lp.top_ids, t), (*lp.top_logprobs, lp.logprob))}
                    for t, lp in zip(tokens, logprobs)],
                "text_offset": offsets, "hilm_tiers": list(deciders)}

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    # -- running ---------------------------------------------------------------------------------

    async def run(self, body: CompletionRequest | ChatCompletionRequest, chat: bool,
                  client: str = ""):
        """One completion or chat request of `client` (its API key, else its address: whom
        the fair queue serves in turn)."""
        applied = fields.transform_values(body.model_extra or {})  # the tiers apply them
        applied |= {k: v for k, v in (body.model_extra or {}).items()
                    if k in fields.STRUCTURED and not fields.is_neutral(
                        v, fields.FIELDS[k].neutral)}
        ignored = [f for f in body.ignored_fields() if f not in applied]
        log_ignored(ignored)
        try:
            fields.check(body.model_extra or {})  # what would change the output: refused
            if chat and not fields.is_neutral((body.model_extra or {}).get("echo"),
                                              fields.FIELDS["echo"].neutral):
                raise InvalidArgument("echo: not supported for chat completions (the last "
                                      "message is not prepended): leave it unset or false")
            self.limits.check_n(body.n)
            ids = self.prompt_ids(body)
            reqs = [self.generation_request(body, ids, chat, i) for i in range(body.n)]
        except HilmError as e:
            return _hilm_error(e)
        except ValueError as e:
            return error_body(400, str(e))
        try:
            slot = await self.router.admission.acquire(client, len(reqs))
        except TooBusy as e:
            return too_busy_response(e)
        try:
            response = await self._respond(body, chat, reqs, ignored, slot)
        except BaseException:
            slot.release()
            raise
        if not isinstance(response, AdmittedStream):
            slot.release()  # a stream gives its slot back when it ends
        return response

    async def _respond(self, body: CompletionRequest | ChatCompletionRequest, chat: bool,
                       reqs: list[GenerationRequest], ignored: list[str], slot: Slot):
        choices = []
        for i, req in enumerate(reqs):
            stats = RequestStats(req.policy.value)
            choices.append(_Choice(i, req, stats, self._events(
                req, stats, body.include_stop_str_in_output)))
        t0 = time.perf_counter()
        try:
            echo = await self.echo_chunk(body, reqs[0], choices[0].stats)
        except HilmError as e:
            await _close_choices(choices)
            return _hilm_error(e)

        async def first(c: _Choice):
            try:
                c.first = await c.events.__anext__()
            except StopAsyncIteration:
                c.first = None

        # errors before the first token become 4xx/5xx
        if len(choices) == 1:
            try:
                await first(choices[0])
                results = [None]
            except Exception as e:  # noqa: BLE001 - handled below, as gather's
                results = [e]
        else:
            results = await asyncio.gather(*(first(c) for c in choices), return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            await _close_choices(choices)
            if isinstance(failed, HilmError):
                return _hilm_error(failed)
            if isinstance(failed, ValueError):  # a value no message to a tier can carry
                return error_body(400, str(failed))
            raise failed
        metrics.TTFT.labels(reqs[0].policy.value).observe(time.perf_counter() - t0)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if body.stream:
            opts = body.stream_options or StreamOptions()
            return AdmittedStream(
                self._sse(rid, created, body.model, chat, choices, opts.include_usage,
                          opts.include_usage and opts.continuous_usage_stats, ignored,
                          echo),
                slot=slot, media_type="text/event-stream")

        async def collect(c: _Choice) -> tuple[str, str, dict | None]:
            text, finish, toks, lps, tiers = "", "length", [], [], []
            if echo is not None:
                text, toks, lps, tiers = (echo.text, list(echo.token_ids), list(echo.logprobs),
                                          list(echo.deciders))
            ev = c.first
            while ev is not None:
                kind, value = ev
                if kind == "text":
                    text += value.text
                    toks += value.token_ids
                    lps += value.logprobs
                    tiers += value.deciders
                else:
                    finish = value
                ev = await anext(c.events, None)
            return text, finish, self.logprobs_object(chat, toks, lps, tiers)

        tasks = [asyncio.ensure_future(collect(c)) for c in choices]
        try:
            outs = await asyncio.gather(*tasks)
        except Exception as e:  # noqa: BLE001 - one choice failed: end the others, say why
            await _close_choices(choices, tasks)
            if isinstance(e, HilmError):
                return _hilm_error(e)
            logger.exception("a choice failed")
            return error_body(500, f"generation failed: {e!r}")
        out_choices = []
        for c, (text, finish, logprobs) in zip(choices, outs):
            if chat:
                out_choices.append({"index": c.index,
                                    "message": {"role": "assistant", "content": text},
                                    "finish_reason": finish, "logprobs": logprobs})
            else:
                out_choices.append({"index": c.index, "text": text, "finish_reason": finish,
                                    "logprobs": logprobs})
        obj = "chat.completion" if chat else "text_completion"
        degraded = sorted({d for c in choices for d in c.stats.degraded})
        headers = {"x-hilm-degraded": ",".join(degraded)} if degraded else None
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": body.model,
                             "choices": out_choices, "usage": self._usage(choices, ignored)},
                            headers=headers)

    @staticmethod
    def _usage(choices: list[_Choice], ignored: list[str]) -> dict:
        """OpenAI's counts (the prompt once, every choice's completion tokens) and
        `hilm`: the first choice's round statistics (every choice's under `choices` when
        n > 1), and the request fields that were ignored."""
        n_prompt = len(choices[0].req.prompt_ids)
        completion = sum(c.stats.tokens for c in choices)
        hilm = choices[0].stats.usage()
        if len(choices) > 1:
            hilm["choices"] = [c.stats.usage() for c in choices]
        hilm["ignored_fields"] = list(ignored)
        return {"prompt_tokens": n_prompt, "completion_tokens": completion,
                "total_tokens": n_prompt + completion, "hilm": hilm}

    async def _events(self, req: GenerationRequest, stats: RequestStats,
                      include_stop: bool = False) -> AsyncIterator[tuple[str, Any]]:
        """("text", TextChunk)... then ("finish", reason)."""
        async for chunk in text_chunks(self.router, req, stats, self.tokenizer, include_stop):
            if chunk.text or chunk.logprobs:
                yield "text", chunk
            if chunk.finish_reason is not None:
                yield "finish", chunk.finish_reason

    @staticmethod
    async def _merged(choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, tuple[str, str]]]:
        """Every choice's events as they come (one choice: read directly)."""
        if len(choices) == 1:
            c = choices[0]
            ev = c.first
            while ev is not None:
                yield c, ev
                ev = await anext(c.events, None)
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(c: _Choice):
            try:
                ev = c.first
                while ev is not None:
                    await queue.put((c, ev))
                    ev = await anext(c.events, None)
            except BaseException as e:  # noqa: BLE001 - handed to the reader
                await queue.put((c, e))
                return
            await queue.put((c, None))

        tasks = [asyncio.ensure_future(pump(c)) for c in choices]
        try:
            left = len(choices)
            while left:
                c, item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield c, item
        finally:
            await _close_choices(choices, tasks)

    async def echo_chunk(self, body: CompletionRequest | ChatCompletionRequest,
                         req: GenerationRequest, stats: RequestStats) -> TextChunk | None:
        """What `echo` puts before each choice's completion: the prompt's text and, with
        logprobs, its tokens with the LLM's logprobs of them (vLLM's prompt_logprobs, from the
        LLM tier whatever the policy: the first token has none), marked `prompt` in
        hilm_tiers. None without echo."""
        text = self.echo_text(body)
        if isinstance(body, ChatCompletionRequest) or not body.echo:
            return None
        if body.logprobs is None:
            return TextChunk([], text)
        ids = list(req.prompt_ids)
        found = await self.router.prompt_logprobs(ids, body.logprobs, stats)
        return TextChunk(ids, text, deciders=[PROMPT_DECIDER] * len(ids),
                         logprobs=[None, *found][:len(ids)])

    def echo_text(self, body: CompletionRequest | ChatCompletionRequest) -> str:
        """The prompt's text, which `echo` puts before a completion's (vLLM's: the prompt as
        sent, or its token ids decoded)."""
        if isinstance(body, ChatCompletionRequest) or not body.echo:
            return ""
        return body.prompt if isinstance(body.prompt, str) else self.tokenizer.decode(
            body.prompt)

    async def _sse(self, rid, created, model, chat, choices: list[_Choice], include_usage: bool,
                   continuous: bool, ignored: list[str], echo: TextChunk | None = None
                   ) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        n_prompt = len(choices[0].req.prompt_ids)

        offsets: dict[int, int] = {}  # completions: each choice's text_offset so far

        def chunk(c: _Choice, text: Any, finish: str | None, role: bool = False) -> str:
            logprobs = None
            if isinstance(text, TextChunk):
                logprobs = self.logprobs_object(chat, text.token_ids, text.logprobs,
                                                text.deciders, offsets.get(c.index, 0))
                if logprobs is not None and not chat:
                    offsets[c.index] = offsets.get(c.index, 0) + sum(
                        len(s) for s in logprobs["tokens"])
                text = text.text
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text:
                    delta["content"] = text
                choice = {"index": c.index, "delta": delta, "finish_reason": finish,
                          "logprobs": logprobs}
            else:
                choice = {"index": c.index, "text": text or "", "finish_reason": finish,
                          "logprobs": logprobs}
            payload = {"id": rid, "object": obj, "created": created, "model": model,
                       "choices": [choice]}
            if continuous:  # vLLM: this choice's tokens so far
                payload["usage"] = {"prompt_tokens": n_prompt,
                                    "completion_tokens": c.stats.tokens,
                                    "total_tokens": n_prompt + c.stats.tokens}
            elif include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        if chat:
            for c in choices:
                yield chunk(c, None, None, role=True)
        elif echo is not None:
            for c in choices:
                yield chunk(c, echo, None)
        try:
            async for c, (kind, value) in self._merged(choices):
                yield chunk(c, value, None) if kind == "text" else chunk(c, None, value)
        except Exception as e:  # noqa: BLE001 - after the first token: tokens sent stay sent;
            # say why it ended, then end the stream as OpenAI's do
            if not isinstance(e, HilmError):
                logger.exception("a streamed choice failed")
            status = e.http_status if isinstance(e, HilmError) else 500
            message = str(e) if isinstance(e, HilmError) else f"generation failed: {e!r}"
            err = {"error": {"message": message, "type": _ERROR_TYPES.get(
                status, "InternalServerError"), "param": None, "code": status}}
            yield f"data: {json.dumps(err)}\n\n"
        if include_usage:
            payload = {"id": rid, "object": obj, "created": created, "model": model,
                       "choices": [], "usage": self._usage(choices, ignored)}
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"

    # -- tokenizer endpoints -------------------------------------------------------------------

    def tokenize(self, data: dict) -> dict:
        if "messages" in data:
            body = TokenizeChatRequest.model_validate(data)
            ids = self.chat_ids(body.messages, body.add_generation_prompt)
            if body.add_special_tokens and self.tokenizer.bos_token_id is not None:
                ids = [self.tokenizer.bos_token_id, *ids]
        else:
            body = TokenizeCompletionRequest.model_validate(data)
            self.limits.check_text(body.prompt)
            ids = self.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        self.limits.check_prompt(len(ids))
        out: dict[str, Any] = {"count": len(ids), "max_model_len": None, "tokens": ids,
                               "token_strs": None}
        if body.return_token_strs:
            out["token_strs"] = self.tokenizer.convert_ids_to_tokens(ids)
        log_ignored(body.ignored_fields())
        return out

    def detokenize(self, data: dict) -> dict:
        body = DetokenizeRequest.model_validate(data)
        self.limits.check_prompt(len(body.tokens))
        codec.check_token_ids(body.tokens, len(self.tokenizer), "tokens")
        log_ignored(body.ignored_fields())
        return {"prompt": self.tokenizer.decode(body.tokens)}


async def _close_choices(choices: list, tasks: list | None = None) -> None:
    """End every choice of a request: cancel the tasks reading them and wait for them to stop
    (an async generator cannot be closed while another task runs it), then close each choice's
    generator, which closes its tier sessions."""
    for t in tasks or ():
        t.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    for c in choices:
        try:
            await c.events.aclose()
        except Exception:  # noqa: BLE001 - closing must reach every choice
            logger.exception("closing choice %s failed", c.index)


class TokenizeCompletionRequest(_Base):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(_Base):
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool | None = False


class DetokenizeRequest(_Base):
    model: str | None = None
    tokens: list[int]



DISCONNECT_POLL_S = 0.5


def http_client(request: Request) -> str:
    """Whom the fair queue serves: the API key the request sends (as a digest), else its
    address."""
    header = request.headers.get("authorization") or ""
    scheme, _, key = header.partition(" ")
    if scheme.lower() == "bearer" and key:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return "addr:" + (request.client.host if request.client else "")


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


def _validation_message(errors) -> str:
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request body"


# As vLLM's instrumentator: no request metrics for these (polled constantly).
UNINSTRUMENTED = ["/metrics", "/health", "/ping", "/version"]


def add_metrics(app: FastAPI) -> None:
    """/metrics on the API port, as `vllm serve` (vllm/entrypoints/serve/instrumentator):
    prometheus-fastapi-instrumentator's HTTP metrics and the process's default registry (the
    router's `hilm_router_*` and vLLM-named metrics)."""
    import prometheus_client
    from prometheus_fastapi_instrumentator import Instrumentator

    class PrometheusResponse(Response):
        media_type = prometheus_client.CONTENT_TYPE_LATEST

    Instrumentator(excluded_handlers=UNINSTRUMENTED).add().instrument(app).expose(
        app, endpoint="/metrics", include_in_schema=False, response_class=PrometheusResponse)


def build_app(api: RouterAPI, api_keys: Sequence[str] = ()) -> FastAPI:
    app = FastAPI(title="hilm-vllm router", docs_url=None, redoc_url=None)
    # Added last = outermost: the key is checked before the body is read.
    app.add_middleware(BodyLimitMiddleware, limit=api.limits.max_request_bytes)
    if api_keys:
        app.add_middleware(APIKeyMiddleware, keys=list(api_keys))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        # OpenAI answers 400 (not FastAPI's 422) with a readable message.
        return error_body(400, _validation_message(exc.errors()))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await until_disconnected(request, api.run(body, False, http_client(request)))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await until_disconnected(request, api.run(body, True, http_client(request)))

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        ids = [api.name] + [p.value for p in Policy]
        max_len = await api.router.max_model_len()
        return {"object": "list", "data": [
            {"id": i, "object": "model", "created": created, "owned_by": "hilm-vllm",
             "root": api.name, "parent": None, "max_model_len": max_len} for i in ids]}

    async def _json(request: Request) -> dict:
        try:
            data = await request.json()
        except ValueError:
            raise InvalidArgument("the body is not JSON") from None
        if not isinstance(data, dict):
            raise InvalidArgument("the body must be a JSON object")
        return data

    @app.post("/tokenize")
    async def tokenize(request: Request):
        try:
            out = api.tokenize(await _json(request))
        except ValidationError as e:
            return error_body(400, _validation_message(e.errors()))
        except HilmError as e:
            return _hilm_error(e)
        out["max_model_len"] = await api.router.max_model_len()
        return out

    @app.post("/detokenize")
    async def detokenize(request: Request):
        try:
            return api.detokenize(await _json(request))
        except ValidationError as e:
            return error_body(400, _validation_message(e.errors()))
        except HilmError as e:
            return _hilm_error(e)

    @app.get("/version")
    async def version():
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        import vllm

        try:
            ours = dist_version("hilm-vllm")
        except PackageNotFoundError:
            ours = None
        return {"version": vllm.__version__, "hilm_vllm": ours}

    async def _health():
        down, tiers = await api.router.health()
        extra = {"replicas": api.router.replica_states} if getattr(
            api.router, "replica_states", None) else {}
        if down is not None:
            return JSONResponse({"status": "unhealthy", "reason": down, "tiers": tiers,
                                 **extra}, status_code=503)
        return JSONResponse({"status": "ok", "tiers": tiers, **extra})

    @app.get("/health")
    async def health():
        """200 while the LLM answers SERVING (every policy needs it: lossless ones fail without
        it); 503 with the reason otherwise. An ILM or drafter that is down is reported in
        `tiers` (requests are routed around it) but leaves the router healthy."""
        return await _health()

    @app.get("/ping")
    @app.post("/ping")
    async def ping():
        return await _health()  # as vLLM's /ping (SageMaker): the health check

    add_metrics(app)
    return app

"""Helpers for thin servicers: domain errors leave as status codes, never as UNKNOWN."""

from __future__ import annotations

import functools
import inspect
import logging

import grpc

from hilm_vllm.errors import HilmError
from hilm_vllm.server.grpc_limits import MAX_MESSAGE_ENV, MAX_MESSAGE_FLAG, max_message_bytes
from hilm_vllm.server.security import peer_identity
from hilm_vllm.sessions import CLIENT_METADATA_KEY, Owner

logger = logging.getLogger("hilm.grpc")


def too_large(e: grpc.aio.AioRpcError) -> bool:
    """Whether a call failed on the message limit (either side's)."""
    return (e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            and "message larger than max" in (e.details() or "").lower())


def too_large_message(what: str) -> str:
    return (f"{what}: a message exceeded the gRPC limit of {max_message_bytes() >> 20} MB "
            f"(full-vocabulary distributions are ~8 bytes per token id): start every tier and "
            f"the router with a larger {MAX_MESSAGE_FLAG} (or set ${MAX_MESSAGE_ENV})")


def client_id(context: grpc.aio.ServicerContext) -> Owner:
    """The owner of the sessions this call may touch: the client id it sends (metadata
    `hilm-client-id`), bound to its verified client certificate under mutual TLS."""
    cid = ""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_METADATA_KEY:
            cid = value
            break
    return Owner(cid, peer_identity(context))


def is_engine_client_error(e: BaseException) -> bool:
    """vLLM's own "your request is wrong" errors (vllm.exceptions.VLLMClientError, its 4xx),
    recognised without importing vLLM here."""
    return any(c.__name__ == "VLLMClientError" and c.__module__ == "vllm.exceptions"
               for c in type(e).__mro__)


def status_of(e: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The gRPC status a servicer answers for `e`, or None for an error that is not the
    client's (it propagates: grpc answers UNKNOWN and logs it): a HilmError's own code; a
    ValueError (validation in domain constructors, e.g. SamplingSpec) or a vLLM client error (a
    check this tier missed) is INVALID_ARGUMENT."""
    if isinstance(e, HilmError):
        return e.code, str(e)
    if isinstance(e, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if is_engine_client_error(e):
        return grpc.StatusCode.INVALID_ARGUMENT, f"the engine refused: {e}"
    return None


def translate_errors(method):
    """Wrap an async unary servicer method: an error `status_of` knows -> context.abort."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as e:
            if (status := status_of(e)) is None:
                raise
            await context.abort(*status)

    return wrapper


def translate_stream_errors(method):
    """`translate_errors` for a server-streaming method (an async generator)."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            async for item in method(self, request, context):
                yield item
        except Exception as e:
            if (status := status_of(e)) is None:
                raise
            await context.abort(*status)

    return wrapper


class _Malformed:
    def __init__(self, error: Exception):
        self.error = error


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """A request whose bytes do not parse as the method's message is the client's error:
    INVALID_ARGUMENT, not the UNKNOWN that grpc answers when a deserializer raises."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or (
                handler.unary_unary is None and handler.unary_stream is None):
            return handler
        parse = handler.request_deserializer
        method = details.method

        def deserialize(data: bytes):
            try:
                return parse(data)
            except Exception as e:  # noqa: BLE001 - DecodeError and whatever a parser raises
                return _Malformed(e)

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid protobuf message for {method} "
                                f"({request.error}): check the client's generated stubs")

        kw = dict(request_deserializer=deserialize,
                  response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                if isinstance(request, _Malformed):
                    return await refuse(request, context)
                result = inner(request, context)
                return await result if inspect.isawaitable(result) else result

            return grpc.unary_unary_rpc_method_handler(unary, **kw)
        inner_stream = handler.unary_stream

        async def stream(request, context):
            if isinstance(request, _Malformed):
                await refuse(request, context)
                return
            result = inner_stream(request, context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            else:
                for item in result:
                    yield item

        return grpc.unary_stream_rpc_method_handler(stream, **kw)

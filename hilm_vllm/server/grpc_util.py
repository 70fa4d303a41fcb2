"""Helpers for thin servicers: domain errors leave as status codes, never as UNKNOWN."""

from __future__ import annotations

import functools
import logging
import os

import grpc

from hilm_vllm.errors import HilmError
from hilm_vllm.sessions import CLIENT_METADATA_KEY

logger = logging.getLogger("hilm.grpc")

# One limit on every gRPC message, both ways, on every server and channel of the project. Sparse
# distributions are, without top-k, up to the whole vocabulary per token (~1 MB for a 128k
# vocabulary): a cascade block of k + 1 emitted rows would not fit gRPC's 4 MB default.
MAX_MESSAGE_ENV = "HILM_GRPC_MAX_MESSAGE_MB"
DEFAULT_MAX_MESSAGE_MB = 256
MAX_MESSAGE_FLAG = "--grpc-max-message-mb"


def max_message_bytes() -> int:
    """The limit in bytes: $HILM_GRPC_MAX_MESSAGE_MB (set by --grpc-max-message-mb), else 256 MB."""
    raw = os.environ.get(MAX_MESSAGE_ENV)
    try:
        mb = float(raw) if raw else DEFAULT_MAX_MESSAGE_MB
    except ValueError:
        raise ValueError(f"${MAX_MESSAGE_ENV}={raw!r} is not a number of MB") from None
    if not 0 < mb <= 2047:
        raise ValueError(f"{MAX_MESSAGE_FLAG} must be in (0, 2047] MB (gRPC's limit is an "
                         f"int32), got {mb:g}")
    return int(mb * (1 << 20))


def grpc_options() -> list[tuple[str, int]]:
    """Channel and server options carrying the message limit."""
    n = max_message_bytes()
    return [("grpc.max_receive_message_length", n), ("grpc.max_send_message_length", n)]


def too_large(e: grpc.aio.AioRpcError) -> bool:
    """Whether a call failed on the message limit (either side's)."""
    return (e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            and "message larger than max" in (e.details() or "").lower())


def too_large_message(what: str) -> str:
    return (f"{what}: a message exceeded the gRPC limit of {max_message_bytes() >> 20} MB "
            f"(full-vocabulary distributions are ~8 bytes per token id): start every tier and "
            f"the router with a larger {MAX_MESSAGE_FLAG} (or set ${MAX_MESSAGE_ENV})")


def client_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_METADATA_KEY:
            return value
    return ""


def translate_errors(method):
    """Wrap an async unary servicer method: HilmError -> context.abort(code, message)."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except HilmError as e:
            await context.abort(e.code, str(e))
        except ValueError as e:  # validation in domain constructors (e.g. SamplingSpec)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    return wrapper

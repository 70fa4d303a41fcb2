"""Helpers for thin servicers: domain errors leave as status codes, never as UNKNOWN."""

from __future__ import annotations

import functools
import logging

import grpc

from hilm_vllm.errors import HilmError
from hilm_vllm.sessions import CLIENT_METADATA_KEY

logger = logging.getLogger("hilm.grpc")


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

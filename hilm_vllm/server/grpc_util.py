"""Helpers for thin servicers: domain errors leave as status codes, never as UNKNOWN."""

from __future__ import annotations

import functools
import logging

import grpc

from hilm_vllm.errors import HilmError
from hilm_vllm.server.security import peer_identity
from hilm_vllm.sessions import CLIENT_METADATA_KEY, Owner

logger = logging.getLogger("hilm.grpc")


def client_id(context: grpc.aio.ServicerContext) -> Owner:
    """The owner of the sessions this call may touch: the client id it sends (metadata
    `hilm-client-id`), bound to its verified client certificate under mutual TLS."""
    cid = ""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_METADATA_KEY:
            cid = value
            break
    return Owner(cid, peer_identity(context))


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

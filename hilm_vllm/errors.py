"""Domain errors that services turn into gRPC status codes (and the router into HTTP 4xx).

Each carries the fix in its message; raising anything else from a servicer is a bug."""

from __future__ import annotations

import grpc


class HilmError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500


class InvalidArgument(HilmError):
    code, http_status = grpc.StatusCode.INVALID_ARGUMENT, 400


class NotFound(HilmError):
    code, http_status = grpc.StatusCode.NOT_FOUND, 404


class FailedPrecondition(HilmError):
    code, http_status = grpc.StatusCode.FAILED_PRECONDITION, 409


class Aborted(HilmError):
    """A call ended by a newer one that superseded it (the client no longer wants its result)."""
    code, http_status = grpc.StatusCode.ABORTED, 409


class PermissionDenied(HilmError):
    code, http_status = grpc.StatusCode.PERMISSION_DENIED, 403


class ResourceExhausted(HilmError):
    code, http_status = grpc.StatusCode.RESOURCE_EXHAUSTED, 429


class Unavailable(HilmError):
    code, http_status = grpc.StatusCode.UNAVAILABLE, 503

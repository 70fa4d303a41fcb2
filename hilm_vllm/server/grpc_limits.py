"""The gRPC message limit of every server and channel of the project, and the channel options
that carry it (apart from security.py and grpc_util.py, which both use them)."""

from __future__ import annotations

import os

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


# The router's public gRPC port takes prompts and sampling fields, never distributions: it
# receives at most gRPC's own default, so no client can make it buffer --grpc-max-message-mb.
PUBLIC_MAX_RECEIVE_BYTES = 4 << 20


def grpc_options(max_receive: int | None = None) -> list[tuple[str, int]]:
    """Channel and server options carrying the message limit (`max_receive`: a smaller limit
    on what this end receives)."""
    n = max_message_bytes()
    return [("grpc.max_receive_message_length", min(n, max_receive or n)),
            ("grpc.max_send_message_length", n)]

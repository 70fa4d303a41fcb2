"""Typed, immutable configuration shared by the tiers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hilm_vllm.tiers import Tier


@dataclass(frozen=True)
class ServeConfig:
    """What `hilm-serve` needs besides vLLM's own engine arguments."""

    tier: Tier
    host: str = "127.0.0.1"
    port: int = 50051  # gRPC; 0 picks a free port
    metrics_port: int = 0  # Prometheus /metrics over HTTP; 0 picks a free port
    http_port: int = 0  # the router's OpenAI API; 0 picks a free port
    shutdown_grace_s: float = 5.0  # in-flight RPCs get this long after SIGTERM
    # SIGTERM first drains: no new sessions (UNAVAILABLE, "draining"), the open ones are
    # served until they close or this long has passed
    drain_timeout_s: float = 30.0
    security: Any = None  # server.security.Security (TLS, tokens); None = plaintext, no token

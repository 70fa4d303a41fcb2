"""Typed, immutable configuration shared by the tiers."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Tier(str, enum.Enum):
    LLM = "llm"  # data center: Verifier + Generator on the large model
    ILM = "ilm"  # edge server: Verifier on the intermediate model, offloads to the LLM
    SLM = "slm"  # device: Drafter with same-step uncertainty
    ROUTER = "router"  # device: the policy loop; no model

    @property
    def runs_engine(self) -> bool:
        return self is not Tier.ROUTER


@dataclass(frozen=True)
class ServeConfig:
    """What `hilm-serve` needs besides vLLM's own engine arguments."""

    tier: Tier
    host: str = "127.0.0.1"
    port: int = 50051  # gRPC; 0 picks a free port
    metrics_port: int = 0  # Prometheus /metrics over HTTP; 0 picks a free port
    http_port: int = 0  # the router's OpenAI API; 0 picks a free port
    shutdown_grace_s: float = 5.0  # in-flight RPCs get this long after SIGTERM
    security: Any = None  # server.security.Security (TLS, tokens); None = plaintext, no token

"""Prometheus metrics of a tier process (names prefixed `hilm_`), served beside vLLM's own
`vllm:` metrics, which AsyncLLM registers in the same default registry."""

from __future__ import annotations

from prometheus_client import Gauge, Info, start_http_server

TIER_INFO = Info("hilm_tier", "Tier this process serves and the model it runs")
ENGINE_READY = Gauge("hilm_engine_ready", "1 once the vLLM engine is ready to serve requests")


def start_metrics_server(host: str, port: int) -> tuple[object, int]:
    """Serve /metrics in a daemon thread; returns (server, bound port)."""
    server, _thread = start_http_server(port, addr=host)
    return server, server.server_port

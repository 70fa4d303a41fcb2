"""Engine busy time: seconds the worker spent in model steps, the cost of a tier's work.

The worker's `execute_model` and `sample_tokens` (vLLM 0.32's V1 runner: the forward pass, then
sampling) are timed and summed in the worker process. The tier's API process reads the sum with
one `collective_rpc` when /metrics is scraped (never per request) and exports it as
`hilm_engine_busy_seconds_total`: the LLM tier's busy seconds per generated token is the
figure that says how many devices one LLM can serve (`llm_busy_s_per_token` in the benchmarks).
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import REGISTRY

logger = logging.getLogger("hilm.serve")

RPC = "hilm_engine_busy"
READ_TIMEOUT_S = 5.0


def install_timer(runner) -> None:
    """Wrap the runner's step methods (once) to add their wall time to `runner._hilm_busy_s`."""
    if hasattr(runner, "_hilm_busy_s"):
        return
    runner._hilm_busy_s = 0.0
    for name in ("execute_model", "sample_tokens"):
        method = getattr(runner, name, None)
        if method is not None:
            setattr(runner, name, _timed(runner, method))


def _timed(runner, method):
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            runner._hilm_busy_s += time.perf_counter() - t0
    return timed


class BusyWorkerExtension:
    """Mixed into a tier's worker extension: `collective_rpc("hilm_engine_busy")`."""

    def hilm_engine_busy(self) -> float:
        install_timer(self.model_runner)
        return self.model_runner._hilm_busy_s


class BusyCollector:
    """Prometheus collector: reads the worker's busy seconds from the tier's event loop."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop, tier: str):
        self.engine, self.loop, self.tier = engine, loop, tier

    def collect(self):
        family = CounterMetricFamily("hilm_engine_busy_seconds",
                                     "Seconds the engine's worker spent in model steps "
                                     "(forward + sampling)", labels=["tier"])
        try:
            future = asyncio.run_coroutine_threadsafe(self.engine.collective_rpc(RPC), self.loop)
            family.add_metric([self.tier], float(sum(future.result(READ_TIMEOUT_S))))
        except Exception as e:  # a scrape must not fail because the engine is busy or gone
            logger.debug("engine busy time unavailable: %s", e)
        yield family


async def start(runtime, tier: str) -> None:
    """Install the timer in the worker and export it (call once the engine is up)."""
    await runtime.engine.collective_rpc(RPC)
    REGISTRY.register(BusyCollector(runtime.engine, asyncio.get_running_loop(), tier))

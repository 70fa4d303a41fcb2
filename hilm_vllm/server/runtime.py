"""Lifecycle of one tier process: gRPC server with health checking, Prometheus /metrics, and the
vLLM engine. Health answers NOT_SERVING until the engine is ready and again from the moment a
shutdown begins, so load balancers and the router never send work to a tier that cannot take it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from hilm_vllm.config import ServeConfig
from hilm_vllm.server import metrics
from hilm_vllm.server.grpc_limits import PUBLIC_MAX_RECEIVE_BYTES, grpc_options
from hilm_vllm.server.grpc_util import MalformedRequestInterceptor
from hilm_vllm.server.security import INSECURE, server_interceptors
from hilm_vllm.sessions import STORES
from hilm_vllm.tiers import Tier

logger = logging.getLogger("hilm.serve")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# A tier registers its gRPC services with this: (grpc server, runtime) -> names of the
# services added, so health can be reported for each by name.
ServiceInstaller = Callable[[grpc.aio.Server, "TierRuntime"], list[str]]
# Run once the engine is up, before health turns SERVING (e.g. installing a worker hook).
ReadyHook = Callable[["TierRuntime"], Awaitable[None]]


class TierRuntime:
    """Owns the engine, the gRPC server, health and metrics of one tier process."""

    def __init__(self, cfg: ServeConfig, engine_args, installers: list[ServiceInstaller],
                 on_ready: list[ReadyHook] | None = None, on_shutdown: list[ReadyHook] | None = None):
        self.cfg = cfg
        self._no_drain = False  # SIGINT: stop without draining
        self._on_shutdown = on_shutdown or []
        self.http_app = None  # an ASGI app an installer may set (the router's OpenAI API)
        self._http_server = self._http_task = None
        self.http_port = 0
        self._on_ready = on_ready or []
        self.engine_args = engine_args  # vLLM AsyncEngineArgs, or None for the router
        self.engine = None  # vllm AsyncLLM once ready
        self._installers = installers
        self._health = health_aio.HealthServicer()
        self._service_names: list[str] = []
        self._server: grpc.aio.Server | None = None
        self._metrics_server = None
        self._stop = asyncio.Event()
        self.grpc_port = self.metrics_port = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)  # drain, then stop
        loop.add_signal_handler(signal.SIGINT, self._stop_now)
        try:
            await self._start_servers()
            await self._start_engine()
            for hook in self._on_ready:
                await hook(self)
            await self._set_health(SERVING)
            logger.info("%s tier ready", self.cfg.tier.value)
            await self._stop.wait()
        finally:
            await self._shutdown()

    async def _start_servers(self) -> None:
        security = self.cfg.security or INSECURE
        # The token check first, then requests that do not parse are INVALID_ARGUMENT.
        public = PUBLIC_MAX_RECEIVE_BYTES if self.cfg.tier is Tier.ROUTER else None
        self._server = grpc.aio.server(
            interceptors=[*server_interceptors(security), MalformedRequestInterceptor()],
            options=grpc_options(max_receive=public))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        for install in self._installers:
            self._service_names += install(self._server, self)
        address = f"{self.cfg.host}:{self.cfg.port}"
        creds = security.server_credentials()
        self.grpc_port = (self._server.add_insecure_port(address) if creds is None
                          else self._server.add_secure_port(address, creds))
        if self.grpc_port == 0:
            raise SystemExit(f"error: cannot bind gRPC to {address}; pick another --port")
        await self._server.start()
        await self._set_health(NOT_SERVING)
        self._metrics_server, self.metrics_port = metrics.start_metrics_server(
            self.cfg.host, self.cfg.metrics_port)
        http = ""
        if self.http_app is not None:
            await self._start_http()
            http = f" http=http://{self.cfg.host}:{self.http_port}"
        metrics.TIER_INFO.info({"tier": self.cfg.tier.value,
                                "model": str(getattr(self.engine_args, "model", ""))})
        # Tests and scripts read the bound ports from this line (ports may be 0 = any).
        logger.info("hilm-serve listening: tier=%s grpc=%s:%d metrics=http://%s:%d/metrics%s",
                    self.cfg.tier.value, self.cfg.host, self.grpc_port, self.cfg.host,
                    self.metrics_port, http)
        logger.info("gRPC security: %s", security.describe())

    async def _start_http(self) -> None:
        import socket

        import uvicorn

        sock = socket.socket(socket.AF_INET6 if ":" in self.cfg.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.cfg.host, self.cfg.http_port))
        except OSError as e:
            raise SystemExit(f"error: cannot bind HTTP to {self.cfg.host}:{self.cfg.http_port} "
                             f"({e.strerror}); pick another --port") from None
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(self.http_app, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=int(self.cfg.shutdown_grace_s))
        self._http_server = uvicorn.Server(config)
        # SIGTERM/SIGINT stop the whole tier through our handlers, not uvicorn's.
        self._http_server.capture_signals = contextlib.nullcontext
        self._http_task = asyncio.ensure_future(self._http_server.serve(sockets=[sock]))

    async def _start_engine(self) -> None:
        if self.engine_args is None:
            return
        from vllm.v1.engine.async_llm import AsyncLLM

        # Construction blocks for seconds (it spawns the engine core and worker); a thread keeps
        # health checks answering NOT_SERVING meanwhile.
        task = asyncio.ensure_future(asyncio.to_thread(AsyncLLM.from_engine_args, self.engine_args))
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        self.engine = await task  # on SIGTERM during startup, finish starting, then shut down
        stop.cancel()
        metrics.ENGINE_READY.set(1)

    async def _set_health(self, status) -> None:
        for name in ("", *self._service_names):
            await self._health.set(name, status)

    def _stop_now(self) -> None:
        """SIGINT (Ctrl-C): stop without draining."""
        self._no_drain = True
        self._stop.set()

    async def _drain(self) -> None:
        """No new sessions (OpenSession answers UNAVAILABLE, "draining": the router opens
        them on another replica); the open ones are served until they close or
        `drain_timeout_s` passes."""
        stores = list(STORES)
        for store in stores:
            store.draining = True
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        open_now = sum(len(s) for s in stores)
        if open_now:
            logger.info("draining: %d sessions open; serving them for up to %g s", open_now,
                        self.cfg.drain_timeout_s)
        while time.monotonic() < deadline:
            for s in stores:
                s.sweep()  # sessions that expire meanwhile count as closed
            if not sum(len(s) for s in stores):
                break
            await asyncio.sleep(0.1)

    async def _shutdown(self) -> None:
        logger.info("shutting down %s tier", self.cfg.tier.value)
        metrics.ENGINE_READY.set(0)
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
        if self.engine is not None and self._stop.is_set() and not self._no_drain:
            await self._drain()
        if self._http_server is not None:
            self._http_server.should_exit = True
            await self._http_task
        if self._server is not None:
            await self._server.stop(self.cfg.shutdown_grace_s)
        for hook in self._on_shutdown:
            await hook(self)
        if self.engine is not None:
            self.engine.shutdown()  # terminates the engine core and worker processes
            self.engine = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()

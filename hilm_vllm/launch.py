"""Start tier processes and wait for them: used by the demo, benchmarks and tests.

    with TierProcess.start("llm", ["--model", path, "--port", "0"]) as llm:
        llm.wait_healthy()
        channel = grpc.insecure_channel(llm.grpc_address)  # make_channel(...) under TLS
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hilm_vllm.server import engine_env
from hilm_vllm.server.security import Security, make_channel, security_args, security_env

_LISTENING = re.compile(r"hilm-serve listening: tier=(\w+) grpc=([\w.:\[\]-]+):(\d+) "
                        r"metrics=http://([\w.:\[\]-]+):(\d+)/metrics"
                        r"(?: http=http://([\w.:\[\]-]+):(\d+))?")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit in a script that launches tiers, so its `finally`/`with`
    blocks stop them (Python's default SIGTERM action kills the script and orphans them). SIGINT
    raises KeyboardInterrupt even when the parent ignored it (a shell script's `cmd &` starts
    its job with SIGINT ignored, so `kill -INT` would do nothing)."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    signal.signal(signal.SIGINT, signal.default_int_handler)


class TierProcess:
    """A `hilm-serve` subprocess whose output is kept (last lines) for error messages."""

    def __init__(self, proc: subprocess.Popen, tier: str, security: Security | None = None,
                 echo: Callable[[str], None] | None = None):
        self.proc, self.tier = proc, tier
        self.echo = echo  # called with each output line (`hilm up` shows the router's)
        self.security = security  # how to reach it (health checks); None: plaintext
        self.log: collections.deque[str] = collections.deque(maxlen=400)
        self.head: list[str] = []  # the first lines (start-up), kept for good
        self.grpc_port = self.metrics_port = self.http_port = 0
        self._listening = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    @classmethod
    def start(cls, tier: str, args: list[str], env: dict[str, str] | None = None,
              placement: str | None = None, security: Security | None = None,
              pem_files: dict | None = None,
              echo: Callable[[str], None] | None = None) -> TierProcess:
        """Start `hilm-serve --tier TIER ARGS`. Engine tiers are placed on this machine's cores
        as co-located tiers (`engine_env.placement`, layout `placement`, else $HILM_PLACEMENT,
        else `spread`) unless the environment already sets VLLM_CPU_OMP_THREADS_BIND.
        `security` (with `pem_files`: cert, key, ca -> the PEM files holding it) adds the --tls-*
        flags and the tier token (through the environment) and is used for health checks."""
        env = dict(os.environ if env is None else env)
        if security is not None:
            args = [*args, *security_args(security, pem_files or {})]
            env.update(security_env(security))
        # AsyncLLM needs the engine core in its own process; a test may have turned that off.
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        if tier in engine_env.ENGINE_TIERS and "VLLM_CPU_OMP_THREADS_BIND" not in env:
            layout = placement or env.get("HILM_PLACEMENT") or "spread"
            binds = engine_env.placement(engine_env.ENGINE_TIERS, engine_env.available_cpus(),
                                         layout)
            env["VLLM_CPU_OMP_THREADS_BIND"] = binds[tier]
        cmd = [sys.executable, "-m", "hilm_vllm.serve", "--tier", tier, *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
        return cls(proc, tier, security, echo)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line.rstrip("\n"))
            if self.echo is not None:
                self.echo(line.rstrip("\n"))
            if len(self.head) < 1000:
                self.head.append(line.rstrip("\n"))
            if m := _LISTENING.search(line):
                self.grpc_port, self.metrics_port = int(m.group(3)), int(m.group(5))
                self.http_port = int(m.group(7) or 0)  # the router's OpenAI API
                self._listening.set()

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """The router's OpenAI-compatible API, e.g. http://127.0.0.1:8000 (router tier only)."""
        if not self.http_port:
            raise RuntimeError(f"the {self.tier} tier serves no HTTP API")
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def tail(self, n: int = 40) -> str:
        return "\n".join(list(self.log)[-n:])

    def wait_listening(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.tier} tier did not start listening "
                                   f"(exit code {self.proc.poll()}):\n{self.tail()}")

    def health(self, service: str = "") -> int:
        with make_channel(self.grpc_address, self.security or Security(), aio=False) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def _health_or_none(self) -> int | None:
        """The health status, or None when the check itself timed out (a loaded machine)."""
        try:
            return self.health()
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                return None
            raise

    def wait_healthy(self, timeout: float = 300.0) -> None:
        self.wait_listening(timeout)
        deadline = time.monotonic() + timeout
        while self._health_or_none() != health_pb2.HealthCheckResponse.SERVING:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.tier} tier never turned SERVING "
                                   f"(exit code {self.proc.poll()}):\n{self.tail()}")
            time.sleep(0.5)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 60.0, drain: bool = False) -> int:
        """SIGINT (stop now), or SIGTERM with `drain` (an engine tier first serves its open
        sessions, `--drain-timeout-s`), and wait; SIGKILL the whole process group if it does
        not exit in time. This launcher stops whole systems (tests, benchmarks, `hilm up`),
        where nothing is left to drain to."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if drain else signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # whatever is left of its group (the engine of a tier that was SIGKILLed)
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def __enter__(self) -> TierProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

"""Verification results straight from vLLM's worker to the verifier's API process.

The engine's own output (the emitted token) travels worker -> engine core -> API process. A
`collective_rpc` to fetch m afterwards takes that round trip once more: measured 0.3 ms on an
idle machine and 2-7 ms on a loaded one (bench/verify_cost.py, column rpc). Instead the hook
pushes each result on a ZMQ PUSH socket to a PULL socket of the API process, at the moment it
computes it, which is before the engine's output even leaves the worker, so a round waits for
nothing extra. Messages carry a per-install token so that no other local process can forge
results. The worker also keeps every result for `hilm_pop_verify`, the fallback.
"""

from __future__ import annotations

import asyncio
import json
import secrets

import zmq
import zmq.asyncio

from hilm_vllm.verifier.wire import VerifyResult


class ResultSink:
    """Worker side: sends results, never blocks the engine step (drops if the queue is full)."""

    def __init__(self, address: str, token: str):
        self._socket = zmq.Context.instance().socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)
        self._token = token

    def send(self, result: VerifyResult) -> None:
        message = json.dumps({"token": self._token, "result": result.to_dict()})
        try:
            self._socket.send_string(message, zmq.NOBLOCK)
        except zmq.Again:  # the API process is not reading: it falls back to hilm_pop_verify
            pass


class ResultChannel:
    """API side: a PULL socket on loopback and a future per awaited key."""

    def __init__(self):
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        port = self._socket.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.token = secrets.token_hex(16)
        self._waiting: dict[str, asyncio.Future] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def expect(self, key: str) -> asyncio.Future:
        """Register before submitting the request: the result may arrive before its output."""
        future = self._waiting[key] = asyncio.get_running_loop().create_future()
        return future

    def forget(self, key: str) -> None:
        self._waiting.pop(key, None)

    async def _read(self) -> None:
        while True:
            message = json.loads(await self._socket.recv_string())
            if message.get("token") != self.token:
                continue
            result = VerifyResult.from_dict(message["result"])
            future = self._waiting.get(result.key)
            if future is not None and not future.done():
                future.set_result(result)

    def close(self) -> None:
        self._reader.cancel()
        self._socket.close()
        self._context.term()

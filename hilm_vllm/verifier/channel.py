"""Verification results straight from vLLM's worker to the verifier's API process.

The engine's own output (the emitted token) travels worker -> engine core -> API process. A
`collective_rpc` to fetch m afterwards takes that round trip once more: measured 0.3 ms on an
idle machine and 2-7 ms on a loaded one (bench/verify_cost.py, column rpc). Instead the hook
pushes each result, at the moment it computes it, on the push channel of
`hilm_vllm.server.push` (msgpack frames with a per-channel token; a malformed frame is dropped
and the reader goes on), before the engine's output even leaves the worker, so a round waits
for nothing extra. The worker keeps a result for `hilm_pop_verify`, the fallback, only when
its push was dropped (the API process was not reading): a delivered result is not kept.
"""

from __future__ import annotations

import asyncio

from hilm_vllm.server.push import PullChannel, PushSink
from hilm_vllm.verifier.wire import VerifyResult


class ResultSink(PushSink):
    """Worker side: never blocks the engine step (drops if the API process is not reading)."""

    def send(self, result: VerifyResult) -> bool:  # type: ignore[override]
        return super().send(result.to_dict())


class ResultChannel:
    """API side: the push channel's PULL socket and a future per awaited key."""

    def __init__(self):
        self._waiting: dict[str, asyncio.Future] = {}
        self._pull = PullChannel(self._on_result)
        self.address, self.token = self._pull.address, self._pull.token

    def expect(self, key: str) -> asyncio.Future:
        """Register before submitting the request: the result may arrive before its output."""
        future = self._waiting[key] = asyncio.get_running_loop().create_future()
        return future

    def forget(self, key: str) -> None:
        self._waiting.pop(key, None)

    def _on_result(self, payload: dict) -> None:
        result = VerifyResult.from_dict(payload)
        future = self._waiting.get(result.key)
        if future is not None and not future.done():
            future.set_result(result)

    def close(self) -> None:
        self._pull.close()

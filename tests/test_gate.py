"""The batching window in front of an engine (pure asyncio)."""

from __future__ import annotations

import asyncio
import time

import pytest

from hilm_vllm.server.gate import BatchGate


def test_calls_within_the_window_are_released_together():
    async def main():
        gate = BatchGate(0.05, max_batch=100)
        released = []

        async def call(i, delay):
            await asyncio.sleep(delay)
            await gate.wait()
            released.append((i, time.monotonic()))

        t0 = time.monotonic()
        await asyncio.gather(*(call(i, 0.01 * i) for i in range(4)))
        times = [t for _, t in released]
        assert max(times) - min(times) < 0.02  # one window, released at once
        assert min(times) - t0 >= 0.045  # ... when it closed
        assert gate.batches == 1 and gate.calls == 4
        await gate.wait()  # a later call opens a new window
        assert gate.batches == 2

    asyncio.run(main())


def test_a_full_batch_goes_at_once_and_off_means_no_wait():
    async def main():
        gate = BatchGate(10.0, max_batch=3)
        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(gate.wait() for _ in range(3))), 1.0)
        assert time.monotonic() - t0 < 0.5 and gate.batches == 1
        off = BatchGate(0.0)
        await asyncio.wait_for(off.wait(), 0.1)
        assert off.batches == 0 and off.calls == 1

    asyncio.run(main())


def test_a_caller_that_leaves_does_not_end_the_window_for_the_others():
    async def main():
        gate = BatchGate(0.05)
        a = asyncio.ensure_future(gate.wait())
        b = asyncio.ensure_future(gate.wait())
        await asyncio.sleep(0.01)
        a.cancel()
        await asyncio.gather(a, return_exceptions=True)
        await asyncio.wait_for(b, 1.0)
        assert gate.batches == 1

    asyncio.run(main())
    with pytest.raises(ValueError):
        BatchGate(-1.0)

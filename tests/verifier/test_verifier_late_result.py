"""A verification result pushed after the grace period is still taken (issue 23, item 1).

Real push channel (ZMQ over loopback, `ResultChannel` + `ResultSink`), no engine: the worker's
fallback RPC answers "not kept" (it was pushed), as the real hook does for a delivered result.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from hilm_vllm.verifier import core
from hilm_vllm.verifier.channel import ResultChannel, ResultSink
from hilm_vllm.verifier.wire import VerifyResult


class _PushedEngine:
    """collective_rpc("hilm_pop_verify") -> [None]: the result was pushed, not kept."""

    async def collective_rpc(self, name, args=()):
        assert name == "hilm_pop_verify"
        return [None]


def _verifier() -> tuple[ResultChannel, core.Verifier]:
    """A real result channel and a Verifier that reads it (no engine: `_PushedEngine`)."""
    channel = ResultChannel()
    verifier = core.Verifier.__new__(core.Verifier)
    verifier.engine, verifier.channel = _PushedEngine(), channel
    return channel, verifier


def test_a_push_after_the_grace_period_is_taken_not_dropped(monkeypatch):
    monkeypatch.setattr(core, "CHANNEL_GRACE_S", 0.05)
    monkeypatch.setattr(core, "CHANNEL_LATE_S", 10.0)

    async def main():
        channel, verifier = _verifier()
        pushed = channel.expect("late")
        sink = ResultSink(channel.address, channel.token)
        timer = threading.Timer(0.4, lambda: sink.send(VerifyResult("late", num_accepted=3)))
        timer.start()
        try:
            result = await verifier._result("late", pushed)
        finally:
            timer.join()
            channel.close()
        return result

    assert asyncio.run(main()).num_accepted == 3


def test_no_result_at_all_fails_with_a_message(monkeypatch):
    monkeypatch.setattr(core, "CHANNEL_GRACE_S", 0.02)
    monkeypatch.setattr(core, "CHANNEL_LATE_S", 0.05)

    async def main():
        channel, verifier = _verifier()
        try:
            await verifier._result("never", channel.expect("never"))
        finally:
            channel.close()

    with pytest.raises(core.HilmError, match="no result"):
        asyncio.run(main())

"""The push channel's reader: authenticated frames pass, anything else is dropped, it goes on."""

from __future__ import annotations

import asyncio

import msgspec

from hilm_vllm.server.push import PullChannel, PushSink


def test_bad_frames_are_dropped_and_the_reader_goes_on():
    async def main():
        got = []
        channel = PullChannel(got.append)
        try:
            encode = msgspec.msgpack.encode
            channel.accept(b"\xc1 not msgpack")
            channel.accept(encode(["another-token", {"x": 1}]))
            channel.accept(encode(["only one element"]))
            sink = PushSink(channel.address, channel.token)
            sink.send({"x": 2})  # a real frame over the socket, after the bad ones
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.01)
            return got, channel.rejected
        finally:
            channel.close()

    got, rejected = asyncio.run(main())
    assert got == [{"x": 2}] and rejected == 3


def test_a_verify_result_round_trips_through_the_channel_bit_exact():
    import numpy as np

    from hilm_vllm.verifier.channel import ResultChannel, ResultSink
    from hilm_vllm.verifier.wire import EmittedRow, VerifyResult, pack, unpack

    ids, probs = np.array([3, 70, 511], np.int32), np.array([0.25, 0.5, 0.25], np.float32)
    result = VerifyResult("k", 1, None, (0.5,), emitted=(EmittedRow(70, 0.35, pack(ids, "<i4"),
                                                                    pack(probs, "<f4")),))

    async def main():
        channel = ResultChannel()
        try:
            future = channel.expect("k")
            sink = ResultSink(channel.address, channel.token)  # kept: LINGER 0 drops on close
            sink.send(result)
            return await asyncio.wait_for(future, 5)
        finally:
            channel.close()

    back = asyncio.run(main())
    assert back == result
    assert unpack(back.emitted[0].probs, "<f4").tobytes() == probs.tobytes()


def test_the_socket_reader_survives_bad_frames_and_a_failing_handler():
    """Over the socket (the reader task itself, not `accept` called by hand): garbage, a frame
    with another token, and a payload the result channel cannot parse, then a good result."""
    import zmq

    from hilm_vllm.verifier.channel import ResultChannel, ResultSink
    from hilm_vllm.verifier.wire import VerifyResult

    async def main():
        channel = ResultChannel()
        try:
            future = channel.expect("good")
            raw = zmq.Context.instance().socket(zmq.PUSH)
            raw.setsockopt(zmq.LINGER, 0)
            raw.connect(channel.address)
            raw.send(b"\xc1 not msgpack")
            raw.send(msgspec.msgpack.encode(["another-token", {"key": "good"}]))
            raw.send(msgspec.msgpack.encode([channel.token, {"no_key": 1}]))  # handler raises
            raw.send(msgspec.msgpack.encode([channel.token, "not a dict"]))
            sink = ResultSink(channel.address, channel.token)
            assert sink.send(VerifyResult("good", 2))
            result = await asyncio.wait_for(future, 5)
            for _ in range(500):  # two connections: their frames may interleave either way
                if channel._pull.rejected >= 4:
                    break
                await asyncio.sleep(0.01)
            raw.close()
            return result, channel._pull.rejected
        finally:
            channel.close()

    result, rejected = asyncio.run(main())
    assert result == VerifyResult("good", 2) and rejected == 4


def test_an_oversized_frame_is_never_read_and_the_channel_goes_on(monkeypatch):
    """ZMQ_MAXMSGSIZE: a frame over the limit disconnects its sender before it is read; frames
    under it (from a fresh sender) still pass. Tokens of another type are refused, not raised."""
    import zmq

    from hilm_vllm.server import push

    monkeypatch.setattr(push, "MAX_FRAME_BYTES", 4096)

    async def main():
        got = []
        channel = PullChannel(got.append)
        ctx = zmq.Context()
        try:
            big = ctx.socket(zmq.PUSH)
            big.setsockopt(zmq.LINGER, 0)
            big.connect(channel.address)
            big.send(msgspec.msgpack.encode([channel.token, "x" * 100_000]))
            channel.accept(msgspec.msgpack.encode([12345, {"x": 0}]))
            channel.accept(msgspec.msgpack.encode([channel.token.encode(), {"x": 0}]))
            await asyncio.sleep(0.3)
            sink = PushSink(channel.address, channel.token)  # kept: LINGER 0 drops on close
            sink.send({"x": 1})
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.01)
            big.close()
            return got, channel.rejected
        finally:
            ctx.term()
            channel.close()

    got, rejected = asyncio.run(main())
    assert got == [{"x": 1}] and rejected == 2

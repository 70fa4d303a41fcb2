"""The llm-only stream over a real socket: a finished stream is read to its end, not cancelled.

grpc.aio leaks native memory for every call cancelled while a read is in flight
(grpc/grpc#43360, ~1 KB a call on the client): the router's linear RSS growth in the soak. The
servicer is a stand-in that streams a fixed answer (no engine needed); the link is the router's
own."""

from __future__ import annotations

import asyncio

import grpc

from hilm_vllm.netmodel import NetworkModel
from hilm_vllm.proto.hilm.v1 import generate_pb2, generate_pb2_grpc
from hilm_vllm.router.links import TierUsage, VerifierLink
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.tiers import Tier


class Streamer(generate_pb2_grpc.GeneratorServicer):
    def __init__(self):
        self.cancelled: list[bool] = []

    async def Generate(self, request, context):
        try:
            for i in range(3):
                await asyncio.sleep(0.01)
                yield generate_pb2.GenerateResponse(token_ids=[i],
                                                    finish_reason="length" if i == 2 else "")
            await asyncio.sleep(0.05)  # the end of the stream comes a moment after the finish
        except asyncio.CancelledError:
            self.cancelled.append(True)
            raise
        self.cancelled.append(False)


async def consume(stop_after: int) -> list[bool]:
    """Read the link's stream as the router does (it stops at the finish, or earlier when
    `stop_after` chunks are enough); returns whether the tier saw each call cancelled."""
    servicer = Streamer()
    server = grpc.aio.server()
    generate_pb2_grpc.add_GeneratorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    link = VerifierLink(Tier.LLM, f"127.0.0.1:{port}", NetworkModel(), "test", 10.0)
    try:
        for _ in range(3):
            stream = link.generate([1, 2, 3], SamplingSpec(0.0), 3, False, TierUsage())
            seen = 0
            async for _ids, finish, _logprobs in stream:
                seen += 1
                if finish or seen == stop_after:
                    break
            await stream.aclose()
        for _ in range(100):
            if len(servicer.cancelled) == 3:
                break
            await asyncio.sleep(0.02)
        return servicer.cancelled
    finally:
        await link.close()
        await server.stop(None)


def test_a_finished_stream_ends_without_a_cancel():
    assert asyncio.run(consume(stop_after=0)) == [False, False, False]


def test_a_stream_cut_short_is_cancelled():
    assert asyncio.run(consume(stop_after=1)) == [True, True, True]

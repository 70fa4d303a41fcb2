"""Results pushed from vLLM's worker process straight to the tier's API process.

The engine's own output travels worker -> engine core -> API process; a `collective_rpc` to
fetch what a hook computed takes that trip once more and waits behind every other session's
steps in the engine core (measured on the drafter: 8 sessions got 1.4 Draft calls/s in all, one
got 16). Instead the hook pushes what it computes on a ZMQ PUSH socket to a PULL socket of the
API process, at the moment it computes it, before the engine's output even leaves the worker.

Frames are msgpack: `[token, payload]`. The token is per channel (random, given to the worker
when the hook is installed), so no other local process can inject results; a frame that does
not decode or carries another token is counted and dropped, and the reader goes on.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

# The largest frame a reader takes: a step's results are kilobytes (rows are truncated, a few
# hundred entries each); anything near this is not ours.
MAX_FRAME_BYTES = 16 << 20

logger = logging.getLogger("hilm.push")

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class PushSink:
    """Worker side: never blocks the engine step (drops a frame if the API process is not
    reading; its waiter then times out and reports it)."""

    def __init__(self, address: str, token: str):
        self._socket = zmq.Context.instance().socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)
        self._token = token
        self.dropped = 0

    def send(self, payload: Any) -> bool:
        """True once the frame is queued for the API process; False if it was dropped."""
        try:
            self._socket.send(_encoder.encode([self._token, payload]), zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        return True


class PullChannel:
    """API side: a PULL socket on loopback; each accepted payload goes to `handle`."""

    def __init__(self, handle: Callable[[Any], None]):
        self._handle = handle
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        # a peer that sends more is disconnected by ZMQ before the frame is read into memory
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        port = self._socket.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.token = secrets.token_hex(16)
        self.rejected = 0  # frames that did not decode, carried another token, or failed
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def accept(self, frame: bytes) -> None:
        """One frame: decoded, authenticated, handed on; never raises."""
        try:
            token, payload = _decoder.decode(frame)
            if not (isinstance(token, str) and hmac.compare_digest(token, self.token)):
                raise ValueError("wrong token")
            self._handle(payload)
        except Exception as e:  # a bad frame must not end the reader
            self.rejected += 1
            logger.warning("dropped a malformed result frame (%s: %s)", type(e).__name__, e)

    async def _read(self) -> None:
        while True:
            self.accept(await self._socket.recv())

    def close(self) -> None:
        self._reader.cancel()
        self._socket.close()
        self._context.term()

"""What the tiers' typed async clients share: the channel and the client id (the message
converters are `hilm_vllm.codec`)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from hilm_vllm.server.security import Security, make_channel
from hilm_vllm.sessions import CLIENT_METADATA_KEY


@dataclass
class TierClient:
    """An aio channel to one tier (`make_channel`: TLS and the tier token per `security`, default
    this process's); `client_id` rides in every call's metadata (it owns the sessions it opens,
    bound to the client certificate under mutual TLS). Subclasses make their stubs in
    `_init_stubs`."""

    address: str
    client_id: str = ""
    security: Security | None = None

    def __post_init__(self):
        self.channel = make_channel(self.address, self.security)
        self._metadata = ((CLIENT_METADATA_KEY, self.client_id),) if self.client_id else ()
        self._init_stubs(self.channel)

    def _init_stubs(self, channel: grpc.aio.Channel) -> None:
        raise NotImplementedError

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

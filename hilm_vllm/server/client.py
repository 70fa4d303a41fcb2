"""What the tiers' typed async clients share: the channel and the client id (the message
converters are `hilm_vllm.codec`)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from hilm_vllm.server.grpc_util import grpc_options
from hilm_vllm.sessions import CLIENT_METADATA_KEY


@dataclass
class TierClient:
    """An insecure aio channel to one tier; `client_id` rides in every call's metadata (it owns
    the sessions it opens). Subclasses make their stubs in `_init_stubs`."""

    address: str
    client_id: str = ""

    def __post_init__(self):
        self.channel = grpc.aio.insecure_channel(self.address, options=grpc_options())
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

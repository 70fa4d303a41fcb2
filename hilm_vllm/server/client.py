"""What the tiers' typed async clients share: the channel, the client id, the message converters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from hilm_vllm.proto.hilm.v1 import common_pb2
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.server.security import Security, make_channel
from hilm_vllm.sessions import CLIENT_METADATA_KEY
from hilm_vllm.uncertainty import Gate, Perturbation, UncertaintyConfig

# Sparse distributions are, without top-k, up to the whole vocabulary per token (~1 MB for 128k
# ids): gRPC's default 4 MB receive limit would cut long blocks off.
MAX_RECEIVE_BYTES = 256 << 20
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),)

_GATES = {Gate.PERTURBED: common_pb2.PERTURBED_TEMPERATURE, Gate.ENTROPY: common_pb2.ENTROPY,
          Gate.VAR_ENTROPY: common_pb2.VAR_ENTROPY, Gate.MAX_PROB: common_pb2.MAX_PROB}
_PERTURBATIONS = {Perturbation.UNIFORM: common_pb2.UNIFORM, Perturbation.GRID: common_pb2.GRID}


def uncertainty_pb(cfg: UncertaintyConfig) -> common_pb2.UncertaintyConfig:
    return common_pb2.UncertaintyConfig(gate=_GATES[cfg.gate], num_samples=cfg.num_samples,
                                        theta_max=cfg.theta_max,
                                        perturbation=_PERTURBATIONS[cfg.perturbation])


def sampling_pb(spec: SamplingSpec) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(temperature=spec.temperature, top_k=spec.top_k,
                                   top_p=spec.top_p)
    if spec.seed is not None:
        pb.seed = spec.seed
    return pb


def prompt_pb(prompt: Sequence[int] | str) -> common_pb2.Prompt:
    if isinstance(prompt, str):
        return common_pb2.Prompt(text=prompt)
    return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=list(prompt)))


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
        self.channel = make_channel(self.address, self.security, options=CHANNEL_OPTIONS)
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

"""What the router's end-to-end tests share: an OpenAI client on a router, its usage block,
gRPC Generate, and the first tokens of many seeded requests (the chi-square tests' samples)."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import openai

from hilm_vllm.proto.hilm.v1 import common_pb2, generate_pb2, generate_pb2_grpc
from hilm_vllm.sampling import SamplingSpec


def client(r) -> openai.OpenAI:
    return openai.OpenAI(base_url=r.http_url + "/v1", api_key="unused", max_retries=0)


def hilm_usage(usage) -> dict:
    return usage.model_extra["hilm"]


async def generate(address: str, prompt: list[int], spec: SamplingSpec, max_tokens: int,
                   policy: str, ignore_eos: bool = True, **options) -> list[int]:
    """gRPC Generate: the token ids the router streams back. `options`: block_size, optimistic
    (GenerateRequest's optional fields)."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = generate_pb2_grpc.GeneratorStub(ch)
        sampling = common_pb2.SamplingParams(temperature=spec.temperature, top_k=spec.top_k,
                                             top_p=spec.top_p)
        if spec.seed is not None:
            sampling.seed = spec.seed
        ids = []
        async for r in stub.Generate(generate_pb2.GenerateRequest(
                prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=prompt)),
                sampling=sampling, max_tokens=max_tokens, ignore_eos=ignore_eos,
                policy=policy, **options)):
            ids += r.token_ids
        return ids


def seeded_tokens(address: str, prompt: list[int], policy: str, spec: SamplingSpec,
                  seeds, max_tokens: int, keep: slice = slice(None), ignore_eos: bool = True,
                  **options) -> list[tuple[int, ...]]:
    """gRPC Generate once per seed (`spec` with that seed), at most 8 in flight: the tokens
    `keep` of each, in seed order. `options`: GenerateRequest's fields (block_size, ...)."""
    async def run() -> list[tuple[int, ...]]:
        sem = asyncio.Semaphore(8)

        async def one(seed: int) -> tuple[int, ...]:
            async with sem:
                ids = await generate(address, prompt, dataclasses.replace(spec, seed=seed),
                                     max_tokens, policy, ignore_eos, **options)
                return tuple(ids[keep])

        return await asyncio.gather(*(one(s) for s in seeds))

    return asyncio.run(run())


def first_tokens(address: str, prompt: list[int], policy: str, n: int, top_k: int,
                 first_seed: int) -> list[int]:
    """The first token of n requests at T = 1 (seeds first_seed .. first_seed + n - 1), at most
    8 in flight."""
    return [t[0] for t in seeded_tokens(address, prompt, policy, SamplingSpec(1.0, top_k),
                                        range(first_seed, first_seed + n), 1)]

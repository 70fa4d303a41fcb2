"""An LLM tier across two CPU workers (`--tensor-parallel-size 2`, vLLM's CPU backend, one core
per rank: `engine_env.rank_binding` turns the tier's cores into "0|1") under the verifier's
hook: rank 0 alone pushes each result; `spec` through it gives the same tokens as llm-only on
a TP = 1 tier at T = 0, and the LLM's joint law of the 2nd and 3rd tokens at T = 1."""

from __future__ import annotations

import asyncio
import os

import pytest

from hilm_vllm.launch import TierProcess
from hilm_vllm.sampling import SamplingSpec
from tests.router.helpers import generate, seeded_tokens
from tests.router.test_router import (N_SEEDS, _prompts, law_pvalue, pair_distribution,
                                      router)
from tests.verifier.helpers import ENGINE_FLAGS


@pytest.mark.slow
def test_a_tp2_llm_tier_is_token_identical_to_tp1_and_keeps_the_llms_law(tiny_zoo):
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0,1")  # the tier's cores, split per rank
    tp2 = TierProcess.start("llm", ["--model", str(tiny_zoo.llm), *ENGINE_FLAGS,
                                    "--tensor-parallel-size", "2"], env=env)
    tp1 = TierProcess.start("llm", ["--model", str(tiny_zoo.llm), *ENGINE_FLAGS])
    slm = TierProcess.start("slm", ["--model", str(tiny_zoo.slm), *ENGINE_FLAGS])
    try:
        for p in (tp2, tp1, slm):
            p.wait_healthy(600)
        with router(tiny_zoo, tp2, slm) as r2, router(tiny_zoo, tp1) as r1:
            prompts = _prompts(tiny_zoo, 6)
            greedy = SamplingSpec(temperature=0.0)

            async def run(address, policy):
                return [await generate(address, p, greedy, 16, policy) for p in prompts]

            expected = asyncio.run(run(r1.grpc_address, "llm-only"))
            assert asyncio.run(run(r2.grpc_address, "spec")) == expected
            assert asyncio.run(run(r2.grpc_address, "llm-only")) == expected

            prompt = prompts[0]
            spec = SamplingSpec(temperature=1.0, top_k=3)
            joint = pair_distribution(tiny_zoo.llm, prompt, spec)

            got = seeded_tokens(r2.grpc_address, prompt, "spec", spec,
                                range(7000, 7000 + N_SEEDS), 3, slice(1, 3), block_size=2)
            assert law_pvalue(got, joint) > 1e-3
    finally:
        for p in (slm, tp1, tp2):
            p.stop()

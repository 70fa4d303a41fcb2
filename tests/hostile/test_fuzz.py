"""Fuzzing, bounded for CI (HILM_FUZZ_INPUTS inputs per service, 40 unless set; `make fuzz` runs
10,000): the drafter's and the verifier's gRPC services and the router's gRPC Generate with
hypothesis, the router's HTTP API with schemathesis against its own /openapi.json. Pass: no tier
gone, no server error for any input, and a normal request served afterwards."""

from __future__ import annotations

import asyncio
import time

import openai
import schemathesis
from hypothesis import given
from hypothesis import strategies as st
from schemathesis import GenerationMode

from hilm_vllm.drafter.client import DrafterClient
from hilm_vllm.proto.hilm.v1 import common_pb2, drafter_pb2, generate_pb2, verifier_pb2
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.server.security import make_channel
from hilm_vllm.sessions import CLIENT_METADATA_KEY
from hilm_vllm.verifier.client import VerifierClient
from tests.hostile.harness import API_KEY
from tests.hostile.harness import (GrpcFuzzer, Tally, _ints, drive, fuzz_settings,
                                   inputs_per_service, messages, session_fields)

PROMPT = [0, 306, 295, 85, 85, 14, 94, 299]

# Prompts that open a session more often than random ones (token ids of the tiny vocabulary).
_PROMPTS = {"prompt": st.one_of(
    st.lists(st.integers(0, 400), min_size=1, max_size=40).map(
        lambda ids: common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=ids))),
    messages(common_pb2.Prompt))}


# Valid sampling and uncertainty settings half the time, so that inputs get past them.
_SAMPLING = st.one_of(st.builds(
    lambda t, k, p, seed: common_pb2.SamplingParams(temperature=t, top_k=k, top_p=p, seed=seed),
    st.floats(0, 2), st.integers(0, 50), st.floats(0.05, 1), st.integers(0, 1 << 40)),
    messages(common_pb2.SamplingParams))
_UNCERTAINTY = st.one_of(st.builds(
    lambda g, k, th, pe: common_pb2.UncertaintyConfig(gate=g, num_samples=k, theta_max=th,
                                                      perturbation=pe),
    st.integers(0, 4), st.integers(0, 64), st.floats(0, 4), st.integers(0, 2)),
    messages(common_pb2.UncertaintyConfig))
_VALID = {**_PROMPTS, "sampling": _SAMPLING, "uncertainty": _UNCERTAINTY}


def _small_ints():
    return st.one_of(st.integers(0, 8), _ints(-(1 << 31), (1 << 31) - 1))


def _check(tally: Tally, tallies, *procs) -> None:
    gone = [p.tier for p in procs if p.proc.poll() is not None]
    tally.crashes = len(gone)
    tallies.flush()
    assert not gone, f"tiers gone: {gone}"
    assert tally.server_errors == 0, "\n".join(tally.examples)
    assert tally.inputs >= inputs_per_service()


def _service(module, service: str, plan: dict) -> list:
    """The fuzzer's call table of `service` (module: its _pb2): method name -> (weight, fields
    strategy); request/response classes and streaming come from the service's descriptor."""
    from google.protobuf.message_factory import GetMessageClass

    svc = module.DESCRIPTOR.services_by_name[service]
    return [(f"/{svc.full_name}/{m.name}", GetMessageClass(m.input_type),
             GetMessageClass(m.output_type), m.server_streaming, *plan[m.name])
            for m in svc.methods if m.name in plan]


def _run_grpc(stack, tally: Tally, address: str, calls) -> None:
    """Fuzz `calls`; the sessions the fuzzer opened are closed with the table's CloseSession."""
    close = next(c[:3] for c in calls if c[0].endswith("/CloseSession"))
    t0 = time.perf_counter()
    with make_channel(address, stack.client, aio=False) as channel:
        fuzzer = GrpcFuzzer(channel, tally, ((CLIENT_METADATA_KEY, "fuzzer"),), close)
        drive(fuzzer, calls, inputs_per_service())
        fuzzer.live.clear()
    tally.seconds = round(time.perf_counter() - t0, 1)


def test_fuzz_the_drafter(stack, tallies):
    tally = Tally("slm Drafter")
    tallies.append(tally)

    def draft_fields(f):
        return {**session_fields(f), "max_tokens": _small_ints()}

    calls = _service(drafter_pb2, "Drafter", {
        "OpenSession": (3, _VALID), "Draft": (4, draft_fields), "Rollback": (2, session_fields),
        "Append": (2, session_fields), "CloseSession": (1, session_fields)})
    _run_grpc(stack, tally, stack.slm.grpc_address, calls)
    _check(tally, tallies, stack.slm)

    async def normal():
        async with DrafterClient(stack.slm.grpc_address, "after-fuzz", stack.client) as c:
            s = await c.open_session(PROMPT, SamplingSpec(temperature=0.0))
            r = await c.draft(s.session_id, s.position, 3)
            await c.close_session(s.session_id)
            return r
    assert len(asyncio.run(normal()).tokens) >= 1


def test_fuzz_the_verifier(stack, tallies):
    tally = Tally("llm Verifier + Generator")
    tallies.append(tally)

    def generate_fields(_f):
        # the LLM tier's own generation has no cap but max-model-len (0 = up to it): keep valid
        # inputs cheap, 1..8 tokens; negative ones test the check
        return {**_VALID, "max_tokens": st.one_of(st.integers(1, 8), st.integers(-5, -1),
                                                  st.just(-(1 << 31)))}

    calls = _service(verifier_pb2, "Verifier", {
        "OpenSession": (3, _VALID), "Verify": (5, session_fields),
        "CloseSession": (1, session_fields)}) + _service(generate_pb2, "Generator", {
            "Generate": (1, generate_fields)})
    _run_grpc(stack, tally, stack.llm.grpc_address, calls)
    _check(tally, tallies, stack.llm)

    async def normal():
        async with VerifierClient(stack.llm.grpc_address, "after-fuzz", stack.client) as c:
            s = await c.open_session(PROMPT, SamplingSpec(temperature=0.0))
            r = await c.verify(s.session_id, s.position)
            await c.close_session(s.session_id)
            return r
    assert asyncio.run(normal()).position == len(PROMPT) + 1


def test_fuzz_the_routers_grpc_generate(stack, tallies):
    tally = Tally("router Generate")
    tallies.append(tally)
    fields = {**_VALID, "policy": st.one_of(
        st.sampled_from(["", "spec", "llm-only", "hlm", "uhlm", "rand", "hilm", "cascade"]),
        st.text(max_size=12))}
    calls = [("/hilm.v1.Generator/Generate", generate_pb2.GenerateRequest,
              generate_pb2.GenerateResponse, True, 1, fields)]
    t0 = time.perf_counter()
    with make_channel(stack.router.grpc_address, _api_key_client(stack), aio=False) as channel:
        drive(GrpcFuzzer(channel, tally), calls, inputs_per_service())
    tally.seconds = round(time.perf_counter() - t0, 1)
    _check(tally, tallies, stack.router, stack.llm, stack.slm)
    _normal_completion(stack)


def _api_key_client(stack):
    """The router's gRPC Generate takes the API key as its bearer token (and the TLS client
    certificate of its CA)."""
    from dataclasses import replace

    return replace(stack.client, token=API_KEY)


def _normal_completion(stack) -> None:
    client = openai.OpenAI(base_url=stack.router.http_url + "/v1", api_key=API_KEY,
                           max_retries=0)
    out = client.completions.create(model="spec", prompt="def f(x):", max_tokens=4)
    assert out.usage.completion_tokens >= 1


def test_fuzz_the_http_api_from_its_openapi_schema(stack, tallies):
    tally = Tally("router HTTP (OpenAI API)")
    tallies.append(tally)
    base = stack.router.http_url
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    ops = [r.ok() for r in schema.get_all_operations()]
    strategy = st.one_of(*[op.as_strategy(mode) for op in ops
                           for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
    t0 = time.perf_counter()

    @fuzz_settings(inputs_per_service())
    @given(case=strategy)
    def one(case):
        try:
            response = case.call(base_url=base, headers=headers, timeout=120)
        except Exception as e:  # noqa: BLE001 - no answer at all counts as a server error
            tally.http(None, f"{case.method} {case.path}", repr(e))
            return
        tally.http(response.status_code, f"{case.method} {case.path} {case.body!r}"[:300],
                   response.text[:300])

    one()
    tally.seconds = round(time.perf_counter() - t0, 1)
    _check(tally, tallies, stack.router, stack.llm, stack.slm)
    _normal_completion(stack)

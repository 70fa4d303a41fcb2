"""`hilm-serve --tier ilm` over real gRPC: sessions, retries, every bad input, Generate.

Each bad input must come back with its status code and a message that says what to fix, and
leave the server serving and other sessions untouched (a witness session checks that).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2

from hilm_vllm.proto.hilm.v1 import (common_pb2, generate_pb2, generate_pb2_grpc, verifier_pb2,
                                     verifier_pb2_grpc)
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.codec import prompt_to_pb as prompt_pb
from hilm_vllm.verifier.client import VerifierClient
from tests.verifier.helpers import SESSION_TTL_S, served

PROMPT = [0, 306, 295, 85, 85, 14, 94, 299, 287, 402]
SPEC = SamplingSpec(temperature=1.0)
MAX_SESSIONS = 48
C = grpc.StatusCode


@pytest.fixture(scope="module")
def ilm(tiny_zoo):
    with served("ilm", tiny_zoo.ilm, "--max-sessions", str(MAX_SESSIONS)) as proc:
        yield proc


def run(ilm, body, client_id="alice"):
    async def main():
        async with VerifierClient(ilm.grpc_address, client_id) as client:
            return await body(client)

    return asyncio.run(main())


def one_hot(tokens):
    return [([x], [1.0]) for x in tokens]


def test_retried_verify_returns_the_same_reply(ilm):
    async def body(c):
        s = await c.open_session(PROMPT, SPEC)  # T = 1, unseeded: a recomputation would differ
        draft = [5, 6, 7, 8]
        dists = [([x, 9], [0.5, 0.5]) for x in draft]
        first = await c.verify(s.session_id, s.position, draft, dists, append=[3])
        again = await c.verify(s.session_id, s.position, draft, dists, append=[3])
        nxt = await c.verify(s.session_id, first.position, [9], one_hot([9]))
        with pytest.raises(grpc.aio.AioRpcError) as stale:  # a different call at the old one
            await c.verify(s.session_id, s.position, [5], one_hot([5]))
        return s, first, again, nxt, stale.value

    s, first, again, nxt, stale = run(ilm, body)
    assert (again.num_accepted, again.next_token, again.position) == \
        (first.num_accepted, first.next_token, first.position)
    assert first.position == s.position + 1 + first.num_accepted + 1
    assert nxt.position == first.position + nxt.num_accepted + 1
    assert stale.code() == C.FAILED_PRECONDITION and f"position {nxt.position}" in stale.details()


def test_verify_returns_target_probs_and_timings_when_asked(ilm):
    async def body(c):
        s = await c.open_session("def foo(x):", SamplingSpec(0.0))
        draft = [5, 6]
        return await c.verify(s.session_id, s.position, draft, one_hot(draft),
                              want_target_probs=True)

    r = run(ilm, body)
    assert len(r.target_probs) == 2 and all(p in (0.0, 1.0) for p in r.target_probs)  # T = 0
    t = r.timings
    assert t.forward_ms > 0 and t.queue_ms >= 0 and t.total_ms >= t.forward_ms


# ---- bad input: (name, request builder, code, message pattern) ----------------------------------

async def _open(c, prompt=PROMPT):
    return await c.open_session(prompt, SPEC)


async def unknown(c):
    await c.verify("0123456789abcdef", 10, [5], one_hot([5]))


async def wrong_position(c):
    s = await _open(c)
    await c.verify(s.session_id, s.position + 3, [5], one_hot([5]))


async def draft_outside_vocab(c):
    s = await _open(c)
    await c.verify(s.session_id, s.position, [512], one_hot([512]))


async def append_outside_vocab(c):
    s = await _open(c)
    await c.verify(s.session_id, s.position, [5], one_hot([5]), append=[-1])


def _with_dist(ids, probs, draft=5):
    async def build(c):
        s = await _open(c)
        await c.verify(s.session_id, s.position, [draft], [(ids, probs)])

    return build


async def mismatched_lengths(c):
    s = await _open(c)
    await c.verify(s.session_id, s.position, [5, 6], one_hot([5]))


async def block_over_limit(c):
    s = await _open(c)
    draft = list(range(2, 19))  # 17 > the default --max-block 16
    await c.verify(s.session_id, s.position, draft, one_hot(draft))


async def context_over_max_model_len(c):
    s = await _open(c, [0] + [7] * 1019)  # 1020 + 4 drafts + 1 next > 1024
    await c.verify(s.session_id, s.position, [5, 6, 7, 8], one_hot([5, 6, 7, 8]))


async def prompt_outside_vocab(c):
    await _open(c, [0, 600])


async def negative_temperature(c):
    request = verifier_pb2.OpenVerifierSessionRequest(
        prompt=prompt_pb(PROMPT), sampling=common_pb2.SamplingParams(temperature=-1.0))
    await verifier_pb2_grpc.VerifierStub(c.channel).OpenSession(request)


async def router_policy_on_generate(c):
    request = generate_pb2.GenerateRequest(prompt=prompt_pb(PROMPT), policy="hilm")
    async for _ in generate_pb2_grpc.GeneratorStub(c.channel).Generate(request):
        pass


async def min_tokens_past_the_context(c):
    """Found by fuzzing: vLLM refuses it deep inside the engine (was INTERNAL)."""
    request = generate_pb2.GenerateRequest(prompt=prompt_pb(PROMPT), min_tokens=105460520)
    async for _ in generate_pb2_grpc.GeneratorStub(c.channel).Generate(request):
        pass


BAD_INPUTS = [
    (unknown, C.NOT_FOUND, r"does not exist or expired"),
    (wrong_position, C.FAILED_PRECONDITION, r"session is at position 10.*resend with position=10"),
    (draft_outside_vocab, C.INVALID_ARGUMENT, r"draft_token_ids has token id 512 outside"),
    (append_outside_vocab, C.INVALID_ARGUMENT, r"append_token_ids has token id -1 outside"),
    (_with_dist([5, 6], [1.5, -0.5]), C.INVALID_ARGUMENT, r"draft_dists\[0\]: .*negative"),
    (_with_dist([5, 6], [math.nan, 1.0]), C.INVALID_ARGUMENT, r"draft_dists\[0\]: .*NaN"),
    (_with_dist([5, 6], [0.7, 0.7]), C.INVALID_ARGUMENT, r"draft_dists\[0\]: .*sum to 1\.4"),
    (_with_dist([6, 7], [0.5, 0.5]), C.INVALID_ARGUMENT, r"draft token 5 is missing"),
    (_with_dist([5, 5], [0.5, 0.5]), C.INVALID_ARGUMENT, r"lists a token id twice"),
    (mismatched_lengths, C.INVALID_ARGUMENT, r"2 draft tokens but 1 draft distributions"),
    (block_over_limit, C.INVALID_ARGUMENT, r"17 tokens is over this tier's limit of 16"),
    (context_over_max_model_len, C.INVALID_ARGUMENT, r"reach 1025 .*over max-model-len 1024"),
    (prompt_outside_vocab, C.INVALID_ARGUMENT, r"prompt has token id 600 outside"),
    (negative_temperature, C.INVALID_ARGUMENT, r"temperature must be a finite number >= 0"),
    (router_policy_on_generate, C.INVALID_ARGUMENT, r"router option"),
    (min_tokens_past_the_context, C.INVALID_ARGUMENT, r"min_tokens must be in \[0, \d+\]"),
]


@pytest.fixture(scope="module")
def witness(ilm):
    """A session opened before the bad inputs, verified after each of them."""
    s = run(ilm, _open)
    return {"id": s.session_id, "position": s.position}


@pytest.mark.parametrize("build, code, pattern", BAD_INPUTS, ids=[b[0].__name__ for b in
                                                                    BAD_INPUTS])
def test_bad_input_is_refused_and_the_server_serves_on(ilm, witness, build, code, pattern):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        run(ilm, build)
    assert refused.value.code() == code, refused.value.details()
    assert re.search(pattern, refused.value.details()), refused.value.details()
    reply = run(ilm, lambda c: c.verify(witness["id"], witness["position"], [5], one_hot([5])))
    assert reply.position == witness["position"] + reply.num_accepted + 1
    witness["position"] = reply.position
    assert ilm.health() == health_pb2.HealthCheckResponse.SERVING


def test_another_clients_session_is_refused(ilm):
    s = run(ilm, _open, client_id="alice")
    for client in ("mallory", ""):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            run(ilm, lambda c: c.verify(s.session_id, s.position, [5], one_hot([5])), client)
        assert refused.value.code() == C.PERMISSION_DENIED
        assert "belongs to another client" in refused.value.details()
    assert run(ilm, lambda c: c.verify(s.session_id, s.position, [5], one_hot([5]))).position


def test_closed_and_expired_sessions_are_not_found(ilm):
    async def body(c):
        closed, idle, busy = await _open(c), await _open(c), await _open(c)
        await c.close_session(closed.session_id)
        position = busy.position
        deadline = time.monotonic() + SESSION_TTL_S + 1
        while time.monotonic() < deadline:  # keep one session in use while the other idles
            position = (await c.verify(busy.session_id, position, [5], one_hot([5]))).position
            await asyncio.sleep(1)
        codes = []
        for s in (closed, idle):
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await c.verify(s.session_id, s.position, [5], one_hot([5]))
            codes.append(gone.value.code())
        return codes

    assert run(ilm, body) == [C.NOT_FOUND, C.NOT_FOUND]


def test_sessions_are_bounded_in_number(ilm):
    async def body(c):
        opened, error = [], None
        try:
            for _ in range(MAX_SESSIONS + 1):
                opened.append(await _open(c))
        except grpc.aio.AioRpcError as e:
            error = e
        for s in opened:
            await c.close_session(s.session_id)
        return len(opened), error

    count, error = run(ilm, body)
    assert count <= MAX_SESSIONS and error is not None
    assert error.code() == C.RESOURCE_EXHAUSTED and "CloseSession" in error.details()


def test_generate_streams_and_a_cancelled_stream_is_aborted(ilm):
    async def body(c):
        chunks = [ch async for ch in c.generate(PROMPT, SamplingSpec(0.0), max_tokens=12,
                                                ignore_eos=True)]
        stream = c.generate(PROMPT, SamplingSpec(1.0), max_tokens=1000, ignore_eos=True)
        async for _ in stream:
            break
        await stream.aclose()  # cancels the RPC
        return chunks

    before = engine_metric(ilm, "vllm:generation_tokens_total")
    chunks = run(ilm, body)
    assert sum(len(ch.token_ids) for ch in chunks) == 12
    assert chunks[-1].finish_reason == "length" and all(ch.finish_reason is None
                                                        for ch in chunks[:-1])
    assert all(ch.text for ch in chunks)
    deadline = time.monotonic() + 60
    while engine_metric(ilm, "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # Had the engine kept generating for the vanished client, all 1000 tokens would count.
    assert engine_metric(ilm, "vllm:generation_tokens_total") - before < 12 + 200


def engine_metric(proc, name: str) -> float:
    body = urllib.request.urlopen(proc.metrics_url, timeout=10).read().decode()
    values = re.findall(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", body, re.M)
    assert values, f"{name} is not exported"
    return sum(float(v) for v in values)

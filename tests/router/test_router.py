"""The router end to end: real llm, ilm and slm tiers (tiny zoo), a real router process, the
official `openai` client over HTTP and gRPC `Generate`, all on loopback with ports picked by the
OS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from scipy import stats

from hilm_vllm.launch import TierProcess
from hilm_vllm import codec
from hilm_vllm.proto.hilm.v1 import generate_pb2, generate_pb2_grpc
from hilm_vllm.sampling import SamplingSpec
from tests.router.helpers import client, first_tokens, generate, hilm_usage, seeded_tokens
from tests.verifier.helpers import ENGINE_FLAGS, next_probs

PROMPT = "def read_config(path):\n    "
ALL_POLICIES = ["llm-only", "hlm", "spec", "uhlm", "hilm", "cascade", "rand"]
LOSSLESS = ["llm-only", "hlm", "spec", "cascade"]


# JSON without free whitespace, so that the tiny model's constrained outputs end: an engine
# setting in vLLM 0.32, not a request field
STRUCTURED_FLAGS = ["--structured-outputs-config",
                    json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})]


@contextlib.contextmanager
def tier(name: str, model_dir, *flags: str):
    proc = TierProcess.start(name, ["--model", str(model_dir), *ENGINE_FLAGS, *flags])
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()


@contextlib.contextmanager
def router(zoo, llm, slm=None, ilm=None, *flags: str):
    args = ["--model", str(zoo.llm), "--llm", llm.grpc_address, "--port", "0",
            "--metrics-port", "0", *flags]
    if slm is not None:
        args += ["--slm", slm.grpc_address]
    if ilm is not None:
        args += ["--ilm", ilm.grpc_address]
    # a short stats interval, so that the SpecDecoding log line can be seen in a test
    env = dict(os.environ, VLLM_LOG_STATS_INTERVAL="2")
    proc = TierProcess.start("router", args, env=env)
    try:
        proc.wait_healthy(120)
        yield proc
    finally:
        assert proc.stop() == 0, proc.tail()


@pytest.fixture(scope="module")
def tiers(tiny_zoo):
    # every tier of a session with the same structured-output settings (they shape the grammar)
    with tier("llm", tiny_zoo.llm, *STRUCTURED_FLAGS) as llm, \
            tier("ilm", tiny_zoo.ilm, *STRUCTURED_FLAGS) as ilm, \
            tier("slm", tiny_zoo.slm, *STRUCTURED_FLAGS) as slm:
        yield llm, ilm, slm


@pytest.fixture(scope="module")
def served(tiny_zoo, tiers):
    llm, ilm, slm = tiers
    with router(tiny_zoo, llm, slm, ilm, "--policy", "hilm", "--t1", "0.3", "--t2", "0.8",
                "--t-ilm", "0.6", "--block-size", "3") as r:
        yield r


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_every_policy_over_http_streaming_and_not(served, policy):
    c = client(served)
    out = c.completions.create(model=policy, prompt=PROMPT, max_tokens=20, temperature=1.0,
                               seed=11, extra_body={"ignore_eos": True})
    u = out.usage
    assert u.completion_tokens == 20 and out.choices[0].finish_reason == "length"
    assert out.choices[0].text
    h = hilm_usage(u)
    assert h["policy"] == policy and h["degraded"] == []
    if policy == "llm-only":
        assert h["llm_forwards"] == 20 and h["messages"]["slm"] == 0
    else:
        # every generated token was skipped, accepted, or emitted by a verifier
        assert h["rounds"] >= 1 and h["messages"]["slm"] >= h["rounds"]
        emitted = h["skips"] + h["llm_accepted"] + h["llm_messages"]
        if policy in ("hilm", "cascade"):
            emitted += h["ilm_accepted"] + h["ilm_messages"]
        assert emitted >= 20
    if policy in ("hlm", "spec", "cascade"):
        assert h["skips"] == 0 and h["llm_messages"] >= 1
    if policy == "cascade":
        assert h["ilm_messages"] == h["llm_messages"] >= 1

    chunks = list(c.completions.create(model=policy, prompt=PROMPT, max_tokens=20,
                                       temperature=1.0, seed=11, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert chunks[-1].usage.completion_tokens == 20
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    # same seed, same tokens: streaming changes nothing but the delivery
    assert text == out.choices[0].text


def test_chat_completions_use_the_chat_template(served):
    c = client(served)
    msgs = [{"role": "user", "content": "Write a loop."}]
    out = c.chat.completions.create(model="spec", messages=msgs, max_tokens=8, seed=1)
    assert out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens > len("Write a loop.") // 4  # the template's tokens count
    chunks = list(c.chat.completions.create(model="spec", messages=msgs, max_tokens=8, seed=1,
                                            stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == \
        out.choices[0].message.content
    models = {m.id for m in c.models.list()}
    assert set(ALL_POLICIES) <= models


def _prompts(zoo, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(zoo.llm))
    return [tok.encode(p["prompt"])[-40:] for p in zoo.heldout_prompts(n)]


@pytest.mark.parametrize("optimistic", [False, True])
def test_lossless_policies_are_token_identical_to_llm_only_at_t0(served, tiny_zoo, optimistic):
    prompts = _prompts(tiny_zoo, 3)
    greedy = SamplingSpec(temperature=0.0)

    async def run():
        out = {}
        for policy in LOSSLESS:
            out[policy] = [await generate(served.grpc_address, p, greedy, 32, policy,
                                           optimistic=optimistic) for p in prompts]
        return out

    out = asyncio.run(run())
    for policy in LOSSLESS[1:]:
        assert out[policy] == out["llm-only"], policy
    assert all(len(x) == 32 for x in out["llm-only"])


N_SEEDS = 400
POWER_P_VALUE = 1e-3  # the same counts against the drafter's law must be rejected this hard


def law_pvalue(samples: list, law: dict) -> float:
    """Chi-square p-value of `samples` against `law` (outcome -> probability): cells with fewer
    than 5 expected pooled into one; 0.0 when a sample has probability 0 under `law`."""
    n = len(samples)
    if any(law.get(s, 0.0) <= 0 for s in samples):
        return 0.0
    big = [c for c in law if law[c] * n >= 5]
    observed = np.array([samples.count(c) for c in big] + [sum(s not in big for s in samples)])
    expected = np.array([law[c] for c in big] + [max(0.0, 1 - sum(law[c] for c in big))]) * n
    keep = expected > 1e-9
    f_exp = expected[keep] / expected[keep].sum() * observed[keep].sum()  # float rounding
    return float(stats.chisquare(observed[keep], f_exp).pvalue)


def test_lossless_policies_follow_the_llm_distribution_at_t1(served, tiny_zoo):
    """The first token of N seeded requests per policy against the LLM's p (transformers):
    chi-square, p > 1e-3. top_k = 8 keeps the expected counts large. Power: the same counts
    against the drafter's own law (what a policy that kept its drafts unverified would give)
    are rejected with p < 1e-3, so the test can tell the two apart."""
    prompt = _prompts(tiny_zoo, 1)[0]
    spec = SamplingSpec(temperature=1.0, top_k=8)
    p = next_probs(tiny_zoo.llm, prompt, spec).numpy().astype(np.float64)
    q = next_probs(tiny_zoo.slm, prompt, spec).numpy().astype(np.float64)
    target = {int(t): p[t] / p.sum() for t in np.nonzero(p)[0]}
    drafter = {int(t): q[t] / q.sum() for t in np.nonzero(q)[0]}

    for policy in LOSSLESS:
        tokens = first_tokens(served.grpc_address, prompt, policy, N_SEEDS, 8, 1000)
        assert set(tokens) <= set(target), policy
        pvalue = law_pvalue(tokens, target)
        assert pvalue > 1e-3, (policy, pvalue, sorted(target.items()))
        assert law_pvalue(tokens, drafter) < POWER_P_VALUE, (
            f"power: {policy}'s first tokens do not reject the drafter's law")


def pair_distribution(model_dir, prompt: list[int], spec: SamplingSpec) -> dict[tuple, float]:
    """P(x1, x2): a model's joint law of the 2nd and 3rd tokens (x0 summed out)."""
    joint: dict[tuple, float] = {}
    p0 = next_probs(model_dir, prompt, spec).double()
    for x0 in p0.nonzero().flatten().tolist():
        p1 = next_probs(model_dir, prompt + [x0], spec).double()
        for x1 in p1.nonzero().flatten().tolist():
            p2 = next_probs(model_dir, prompt + [x0, x1], spec).double()
            for x2 in p2.nonzero().flatten().tolist():
                joint[(x1, x2)] = joint.get((x1, x2), 0.0) + float(p0[x0] * p1[x1] * p2[x2])
    return joint


@pytest.mark.parametrize("block_size, top_p", [(1, 1.0), (2, 0.8)])
def test_lossless_policies_keep_the_llm_distribution_beyond_the_first_token(
        served, tiny_zoo, block_size, top_p):
    """The pair (x1, x2) of spec and cascade end to end, at T = 1 with top-k (and top-p).
    k = 1: the 2nd and 3rd tokens come through the optimistic path (the bonus matched the
    drafter's next token, whose follower becomes the next block) whenever the first block is
    accepted; k = 2: through the residual after a rejection inside a block, the bonus after a
    full one, and the drafter's rollback. Chi-square against the LLM's joint law, cells with
    fewer than 5 expected merged; p > 1e-3. Power: the same pairs against the drafter's joint
    law are rejected (p < 1e-3). Coverage, from the router's counters over the run: with k = 1,
    drafts made ahead were kept as next blocks (the optimistic path ran); with k = 2, the LLM
    both accepted and rejected drafts (the residual and the bonus paths ran)."""
    prompt = _prompts(tiny_zoo, 1)[0]
    spec = SamplingSpec(temperature=1.0, top_k=3, top_p=top_p)
    joint = pair_distribution(tiny_zoo.llm, prompt, spec)
    drafter_joint = pair_distribution(tiny_zoo.slm, prompt, spec)


    def counters() -> dict[str, float]:
        text = _get(served.metrics_url)[1]
        return {"kept": _samples(text, "hilm_router_optimistic_drafts_total").get(
                    '{outcome="kept"}', 0.0),
                "verified": sum(_samples(text, "hilm_router_verified_drafts_total").values()),
                "accepted": sum(_samples(text, "hilm_router_accepted_drafts_total").values())}

    for policy in ("spec", "cascade"):
        before = counters()
        got = seeded_tokens(served.grpc_address, prompt, policy, spec,
                            range(5000, 5000 + N_SEEDS), 3, slice(1, 3),
                            block_size=block_size, optimistic=True)
        used = {k: v - before[k] for k, v in counters().items()}
        assert set(got) <= set(joint), policy  # no pair the LLM cannot produce
        pvalue = law_pvalue(got, joint)
        assert pvalue > 1e-3, (policy, pvalue)
        assert law_pvalue(got, drafter_joint) < POWER_P_VALUE, (
            f"power: {policy}'s pairs do not reject the drafter's joint law")
        if block_size == 1:
            assert used["kept"] > 0, f"{policy}: no draft made ahead became a block"
        else:
            assert 0 < used["accepted"] < used["verified"], (policy, used)  # both paths


def test_optimistic_drafting_is_used_and_reported(served):
    """The optimistic path runs (its drafts are counted in usage.hilm) and turning it off per
    request stops it."""
    c = client(served)

    def usage(optimistic: bool) -> dict:
        out = c.completions.create(model="spec", prompt=PROMPT, max_tokens=24, temperature=0,
                                   extra_body={"ignore_eos": True, "optimistic": optimistic,
                                               "block_size": 2})
        return hilm_usage(out.usage)

    on, off = usage(True), usage(False)
    assert on["optimistic_drafts"] > 0 and on["optimistic_kept"] > 0
    assert off["optimistic_drafts"] == 0 and off["optimistic_kept"] == 0


def scrape(proc, name: str) -> float:
    import re

    text = urllib.request.urlopen(proc.metrics_url, timeout=10).read().decode()
    m = re.search(rf"^{name} ([-+\deE.]+)$", text, re.M)
    assert m, f"{name} is not on the {proc.tier} tier's /metrics"
    return float(m.group(1))


def test_a_client_that_leaves_mid_stream_leaves_nothing_on_any_tier(served, tiers):
    """Close an SSE stream after its first chunks: the router closes the request's sessions on
    every tier, and the drafter holds no draft record (nor does a draft-ahead linger)."""
    import time

    llm, ilm, slm = tiers
    for policy in ("hilm", "spec", "cascade"):
        body = {"model": policy, "prompt": PROMPT, "max_tokens": 200, "temperature": 1.0,
                "ignore_eos": True, "stream": True, "block_size": 3}
        request = urllib.request.Request(served.http_url + "/v1/completions",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            for _ in range(3):
                assert response.readline()  # a few SSE lines, then hang up mid-generation
    names = {llm: "hilm_verifier_sessions", ilm: "hilm_verifier_sessions",
             slm: "hilm_drafter_sessions"}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(scrape(p, n) for p, n in names.items()):
        time.sleep(0.5)
    assert {p.tier: scrape(p, n) for p, n in names.items()} == {"llm": 0, "ilm": 0, "slm": 0}
    assert scrape(slm, "hilm_drafter_waiting_drafts") == 0


def spec_tokens(router) -> float:
    """Tokens the router has generated for `spec` requests (counted when a request ends)."""
    import re

    text = urllib.request.urlopen(router.metrics_url, timeout=10).read().decode()
    m = re.search(r'^hilm_router_tokens_total\{policy="spec"\} ([-+\deE.]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_client_that_leaves_a_non_streaming_request_stops_its_generation(served, tiers):
    """Hang up on a long non-streaming request: the router notices, stops the generation and
    closes its sessions (it does not run 2,000 tokens for nobody)."""
    import socket
    import time

    llm, ilm, slm = tiers
    before = spec_tokens(served)
    host, port = served.http_url.removeprefix("http://").split(":")
    body = json.dumps({"model": "spec", "prompt": PROMPT, "max_tokens": 2000,
                       "ignore_eos": True, "temperature": 1.0}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(2.0)  # generating by now
    deadline = time.monotonic() + 20
    names = {llm: "hilm_verifier_sessions", slm: "hilm_drafter_sessions"}
    while time.monotonic() < deadline and any(scrape(p, n) for p, n in names.items()):
        time.sleep(0.5)
    assert {p.tier: scrape(p, n) for p, n in names.items()} == {"llm": 0, "slm": 0}
    # it ended (cancelled) long before the context's ~1,000 tokens it would have run to
    assert spec_tokens(served) - before < 600


def test_thresholds_steer_the_routing(served):
    c = client(served)

    def usage(thresholds: dict, policy: str = "hilm") -> dict:
        out = c.completions.create(model=policy, prompt=PROMPT, max_tokens=24, seed=5,
                                   extra_body={"ignore_eos": True, "thresholds": thresholds})
        return hilm_usage(out.usage)

    # T1 = 0: only a token whose K perturbed samples all agree (u = 0) could stay; the tiny
    # models are far too unsure for that at T = 1.
    none_kept = usage({"t1": 0.0, "t2": 1.0, "t_ilm": 1.0})
    assert none_kept["skips"] == 0 and none_kept["ilm_messages"] >= 1
    all_kept = usage({"t1": 1.0, "t2": 1.0})
    assert all_kept["skips"] == 24 and all_kept["ilm_messages"] == all_kept["llm_messages"] == 0
    to_llm = usage({"t1": -1.0, "t2": -1.0})
    assert to_llm["ilm_messages"] == 0 and to_llm["llm_messages"] >= 1
    forwarded = usage({"t1": -1.0, "t2": 2.0, "t_ilm": -1.0})  # the ILM forwards everything
    assert forwarded["ilm_forwarded"] >= forwarded["ilm_messages"] >= 1
    assert forwarded["llm_messages"] == forwarded["ilm_messages"]


def test_rand_skips_at_its_target_rate(served):
    c = client(served)
    rate, skips, rounds = 0.3, 0, 0
    for seed in range(6):
        out = c.completions.create(model="rand", prompt=PROMPT, max_tokens=60, seed=seed,
                                   extra_body={"ignore_eos": True, "skip_rate": rate,
                                               "block_size": 1})
        h = hilm_usage(out.usage)
        skips, rounds = skips + h["skips"], rounds + h["rounds"]
    # block size 1: one routing decision per round
    assert abs(skips / rounds - rate) < 4 * math.sqrt(rate * (1 - rate) / rounds), (skips, rounds)


def test_killing_the_ilm_mid_request_completes_through_the_llm(tiny_zoo, tiers):
    llm, _, slm = tiers
    with tier("ilm", tiny_zoo.ilm) as ilm, \
            router(tiny_zoo, llm, slm, ilm, "--policy", "hilm", "--t1", "-1", "--t2", "2",
                   "--t-ilm", "2") as r:
        stream = client(r).completions.create(
            model="hilm", prompt=PROMPT, max_tokens=80, seed=3, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        engine = ilm.descendants()
        chunks = []
        for ch in stream:
            chunks.append(ch)
            if len(chunks) == 3:
                ilm.proc.kill()  # no goodbye: the connection just drops
        for child in engine:
            with contextlib.suppress(Exception):
                child.kill()
    usage = chunks[-1].usage
    assert usage.completion_tokens == 80
    h = hilm_usage(usage)
    assert "ilm-unreachable" in h["degraded"]
    assert h["ilm_messages"] >= 1 and h["llm_messages"] >= 1


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body, status, words", [
    ({"model": "hilm", "max_tokens": 4}, 400, "prompt"),
    ({"model": "hilm", "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "hilm", "prompt": "x", "policy": "fastest"}, 400, "unknown policy"),
    ({"model": "gpt-9", "prompt": "x"}, 404, "does not exist"),
    ({"model": "hilm", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "hilm", "prompt": [1, 2, 10 ** 6]}, 400, "vocabulary"),
    ({"model": "hilm", "prompt": "x" * 4000, "max_tokens": 4}, 400, "max-model-len"),
    ({"model": "hilm", "prompt": "x", "n": 0}, 400, "n must be"),
    ({"model": "hilm", "prompt": "x", "n": 1000}, 400, "--max-n"),
    ({"model": "spec", "prompt": "x", "max_tokens": 2 ** 31}, 400, "max_tokens"),
    ({"model": "spec", "prompt": "x", "min_tokens": 9, "max_tokens": 4}, 400, "min_tokens"),
    ({"model": "spec", "prompt": "x", "stop_token_ids": [10 ** 6]}, 400, "stop_token_ids"),
])
def test_bad_requests_get_openai_errors_and_the_router_keeps_serving(served, body, status,
                                                                     words):
    code, err = _post(served.http_url + "/v1/completions", body)
    assert code == status, err
    assert set(err["error"]) >= {"message", "type", "code"} and err["error"]["code"] == status
    assert words in err["error"]["message"], err
    out = client(served).completions.create(model="spec", prompt=PROMPT, max_tokens=4)
    assert out.usage.completion_tokens >= 1


def test_chat_with_no_messages_and_grpc_bad_input(served):
    code, err = _post(served.http_url + "/v1/chat/completions", {"model": "hilm", "messages": []})
    assert code == 400 and "messages" in err["error"]["message"]

    async def bad():
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async with grpc.aio.insecure_channel(served.grpc_address) as ch:
                stub = generate_pb2_grpc.GeneratorStub(ch)
                async for _ in stub.Generate(generate_pb2.GenerateRequest(max_tokens=3)):
                    pass
        return e.value

    e = asyncio.run(bad())
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT and "prompt" in e.details()

    async def too_many(**fields):  # the gRPC door checks the stop lists as HTTP does
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async with grpc.aio.insecure_channel(served.grpc_address) as ch:
                stub = generate_pb2_grpc.GeneratorStub(ch)
                fields.setdefault("prompt", codec.prompt_to_pb("x"))
                async for _ in stub.Generate(generate_pb2.GenerateRequest(max_tokens=3,
                                                                           **fields)):
                    pass
        return e.value

    # The public port receives at most 4 MiB (prompts, never distributions): a 5 MiB prompt is
    # refused by gRPC itself, and the router keeps serving.
    e = asyncio.run(too_many(prompt=codec.prompt_to_pb("x" * (5 << 20))))
    assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in e.details()
    e = asyncio.run(too_many(stop=["a"] * 17))
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT and "--max-stop-sequences" in e.details()
    e = asyncio.run(too_many(stop_token_ids=[1] * 1025))
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT and "stop_token_ids" in e.details()
    code, err = _post(served.http_url + "/v1/completions", {
        "model": "hilm", "prompt": "x", "max_tokens": 2, "stop_token_ids": [1] * 1025})
    assert code == 400 and "stop_token_ids" in err["error"]["message"]


def test_metrics_count_routes_and_hops(served):
    client(served).completions.create(model="hilm", prompt=PROMPT, max_tokens=8)
    with urllib.request.urlopen(served.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    for name in ("hilm_router_route_decisions_total", "hilm_router_rtt_seconds_bucket",
                 "hilm_router_uplink_bytes_total", "hilm_router_transmission_rate_bucket",
                 "hilm_router_accepted_drafts_total", "hilm_router_requests_total"):
        assert name in text, name
    assert 'hilm_router_requests_total{outcome="ok",policy="hilm"}' in text


def test_lossless_policies_stop_where_llm_only_stops(served, tiny_zoo):
    """T = 0 without ignore_eos: a stop token (here a stop_token_id taken from llm-only's own
    output) ends every lossless policy on the same token as llm-only, finish_reason "stop"."""
    prompt = _prompts(tiny_zoo, 1)[0]
    c = client(served)

    def run(policy: str, **extra) -> tuple[list[int], str]:
        out = c.completions.create(model=policy, prompt=prompt, max_tokens=40, temperature=0,
                                   extra_body={"block_size": 4, **extra})
        return hilm_usage(out.usage)["token_ids"], out.choices[0].finish_reason

    free, _ = run("llm-only")
    stop = free[6]
    expected = free[:free.index(stop) + 1]
    for policy in LOSSLESS:
        ids, finish = run(policy, stop_token_ids=[stop])
        assert ids == expected and finish == "stop", policy


def test_a_block_larger_than_the_verifiers_limit_is_cut_to_it(served):
    """--max-block of the verifiers is 16: cascade at k = 40 forwards up to 41 tokens; the
    router uses the limit OpenSession returned instead of failing mid-stream."""
    out = client(served).completions.create(model="cascade", prompt=PROMPT, max_tokens=48,
                                            temperature=0, extra_body={"block_size": 40,
                                                                       "ignore_eos": True})
    assert out.usage.completion_tokens == 48 and hilm_usage(out.usage)["degraded"] == []


def test_max_tokens_past_the_context_ends_with_length(served):
    """max-model-len is 1024: a 1000-token prompt leaves about 23 tokens; the request ends
    there with finish_reason "length", as vLLM's does, for every policy."""
    prompt = [300 + i % 50 for i in range(1000)]
    c = client(served)
    for policy in ("llm-only", "spec", "hilm", "cascade"):
        out = c.completions.create(model=policy, prompt=prompt, max_tokens=500, temperature=0,
                                   extra_body={"ignore_eos": True})
        assert out.choices[0].finish_reason == "length", policy
        assert 20 <= out.usage.completion_tokens <= 24, policy


def test_min_tokens_masks_the_stop_tokens_exactly_as_llm_only(served, tiny_zoo):
    """vLLM's min_tokens gives the stop tokens probability 0 until then; the verifiers mask
    their p the same way, so every lossless policy stays token-identical to llm-only at T = 0
    with a stop token the unmasked model would pick early, and follows the masked p at T = 1
    (first token, chi-square)."""
    prompt = _prompts(tiny_zoo, 1)[0]
    c = client(served)

    def run(policy: str, temperature: float = 0.0, seed: int | None = None, **extra):
        out = c.completions.create(model=policy, prompt=prompt, max_tokens=12,
                                   temperature=temperature, seed=seed,
                                   extra_body={"block_size": 3, **extra})
        return hilm_usage(out.usage)["token_ids"]

    free = run("llm-only")
    stop = free[1]  # unmasked, the second token would end the request
    masked = run("llm-only", stop_token_ids=[stop], min_tokens=6)
    assert len(masked) >= 6 and stop not in masked[:5] and masked != free[:len(masked)]
    for policy in LOSSLESS[1:]:
        assert run(policy, stop_token_ids=[stop], min_tokens=6) == masked, policy

    # vLLM masks the stop tokens in the logits before top-k: the 9th token comes into the top 8
    import torch

    from hilm_vllm.sampling import mask_tokens, processed_probs
    from tests.verifier.helpers import hf_model

    spec = SamplingSpec(temperature=1.0, top_k=8)
    with torch.no_grad():
        logits = hf_model(tiny_zoo.llm)(torch.tensor([prompt])).logits[0, -1:].float()
    top = int(logits[0].argmax())
    p = processed_probs(mask_tokens(logits, [top], 1), spec)[0].numpy().astype(np.float64)
    support = np.nonzero(p)[0]

    async def first_tokens() -> list[int]:
        sem = asyncio.Semaphore(8)

        async def one(seed: int) -> int:
            async with sem:
                return (await asyncio.to_thread(
                    run, "spec", 1.0, 7000 + seed, top_k=8, stop_token_ids=[top],
                    min_tokens=2))[0]

        return await asyncio.gather(*(one(s) for s in range(200)))

    tokens = asyncio.run(first_tokens())
    assert top not in tokens and set(tokens) <= set(support.tolist())
    big = [int(t) for t in support if p[t] * 200 >= 5]  # cells under 5 expected merged
    observed = np.array([tokens.count(t) for t in big] + [sum(t not in big for t in tokens)])
    expected = np.array([p[t] for t in big] + [1 - sum(p[t] for t in big)]) * 200
    keep = expected > 1e-9
    f_exp = expected[keep] / expected[keep].sum() * observed[keep].sum()
    assert stats.chisquare(observed[keep], f_exp).pvalue > 1e-3


def test_min_tokens_holds_for_tokens_the_device_keeps(served, tiny_zoo):
    """A lossy policy that keeps every token on the device (uhlm skips u <= t2; t2 = 2: nothing
    is verified):
    the drafter masks the stop tokens until min_tokens as vLLM does, so no stop token is kept
    before then (it used to be drafted, kept, and not counted as a stop)."""
    prompt = _prompts(tiny_zoo, 1)[0]
    c = client(served)

    def run(temperature: float = 0.0, seed: int | None = None, **extra):
        out = c.completions.create(model="uhlm", prompt=prompt, max_tokens=10,
                                   temperature=temperature, seed=seed,
                                   extra_body={"block_size": 3,
                                               "thresholds": {"t1": 2.0, "t2": 2.0},
                                               **extra})
        u = hilm_usage(out.usage)
        return u["token_ids"], u

    free, usage = run()
    assert len(usage["skipped_at"]) == len(free), usage  # every token kept on the device
    stops = sorted(set(free[:3]))  # the device would pick these first
    for seed in (None, 1, 2, 3):
        tokens, _ = run(1.0 if seed else 0.0, seed, stop_token_ids=stops, min_tokens=6)
        assert len(tokens) >= 6 and not set(tokens[:6]) & set(stops), (seed, tokens, stops)


def test_the_drafter_applies_the_penalties_to_the_tokens_the_device_keeps(served, tiny_zoo):
    """Every token kept on the device (uhlm, t1 = t2 = 2) at T = 0 with penalties and a logit
    bias: the drafter's greedy tokens are the SLM's penalised argmax, step by step (each counts
    the earlier draft tokens), computed here by the penalties' definition."""
    prompt = _prompts(tiny_zoo, 1)[0]
    pen = {"repetition_penalty": 1.3, "presence_penalty": 2.0, "frequency_penalty": 2.0}
    c = client(served)

    def run(**extra):
        out = c.completions.create(model="uhlm", prompt=prompt, max_tokens=8, temperature=0.0,
                                   extra_body={"block_size": 3, "ignore_eos": True,
                                               "thresholds": {"t1": 2.0, "t2": 2.0}, **extra})
        return hilm_usage(out.usage)

    usage = run(**pen)
    assert len(usage["skipped_at"]) == 8, usage  # every token kept on the device
    want, greedy = [], SamplingSpec(temperature=0.0)
    for _ in range(8):
        want.append(int(penalised_next(tiny_zoo.slm, prompt, want, greedy, pen).argmax()))
    assert usage["token_ids"] == want
    assert run()["token_ids"] != want  # the penalties changed the device's tokens


def streamed_logprobs(url: str, body: dict) -> list:
    """The token_logprobs of a streamed completion, chunk after chunk."""
    req = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(),
                                 {"Content-Type": "application/json"})
    out = []
    with urllib.request.urlopen(req, timeout=60) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("data: {"):
                part = json.loads(line[6:])["choices"][0]["logprobs"]
                out += part["token_logprobs"] if part else []
    return out


def test_logprobs_are_the_llms_own_in_every_lossless_policy(served, tiny_zoo):
    """Completions `logprobs: 3` at T = 1 (seeded) and T = 0: every lossless policy reports,
    for each token, the LLM's raw logprob (as vLLM reports it: the model's log-softmax, before
    temperature and top-k) and its top 3, marked as decided by the LLM; at T = 0 the values
    equal llm-only's (vLLM's own logprobs) within float tolerance, and every value equals the
    LLM's log-softmax computed here with transformers. Chat `top_logprobs`, streaming (the
    chunks' logprobs add up to the whole) and gRPC agree. Lossy policies report each token
    under the tier that decided it: the drafter's own raw logprob for the tokens it kept."""
    import torch

    from tests.verifier.helpers import hf_model

    prompt = _prompts(tiny_zoo, 1)[0]
    url = served.http_url + "/v1/completions"
    base = {"prompt": prompt, "max_tokens": 10, "ignore_eos": True, "logprobs": 3,
            "block_size": 3}

    def completion(policy: str, **extra) -> dict:
        code, out = _post(url, {**base, "model": policy, **extra})
        assert code == 200, (policy, out)
        return out

    def reference(tokens: list[int], tiers: list[str] | None = None) -> list[float]:
        out = []
        for i, t in enumerate(tokens):
            model = getattr(tiny_zoo, tiers[i] if tiers else "llm")
            with torch.no_grad():
                logits = hf_model(model)(torch.tensor([prompt + tokens[:i]])).logits[0, -1]
            out.append(float(torch.log_softmax(logits.float(), -1)[t]))
        return out

    greedy = {}
    for policy in LOSSLESS:
        for extra in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 5, "top_k": 8}):
            out = completion(policy, **extra)
            tokens = hilm_usage_json(out)["token_ids"]
            lp = out["choices"][0]["logprobs"]
            assert len(lp["token_logprobs"]) == len(lp["tokens"]) == len(tokens) == 10
            assert lp["hilm_tiers"] == ["llm"] * 10, (policy, lp["hilm_tiers"])
            assert all(len(top) >= 3 for top in lp["top_logprobs"])
            np.testing.assert_allclose(lp["token_logprobs"], reference(tokens), atol=2e-3)
            assert lp["text_offset"][0] == 0
            if extra["temperature"] == 0.0:
                greedy[policy] = (tokens, lp["token_logprobs"])
    for policy in LOSSLESS[1:]:
        assert greedy[policy][0] == greedy["llm-only"][0], policy
        np.testing.assert_allclose(greedy[policy][1], greedy["llm-only"][1], atol=1e-3)

    # streaming: the chunks carry the logprobs of their tokens
    streamed = streamed_logprobs(url, {**base, "model": "spec", "temperature": 0.0})
    np.testing.assert_allclose(streamed, greedy["spec"][1], atol=1e-6)

    # chat: the OpenAI shape, with each token's tier
    code, out = _post(served.http_url + "/v1/chat/completions", {
        "model": "cascade", "messages": [{"role": "user", "content": "def f(x):"}],
        "max_tokens": 5, "temperature": 0.0, "logprobs": True, "top_logprobs": 2})
    assert code == 200, out
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == 5 and all(len(e["top_logprobs"]) == 2 and e["hilm_tier"] == "llm"
                                      and e["logprob"] <= 0 for e in content)
    code, out = _post(served.http_url + "/v1/chat/completions", {
        "model": "spec", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
        "top_logprobs": 2})
    assert code == 400 and "top_logprobs needs logprobs" in out["error"]["message"]

    # gRPC: one logprob and one decider per token
    async def grpc_run():
        async with grpc.aio.insecure_channel(served.grpc_address) as ch:
            stub = generate_pb2_grpc.GeneratorStub(ch)
            ids, lps, tiers = [], [], []
            async for r in stub.Generate(generate_pb2.GenerateRequest(
                    prompt=codec.prompt_to_pb(prompt),
                    sampling=codec.sampling_to_pb(SamplingSpec(0.0)), max_tokens=10,
                    ignore_eos=True, policy="spec", logprobs=0)):
                ids += r.token_ids
                lps += [t.logprob for t in r.logprobs]
                tiers += r.deciders
            return ids, lps, tiers

    ids, lps, tiers = asyncio.run(grpc_run())
    assert ids == greedy["spec"][0] and tiers == ["llm"] * 10
    np.testing.assert_allclose(lps, greedy["spec"][1], atol=1e-5)

    # lossy: every token kept on the device (uhlm, t1 = t2 = 2) has the drafter's logprob; under
    # hilm each token has the logprob of the tier that decided it
    out = completion("uhlm", temperature=1.0, seed=3, thresholds={"t1": 2.0, "t2": 2.0})
    lp = out["choices"][0]["logprobs"]
    assert lp["hilm_tiers"] == ["slm"] * 10
    np.testing.assert_allclose(lp["token_logprobs"],
                               reference(hilm_usage_json(out)["token_ids"], lp["hilm_tiers"]),
                               atol=2e-3)
    for seed in (1, 2):
        out = completion("hilm", temperature=1.0, seed=seed)
        lp = out["choices"][0]["logprobs"]
        assert set(lp["hilm_tiers"]) <= {"slm", "ilm", "llm"}
        np.testing.assert_allclose(lp["token_logprobs"], reference(
            hilm_usage_json(out)["token_ids"], lp["hilm_tiers"]), atol=2e-3)
        assert hilm_usage_json(out)["deciders"] == lp["hilm_tiers"]
    code, out = _post(url, {**base, "model": "spec", "logprobs": 21})
    assert code == 400 and "logprobs must be in [0, 20]" in out["error"]["message"]


def test_echo_with_logprobs_gives_the_prompts_llm_logprobs(served, tiny_zoo):
    """Completions echo + logprobs (vLLM's prompt logprobs) under llm-only and spec: the prompt's
    tokens first, the first without a logprob, each other with the LLM's log-softmax at its
    position (transformers) and its top 2, marked "prompt"; then the completion's; the stream
    carries the same; gRPC GenerateRequest.prompt_logprobs gives the same values."""
    import torch

    from tests.verifier.helpers import hf_model

    prompt = _prompts(tiny_zoo, 1)[0][:12]
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(tiny_zoo.llm)(torch.tensor([prompt])).logits[0].float(),
                                 -1)
    expected = [float(logp[i - 1, prompt[i]]) for i in range(1, len(prompt))]
    url = served.http_url + "/v1/completions"
    for policy in ("llm-only", "spec"):
        body = {"model": policy, "prompt": prompt, "max_tokens": 4, "temperature": 0,
                "ignore_eos": True, "echo": True, "logprobs": 2}
        code, out = _post(url, body)
        assert code == 200, (policy, out)
        lp = out["choices"][0]["logprobs"]
        n = len(prompt)
        assert len(lp["tokens"]) == n + 4 and lp["token_logprobs"][0] is None
        assert lp["hilm_tiers"] == ["prompt"] * n + ["llm"] * 4, lp["hilm_tiers"]
        np.testing.assert_allclose(lp["token_logprobs"][1:n], expected, atol=2e-3)
        assert all(len(top) >= 2 for top in lp["top_logprobs"][1:])
        streamed = streamed_logprobs(url, body)
        assert streamed[0] is None
        np.testing.assert_allclose(streamed[1:], lp["token_logprobs"][1:], atol=1e-6)

    async def grpc_run():
        async with grpc.aio.insecure_channel(served.grpc_address) as ch:
            stub = generate_pb2_grpc.GeneratorStub(ch)
            got = []
            async for r in stub.Generate(generate_pb2.GenerateRequest(
                    prompt=codec.prompt_to_pb(prompt),
                    sampling=codec.sampling_to_pb(SamplingSpec(0.0)), max_tokens=2,
                    ignore_eos=True, policy="hilm", prompt_logprobs=1)):
                got += [t.logprob for t in r.prompt_logprobs]
            return got

    np.testing.assert_allclose(asyncio.run(grpc_run()), expected, atol=2e-3)


def test_structured_output_under_llm_only_through_the_llms_own_backend(served, tiny_zoo):
    """response_format json_schema and json_object, and vLLM's structured_outputs (choice,
    regex), under llm-only: the LLM's own structured-output backend constrains it, every output
    parses and follows its constraint (seeded, T = 1); a bad constraint is a 400 and the router
    keeps serving."""
    prompt = _prompts(tiny_zoo, 1)[0]
    url = served.http_url + "/v1/completions"
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    base = {"model": "llm-only", "prompt": prompt, "max_tokens": 40, "temperature": 1.0}
    for seed in range(4):
        code, out = _post(url, {**base, "seed": seed, "response_format": {
            "type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
        assert code == 200, out
        value = json.loads(out["choices"][0]["text"])
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and \
            value["n"] in (1, 2, 3), value
        code, out = _post(url, {**base, "seed": seed,
                                "structured_outputs": {"choice": ["yes", "no", "maybe"]}})
        assert code == 200 and out["choices"][0]["text"] in ("yes", "no", "maybe"), out
        code, out = _post(url, {**base, "seed": seed, "structured_outputs": {"regex": "[a-c]{3}"}})
        assert code == 200 and re.fullmatch("[a-c]{3}", out["choices"][0]["text"]), out
    # json_object: any object (the tiny model's strings run long: it starts as one)
    code, out = _post(url, {**base, "seed": 1, "response_format": {"type": "json_object"}})
    assert code == 200 and out["choices"][0]["text"].startswith("{"), out
    if out["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(out["choices"][0]["text"]), dict)
    code, out = _post(url, {**base, "structured_outputs": {"choice": ["a"],
                                                           "disable_any_whitespace": True}})
    assert code == 400 and "--structured-outputs-config" in out["error"]["message"], out
    code, out = _post(url, {**base, "structured_outputs": {"regex": "(unclosed"}})
    assert 400 <= code < 500, (code, out)
    code, out = _post(url, {**base, "seed": 1, "structured_outputs": {"choice": ["a", "b"]}})
    assert code == 200 and out["choices"][0]["text"] in ("a", "b")  # still serving


JSON_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                                "n": {"type": "integer", "enum": [1, 2, 3]},
                                                "tag": {"type": "string", "maxLength": 6}},
               "required": ["ok", "n", "tag"], "additionalProperties": False}


@pytest.mark.parametrize("policy", ALL_POLICIES[1:])
def test_structured_output_in_every_policy(served, tiny_zoo, policy):
    """json_schema, json_object, choice and regex under every speculative policy (the drafter
    drafts inside the grammar, the verifiers mask p with it, across many rounds and rollbacks):
    at T = 1 every output parses and follows its constraint (seeded, streamed and not); a
    constraint the tiers' backend refuses is a 400 and the router keeps serving."""
    prompt = _prompts(tiny_zoo, 1)[0]
    url = served.http_url + "/v1/completions"
    base = {"model": policy, "prompt": prompt, "max_tokens": 60, "temperature": 1.0}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": JSON_SCHEMA}}
    for seed in range(3):
        code, out = _post(url, {**base, "seed": seed, "response_format": fmt})
        assert code == 200, out
        # strict=False: xgrammar's JSON strings admit control characters (llm-only's too)
        value = json.loads(out["choices"][0]["text"], strict=False)
        assert set(value) == {"ok", "n", "tag"} and isinstance(value["ok"], bool) and \
            value["n"] in (1, 2, 3) and len(value["tag"]) <= 6, value
        assert out["choices"][0]["finish_reason"] == "stop"
        code, out = _post(url, {**base, "seed": seed,
                                "structured_outputs": {"choice": ["yes", "no", "maybe"]}})
        assert code == 200 and out["choices"][0]["text"] in ("yes", "no", "maybe"), out
        code, out = _post(url, {**base, "seed": seed,
                                "structured_outputs": {"regex": "[a-c]{3}[0-9]{2,5}"}})
        assert code == 200 and re.fullmatch("[a-c]{3}[0-9]{2,5}", out["choices"][0]["text"]), out
    c = client(served)
    chunks = list(c.completions.create(model=policy, prompt=prompt, max_tokens=60, seed=7,
                                       temperature=1.0, stream=True,
                                       extra_body={"response_format": fmt}))
    value = json.loads("".join(ch.choices[0].text for ch in chunks if ch.choices), strict=False)
    assert set(value) == {"ok", "n", "tag"}, value
    code, out = _post(url, {**base, "seed": 1, "response_format": {"type": "json_object"}})
    assert code == 200 and out["choices"][0]["text"].startswith("{"), out
    code, out = _post(url, {**base, "structured_outputs": {"regex": "(unclosed"}})
    assert code == 400 and "structured output" in out["error"]["message"], (code, out)
    code, out = _post(url, {**base, "seed": 1, "structured_outputs": {"choice": ["a", "b"]}})
    assert code == 200 and out["choices"][0]["text"] in ("a", "b")  # still serving


def test_structured_output_gives_the_llms_own_tokens_in_every_lossless_policy(served):
    """At T = 0 a json_schema completion of hlm, spec and cascade is the LLM's own under its
    vLLM backend (llm-only), token for token, on several prompts."""
    url = served.http_url + "/v1/completions"
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": JSON_SCHEMA}}
    for prompt in ["def read_config(path):\n    ", "{\"a\": ", "Answer in JSON: "]:
        base = {"prompt": prompt, "max_tokens": 60, "temperature": 0, "response_format": fmt}
        code, out = _post(url, {**base, "model": "llm-only"})
        assert code == 200, out
        expected = out["usage"]["hilm"]["token_ids"]
        json.loads(out["choices"][0]["text"], strict=False)
        for policy in LOSSLESS[1:]:
            code, out = _post(url, {**base, "model": policy})
            assert code == 200, (policy, out)
            assert out["usage"]["hilm"]["token_ids"] == expected, (policy, prompt)


STRUCTURED_REGEX = "[a-z ]{2}"  # top-3 after its mask: total variation 0.33 between LLM and SLM


def constrained_pair_law(model_dir, prompt: list[int], spec: SamplingSpec, regex: str) -> dict:
    """The joint law of the first two tokens under `regex` as vLLM samples it: the grammar's
    bitmask (xgrammar, the tokenizer's vocabulary, EOS its stop token) applied to the logits,
    then the sampling transform. Independent of hilm_vllm's grammar code."""
    import torch
    import xgrammar as xgr
    from transformers import AutoConfig, AutoTokenizer

    from hilm_vllm.sampling import processed_probs
    from tests.verifier.helpers import hf_model

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_regex(regex),
                                 override_stop_tokens=[tok.eos_token_id])

    def row(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = hf_model(model_dir)(torch.tensor([ids])).logits[0, -1:].float()
        mask = xgr.allocate_token_bitmask(1, vocab)
        matcher.fill_next_token_bitmask(mask)
        xgr.apply_token_bitmask_inplace(logits, mask)
        p = processed_probs(logits, spec)[0].numpy().astype(np.float64)
        return p / p.sum()

    out = {}
    p0 = row(prompt)
    for x0 in np.nonzero(p0)[0].tolist():
        assert matcher.accept_token(x0)
        p1 = row(prompt + [x0])
        for x1 in np.nonzero(p1)[0].tolist():
            out[(x0, x1)] = float(p0[x0] * p1[x1])
        matcher.rollback(1)
    return out


def test_lossless_policies_sample_the_llms_constrained_law(served, tiny_zoo):
    """A regex constraint at T = 1 (top-k 3 after the grammar's mask, as vLLM orders them)
    under llm-only (the LLM's own vLLM backend: the reference is its law), spec and cascade
    with k = 2: the pair (x0, x1) of N seeded requests against the LLM's constrained joint law,
    chi-square p > 1e-3; power: the same pairs reject the drafter's constrained law
    (p < 1e-3)."""
    prompt = _prompts(tiny_zoo, 1)[0]
    spec = SamplingSpec(temperature=1.0, top_k=3)
    target = constrained_pair_law(tiny_zoo.llm, prompt, spec, STRUCTURED_REGEX)
    drafter = constrained_pair_law(tiny_zoo.slm, prompt, spec, STRUCTURED_REGEX)
    structured = json.dumps({"regex": STRUCTURED_REGEX})
    for policy in ("llm-only", "spec", "cascade"):
        got = seeded_tokens(served.grpc_address, prompt, policy, spec,
                            range(12000, 12000 + N_SEEDS), 3, slice(0, 2), ignore_eos=False,
                            block_size=2, structured_outputs=structured)
        assert law_pvalue(got, target) > 1e-3, (policy, sorted(target.items()))
        assert law_pvalue(got, drafter) < POWER_P_VALUE, f"power: {policy} vs the drafter's law"


def hilm_usage_json(out: dict) -> dict:
    return out["usage"]["hilm"]


# ---- soak and faults (hilm_vllm/lab/soak; bench/soak.py and bench/faults.py run them longer) ---------

@pytest.mark.slow
def test_a_small_soak_fails_nothing_holds_memory_and_closes_every_session(served, tiers):
    """16 Locust users (OpenAI SSE completions and chat, gRPC Generate; every policy) for 60 s
    on the shared tiers: 0 failed requests, each tier's RSS grows < 5% after a 20 s warm-up,
    and every tier's session count is back to 0 at the end."""
    from hilm_vllm.lab.soak.harness import soak
    from hilm_vllm.stack import Stack

    llm, ilm, slm = tiers
    stack = Stack({"llm": llm, "ilm": ilm, "slm": slm, "router": served}, owned=False)
    errors: dict = {}
    results = soak(stack, users=16, duration_s=60, warmup_s=20, max_tokens=16,
                   errors_out=errors)
    assert results["requests"] >= 16, results
    assert results["failures"] == 0, errors
    assert results["ttft_ms_p50"] is not None and results["itl_ms_p99"] is not None
    assert results["sessions"] == {"slm": 0, "ilm": 0, "llm": 0}, results["sessions"]
    assert results["verdict"]["rss_bounded"], results["rss_mb"]
    assert results["verdict"]["pass"]


@pytest.mark.slow
def test_killing_and_restarting_the_ilm_under_load_fails_no_lossy_request(tiny_zoo, tiers):
    """SSE users on the lossy `hilm` policy (every block to the ILM) while the ILM's whole
    process tree is SIGKILLed and started again on its ports: no request fails (they complete
    through the LLM while it is down), and the router uses the restarted ILM again."""
    from hilm_vllm.lab.soak.harness import LocustRun, in_window, kill_and_restart
    from hilm_vllm.stack import Stack

    llm, _, slm = tiers
    with tier("ilm", tiny_zoo.ilm) as ilm, \
            router(tiny_zoo, llm, slm, ilm, "--policy", "hilm", "--t1", "-1", "--t2", "2",
                   "--t-ilm", "2", "--block-size", "3") as r:
        stack = Stack({"llm": llm, "ilm": ilm, "slm": slm, "router": r},
                      {"ilm": ["--model", str(tiny_zoo.ilm), *ENGINE_FLAGS]}, owned=False)
        run = LocustRun(r.http_url, r.grpc_address, 4, 3600, policies="hilm", max_tokens=16,
                        user_classes=["SseUser"]).start()
        try:
            time.sleep(10)
            degraded, reason = "hilm_router_degraded_total", '{reason="ilm-unreachable"}'
            before = _samples(_get(r.metrics_url)[1], degraded).get(reason, 0)
            fault = kill_and_restart(stack, "ilm", deadline_s=300)
            time.sleep(10)
            samples = run.finish()
            routed_around = _samples(_get(r.metrics_url)[1], degraded).get(reason, 0) - before
        finally:
            run.stop()
            if stack.tiers["ilm"] is not ilm:
                stack.tiers["ilm"].stop()
    requests, failed = in_window(samples["records"], fault.start, fault.end)
    # Coverage: the load really ran through the fault (4 users, one request each at least,
    # in flight while the ILM was down), and requests were routed around the dead ILM.
    assert requests >= 4, (requests, samples["requests"])
    assert routed_around > 0, "no request was routed around the dead ILM"
    assert samples["failures"] == 0, samples["errors"]
    assert fault.recovered_s is not None, "the router never served through the restarted ILM"


# -- the serving surface as vLLM's (issue 15) ---------------------------------------------------


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _samples(text: str, name: str) -> dict[str, float]:
    """Prometheus exposition lines of one metric name: {labels: value}."""
    out = {}
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        out[m.group(1) or ""] = float(m.group(2))
    return out


def test_unknown_fields_are_accepted_logged_and_listed(served):
    body = {"model": "spec", "prompt": PROMPT, "max_tokens": 4, "repetition_penalty": 1.0,
            "frobnicate": {"a": 1}, "stream_options": None}
    code, out = _post(served.http_url + "/v1/completions", body)
    assert code == 200, out
    assert out["usage"]["hilm"]["ignored_fields"] == ["repetition_penalty", "frobnicate"]
    code, out = _post(served.http_url + "/v1/completions", {"model": "spec", "prompt": PROMPT,
                                                             "max_tokens": 2})
    assert code == 200 and out["usage"]["hilm"]["ignored_fields"] == []
    deadline = time.monotonic() + 10
    while "frobnicate" not in served.tail(400) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert re.search(r"WARNING .*ignored by the router.*repetition_penalty, frobnicate",
                     served.tail(400)), served.tail(20)


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(served):
    """vLLM's default for chat: the rest of the context (the tiers run max-model-len 1024)."""
    c = client(served)
    long = " ".join(["def f(x): return x"] * 120)
    out = c.chat.completions.create(model="spec", messages=[{"role": "user", "content": long}],
                                    seed=3, extra_body={"ignore_eos": True})
    u = out.usage
    assert out.choices[0].finish_reason == "length"
    assert u.completion_tokens > 16 and 1024 - 3 <= u.total_tokens <= 1024, u


def test_chat_content_parts_are_the_joined_text(served):
    c = client(served)
    parts = [{"type": "text", "text": "Write a loop."}, {"type": "text", "text": "In Python."}]
    a = c.chat.completions.create(model="spec", messages=[{"role": "user", "content": parts}],
                                  max_tokens=6, seed=5)
    b = c.chat.completions.create(
        model="spec", messages=[{"role": "user", "content": "Write a loop.\nIn Python."}],
        max_tokens=6, seed=5)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.choices[0].message.content == b.choices[0].message.content
    code, err = _post(served.http_url + "/v1/chat/completions", {
        "model": "spec", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]})
    assert code == 400 and "text only" in err["error"]["message"], err


def test_n_choices_are_independent_indexed_and_seeded(served):
    c = client(served)
    kw = dict(prompt=PROMPT, max_tokens=12, temperature=1.0, seed=21,
              extra_body={"ignore_eos": True})
    one = c.completions.create(model="hilm", **kw)
    three = c.completions.create(model="hilm", n=3, **kw)
    assert [ch.index for ch in three.choices] == [0, 1, 2]
    assert three.choices[0].text == one.choices[0].text  # choice 0 keeps the request's seed
    assert len({ch.text for ch in three.choices}) >= 2  # the others are their own samples
    assert three.usage.completion_tokens == 36
    assert len(hilm_usage(three.usage)["choices"]) == 3
    again = c.completions.create(model="hilm", n=3, **kw)
    assert [ch.text for ch in again.choices] == [ch.text for ch in three.choices]

    chunks = list(c.completions.create(model="hilm", n=2, stream=True,
                                       stream_options={"include_usage": True,
                                                       "continuous_usage_stats": True}, **kw))
    texts = {0: "", 1: ""}
    for ch in chunks:
        if ch.choices:
            texts[ch.choices[0].index] += ch.choices[0].text
            assert ch.usage is not None and ch.usage.completion_tokens <= 12
    assert texts[0] == one.choices[0].text and texts[1] == three.choices[1].text
    assert chunks[-1].usage.completion_tokens == 24 and not chunks[-1].choices


def test_include_stop_str_in_output(served):
    c = client(served)
    base = c.completions.create(model="llm-only", prompt=PROMPT, max_tokens=24, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    stop = base[len(base) // 2:len(base) // 2 + 2]
    cut = base[:base.index(stop)]
    for policy in ("llm-only", "spec"):
        kw = dict(model=policy, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
        out = c.completions.create(**kw, extra_body={"ignore_eos": True})
        assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
        out = c.completions.create(**kw, extra_body={"ignore_eos": True,
                                                     "include_stop_str_in_output": True})
        assert out.choices[0].text == cut + stop and out.choices[0].finish_reason == "stop"


def test_tokenize_detokenize_version_ping_models(served, tiny_zoo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_zoo.llm))
    code, out = _post(served.http_url + "/tokenize", {"model": "hilm", "prompt": PROMPT,
                                                      "return_token_strs": True})
    assert code == 200 and out["tokens"] == tok.encode(PROMPT), out
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 1024
    assert out["token_strs"] == tok.convert_ids_to_tokens(out["tokens"])
    code, chat = _post(served.http_url + "/tokenize", {
        "messages": [{"role": "user", "content": "hi"}]})
    assert code == 200 and chat["tokens"] == tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True,
        return_dict=False)
    code, out = _post(served.http_url + "/detokenize", {"tokens": out["tokens"]})
    assert code == 200 and out["prompt"] == tok.decode(tok.encode(PROMPT))
    code, err = _post(served.http_url + "/detokenize", {"tokens": [10 ** 7]})
    assert code == 400 and "vocabulary" in err["error"]["message"]
    code, body = _get(served.http_url + "/version")
    import vllm

    assert code == 200 and json.loads(body)["version"] == vllm.__version__
    assert _get(served.http_url + "/ping")[0] == 200
    models = client(served).models.list().data
    assert models[0].root == models[0].id and all(
        m.model_extra["max_model_len"] == 1024 for m in models)


def test_metrics_on_the_api_port_in_vllms_names(served):
    """/metrics on the HTTP port: vLLM's spec-decode counters, consistent with usage.hilm (one
    draft per verification; acceptance length 1 + accepted / drafts), the latency histograms,
    in-flight requests, the HTTP metrics of prometheus-fastapi-instrumentator; the periodic
    SpecDecoding log line."""
    url = served.http_url + "/metrics"
    before = _get(url)[1]
    out = client(served).completions.create(model="spec", prompt=PROMPT, max_tokens=24,
                                            seed=2, extra_body={"ignore_eos": True})
    h = hilm_usage(out.usage)
    code, after = _get(url)
    assert code == 200

    def total(text, name):
        return sum(_samples(text, name).values())

    drafts = total(after, "vllm:spec_decode_num_drafts_total") - \
        total(before, "vllm:spec_decode_num_drafts_total")
    accepted = total(after, "vllm:spec_decode_num_accepted_tokens_total") - \
        total(before, "vllm:spec_decode_num_accepted_tokens_total")
    drafted = total(after, "vllm:spec_decode_num_draft_tokens_total") - \
        total(before, "vllm:spec_decode_num_draft_tokens_total")
    assert drafts == h["llm_drafts"] >= 1 and accepted == h["llm_accepted"]
    assert drafted == h["llm_drafted"]
    assert h["acceptance_length"]["llm"] == pytest.approx(1 + accepted / drafts)
    per_pos = _samples(after, "vllm:spec_decode_num_accepted_tokens_per_pos_total")
    assert any('position="0"' in k for k in per_pos)
    assert sum(per_pos.values()) == total(after, "vllm:spec_decode_num_accepted_tokens_total")
    for name in ("hilm_router_inter_token_latency_seconds_bucket",
                 "hilm_router_e2e_request_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:inter_token_latency_seconds_bucket",
                 "hilm_router_requests_running", "vllm:num_requests_running",
                 "hilm_router_rounds_total", "hilm_router_accepted_drafts_per_pos_total",
                 "http_requests_total", "hilm_router_route_decisions_total"):
        assert name in after, name
    assert total(after, "hilm_router_requests_running") == 0
    # the old separate port serves the same registry
    assert "vllm:spec_decode_num_drafts_total" in _get(served.metrics_url)[1]
    deadline = time.monotonic() + 10
    line = None
    while line is None and time.monotonic() < deadline:
        line = next((x for x in served.tail(400).splitlines()
                     if "SpecDecoding metrics: Mean acceptance length" in x), None)
        time.sleep(0.3)
    assert line and "Per-position acceptance rate" in line and "TR:" in line, served.tail(20)


def test_tiers_export_their_verify_and_draft_metrics(served, tiers):
    client(served).completions.create(model="hilm", prompt=PROMPT, max_tokens=12, seed=4,
                                      extra_body={"ignore_eos": True})
    llm, ilm, slm = tiers
    text = _get(llm.metrics_url)[1]
    assert total_of(text, "hilm_verifier_verifies_total") >= 1
    assert total_of(text, "hilm_verifier_draft_tokens_total") >= \
        total_of(text, "hilm_verifier_accepted_tokens_total")
    assert "hilm_verifier_verify_seconds_bucket" in text and "hilm_verifier_sessions" in text
    text = _get(slm.metrics_url)[1]
    for name in ("hilm_drafter_sessions", "hilm_drafter_draft_seconds_bucket",
                 "hilm_drafter_rolled_back_tokens_total", "hilm_drafter_tokens_total"):
        assert name in text, name


def total_of(text: str, name: str) -> float:
    return sum(_samples(text, name).values())


class _Nowhere:
    """A tier address where nothing listens."""

    def __init__(self):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.grpc_address = f"127.0.0.1:{s.getsockname()[1]}"


def test_health_is_503_with_the_reason_while_the_llm_is_down(served, tiny_zoo, tiers):
    code, body = _get(served.http_url + "/health")
    assert code == 200 and json.loads(body)["tiers"] == {
        "slm": "serving", "ilm": "serving", "llm": "serving"}
    _llm, ilm, slm = tiers
    with router(tiny_zoo, _Nowhere(), slm, ilm, "--policy", "spec") as r:
        code, body = _get(r.http_url + "/health")
        doc = json.loads(body)
        assert code == 503 and doc["status"] == "unhealthy", doc
        assert "llm tier" in doc["reason"] and doc["tiers"]["slm"] == "serving"
        assert _get(r.http_url + "/ping")[0] == 503
        models = json.loads(_get(r.http_url + "/v1/models")[1])
        assert models["data"][0]["max_model_len"] is None


def test_vllm_bench_serve_runs_against_the_router(served, tiny_zoo, tmp_path):
    """vLLM's serving benchmark, its own code (`vllm bench serve`; hilm_vllm.lab.bench.vllm_serve
    runs it where the CPU wheel's `vllm` command cannot start): every request succeeds and the
    result reports the spec-decode acceptance it scraped from the router's /metrics."""
    n = 24
    cmd = [sys.executable, "-m", "hilm_vllm.lab.bench", "vllm-serve", "--backend", "openai",
           "--base-url", served.http_url, "--endpoint", "/v1/completions",
           "--model", str(tiny_zoo.llm), "--tokenizer", str(tiny_zoo.llm),
           "--dataset-name", "random", "--random-input-len", "24", "--random-output-len", "16",
           "--num-prompts", str(n), "--max-concurrency", "4", "--ignore-eos", "--seed", "0",
           "--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json",
           "--disable-tqdm"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OPENAI_API_KEY=""))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["completed"] == n and doc["failed"] == 0, doc["errors"]
    assert doc["total_output_tokens"] == 16 * n
    assert doc["spec_decode_num_drafts"] >= 1 and doc["spec_decode_draft_tokens"] >= 1
    assert doc["spec_decode_acceptance_length"] == pytest.approx(
        1 + doc["spec_decode_accepted_tokens"] / doc["spec_decode_num_drafts"])
    assert doc["spec_decode_per_position_acceptance_rates"]
    assert "Acceptance length:" in r.stdout
    print(r.stdout[-2500:])


def test_admission_queues_per_client_and_answers_429_with_retry_after_when_full(tiny_zoo, tiers):
    """A router that runs one choice at once and queues one request per client: a client's
    second request waits, another client's request still gets a place, a client's third is 429
    (OpenAI's RateLimitError body, Retry-After) on HTTP and RESOURCE_EXHAUSTED (retry-after-s)
    on gRPC, the router's 429s are counted, and the waiting requests run once the slot frees."""
    import openai
    from concurrent.futures import ThreadPoolExecutor

    llm, ilm, slm = tiers
    with router(tiny_zoo, llm, slm, ilm, "--api-key", "k1", "k2", "--max-active-choices", "1",
                "--max-queued-per-client", "1") as r:
        a, b = (openai.OpenAI(base_url=r.http_url + "/v1", api_key=k, max_retries=0)
                for k in ("k1", "k2"))
        kw = dict(model="llm-only", prompt=PROMPT, max_tokens=4, temperature=0)

        def queued(n: int) -> None:
            deadline = time.monotonic() + 30
            while scrape(r, "hilm_router_admission_queued_requests") != n:
                assert time.monotonic() < deadline, "the request did not queue"
                time.sleep(0.05)

        held = a.completions.create(model="spec", prompt=PROMPT, max_tokens=900, stream=True,
                                    temperature=1.0, extra_body={"ignore_eos": True})
        next(iter(held))  # admitted: the router's only slot is taken
        assert scrape(r, "hilm_router_admission_active_choices") == 1
        with ThreadPoolExecutor(2) as pool:
            waiting_a = pool.submit(a.completions.create, **kw)
            queued(1)
            waiting_b = pool.submit(b.completions.create, **kw)
            queued(2)
            with pytest.raises(openai.RateLimitError) as e:
                a.completions.create(**kw)
            assert int(e.value.response.headers["retry-after"]) >= 1
            assert e.value.body["type"] == "RateLimitError"
            assert "--max-queued-per-client" in e.value.body["message"]

            async def grpc_generate():
                async with grpc.aio.insecure_channel(r.grpc_address) as ch:
                    call = generate_pb2_grpc.GeneratorStub(ch).Generate(
                        generate_pb2.GenerateRequest(prompt=codec.prompt_to_pb(PROMPT),
                                                     max_tokens=4, policy="llm-only"),
                        metadata=(("authorization", "Bearer k1"),), timeout=30)
                    with pytest.raises(grpc.aio.AioRpcError) as g:
                        async for _ in call:
                            pass
                    return g.value.code(), dict(g.value.trailing_metadata() or ())

            code, trailers = asyncio.run(grpc_generate())
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert int(trailers["retry-after-s"]) >= 1
            assert not waiting_a.done() and not waiting_b.done()
            held.close()  # the stream's client leaves: its slot frees
            assert waiting_a.result(timeout=60).choices[0].text
            assert waiting_b.result(timeout=60).choices[0].text
        assert scrape(r, "hilm_router_admission_refused_requests") == 2
        assert scrape(r, "hilm_router_admission_active_choices") == 0


def test_penalties_give_the_llms_own_tokens_in_every_lossless_policy(served, tiers, tiny_zoo):
    """Penalties and logit bias ride to the LLM tier under llm-only and its vLLM sampler
    applies them: the router's tokens (HTTP and gRPC) equal the tier's own Generate with the
    same fields, and differ from the tokens without them. The lossless policies give the same
    tokens at T = 0 (the drafter and verifiers apply them to q and p), bad_words included."""
    from hilm_vllm.verifier.client import VerifierClient

    llm = tiers[0]
    prompt = _prompts(tiny_zoo, 1)[0]
    greedy = SamplingSpec(temperature=0.0)
    plain = asyncio.run(generate(served.grpc_address, prompt, greedy, 24, "llm-only"))
    pen = {"repetition_penalty": 1.8, "presence_penalty": 0.5, "logit_bias": {plain[0]: -100.0}}

    async def tier_own():
        async with VerifierClient(llm.grpc_address) as v:
            return [t async for c in v.generate(prompt, greedy, 24, ignore_eos=True,
                                                 penalties=pen) for t in c.token_ids]

    expected = asyncio.run(tier_own())
    assert expected != plain and expected[0] != plain[0]
    got = asyncio.run(generate(served.grpc_address, prompt, greedy, 24, "llm-only",
                               penalties=codec.penalties_to_pb(pen)))
    assert got == expected
    body = {"model": "llm-only", "prompt": prompt, "max_tokens": 24, "temperature": 0,
            "ignore_eos": True, "repetition_penalty": 1.8, "presence_penalty": 0.5,
            "logit_bias": {str(plain[0]): -100}}
    code, out = _post(served.http_url + "/v1/completions", body)
    assert code == 200, out
    assert out["usage"]["hilm"]["token_ids"] == expected
    for policy in LOSSLESS[1:]:  # the drafter's q and each verifier's p are penalised alike
        code, out = _post(served.http_url + "/v1/completions", {**body, "model": policy})
        assert code == 200, (policy, out)
        assert out["usage"]["hilm"]["token_ids"] == expected, policy
    # bad words: the router tokenizes them as vLLM does; every tier bans a word's last token
    # where the output ends with the rest of it (the LLM's own sampler under llm-only)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_zoo.llm))
    words = [tok.decode(expected[i:i + 2]) for i in (1, 4, 8)]  # words the output holds
    body = {**body, "bad_words": words}
    code, out = _post(served.http_url + "/v1/completions", body)
    assert code == 200, out
    banned = out["usage"]["hilm"]["token_ids"]
    assert banned != expected, "the bad words changed nothing: pick others"
    for policy in LOSSLESS[1:]:
        code, out = _post(served.http_url + "/v1/completions", {**body, "model": policy})
        assert code == 200, (policy, out)
        assert out["usage"]["hilm"]["token_ids"] == banned, (policy, words)


# Strong enough that the penalised law is far (total variation 0.53) from the plain one and
# (0.33) from one whose second row does not count the first token (the power checks below).
PENALTIES = {"repetition_penalty": 1.3, "presence_penalty": 2.0, "frequency_penalty": 2.0}


def penalised_next(model_dir, prompt: list[int], output: list[int], spec: SamplingSpec,
                   pen: dict) -> np.ndarray:
    """The next-token law after prompt + output with vLLM's penalties applied by their
    definition (independent of hilm_vllm.sampling): the repetition penalty divides a positive
    logit and multiplies a negative one of every token seen in the prompt or the output; the
    frequency penalty subtracts per occurrence in the output, the presence penalty once."""
    import torch

    from hilm_vllm.sampling import processed_probs
    from tests.verifier.helpers import hf_model

    with torch.no_grad():
        logits = hf_model(model_dir)(torch.tensor([prompt + output])).logits[0, -1].double()
    seen = set(prompt) | set(output)
    r = pen.get("repetition_penalty", 1.0)
    for t in seen:
        logits[t] = logits[t] / r if logits[t] > 0 else logits[t] * r
    for t in set(output):
        logits[t] -= pen.get("frequency_penalty", 0.0) * output.count(t)
        logits[t] -= pen.get("presence_penalty", 0.0)
    p = processed_probs(logits.float()[None, :], spec)[0].numpy().astype(np.float64)
    return p / p.sum()


def test_lossless_policies_sample_the_llms_penalised_law(served, tiny_zoo):
    """Presence, frequency and repetition penalties at T = 1 under spec and cascade with k = 2:
    the pair (x0, x1) of N seeded requests against the LLM's penalised joint law (x1's row
    counts x0, a draft token when both were drafted), chi-square p > 1e-3; power: the same
    pairs reject the unpenalised law and the law of a verifier that would not count the draft
    token before a row (p < 1e-3)."""
    prompt = _prompts(tiny_zoo, 1)[0]
    spec = SamplingSpec(temperature=1.0, top_k=3)

    def joint(pen: dict, count_draft: bool = True) -> dict:
        out = {}
        p0 = penalised_next(tiny_zoo.llm, prompt, [], spec, pen)
        for x0 in np.nonzero(p0)[0].tolist():
            p1 = (penalised_next(tiny_zoo.llm, prompt, [x0], spec, pen) if count_draft else
                  penalised_next(tiny_zoo.llm, prompt + [x0], [], spec, pen))
            for x1 in np.nonzero(p1)[0].tolist():
                out[(x0, x1)] = float(p0[x0] * p1[x1])
        return out

    target, plain, stale = joint(PENALTIES), joint({}), joint(PENALTIES, count_draft=False)
    for policy in ("spec", "cascade"):
        got = seeded_tokens(served.grpc_address, prompt, policy, spec,
                            range(9000, 9000 + N_SEEDS), 2, slice(0, 2), block_size=2,
                            penalties=codec.penalties_to_pb(PENALTIES))
        assert law_pvalue(got, target) > 1e-3, (policy, sorted(target.items()))
        assert law_pvalue(got, plain) < POWER_P_VALUE, f"power: {policy} vs the plain law"
        assert law_pvalue(got, stale) < POWER_P_VALUE, f"power: {policy} vs uncounted drafts"

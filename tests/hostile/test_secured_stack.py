"""The secured stack end to end: the router's API key (HTTP and gRPC), its links to the tiers under
mutual TLS with the tier token, and the request caps, each answered with a clear error while
the router keeps serving."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import replace

import grpc
import openai
import pytest

from hilm_vllm.drafter.client import DrafterClient
from hilm_vllm.proto.hilm.v1 import common_pb2, generate_pb2, generate_pb2_grpc
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.server.security import Security, make_channel
from tests.hostile.harness import API_KEY, MAX_OUTPUT_TOKENS

PROMPT = "def read_config(path):\n    "


def _post(url: str, body: dict | bytes, key: str | None = API_KEY) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data, headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def _client(stack, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.router.http_url + "/v1", api_key=key, max_retries=0)


def test_the_api_key_guards_v1_and_health_stays_open(stack):
    url = stack.router.http_url
    for key in (None, "sk-wrong"):
        code, err = _post(url + "/v1/completions", {"model": "spec", "prompt": "x"}, key)
        assert code == 401, err
        assert err["error"]["code"] == 401 and err["error"]["type"] == "AuthenticationError"
        assert "--api-key" in err["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        _client(stack, "sk-wrong").models.list()
    assert _get(url + "/health") == 200
    # with the key, a request runs through the drafter and the LLM over mutual TLS + token
    out = _client(stack).completions.create(model="spec", prompt=PROMPT, max_tokens=6)
    assert out.usage.completion_tokens >= 1
    assert out.usage.model_extra["hilm"]["llm_messages"] >= 1
    assert not out.usage.model_extra["hilm"]["degraded"]


@pytest.mark.parametrize("body, status, flag", [
    ({"max_tokens": MAX_OUTPUT_TOKENS + 1}, 400, "--max-output-tokens"),
    ({"max_completion_tokens": 10 ** 12}, 400, "--max-output-tokens"),
    ({"stop": ["x"] * 17}, 400, "--max-stop-sequences"),
    ({"stop": "y" * 257}, 400, "--max-stop-length"),
    ({"prompt": [5] * 8193}, 400, "--max-prompt-tokens"),
    ({"temperature": 1.8e266}, 400, "temperature"),  # found by the fuzzer: was a 503
    ({"top_k": 10 ** 34}, 400, "top_k"),  # found by the fuzzer: was a 500
])
def test_every_size_has_a_cap_named_in_the_error(stack, body, status, flag):
    code, err = _post(stack.router.http_url + "/v1/completions",
                      {"model": "spec", "prompt": "x", **body})
    assert code == status, err
    assert err["error"]["code"] == status and flag in err["error"]["message"], err
    out = _client(stack).completions.create(model="spec", prompt=PROMPT, max_tokens=4)
    assert out.usage.completion_tokens >= 1


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_is_refused_before_it_is_read(stack, chunked):
    """413 at once on a Content-Length over --max-request-bytes; a chunked body (no length to
    trust) is counted as it arrives. The server answers early and stops reading, so the client
    may see its send cut off before it reads the answer."""
    import http.client

    body = json.dumps({"model": "spec", "prompt": "z" * (2 << 20)}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", stack.router.http_port, timeout=60)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Authorization", f"Bearer {API_KEY}")
    conn.putheader("Content-Type", "application/json")
    if chunked:
        conn.putheader("Transfer-Encoding", "chunked")
    else:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    try:
        for i in range(0, len(body), 256 << 10):
            part = body[i:i + (256 << 10)]
            conn.send(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
        if chunked:
            conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    resp = conn.getresponse()
    data = resp.read()
    assert resp.status == 413, data
    assert "--max-request-bytes" in json.loads(data)["error"]["message"]
    conn.close()
    out = _client(stack).completions.create(model="spec", prompt=PROMPT, max_tokens=4)
    assert out.usage.completion_tokens >= 1


def test_grpc_generate_takes_the_api_key_and_the_caps(stack):
    client = replace(stack.client, token=API_KEY)

    async def tokens(security: Security, **kw) -> list[int]:
        async with make_channel(stack.router.grpc_address, security) as ch:
            stub = generate_pb2_grpc.GeneratorStub(ch)
            out = []
            request = generate_pb2.GenerateRequest(prompt=common_pb2.Prompt(text=PROMPT),
                                                   policy="spec", **kw)
            async for r in stub.Generate(request, timeout=120):
                out += r.token_ids
            return out

    async def code(security: Security, **kw):
        try:
            await tokens(security, **kw)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()
        return grpc.StatusCode.OK, ""

    async def run():
        assert len(await tokens(client, max_tokens=4)) >= 1
        c, _ = await code(replace(client, token=None), max_tokens=4)
        assert c is grpc.StatusCode.UNAUTHENTICATED
        c, details = await code(client, max_tokens=MAX_OUTPUT_TOKENS + 1)
        assert c is grpc.StatusCode.INVALID_ARGUMENT and "--max-output-tokens" in details
    asyncio.run(run())


def test_the_tiers_refuse_plaintext_and_token_less_peers(stack):
    async def open_with(security: Security):
        async with DrafterClient(stack.slm.grpc_address, "intruder", security) as d:
            return await d.open_session([1, 2, 3], SamplingSpec())

    async def code(security):
        try:
            await open_with(security)
        except grpc.aio.AioRpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    async def run():
        assert await code(Security()) is grpc.StatusCode.UNAVAILABLE  # plaintext: no handshake
        no_token = replace(stack.client, token=None)
        assert await code(no_token) is grpc.StatusCode.UNAUTHENTICATED
        s = await open_with(stack.client)
        async with DrafterClient(stack.slm.grpc_address, "intruder", stack.client) as d:
            await d.close_session(s.session_id)
    asyncio.run(run())

"""n > 1: one choice that fails ends the request cleanly (issue 23, item 2).

The HTTP app (in process) over a router double whose second choice fails after its first token
while the first choice is still generating: the pure error handling of `RouterAPI`, not a
tier's behaviour (the tiers' own failures are tested against real tiers in test_router.py)."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from hilm_vllm.errors import Unavailable
from hilm_vllm.router.admission import FairAdmission
from hilm_vllm.router.engine import RouterConfig
from hilm_vllm.router.openai_api import RouterAPI, build_app
from hilm_vllm.router.policy import Policy


class _Llm:
    limits = None


class FailingSecondChoice:
    """generate(): the first call yields a token every 10 ms until closed; the second yields one
    token, then fails. Counts the generators closed."""

    def __init__(self):
        self.cfg = RouterConfig("llm:1", policy=Policy.LLM_ONLY)
        self.llm, self.slm, self.ilm = _Llm(), None, None
        self.admission = FairAdmission()
        self.calls = self.closed = 0

    def check_policy(self, policy) -> None:
        pass

    async def generate(self, req, stats):
        self.calls += 1
        call = self.calls
        try:
            if call == 1:
                while True:
                    stats.tokens += 1
                    yield [65]
                    await asyncio.sleep(0.01)
            stats.tokens += 1
            yield [66]
            await asyncio.sleep(0.05)
            raise Unavailable("the LLM tier went away")
        finally:
            self.closed += 1


@pytest.fixture
def app(tiny_zoo):
    from transformers import AutoTokenizer

    router = FailingSecondChoice()
    api = RouterAPI(router, AutoTokenizer.from_pretrained(tiny_zoo.llm), "m")
    return router, build_app(api)


def test_a_failing_choice_gives_one_openai_error_and_closes_every_choice(app):
    router, asgi = app
    with TestClient(asgi) as client:
        r = client.post("/v1/completions", json={"model": "m", "prompt": "def f(", "n": 2,
                                                 "max_tokens": 1000})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["message"] == "the LLM tier went away"
        assert router.closed == router.calls == 2
        assert router.admission.active == 0  # the request's admission slots are back
        again = client.post("/v1/completions", json={"model": "m", "prompt": "x", "n": 2})
        assert again.status_code == 503  # the server keeps serving
        assert router.admission.active == 0


def test_a_failing_streamed_choice_ends_with_an_error_event_and_done(app):
    router, asgi = app
    with TestClient(asgi) as client:
        with client.stream("POST", "/v1/completions", json={
                "model": "m", "prompt": "def f(", "n": 2, "max_tokens": 1000,
                "stream": True}) as r:
            assert r.status_code == 200
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 503 and error["message"] == "the LLM tier went away"
        assert router.closed == router.calls == 2
        assert router.admission.active == 0  # a stream gives its slots back when it ends

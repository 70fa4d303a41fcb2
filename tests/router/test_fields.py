"""The request-field inventory (hilm_vllm/router/fields.py) against vLLM's own request models,
the docs page generated from it, and the router's HTTP door refusing a field that would change
the output (with the router's pure request handling over a scripted router)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic_core import PydanticUndefined

from hilm_vllm import codec
from hilm_vllm.router import fields
from hilm_vllm.router.admission import FairAdmission
from hilm_vllm.router.engine import RouterConfig
from hilm_vllm.router.openai_api import (ChatCompletionRequest, CompletionRequest, RouterAPI,
                                         build_app)
from hilm_vllm.router.policy import Policy
from hilm_vllm.sampling import TokenLogprob

REPO = Path(__file__).resolve().parents[2]


def vllm_models():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as Chat
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest as Completion

    return Completion, Chat


def test_every_field_of_vllms_request_models_is_classified():
    vllm_fields = set().union(*(m.model_fields for m in vllm_models()))
    unclassified = sorted(vllm_fields - fields.FIELDS.keys())
    assert not unclassified, f"classify in router/fields.py: {unclassified}"
    stale = sorted(fields.FIELDS.keys() - vllm_fields)
    assert not stale, f"router/fields.py classifies fields vLLM no longer has: {stale}"


def test_vllms_default_of_every_refused_field_is_accepted():
    """A client that sends vLLM's defaults (some do, for every field) is never refused."""
    for model in vllm_models():
        for name, info in model.model_fields.items():
            f = fields.FIELDS[name]
            if f.status != fields.REFUSED or info.default is PydanticUndefined:
                continue
            assert fields.is_neutral(info.default, f.neutral), (model.__name__, name,
                                                                info.default)


def test_applied_fields_are_the_routers_own_request_fields():
    """What the table calls applied is a field the router's request models declare, or a
    sampler transform or a structured output read from the body's other fields."""
    declared = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    applied = {n for n, f in fields.FIELDS.items() if f.status == fields.APPLIED}
    assert applied - set(codec.PENALTY_FIELDS) - set(fields.STRUCTURED) <= declared, \
        applied - declared
    assert set(fields.HILM_FIELDS) <= declared


def test_the_docs_page_is_the_table():
    page = (REPO / "docs" / "api-fields.md").read_text()
    assert page == fields.markdown(), "regenerate docs/api-fields.md from router/fields.py"


def test_a_neutral_value_passes_and_anything_else_is_refused():
    fields.check({"presence_penalty": 0.5, "response_format": {"type": "text"}, "user": "u",
                  "frobnicate": 3, "echo": False})
    for bad in ({"suffix": "x"}, {"use_beam_search": True},
                {"return_prompt_text": True}, {"prompt_logprobs": 2},
                {"tools": [{"type": "function"}]}):
        with pytest.raises(fields.InvalidArgument, match=f"`{next(iter(bad))}`"):
            fields.check(bad)
    # the sampler transforms: only non-neutral values are taken
    assert fields.transform_values({"presence_penalty": 0, "repetition_penalty": 1.0,
                                    "logit_bias": {}, "bad_words": [], "user": "u"}) == {}
    assert fields.transform_values({"repetition_penalty": 1.3, "min_p": 0.0,
                                    "logit_bias": {"5": 1}}) == {"repetition_penalty": 1.3,
                                                                  "logit_bias": {"5": 1}}
    assert fields.transform_values({"repetition_penalty": True}) == {"repetition_penalty": True}


class _Llm:
    limits = None


class OneTokenRouter:
    def __init__(self):
        self.cfg = RouterConfig("llm:1", policy=Policy.LLM_ONLY)
        self.llm, self.slm, self.ilm = _Llm(), None, None
        self.admission = FairAdmission()
        self.requests = []

    def check_policy(self, policy) -> None:
        pass

    async def generate(self, req, stats):
        self.requests.append(req)
        stats.tokens += 1
        yield [65]

    async def prompt_logprobs(self, ids, top, stats):
        """Made-up values for the prompt's tokens after the first (the shape is tested here;
        the LLM's own values in tests/router/test_router.py)."""
        return [TokenLogprob(-float(i), tuple(range(top)), tuple([-0.5] * top))
                for i in range(1, len(ids))]


@pytest.fixture
def served(tiny_zoo):
    from transformers import AutoTokenizer

    router = OneTokenRouter()
    api = RouterAPI(router, AutoTokenizer.from_pretrained(tiny_zoo.llm), "m")
    with TestClient(build_app(api)) as client:
        yield router, client


def test_the_http_door_refuses_an_output_changing_field_and_keeps_serving(served):
    router, client = served
    r = client.post("/v1/completions", json={"model": "spec", "prompt": "x", "max_tokens": 1,
                                             "bad_words": ["y"]})
    assert r.status_code == 200, r.text  # tokenized as vLLM does, applied by every tier
    words = router.requests[-1].sampling_spec(3).penalties.bad_words
    assert words and words == router.requests[-1].bad_words_ids
    r = client.post("/v1/completions", json={"model": "spec", "prompt": "x", "max_tokens": 1,
                                             "bad_words": [" "]})
    assert r.status_code == 400 and "bad_words" in r.json()["error"]["message"], r.text
    router.requests.clear()
    r = client.post("/v1/completions", json={"model": "spec", "prompt": "x", "max_tokens": 1,
                                             "presence_penalty": 2.5})
    assert r.status_code == 400 and "presence_penalty must be in [-2, 2]" in \
        r.json()["error"]["message"] and not router.requests
    r = client.post("/v1/completions", json={"model": "spec", "prompt": "x", "max_tokens": 1,
                                             "presence_penalty": 0.7, "logit_bias": {"5": 300}})
    assert r.status_code == 200, r.text  # applied under every policy; biases clamped to 100
    assert router.requests[-1].penalties == {"presence_penalty": 0.7, "logit_bias": {5: 100.0}}
    assert router.requests[-1].sampling_spec(4).penalties.output_start == 4
    r = client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1,
                                             "presence_penalty": 0.7, "logit_bias": {"5": -2},
                                             "bad_words": "no"})
    assert r.status_code == 400 and "bad_words" in r.json()["error"]["message"]  # a type
    r = client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1,
                                             "presence_penalty": 0.7, "logit_bias": {"5": -2}})
    assert r.status_code == 200, r.text  # the served model's policy is llm-only
    assert router.requests[-1].penalties == {"presence_penalty": 0.7, "logit_bias": {5: -2.0}}
    assert r.json()["usage"]["hilm"]["ignored_fields"] == []
    r = client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1,
                                             "logit_bias": {"99999": 1}})
    assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    r = client.post("/v1/chat/completions", json={
        "model": "spec", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
        "response_format": fmt})
    assert r.status_code == 200, r.text  # the drafter and verifiers mask with the grammar
    spec = router.requests[-1].sampling_spec(7)
    assert json.loads(spec.structured.params) == {"json": {"type": "object"}} and \
        spec.structured.output_start == 7
    r = client.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
        "response_format": fmt})
    assert r.status_code == 200, r.text  # llm-only: the LLM's own backend applies it
    assert router.requests[-1].structured == {"json": {"type": "object"}}
    assert r.json()["usage"]["hilm"]["ignored_fields"] == []
    for bad, words in (({"response_format": {"type": "yaml"}}, "response_format.type"),
                       ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "one constraint"),
                       ({"structured_outputs": {"grammar": "x" * 70000}}, "larger than")):
        r = client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1,
                                                 **bad})
        assert r.status_code == 400 and words in r.json()["error"]["message"], (bad, r.text)
    r = client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1,
                                             "presence_penalty": 0, "priority": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["hilm"]["ignored_fields"] == ["presence_penalty", "priority"]


def test_add_generation_prompt_is_applied(served):
    router, client = served
    for flag in (True, False):
        r = client.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "add_generation_prompt": flag})
        assert r.status_code == 200, r.text
    with_prompt, without = (len(r.prompt_ids) for r in router.requests)
    assert with_prompt > without


def test_echo_puts_the_prompt_before_a_completion_and_is_refused_where_it_cannot_be(served):
    """The prompt's text first (streamed first); with logprobs, its tokens and the LLM's
    logprobs of them (none for the first), marked "prompt"; chat refuses echo."""
    router, client = served
    plain = client.post("/v1/completions", json={"model": "m", "prompt": "x = ",
                                                 "max_tokens": 1}).json()
    r = client.post("/v1/completions", json={"model": "m", "prompt": "x = ", "max_tokens": 1,
                                             "echo": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "x = " + plain["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={
            "model": "m", "prompt": "x = ", "max_tokens": 1, "echo": True,
            "stream": True}) as s:
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in s.iter_lines()
                 if line.startswith("data: {")]
    assert "".join(texts) == r.json()["choices"][0]["text"] and texts[0] == "x = "
    r = client.post("/v1/completions", json={"model": "m", "prompt": "x = ", "max_tokens": 1,
                                             "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    n = len(router.requests[-1].prompt_ids)
    assert len(lp["tokens"]) == n + 1 and lp["token_logprobs"][0] is None and \
        lp["top_logprobs"][0] is None and lp["token_logprobs"][1:n] == [-float(i)
                                                                         for i in range(1, n)]
    assert lp["hilm_tiers"][:n] == ["prompt"] * n and lp["text_offset"][0] == 0
    r = client.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
        "echo": True})
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]

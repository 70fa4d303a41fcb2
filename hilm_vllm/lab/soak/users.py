"""Locust users of the router: the OpenAI API over SSE (completions and chat, mixed policies)
and gRPC `Generate`. Thin locustfiles import them (locustfiles/soak.py).

Every request is one Locust event (type `SSE` or `gRPC`, named by endpoint and policy); its time
to first token and each inter-token gap are events of their own (types `TTFT` and `ITL`, named
by channel). A request fails when its status is not 200, the stream carries an error event or
ends without `[DONE]`, or it delivers fewer tokens than asked (`ignore_eos`: every request must
run to `max_tokens`). With `--samples-out` the raw TTFT / ITL samples, request and failure
counts and the failure messages are written as JSON when the run stops (the harness reads it).

Options (besides Locust's): --grpc-address, --policies, --max-tokens, --prompts-file,
--samples-out, --request-timeout.
"""

from __future__ import annotations

import collections
import itertools
import json
import random
import threading
import time

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any channel: gRPC's I/O on gevent's loop

import grpc  # noqa: E402
import requests  # noqa: E402
from locust import User, between, events, task  # noqa: E402

from hilm_vllm.proto.hilm.v1 import common_pb2, generate_pb2, generate_pb2_grpc  # noqa: E402
from hilm_vllm.lab.soak import DEFAULT_POLICIES  # noqa: E402

DEFAULT_PROMPTS = ["def read_config(path):\n    ", "class Stack:\n    def __init__(self):\n",
                   "for i in range(10):\n    ", "import os\n\ndef main():\n    "]


class Samples:
    """What the harness reads back: raw latencies (ms), counts, failure messages."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ttft_ms: list[float] = []
        self.itl_ms: list[float] = []
        self.requests = 0
        self.failures = 0
        self.tokens = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.by_policy: collections.Counter[str] = collections.Counter()
        # one per request: [start, end] (Unix time, s), failed, policy (the fault harness
        # counts the requests in flight around each fault from these)
        self.records: list[tuple[float, float, bool, str]] = []

    def to_dict(self) -> dict:
        return {"requests": self.requests, "failures": self.failures, "tokens": self.tokens,
                "ttft_ms": self.ttft_ms, "itl_ms": self.itl_ms, "errors": dict(self.errors),
                "by_policy": dict(self.by_policy), "records": self.records}


SAMPLES = Samples()


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--grpc-address", default="", help="the router's gRPC Generate address")
    parser.add_argument("--policies", default=DEFAULT_POLICIES,
                        help="comma-separated policies the users cycle through")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per request")
    parser.add_argument("--prompts-file", default="", help="JSON list of prompt strings")
    parser.add_argument("--samples-out", default="", help="write the raw samples here (JSON)")
    parser.add_argument("--request-timeout", type=float, default=300.0,
                        help="seconds one request may take before it counts as failed")


@events.test_stop.add_listener
def _write_samples(environment, **_kw) -> None:
    path = environment.parsed_options.samples_out
    if path:
        with SAMPLES.lock, open(path, "w") as f:
            json.dump(SAMPLES.to_dict(), f)


class _Stream:
    """Arrival times of one request's tokens -> TTFT / ITL events and the samples."""

    def __init__(self, user: User, channel: str):
        self.user, self.channel = user, channel
        self.start = time.perf_counter()
        self.wall_start = time.time()
        self.last: float | None = None
        self.ttft_ms: float | None = None
        self.gaps: list[float] = []

    def arrived(self) -> None:
        now = time.perf_counter()
        fire = self.user.environment.events.request.fire
        if self.last is None:
            self.ttft_ms = (now - self.start) * 1e3
            fire(request_type="TTFT", name=self.channel, response_time=self.ttft_ms,
                 response_length=0, exception=None, context={})
        else:
            gap = (now - self.last) * 1e3
            self.gaps.append(gap)
            fire(request_type="ITL", name=self.channel, response_time=gap, response_length=0,
                 exception=None, context={})
        self.last = now

    def done(self, kind: str, name: str, policy: str, tokens: int,
             error: str | None) -> None:
        elapsed = (time.perf_counter() - self.start) * 1e3
        self.user.environment.events.request.fire(
            request_type=kind, name=name, response_time=elapsed, response_length=tokens,
            exception=None if error is None else RuntimeError(error), context={})
        with SAMPLES.lock:
            SAMPLES.requests += 1
            SAMPLES.tokens += tokens
            SAMPLES.by_policy[policy] += 1
            SAMPLES.records.append((self.wall_start, time.time(), error is not None, policy))
            if self.ttft_ms is not None:
                SAMPLES.ttft_ms.append(self.ttft_ms)
            SAMPLES.itl_ms.extend(self.gaps)
            if error is not None:
                SAMPLES.failures += 1
                SAMPLES.errors[f"{kind} {name}: {error[:200]}"] += 1


class _RouterUser(User):
    abstract = True
    wait_time = between(0.0, 0.2)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.policies = itertools.cycle(random.sample(p := opts.policies.split(","), len(p)))
        self.max_tokens, self.timeout = opts.max_tokens, opts.request_timeout
        prompts = DEFAULT_PROMPTS
        if opts.prompts_file:
            with open(opts.prompts_file) as f:
                prompts = json.load(f)
        self.prompts = prompts
        self.rng = random.Random()


class SseUser(_RouterUser):
    """The OpenAI API, streaming: completions and chat alternate, the policy by `model`."""

    weight = 3

    def on_start(self) -> None:
        super().on_start()
        self.http = requests.Session()

    def on_stop(self) -> None:
        self.http.close()

    @task
    def completion(self) -> None:
        self._stream("/v1/completions", {"prompt": self.rng.choice(self.prompts)})

    @task
    def chat(self) -> None:
        prompt = self.rng.choice(self.prompts)
        self._stream("/v1/chat/completions",
                     {"messages": [{"role": "user", "content": f"Continue:\n{prompt}"}]})

    def _stream(self, path: str, body: dict) -> None:
        policy = next(self.policies)
        body |= {"model": policy, "max_tokens": self.max_tokens, "temperature": 1.0,
                 "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
                 "seed": self.rng.randrange(2**31)}
        s = _Stream(self, "sse")
        tokens, error = 0, None
        try:
            with self.http.post(self.host + path, json=body, stream=True,
                                timeout=self.timeout) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                done = False
                for line in resp.iter_lines():
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:]
                    if data == b"[DONE]":
                        done = True
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        raise RuntimeError(f"error event: {obj['error'].get('message')}")
                    for choice in obj.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content") or choice.get("text")
                        if text:
                            s.arrived()
                    if obj.get("usage"):
                        tokens = obj["usage"]["completion_tokens"]
                if not done:
                    raise RuntimeError("the stream ended without [DONE]")
                if tokens < self.max_tokens:
                    raise RuntimeError(f"{tokens} of {self.max_tokens} tokens")
        except Exception as e:  # noqa: BLE001 - every failure is recorded, by its message
            error = f"{type(e).__name__}: {e}"
        s.done("SSE", f"{path} {policy}", policy, tokens, error)


class GrpcGenerateUser(_RouterUser):
    """gRPC `hilm.v1.Generator/Generate` on the router (text prompts, mixed policies)."""

    weight = 1

    def on_start(self) -> None:
        super().on_start()
        self.channel = grpc.insecure_channel(self.environment.parsed_options.grpc_address)
        self.stub = generate_pb2_grpc.GeneratorStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def generate(self) -> None:
        policy = next(self.policies)
        request = generate_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(text=self.rng.choice(self.prompts)),
            sampling=common_pb2.SamplingParams(temperature=1.0, seed=self.rng.randrange(2**31)),
            max_tokens=self.max_tokens, ignore_eos=True, policy=policy)
        s = _Stream(self, "grpc")
        tokens, error, finish = 0, None, ""
        try:
            for r in self.stub.Generate(request, timeout=self.timeout):
                if r.token_ids:
                    s.arrived()
                    tokens += len(r.token_ids)
                finish = r.finish_reason or finish
            if tokens < self.max_tokens or finish != "length":
                raise RuntimeError(f"{tokens} of {self.max_tokens} tokens, finish {finish!r}")
        except grpc.RpcError as e:
            error = f"{e.code().name}: {e.details()}"
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"
        s.done("gRPC", f"Generate {policy}", policy, tokens, error)

"""Fuzzing the tiers' gRPC services (hypothesis) and the router's HTTP API (schemathesis).

One input = one request sent. gRPC messages are drawn from the services' own protobuf
descriptors (every field, out-of-range numbers, NaN and infinities, unknown enum values, huge and
empty lists, oneofs), with session ids and positions biased towards the live ones so that inputs
reach past the first check; a share of inputs are raw bytes that are no valid message at all.
The HTTP API is fuzzed from the router's own OpenAPI schema (FastAPI's /openapi.json), positive
(schema-valid) and negative cases.

Outcome classes: a client error (a gRPC status a client can cause: INVALID_ARGUMENT, NOT_FOUND,
FAILED_PRECONDITION, PERMISSION_DENIED, RESOURCE_EXHAUSTED, OUT_OF_RANGE; HTTP 4xx), OK, or a
server error (gRPC UNKNOWN, INTERNAL, DATA_LOSS, UNAVAILABLE, DEADLINE_EXCEEDED, UNIMPLEMENTED;
HTTP 5xx or no answer). A crash is a tier process that is gone. Pass: 0 of both.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from pathlib import Path

import grpc
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}
# The secured stack of conftest.py.
TIER_TOKEN = "tier-token-for-tests"
API_KEY = "sk-router-test-key"
MAX_OUTPUT_TOKENS = 16  # the router's --max-output-tokens: bounds the work of each valid input
RPC_TIMEOUT_S = 120.0  # a hang is a server error, not a slow machine: generous


def inputs_per_service() -> int:
    """HILM_FUZZ_INPUTS (`make fuzz`: 10,000); CI runs a bounded sample."""
    return int(os.environ.get("HILM_FUZZ_INPUTS", "40"))


def fuzz_settings(n: int):
    return settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck), derandomize=False)


@dataclasses.dataclass
class Tally:
    service: str
    inputs: int = 0
    ok: int = 0
    client_errors: int = 0
    server_errors: int = 0
    crashes: int = 0
    codes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list[str] = dataclasses.field(default_factory=list)  # first server errors
    seconds: float = 0.0

    def grpc(self, code: grpc.StatusCode, what: str, details: str = "") -> None:
        self.inputs += 1
        self.codes[code.name] += 1
        if code is grpc.StatusCode.OK:
            self.ok += 1
        elif code in CLIENT_ERRORS:
            self.client_errors += 1
        else:
            self.server_errors += 1
            if len(self.examples) < 10:
                self.examples.append(f"{what}: {code.name} {details[:300]}")

    def http(self, status: int | None, what: str, details: str = "") -> None:
        self.inputs += 1
        self.codes[str(status)] += 1
        if status is not None and status < 400:
            self.ok += 1
        elif status is not None and status < 500:
            self.client_errors += 1
        else:
            self.server_errors += 1
            if len(self.examples) < 10:
                self.examples.append(f"{what}: {status} {details[:300]}")

    def summary(self) -> dict:
        d = dataclasses.asdict(self)
        d["codes"] = dict(self.codes)
        return d


class Report(list):
    """The session's tallies, written to bench/results/fuzz-<UTC>.json after each service when
    HILM_FUZZ_REPORT is set (`make fuzz`), so that a run cut short keeps what it measured."""

    def __init__(self):
        super().__init__()
        self.path: Path | None = None
        if os.environ.get("HILM_FUZZ_REPORT"):
            out = Path(__file__).resolve().parents[2] / "bench" / "results"
            out.mkdir(parents=True, exist_ok=True)
            self.path = out / f"fuzz-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"

    def flush(self, **extra) -> None:
        """The standard benchmark JSON (hilm_vllm.lab.benchjson): config, git commit, machine,
        and under `results` the services' tallies."""
        if self.path is not None:
            from hilm_vllm.lab.benchjson import git_commit, machine

            self.path.write_text(json.dumps(
                {"benchmark": "fuzz", "created_utc": self.path.stem.removeprefix("fuzz-"),
                 "config": {"inputs_per_service": inputs_per_service()},
                 "git_commit": git_commit(), "machine": machine(),
                 "results": {"services": [t.summary() for t in self], **extra}}, indent=2)
                + "\n")


# ---- protobuf messages from their descriptors --------------------------------------------------

_INT32 = (-(1 << 31), (1 << 31) - 1)
_INT64 = (-(1 << 63), (1 << 63) - 1)
_EDGES = [0, 1, -1, 2, 3, 4, 16, 63, 64, 65, 1023, 1024, 1025, 4096]


def _ints(lo: int, hi: int, small: tuple[int, int] = (0, 600)) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(*small), st.sampled_from([e for e in _EDGES if lo <= e <= hi]
                                                          + [lo, hi]), st.integers(lo, hi))


def _floats(width: int) -> st.SearchStrategy[float]:
    return st.one_of(st.floats(0, 2, width=width), st.sampled_from([0.0, 1.0, -1.0, 1e-9]),
                     st.floats(width=width, allow_nan=True, allow_infinity=True))


def _scalar(f) -> st.SearchStrategy:
    t = f.type
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return _ints(*_INT32)
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return _ints(*_INT64)
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return _ints(0, (1 << 32) - 1)
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return _ints(0, (1 << 64) - 1)
    if t == F.TYPE_FLOAT:
        return _floats(32)
    if t == F.TYPE_DOUBLE:
        return _floats(64)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return st.one_of(st.text(max_size=40), st.just("def f(x):\n    return"),
                         st.text(min_size=2000, max_size=5000, alphabet="ab \n\u00e9\U0001f600"))
    if t == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == F.TYPE_ENUM:
        return st.integers(-3, 8)  # known values and unknown ones (proto3 enums are open)
    raise TypeError(f"unhandled field type {t}")


def _is_map(f) -> bool:
    return f.type == F.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def messages(cls, depth: int = 0, fixed: dict | None = None) -> st.SearchStrategy:
    """Messages of `cls` with any subset of fields set; `fixed` maps field names to strategies
    that replace the generic ones (to steer towards live sessions)."""
    fixed = fixed or {}
    fields = {}
    for f in cls.DESCRIPTOR.fields:
        if f.name in fixed:
            s = fixed[f.name]
        elif _is_map(f):  # map<K, V>: a dict of any size, small or large
            key, value = (f.message_type.fields_by_name[n] for n in ("key", "value"))
            vs = (messages(value.message_type._concrete_class, depth + 1)
                  if value.type == F.TYPE_MESSAGE else _scalar(value))
            fields[f.name] = st.one_of(st.dictionaries(_scalar(key), vs, max_size=6),
                                       st.dictionaries(_scalar(key), vs, min_size=60,
                                                       max_size=300))
            continue
        elif f.type == F.TYPE_MESSAGE:
            if depth >= 3:
                continue
            s = messages(f.message_type._concrete_class, depth + 1)
        else:
            s = _scalar(f)
        if f.is_repeated:
            s = st.one_of(st.lists(s, max_size=6), st.lists(s, min_size=60, max_size=300))
        fields[f.name] = s

    def build(values: dict):
        msg = cls()
        for name, value in values.items():
            field = cls.DESCRIPTOR.fields_by_name[name]
            if _is_map(field):
                target = getattr(msg, name)
                for k, v in value.items():
                    if field.message_type.fields_by_name["value"].type == F.TYPE_MESSAGE:
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
            elif field.is_repeated:
                getattr(msg, name).extend(value)
            elif field.type == F.TYPE_MESSAGE:
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    return st.fixed_dictionaries({}, optional=fields).map(build)


# ---- the gRPC driver ---------------------------------------------------------------------------

class GrpcFuzzer:
    """Calls one service over a blocking channel and files each outcome in a Tally.

    Sessions: `live` maps session ids this fuzzer opened to their positions; request fields
    `session_id` and `position` are drawn from them most of the time."""

    MAX_LIVE = 8  # older sessions are closed (not counted as inputs): the per-client cap

    def __init__(self, channel, tally: Tally, metadata=(), close=None):
        self.channel, self.tally, self.metadata = channel, tally, tuple(metadata)
        self.live: dict[str, int] = {}
        self.close = close  # (method, request class, response class) of CloseSession

    def close_oldest(self) -> None:
        while self.close and len(self.live) > self.MAX_LIVE:
            sid = next(iter(self.live))
            method, req, resp = self.close
            with_ok = self.channel.unary_unary(method, request_serializer=_serialize,
                                               response_deserializer=resp.FromString)
            try:
                with_ok(req(session_id=sid), metadata=self.metadata, timeout=RPC_TIMEOUT_S)
            except grpc.RpcError:
                pass
            self.live.pop(sid, None)

    def call(self, method: str, request, response_cls, stream: bool = False):
        """One input. Returns the reply (or the list of streamed replies), None on error."""
        kind = self.channel.unary_stream if stream else self.channel.unary_unary
        serialize = _raw if isinstance(request, bytes) else _serialize
        rpc = kind(method, request_serializer=serialize,
                   response_deserializer=response_cls.FromString)
        try:
            if stream:
                reply = list(rpc(request, metadata=self.metadata, timeout=RPC_TIMEOUT_S))
            else:
                reply = rpc(request, metadata=self.metadata, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as e:
            self.tally.grpc(e.code(), f"{method} {_short(request)}", e.details() or "")
            return None
        self.tally.grpc(grpc.StatusCode.OK, method)
        return reply


def _serialize(msg) -> bytes:
    return msg.SerializeToString()


def _raw(data: bytes) -> bytes:
    return data


def _short(request) -> str:
    text = repr(request) if isinstance(request, bytes) else str(request).replace("\n", " ")
    return text[:300]


def session_fields(fuzzer: GrpcFuzzer) -> dict:
    """session_id / position strategies biased to the live sessions."""
    def pick(i: int) -> str:  # at draw time: the sessions live now
        live = list(fuzzer.live)
        return live[i % len(live)] if live else ""

    ids = st.one_of(st.integers(0, 1 << 20).map(pick), st.integers(0, 1 << 20).map(pick),
                    st.integers(0, 1 << 20).map(pick), st.text(max_size=20))
    positions = st.one_of(st.just(0), _ints(*_INT64))  # 0: the session's live position
    return {"session_id": ids, "position": positions}


def drive(fuzzer: GrpcFuzzer, calls: list[tuple], n: int, raw_share: float = 0.1) -> None:
    """Run `n` inputs. `calls`: (method, request class, response class, stream, weight, fixed)
    where `fixed` maps field names to strategies; a `position` of None is replaced by the live
    position of the chosen session."""
    methods = [c[0] for c in calls]
    table = {c[0]: c for c in calls}
    weights = st.sampled_from(sum(([c[0]] * c[4] for c in calls), []))

    @fuzz_settings(n)
    @given(st.data())
    def one(data):
        if data.draw(st.floats(0, 1)) < raw_share:  # bytes that are no valid message
            method = data.draw(st.sampled_from(methods))
            _, _, resp, stream, _, _ = table[method]
            fuzzer.call(method, data.draw(st.binary(max_size=80)), resp, stream)
            return
        method = data.draw(weights)
        _, req_cls, resp, stream, _, fixed = table[method]
        request = data.draw(messages(req_cls, fixed=fixed(fuzzer) if callable(fixed) else fixed))
        fields = req_cls.DESCRIPTOR.fields_by_name
        if "position" in fields and "session_id" in fields and not request.position:
            request.position = fuzzer.live.get(request.session_id, 0)
        reply = fuzzer.call(method, request, resp, stream)
        after_reply(fuzzer, method, request, reply)

    one()


def after_reply(fuzzer: GrpcFuzzer, method: str, request, reply) -> None:
    """Track live sessions and their positions from the replies."""
    if reply is None or isinstance(request, bytes):
        return
    if method.endswith("/OpenSession"):
        fuzzer.live[reply.session_id] = reply.position
        fuzzer.close_oldest()
    elif method.endswith("/CloseSession"):
        fuzzer.live.pop(request.session_id, None)
    elif hasattr(reply, "position") and getattr(request, "session_id", ""):
        fuzzer.live[request.session_id] = reply.position

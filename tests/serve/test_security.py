"""Authentication and encryption between tiers, over real gRPC servers on loopback.

Each test serves the real Drafter and Generator services from a real `TierRuntime` (the one
`hilm-serve` runs) with the security a tier gets from its flags; the drafter's engine is absent
(sessions are bookkeeping until a Draft; Generate answers UNAVAILABLE), so these run in seconds.
Certificates are made per test run (tests/certs.py)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hilm_vllm.config import ServeConfig
from hilm_vllm.tiers import Tier
from hilm_vllm.drafter.client import DrafterClient
from hilm_vllm.drafter.core import Drafter, DrafterSettings, ModelInfo
from hilm_vllm.drafter.service import DrafterServicer
from hilm_vllm.errors import Unavailable
from hilm_vllm.netmodel import NetworkModel
from hilm_vllm.proto.hilm.v1 import (common_pb2, drafter_pb2, drafter_pb2_grpc, generate_pb2,
                                     generate_pb2_grpc)
from hilm_vllm.router.links import DrafterLink, TierUsage
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.server import security as sec
from hilm_vllm.server.runtime import TierRuntime
from hilm_vllm.server.security import Security, make_channel
from hilm_vllm.sessions import CLIENT_METADATA_KEY, SessionLimits, SessionStore
from hilm_vllm.verifier.service import GeneratorServicer
from tests.certs import CA

TOKEN = "s3cret-tier-token"
PROMPT = [1, 2, 3]


@pytest.fixture(scope="module")
def pki():
    return CA(), CA("stranger-ca")


def _install(settings: DrafterSettings):
    def install(server, runtime):
        drafter = DrafterServicer(runtime, settings)
        drafter._core = Drafter(None, ModelInfo(100, (), 64), settings)  # no engine needed
        drafter_pb2_grpc.add_DrafterServicer_to_server(drafter, server)

        def no_engine():
            raise Unavailable("no engine in this test")

        generate_pb2_grpc.add_GeneratorServicer_to_server(GeneratorServicer(no_engine), server)
        return ["hilm.v1.Drafter"]
    return install


@contextlib.asynccontextmanager
async def serving(security: Security | None, settings: DrafterSettings | None = None):
    cfg = ServeConfig(Tier.SLM, port=0, security=security)
    runtime = TierRuntime(cfg, None, installers=[_install(settings or DrafterSettings())])
    task = asyncio.ensure_future(runtime.run())
    while not runtime.grpc_port:
        assert not task.done(), task.exception()
        await asyncio.sleep(0.02)
    try:
        yield f"127.0.0.1:{runtime.grpc_port}"
    finally:
        runtime._stop.set()
        await task


def open_request(**kw) -> drafter_pb2.OpenDrafterSessionRequest:
    return drafter_pb2.OpenDrafterSessionRequest(
        prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=PROMPT)), **kw)


async def _open(address, security, client_id="c", **kw) -> str:
    async with make_channel(address, security) as ch:
        r = await drafter_pb2_grpc.DrafterStub(ch).OpenSession(
            open_request(**kw), metadata=((CLIENT_METADATA_KEY, client_id),), timeout=10)
        return r.session_id


async def _close(address, security, sid, client_id="c") -> None:
    async with make_channel(address, security) as ch:
        await drafter_pb2_grpc.DrafterStub(ch).CloseSession(
            drafter_pb2.CloseDrafterSessionRequest(session_id=sid),
            metadata=((CLIENT_METADATA_KEY, client_id),), timeout=10)


async def _code(coro) -> grpc.StatusCode:
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def _generate(address, security) -> None:
    async with make_channel(address, security) as ch:
        call = generate_pb2_grpc.GeneratorStub(ch).Generate(generate_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(text="x")), timeout=10)
        async for _ in call:
            pass


async def _health(address, security) -> int:
    async with make_channel(address, security) as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                       timeout=10)
        return r.status


def test_the_tier_token_is_required_on_every_method_but_health():
    async def run():
        async with serving(Security(token=TOKEN)) as address:
            none, wrong, right = Security(), Security(token="guess"), Security(token=TOKEN)
            assert await _code(_open(address, none)) is grpc.StatusCode.UNAUTHENTICATED
            assert await _code(_open(address, wrong)) is grpc.StatusCode.UNAUTHENTICATED
            # a streaming method is refused the same way
            assert await _code(_generate(address, none)) is grpc.StatusCode.UNAUTHENTICATED
            # with the token the call reaches the service (here: no engine -> UNAVAILABLE)
            assert await _code(_generate(address, right)) is grpc.StatusCode.UNAVAILABLE
            sid = await _open(address, right)
            await _close(address, right, sid)
            # health checks stay open (load balancers, TierProcess.wait_healthy)
            assert await _health(address, none) == health_pb2.HealthCheckResponse.SERVING

            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _open(address, none)
            assert "--tier-token" in e.value.details()
    asyncio.run(run())


def test_a_call_without_the_token_is_refused_before_its_request_is_parsed():
    """The token interceptor answers UNAUTHENTICATED without deserialising the request (an
    unauthenticated peer must not make the server parse megabytes of protobuf)."""
    from hilm_vllm.server.security import TokenInterceptor

    parsed = []

    def deserialize(raw: bytes) -> bytes:
        parsed.append(len(raw))
        return raw

    async def echo(request, context):
        return request

    handler = grpc.method_handlers_generic_handler("t.Echo", {
        "Call": grpc.unary_unary_rpc_method_handler(echo, request_deserializer=deserialize,
                                                    response_serializer=bytes)})

    async def run():
        server = grpc.aio.server(interceptors=[TokenInterceptor([TOKEN])])
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = ch.unary_unary("/t.Echo/Call")
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call(b"x" * 100_000, timeout=10)
                assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
                assert parsed == []
                out = await call(b"y" * 10, timeout=10,
                                 metadata=(("authorization", f"Bearer {TOKEN}"),))
                assert out == b"y" * 10 and parsed == [10]
        finally:
            await server.stop(None)

    asyncio.run(run())


def test_mutual_tls_refuses_strangers_and_binds_sessions_to_the_certificate(pki):
    ca, stranger = pki

    async def run():
        async with serving(ca.security("slm", TOKEN)) as address:
            router_a = ca.security("router-a", TOKEN, server=False)
            router_b = ca.security("router-b", TOKEN, server=False)
            # no TLS, TLS without a client certificate, a certificate of another CA: refused
            # in the handshake
            plain = Security(token=TOKEN)
            no_cert = Security(ca=ca.pem, token=TOKEN)
            foreign = stranger.security("router-a", TOKEN, server=False)
            foreign = Security(foreign.cert, foreign.key, ca.pem, TOKEN)
            for bad in (plain, no_cert, foreign):
                assert await _code(_open(address, bad)) is grpc.StatusCode.UNAVAILABLE
            # a good certificate without the token: still UNAUTHENTICATED
            no_token = Security(router_a.cert, router_a.key, ca.pem)
            assert await _code(_open(address, no_token)) is grpc.StatusCode.UNAUTHENTICATED

            sid = await _open(address, router_a, client_id="router")
            # same self-asserted client id, another certificate: not its session
            code = await _code(_close(address, router_b, sid, client_id="router"))
            assert code is grpc.StatusCode.PERMISSION_DENIED
            await _close(address, router_a, sid, client_id="router")
    asyncio.run(run())


def test_server_only_tls_needs_a_tls_client():
    ca = CA()

    async def run():
        async with serving(ca.security("slm", mutual=False)) as address:
            assert await _code(_open(address, Security())) is grpc.StatusCode.UNAVAILABLE
            sid = await _open(address, Security(ca=ca.pem))  # verifies the server, no cert
            await _close(address, Security(ca=ca.pem), sid)
    asyncio.run(run())


def test_tier_clients_and_router_links_use_the_one_channel_function(pki):
    """DrafterClient (TierClient) takes a Security; the router's links take the process's."""
    ca, _ = pki
    client = ca.security("router-a", TOKEN, server=False)

    async def run():
        async with serving(ca.security("slm", TOKEN)) as address:
            async with DrafterClient(address, client_id="r", security=client) as d:
                s = await d.open_session(PROMPT, SamplingSpec())
                await d.close_session(s.session_id)
            async with DrafterClient(address, client_id="r") as d:  # process default: none
                with pytest.raises(grpc.aio.AioRpcError):
                    await d.open_session(PROMPT, SamplingSpec())
            sec.set_process_security(client)
            try:
                link = DrafterLink(Tier.SLM, address, NetworkModel(), "r", 10.0)
                r = await link.open(PROMPT, SamplingSpec(), 4, None, TierUsage())
                await link.close_session(r.session_id, TierUsage())
                await link.close()
            finally:
                sec.set_process_security(sec.INSECURE)
    asyncio.run(run())


def test_per_client_session_cap_counts_the_certificate_not_the_client_id(pki):
    ca, _ = pki
    settings = DrafterSettings(max_sessions=10, max_sessions_per_client=3)

    async def run():
        async with serving(ca.security("slm"), settings) as address:
            a = ca.security("router-a", server=False)
            b = ca.security("router-b", server=False)
            for i in range(3):  # new client ids do not buy a new quota
                await _open(address, a, client_id=f"id-{i}")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _open(address, a, client_id="id-9")
            assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-sessions-per-client" in e.value.details()
            await _open(address, b)  # another peer still gets in
    asyncio.run(run())


def test_num_samples_over_the_cap_is_invalid_argument_naming_the_flag():
    settings = DrafterSettings(max_client_samples=32)

    async def run():
        async with serving(None, settings) as address:
            ok = common_pb2.UncertaintyConfig(num_samples=32)
            await _open(address, Security(), uncertainty=ok)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _open(address, Security(),
                            uncertainty=common_pb2.UncertaintyConfig(num_samples=1024))
            assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "--max-uncertainty-samples" in e.value.details()
    asyncio.run(run())


def test_session_store_per_client_cap_is_released_by_close_and_expiry():
    now = [0.0]
    store = SessionStore(SessionLimits(max_sessions=5, ttl_s=10, max_sessions_per_client=2),
                         clock=lambda: now[0])
    s1 = store.open("a", None)
    store.open("a", None)
    with pytest.raises(Exception, match="--max-sessions-per-client"):
        store.open("a", None)
    store.open("b", None)
    store.close(s1.id, "a")
    store.open("a", None)  # a close gives the slot back
    now[0] = 11.0
    assert store.held_by("a") == 2
    store.open("a", None)  # open sweeps expired sessions first
    assert store.held_by("a") == 1 and store.held_by("b") == 0
    with pytest.raises(ValueError):
        SessionLimits(max_sessions_per_client=0)


def test_flags_are_checked_at_startup(tmp_path):
    import argparse

    ns = argparse.Namespace(tls_cert=None, tls_key=None, tls_ca=tmp_path / "ca.pem",
                            tier_token=None, tls_server_name=None)
    with pytest.raises(ValueError, match="--tls-ca needs --tls-cert"):
        sec.security_from_args(ns)
    ns = argparse.Namespace(tls_cert=tmp_path / "missing.pem", tls_key=tmp_path / "k.pem",
                            tls_ca=None, tier_token=None, tls_server_name=None)
    with pytest.raises(ValueError, match="--tls-cert"):
        sec.security_from_args(ns)
    with pytest.raises(ValueError, match="--max-uncertainty-samples"):
        DrafterSettings(max_client_samples=2000)


def test_a_temperature_no_float32_can_carry_is_refused_before_the_wire():
    """Found by the HTTP fuzzer: 1.8e266 passed the router, arrived at the drafter as inf, and
    vLLM's refusal there left as UNKNOWN (a 503)."""
    from vllm.exceptions import VLLMValidationError

    from hilm_vllm.server.grpc_util import is_engine_client_error

    SamplingSpec(temperature=3.0e38)
    for bad in (1.8e266, float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="temperature"):
            SamplingSpec(temperature=bad)
    with pytest.raises(ValueError, match="top_k"):  # an int32 on the wire: was a 500
        SamplingSpec(top_k=8251277124443051632125519784312832)
    assert is_engine_client_error(VLLMValidationError("temperature must be finite"))
    assert not is_engine_client_error(RuntimeError("x"))


def test_exempt_principals_are_not_capped_per_client_but_still_by_the_tier():
    store = SessionStore(SessionLimits(max_sessions=10, ttl_s=10, max_sessions_per_client=2,
                                       exempt_principals=("hilm-router",)))
    for _ in range(4):  # the router's client id "hilm-router-<pid>" matches "hilm-router"
        store.open("hilm-router-123", None)
    store.open("hilm-router", None)
    for owner in ("hilm-routerx", "a"):  # a name matches exactly or as "name-...": capped
        store.open(owner, None)
        store.open(owner, None)
        with pytest.raises(Exception, match="--max-sessions-per-client"):
            store.open(owner, None)
    store.open("hilm-router-9", None)  # the 10th session
    with pytest.raises(Exception, match=r"\(--max-sessions\)"):
        store.open("hilm-router-123", None)  # the tier's own cap binds everyone

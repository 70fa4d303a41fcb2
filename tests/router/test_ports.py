"""The router's ports (hilm_vllm/router/ports.py) are what both the gRPC links and the test
fakes implement: every member the protocol names exists, its parameters are accepted under the
protocol's names, and it is async where the protocol's is (pure inspection, no tiers)."""

from __future__ import annotations

import inspect

import pytest

from hilm_vllm.router.links import DrafterLink, VerifierLink
from hilm_vllm.router.ports import DraftPort, TierPort, VerifyPort
from tests.router.fakes import FakeDrafter, FakeVerifier, SlowDrafter


def members(protocol) -> dict[str, object]:
    out = {}
    for cls in reversed(protocol.__mro__):
        if cls in (TierPort, DraftPort, VerifyPort):
            out.update({k: v for k, v in vars(cls).items() if not k.startswith("_")})
    return out


def mismatches(impl: type, protocol) -> list[str]:
    bad = []
    for name, want in members(protocol).items():
        got = inspect.getattr_static(impl, name, None)
        if got is None:
            bad.append(f"{impl.__name__}.{name} is missing")
            continue
        if isinstance(want, property):
            if not isinstance(got, property):
                bad.append(f"{impl.__name__}.{name} is not a property")
            continue
        if inspect.iscoroutinefunction(want) and not inspect.iscoroutinefunction(got):
            bad.append(f"{impl.__name__}.{name} is not a coroutine function")
        if name == "generate" and not inspect.isasyncgenfunction(got):
            bad.append(f"{impl.__name__}.generate is not an async generator")
        params = inspect.signature(got).parameters
        varargs = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values())
        missing = [p for p in inspect.signature(want).parameters
                   if p != "self" and p not in params]
        if missing and not varargs:
            bad.append(f"{impl.__name__}.{name} lacks parameters {missing}")
    return bad


@pytest.mark.parametrize("impl, protocol", [
    (DrafterLink, DraftPort), (VerifierLink, VerifyPort),
    (FakeDrafter, DraftPort), (SlowDrafter, DraftPort), (FakeVerifier, VerifyPort)])
def test_links_and_fakes_implement_the_routers_ports(impl, protocol):
    assert mismatches(impl, protocol) == []


def test_a_link_that_misses_a_port_member_is_caught():
    class NoDraft(FakeVerifier):
        async def verify(self, sid, position):  # too few parameters
            return None

    assert "NoDraft.draft is missing" in mismatches(NoDraft, DraftPort)
    assert any("lacks parameters" in m for m in mismatches(NoDraft, VerifyPort))

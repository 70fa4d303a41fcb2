"""Routing policies and the network model: pure functions."""

import math
import random

import pytest

from hilm_vllm.netmodel import Site, network_model, shannon_rate
from hilm_vllm import codec
from hilm_vllm.router.policy import (Forward, LlmDown, Policy, common_prefix, ilm_forward_from,
                                     plan)
from hilm_vllm.thresholds import Thresholds
from hilm_vllm.tiers import Tier

TH = Thresholds(t1=0.2, t2=0.6, t_ilm=0.5)


def where(p):
    return p.skips, p.target


@pytest.mark.parametrize("us, skips, target", [
    ([0.1, 0.2, 0.0], 3, None),  # all confident: kept on the device
    ([0.1, 0.3, 0.9], 1, Tier.ILM),  # the block from the first medium token goes to the ILM
    ([0.0, 0.7, 0.1], 1, Tier.LLM),  # from the first uncertain token to the LLM
    ([0.65, 0.0], 0, Tier.LLM),
    ([0.2, 0.6], 1, Tier.ILM),  # the bounds are inclusive: u <= t1 skip, u <= t2 ILM
])
def test_hilm_routes_by_the_first_token_it_does_not_skip(us, skips, target):
    assert where(plan(Policy.HILM, us, TH)) == (skips, target)


@pytest.mark.parametrize("policy, forward, llm_down", [
    (Policy.HILM, Forward.UNSURE, LlmDown.KEEP), (Policy.CASCADE, Forward.ALL, LlmDown.FAIL),
    (Policy.SPEC, Forward.NONE, LlmDown.FAIL), (Policy.HLM, Forward.NONE, LlmDown.FAIL),
    (Policy.UHLM, Forward.NONE, LlmDown.KEEP), (Policy.RAND, Forward.NONE, LlmDown.KEEP),
])
def test_the_plan_says_how_the_ilm_forwards_and_what_a_lost_llm_means(policy, forward,
                                                                      llm_down):
    p = plan(policy, [0.3, 0.9], TH, 0.0)
    assert p.forward is forward and p.llm_down is llm_down
    assert p.want_emitted == (p.target is Tier.ILM and forward is not Forward.NONE)


def test_forward_from_follows_the_plan():
    hilm, cascade = plan(Policy.HILM, [0.3], TH), plan(Policy.CASCADE, [0.3], TH)
    assert hilm.forward_from([0.1, 0.2]) is None and hilm.forward_from([0.1, 0.9]) == 1
    assert cascade.forward_from([0.1, 0.2]) == 0 and cascade.forward_from([]) is None
    assert plan(Policy.SPEC, [0.3], TH).forward_from([0.9]) is None


def test_lossless_policies_never_skip():
    us = [0.0, 0.0, 0.0]
    for policy in (Policy.SPEC, Policy.HLM):
        assert where(plan(policy, us, TH)) == (0, Tier.LLM)
    assert where(plan(Policy.CASCADE, us, TH)) == (0, Tier.ILM)


def test_uhlm_uses_t2_and_never_the_ilm():
    assert plan(Policy.UHLM, [0.5, 0.6, 0.61], TH).skips == 2
    assert plan(Policy.UHLM, [0.5, 0.6, 0.61], TH).target is Tier.LLM


def test_rand_skips_at_its_rate():
    rng, n, rate = random.Random(7), 20_000, 0.3
    skipped = sum(plan(Policy.RAND, [0.99], TH, rate, rng).skips for _ in range(n))
    assert abs(skipped / n - rate) < 4 * math.sqrt(rate * (1 - rate) / n)


def test_extreme_thresholds_steer_everything():
    us = [0.0, 0.05, 0.5, 1.0]
    assert plan(Policy.HILM, us, Thresholds(1.0, 1.0, 1.0)).skips == 4
    assert where(plan(Policy.HILM, us, Thresholds(-1.0, -1.0, 1.0))) == (0, Tier.LLM)


def test_thresholds_validate_and_load(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        Thresholds(0.5, float("nan"), 0.3)
    # t2 below t1: no ILM band
    assert where(plan(Policy.HILM, [0.4, 0.45], Thresholds(0.5, 0.2, 0.3))) == (2, None)
    assert where(plan(Policy.HILM, [0.6], Thresholds(0.5, 0.2, 0.3))) == (0, Tier.LLM)
    f = tmp_path / "t.yaml"
    f.write_text("t1: 0.1\nt2: 0.4\nt_ilm: 0.3\nuncertainty:\n  gate: entropy\n")
    tf = codec.read_thresholds(f)
    assert tf.thresholds == Thresholds(0.1, 0.4, 0.3) and tf.uncertainty.gate.value == "entropy"
    assert tf.ilm_uncertainty is None
    f.write_text("t1: 0.1\n")
    with pytest.raises(ValueError, match="t_ilm"):
        codec.read_thresholds(f)
    f.write_text("t1: 0.1\nt2: 0.4\nt_ilm: 0.3\nuncertainty:\n  gate: nope\n")
    with pytest.raises(ValueError, match="uncertainty"):
        codec.read_thresholds(f)
    with pytest.raises(ValueError, match="no such file"):
        codec.read_thresholds(tmp_path / "missing.yaml")


def test_ilm_forwarding_and_prefixes():
    assert ilm_forward_from([0.1, 0.2], 0.5) is None
    assert ilm_forward_from([0.1, 0.9, 0.0], 0.5) == 1
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0


def test_policy_parse_names_the_choices():
    assert Policy.parse("cascade") is Policy.CASCADE
    with pytest.raises(ValueError, match="llm-only, hlm, spec"):
        Policy.parse("fast")
    assert {p for p in Policy if p.lossless} == {Policy.LLM_ONLY, Policy.HLM, Policy.SPEC,
                                                 Policy.CASCADE}


def test_network_delay_is_latency_plus_size_over_shannon_rate():
    rate = shannon_rate(1e6, 20.0)
    assert rate == pytest.approx(1e6 * math.log2(101))
    net = network_model("hilm", bandwidth_hz=1e6, snr_db=20.0)
    assert net.delay(Site.DEVICE, Site.CLOUD, 1000) == pytest.approx(0.060 + 8000 / rate)
    assert net.delay(Site.CLOUD, Site.EDGE, 0) == pytest.approx(0.050)
    assert net.delay(Site.DEVICE, Site.EDGE, 10) == pytest.approx(0.010 + 80 / rate)
    assert net.delay(Site.DEVICE, Site.DEVICE, 10_000) == 0.0  # the drafter is on the device


def test_network_is_off_by_default_and_rejects_bad_input():
    net = network_model()
    assert not net.enabled and net.delay(Site.DEVICE, Site.CLOUD, 10_000) == 0.0
    assert network_model(bandwidth_hz=1e6).delay(Site.DEVICE, Site.CLOUD, 125) == pytest.approx(
        1000 / shannon_rate(1e6, 20.0))
    with pytest.raises(ValueError, match="unknown latency preset"):
        network_model("5g")
    with pytest.raises(ValueError, match="bandwidth"):
        shannon_rate(0, 10)

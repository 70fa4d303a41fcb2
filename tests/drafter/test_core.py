"""Drafter session rules and request building, without an engine (pure logic)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from hilm_vllm.drafter.core import (Drafter, DrafterSettings, ModelInfo,
                                    drafted_tokens, effective_top_k)
from hilm_vllm.drafter.processor import DRAFT_ARG, DraftOptions
from hilm_vllm.errors import (FailedPrecondition, InvalidArgument, NotFound, PermissionDenied,
                              ResourceExhausted)
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.sessions import SessionLimits, SessionStore
from hilm_vllm.seeds import Stream, derive_seed
from hilm_vllm.uncertainty import UncertaintyConfig

INFO = ModelInfo(vocab_size=100, eos_token_ids=(1,), max_model_len=64)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drafter(info=INFO, clock=None, **settings) -> Drafter:
    s = DrafterSettings(**settings)
    store = SessionStore(SessionLimits(s.max_sessions, s.session_ttl_s), clock or Clock())
    return Drafter(engine=None, info=info, settings=s, store=store)


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("request_k, cap, expected", [(0, 0, 0), (10, 0, 10), (0, 8, 8),
                                                       (10, 8, 8), (5, 8, 5)])
def test_effective_top_k(request_k, cap, expected):
    assert effective_top_k(request_k, cap) == expected


def test_open_validates_the_prompt_and_caps_top_k():
    d = drafter(draft_top_k=16)
    for bad in ([], [5, 100], [-1], list(range(64))):
        with pytest.raises(InvalidArgument):
            d.open("", bad, SamplingSpec(), None, 0)
    with pytest.raises(InvalidArgument):
        d.open("", [5], SamplingSpec(), None, -1)
    s = d.open("", [5, 6], SamplingSpec(top_k=40, seed=9), None, 10)
    assert s.state.spec.top_k == 16 and s.state.seed == 9 and s.state.seeded
    assert s.state.limit == 12 and s.state.uncertainty == UncertaintyConfig()


def test_sessions_expire_are_bounded_and_owned():
    clock = Clock()
    d = drafter(clock=clock, max_sessions=2, session_ttl_s=10)
    a = d.open("alice", [5], SamplingSpec(), None, 0)
    d.open("alice", [6], SamplingSpec(), None, 0)
    with pytest.raises(ResourceExhausted):
        d.open("bob", [7], SamplingSpec(), None, 0)
    with pytest.raises(PermissionDenied):
        run(d.append("bob", a.id, 1, [5]))
    clock.now = 11
    with pytest.raises(NotFound):
        run(d.append("alice", a.id, 1, [5]))
    d.open("bob", [7], SamplingSpec(), None, 0)  # expired sessions free their slots


def test_rollback_and_append_keep_positions_honest():
    d = drafter()
    s = d.open("", [5, 6, 7], SamplingSpec(), None, 5)
    assert run(d.append("", s.id, 3, [8, 9])) == 5
    with pytest.raises(FailedPrecondition, match="at position 5"):
        run(d.append("", s.id, 4, [1]))
    with pytest.raises(InvalidArgument):
        run(d.append("", s.id, 5, [100]))
    with pytest.raises(InvalidArgument, match="limit of 8"):
        run(d.append("", s.id, 5, [1, 2, 3, 4]))
    with pytest.raises(FailedPrecondition, match="at position 5"):
        run(d.rollback("", s.id, 6))
    with pytest.raises(InvalidArgument):
        run(d.rollback("", s.id, 0))
    assert run(d.rollback("", s.id, 2)) == 2 and s.state.tokens == [5, 6]
    d.close("", s.id)
    with pytest.raises(NotFound):
        run(d.rollback("", s.id, 1))


def test_draft_arguments_are_checked_before_the_engine():
    d = drafter(max_draft_tokens=8)
    s = d.open("", [5, 6], SamplingSpec(), None, 0)
    for n in (0, 9):
        with pytest.raises(InvalidArgument):
            run(d.draft("", s.id, 2, n))
    with pytest.raises(InvalidArgument):
        run(d.draft("", s.id, 2, 2, stop_uncertainty=float("nan")))
    with pytest.raises(FailedPrecondition):
        run(d.draft("", s.id, 3, 2))
    full = d.open("", [5, 6], SamplingSpec(), None, 1)
    run(d.append("", full.id, 2, [7]))
    with pytest.raises(InvalidArgument, match="nothing is left"):
        run(d.draft("", full.id, 3, 1))


def test_sampling_params_derive_seeds_from_the_position():
    d = drafter()
    s = d.open("", [5, 6, 7], SamplingSpec(temperature=0.7, top_p=0.9, seed=4),
               UncertaintyConfig(num_samples=8), 0)
    sp = d.sampling_params(s, "k1", 4, None)
    assert sp.seed == derive_seed(4, 3, Stream.DRAFT_SAMPLE) and sp.max_tokens == 4
    assert (sp.temperature, sp.top_p, sp.detokenize) == (0.7, 0.9, False)
    opts = DraftOptions.from_extra_args(sp.extra_args[DRAFT_ARG])
    assert opts == DraftOptions("k1", 4, 3, UncertaintyConfig(num_samples=8))
    assert d.sampling_params(s, "k2", 4, None).seed == sp.seed  # same position, same seed
    stop = d.sampling_params(s, "k3", 4, 0.5).extra_args[DRAFT_ARG]
    assert stop["stop_uncertainty"] == 0.5 and stop["stop_token"] == 1


def test_without_eos_early_stop_uses_an_explicit_stop_token():
    d = drafter(info=ModelInfo(100, (), 64))
    s = d.open("", [5], SamplingSpec(), None, 0)
    sp = d.sampling_params(s, "k", 4, 0.5)
    assert sp.stop_token_ids == [0] and sp.extra_args[DRAFT_ARG]["stop_token"] == 0
    unseeded = d.sampling_params(s, "k", 4, None)
    assert unseeded.seed is None and unseeded.stop_token_ids == []


def test_drafted_tokens_decode_the_readout():
    ids, probs = np.array([3, 9], np.int32), np.array([0.25, 0.75], np.float32)
    readout = {"tokens": [9], "u": [0.5], "ids": [ids.tobytes()], "probs": [probs.tobytes()],
               "forced_stop": None}
    (t,) = drafted_tokens(readout)
    assert (t.token_id, t.uncertainty, t.ids.tolist(), t.probs.tolist()) == (9, 0.5, [3, 9],
                                                                             [0.25, 0.75])


def test_draft_options_round_trip_and_validation():
    opts = DraftOptions("k", 1, 2, UncertaintyConfig(gate="max-prob"), 0.3, 1)
    assert DraftOptions.from_extra_args(opts.to_extra_args()) == opts
    for bad in ({"key": "", "seed": 1, "base": 0}, {"seed": 1, "base": 0},
                {"key": "k", "seed": 1, "base": 0, "stop_uncertainty": 0.5},
                {"key": "k", "seed": 1, "base": 0, "uncertainty": {"num_samples": 0}}):
        with pytest.raises(ValueError):
            DraftOptions.from_extra_args(bad)

"""Drafter session rules and request building, without an engine (pure logic)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from hilm_vllm.drafter.core import Drafter, DrafterSettings, ModelInfo, drafted_tokens
from hilm_vllm.drafter.processor import DRAFT_ARG, DraftOptions
from hilm_vllm.errors import (FailedPrecondition, InvalidArgument, NotFound, PermissionDenied,
                              ResourceExhausted)
from hilm_vllm.sampling import SamplingSpec, Truncation
from hilm_vllm.sessions import SessionLimits, SessionStore
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


def test_truncation_defaults_and_bad_values():
    assert DrafterSettings().truncation == Truncation(64, 1e-3)
    assert drafter(draft_top_k=0, draft_eps=0).settings.truncation == Truncation(0, 0.0)
    for bad in (dict(draft_top_k=-1), dict(draft_eps=1.0), dict(draft_eps=-0.1),
                dict(draft_eps=float("nan"))):
        with pytest.raises(ValueError):
            DrafterSettings(**bad)


def test_open_validates_the_prompt_and_keeps_the_request_spec():
    d = drafter(draft_top_k=16)
    for bad in ([], [5, 100], [-1], list(range(64))):
        with pytest.raises(InvalidArgument):
            d.open("", bad, SamplingSpec(), None, 0)
    with pytest.raises(InvalidArgument):
        d.open("", [5], SamplingSpec(), None, -1)
    s = d.open("", [5, 6], SamplingSpec(top_k=40, seed=9), None, 10)
    # the request's own top-k stays in the spec; the cap is the proposal's truncation
    assert s.state.spec.top_k == 40 and s.state.seed == 9 and s.state.seeded
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


def test_sampling_params_carry_the_spec_and_truncation_to_the_processor():
    d = drafter(draft_top_k=32, draft_eps=0.01)
    spec = SamplingSpec(temperature=0.7, top_p=0.9, seed=4)
    s = d.open("", [5, 6, 7], spec, UncertaintyConfig(num_samples=8), 0)
    sp = d.sampling_params(s, "k1", 4, None)
    # vLLM's sampler only keeps greedy rows greedy: the processor draws and forces each token
    assert sp.seed is None and sp.max_tokens == 4 and (sp.top_k, sp.top_p) in ((0, 1.0),
                                                                               (-1, 1.0))
    assert (sp.temperature, sp.detokenize) == (0.7, False)
    opts = DraftOptions.from_extra_args(sp.extra_args[DRAFT_ARG])
    assert opts == DraftOptions("k1", 4, 3, UncertaintyConfig(num_samples=8), spec=spec,
                                truncation=Truncation(32, 0.01), session=s.id)
    stop = d.sampling_params(s, "k3", 4, 0.5).extra_args[DRAFT_ARG]
    assert stop["stop_uncertainty"] == 0.5 and stop["stop_token"] == 1


def test_without_eos_early_stop_uses_an_explicit_stop_token():
    d = drafter(info=ModelInfo(100, (), 64))
    s = d.open("", [5], SamplingSpec(), None, 0)
    sp = d.sampling_params(s, "k", 4, 0.5)
    assert sp.stop_token_ids == [0] and sp.extra_args[DRAFT_ARG]["stop_token"] == 0
    unseeded = d.sampling_params(s, "k", 4, None)
    assert unseeded.seed is None and unseeded.stop_token_ids == []
    assert not s.state.seeded and s.state.seed >= 0  # a random session seed draws the tokens


def test_drafted_tokens_decode_the_readout():
    ids, probs = np.array([3, 9], np.int32), np.array([0.25, 0.75], np.float16)
    readout = {"tokens": [9], "u": [0.5], "ids": [ids.tobytes()], "probs": [probs.tobytes()],
               "forced_stop": None}
    (t,) = drafted_tokens(readout)
    assert (t.token_id, t.uncertainty, t.ids.tolist(), t.probs.tolist()) == (9, 0.5, [3, 9],
                                                                             [0.25, 0.75])


def test_draft_options_round_trip_and_validation():
    opts = DraftOptions("k", 1, 2, UncertaintyConfig(gate="max-prob"), 0.3, 1,
                        SamplingSpec(0.5, 7, 0.9, 3), Truncation(16, 0.02))
    assert DraftOptions.from_extra_args(opts.to_extra_args()) == opts
    for bad in ({"key": "", "seed": 1, "base": 0}, {"seed": 1, "base": 0},
                {"key": "k", "seed": 1, "base": 0, "stop_uncertainty": 0.5},
                {"key": "k", "seed": 1, "base": 0, "uncertainty": {"num_samples": 0}},
                {"key": "k", "seed": 1, "base": 0, "truncation": [-1, 0.0]},
                {"key": "k", "seed": 1, "base": 0, "truncation": [8, 1.5]}):
        with pytest.raises(ValueError):
            DraftOptions.from_extra_args(bad)


def test_a_draft_that_fails_leaves_the_session_as_it_was():
    d = drafter()  # no engine and no result channel: the draft fails with UNAVAILABLE
    s = d.open("", [5, 6, 7, 8], SamplingSpec(), None, 0)
    from hilm_vllm.errors import Unavailable

    with pytest.raises(Unavailable):
        run(d.draft("", s.id, 4, 2, rollback_to=2, append=[9, 9, 9]))
    assert s.state.tokens == [5, 6, 7, 8]  # neither the rollback nor the append stands


def test_min_tokens_bans_the_stop_ids_in_the_drafts_before_it():
    d = drafter()
    for bad in (dict(min_tokens=-1), dict(min_tokens=5, max_tokens=4),
                dict(stop_token_ids=[100]), dict(stop_token_ids=list(range(2000)))):
        kw = {"max_tokens": 0, **bad}
        with pytest.raises(InvalidArgument):
            d.open("", [5, 6], SamplingSpec(), None, kw.pop("max_tokens"), **kw)
    s = d.open("", [5, 6, 7], SamplingSpec(), None, 10, min_tokens=2, stop_token_ids=[9, 1])
    assert (s.state.ban, s.state.ban_until) == ((1, 9), 5)  # EOS first, no duplicates
    opts = DraftOptions.from_extra_args(d.sampling_params(s, "k", 4, None).extra_args[DRAFT_ARG])
    assert (opts.ban, opts.ban_until, opts.base) == ((1, 9), 5, 3)
    s.state.tokens += [20, 21]  # at prompt + min_tokens: nothing is banned any more
    opts = DraftOptions.from_extra_args(d.sampling_params(s, "k", 4, None).extra_args[DRAFT_ARG])
    assert (opts.ban, opts.ban_until) == ((), 0)
    plain = d.open("", [5], SamplingSpec(), None, 0, stop_token_ids=[9])
    assert plain.state.ban_until == 0  # without min_tokens the stop ids stop as usual


def test_a_cancelled_or_superseded_draft_leaves_the_session_as_it_was():
    d = drafter()
    s = d.open("", [5, 6, 7, 8], SamplingSpec(), None, 0)
    from hilm_vllm.errors import Aborted

    async def main(supersede: bool):
        started = asyncio.Event()

        async def slow_draft(session, n, stop_uncertainty):
            started.set()
            await asyncio.sleep(60)

        d._draft = slow_draft
        task = asyncio.ensure_future(d.draft("", s.id, 4, 2, rollback_to=2, append=[9, 9, 9]))
        await started.wait()
        assert s.state.tokens == [5, 6, 9, 9, 9]  # applied while the draft runs
        if supersede:  # a newer Draft (position 0, rollback_to) or CloseSession ends it
            d.supersede(s)
            with pytest.raises(Aborted):
                await task
        else:  # the client hung up
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    for supersede in (False, True):
        run(main(supersede))
        assert s.state.tokens == [5, 6, 7, 8], supersede

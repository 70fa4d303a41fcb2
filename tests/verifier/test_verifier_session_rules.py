"""Session state and validation alone (no engine): tables of calls and what they must raise."""

from __future__ import annotations

import math

import pytest

from hilm_vllm.errors import FailedPrecondition, InvalidArgument
from hilm_vllm.sampling import SamplingSpec
from hilm_vllm.verifier.session import (SessionLimits, Timings, VerifierSession, VerifyCall,
                                        VerifyReply)
from hilm_vllm.seeds import Stream, derive_seed

LIMITS = SessionLimits(vocab_size=100, max_model_len=64, max_block=4, max_new_tokens=None)


def session(prompt_len=10, limits=LIMITS, seed=None) -> VerifierSession:
    return VerifierSession(list(range(prompt_len)), prompt_len, SamplingSpec(seed=seed), limits)


def call(position=10, append=(), draft=(5,), dists=None) -> VerifyCall:
    dists = dists if dists is not None else tuple(((x,), (1.0,)) for x in draft)
    return VerifyCall(position, tuple(append), tuple(draft), tuple(dists))


def reply(m, token, position) -> VerifyReply:
    return VerifyReply(m, token, position, (), Timings(0, 0, 0))


@pytest.mark.parametrize("bad, error, words", [
    (call(position=9), FailedPrecondition, "session is at position 10"),
    (call(draft=(5, 6), dists=(((5,), (1.0,)),)), InvalidArgument, "one distribution per"),
    (call(draft=(1, 2, 3, 4, 5)), InvalidArgument, "over this tier's limit of 4"),
    (call(draft=(100,)), InvalidArgument, "draft_token_ids has token id 100"),
    (call(append=(3, -2)), InvalidArgument, "append_token_ids has token id -2"),
    (call(dists=(((5, 6), (0.5, -0.1)),)), InvalidArgument, "draft_dists[0]: "),
    (call(dists=(((5, 6), (math.inf, 0.0)),)), InvalidArgument, "sum to"),
    (call(dists=(((6,), (1.0,)),)), InvalidArgument, "draft token 5 is missing"),
    (call(dists=(((5, 6), (0.0, 1.0)),)), InvalidArgument, "probability 0"),
    (call(append=(1,) * 51, draft=(5, 6, 7)), InvalidArgument, "reach 65 tokens"),
])
def test_invalid_calls_say_what_to_fix(bad, error, words):
    with pytest.raises(error) as raised:
        session().check(bad)
    assert words in str(raised.value)


def test_context_may_fill_max_model_len_exactly():
    session().check(call(append=(1,) * 50, draft=(5, 6, 7)))  # 10 + 50 + 3 + 1 next = 64


def test_max_new_tokens_bounds_the_session():
    s = session(limits=SessionLimits(100, 64, 4, max_new_tokens=3))
    s.check(call(append=(1,), draft=(5,)))  # 1 + 1 + 1 next = 3 new tokens
    with pytest.raises(InvalidArgument, match="over its max_tokens 3"):
        s.check(call(append=(1, 2), draft=(5,)))


def test_advance_keeps_append_accepted_and_next_and_replays_only_the_last_call():
    s = session()
    first = call(append=(7,), draft=(5, 6, 8))
    s.advance(first, reply(2, 9, 14))
    assert s.tokens[10:] == [7, 5, 6, 9] and s.position == 14
    assert s.replay(first).next_token == 9
    assert s.replay(call(position=10, append=(7,), draft=(5, 6, 4))) is None


def test_seeds_are_reproducible_per_position_and_independent_streams():
    a, b = session(seed=3), session(seed=3)
    assert a.seeds(10) == b.seeds(10) != a.seeds(11)
    draw, sample = a.seeds(10)
    assert draw != sample and 0 <= draw < 2**63 and derive_seed(3, 10, Stream.VERIFY_DRAWS) == draw
    assert session().seeds(10) != session().seeds(10)  # unseeded: fresh randomness


def test_min_tokens_masks_the_rows_before_it():
    """Rows predict positions base + len(append) ... + n; those before prompt_len + min_tokens
    are masked (vLLM's min_tokens counts the session's own new tokens)."""
    from dataclasses import replace

    s = session(limits=replace(LIMITS, min_tokens=3, stop_ids=(7,)))
    assert s.ban_rows(call(draft=(5, 6))) == 3  # positions 10, 11, 12: all before 13
    assert s.ban_rows(call(append=(1, 2), draft=(5, 6))) == 1  # 12 only
    assert s.ban_rows(call(append=(1, 2, 3, 4), draft=(5,))) == 0
    assert session().ban_rows(call(draft=(5, 6))) == 0  # no min_tokens


def test_verify_args_carry_the_mask_through_the_engine():
    from hilm_vllm.verifier.wire import VerifyArgs

    args = VerifyArgs.build("k", SamplingSpec(0.5, 3), 9, [((5,), (1.0,))], ban=(7, 2),
                            ban_rows=2)
    back = VerifyArgs.from_extra_args(args.to_extra_args())
    assert (back.ban, back.ban_rows, back.spec) == ((7, 2), 2, SamplingSpec(0.5, 3))


def test_the_session_keeps_a_digest_of_the_last_call_not_its_distributions():
    s = session()
    first = call(draft=(5, 6), dists=(((5, 7), (0.5, 0.5)), ((6,), (1.0,))))
    s.advance(first, reply(2, 9, 13))
    digest, _ = s.last
    assert isinstance(digest, bytes) and len(digest) == 16  # not the call and its data
    same = call(draft=(5, 6), dists=(((5, 7), (0.5, 0.5)), ((6,), (1.0,))))
    assert s.replay(same).next_token == 9  # a retry: an equal call, another object
    for other in (call(draft=(5, 6), dists=(((5, 7), (0.25, 0.75)), ((6,), (1.0,)))),
                  call(draft=(5, 6), dists=(((5, 8), (0.5, 0.5)), ((6,), (1.0,)))),
                  call(draft=(5, 6), dists=(((5,), (1.0,)), ((6, 7), (0.5, 0.5))))):
        assert s.replay(other) is None  # same tokens, other distributions: not a retry


def test_large_blocks_are_checked_off_the_event_loop(monkeypatch):
    """A block with full-vocabulary distributions is checked (numpy) in a worker thread, so the
    verifier's event loop keeps serving other sessions; a small one inline (a thread hop would
    cost more). Either way a bad block is refused with the same message."""
    import asyncio
    import threading

    import numpy as np

    from hilm_vllm.verifier import core

    vocab = 50_000
    facts = core.EngineFacts(vocab_size=vocab, max_model_len=256, eos_token_ids=())
    verifier = core.Verifier(None, core.VerifierSettings(), facts)
    threads = []
    real = core.check_block
    monkeypatch.setattr(core, "check_block", lambda c, limits: (
        threads.append(threading.current_thread() is threading.main_thread()), real(c, limits))[1])
    row = np.full(vocab, 1.0 / vocab)
    row[5] += 0.01  # sums to 1.01: refused

    async def main():
        opened = await verifier.open_session("me", [1, 2, 3], SamplingSpec())
        for dists in ([(tuple(range(vocab)), tuple(row))], [((5,), (1.01,))]):
            bad = VerifyCall(opened.position, (), (5,), tuple(dists))
            with pytest.raises(InvalidArgument, match=r"draft_dists\[0\]: probabilities sum to"):
                await verifier.verify("me", opened.session_id, bad)

    asyncio.run(main())
    assert threads == [False, True]  # the large block in a thread, the small one inline

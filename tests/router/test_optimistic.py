"""Which optimistically drafted tokens may become the next block (pure logic)."""

from __future__ import annotations

from hilm_vllm.router.engine import optimistic_start


def test_all_accepted_and_the_bonus_is_the_drafters_next_token():
    assert optimistic_start([1, 2, 3], [1, 2, 3, 7], [7, 8, 9]) == 1


def test_the_bonus_differs_from_the_drafters_next_token():
    assert optimistic_start([1, 2, 3], [1, 2, 3, 6], [7, 8, 9]) is None


def test_a_rejection_invalidates_everything_drafted_after():
    assert optimistic_start([1, 2, 3], [1, 5], [7, 8, 9]) is None
    assert optimistic_start([1, 2, 3], [1, 2, 5], [3, 8, 9]) is None  # same length, not a bonus


def test_a_block_kept_as_it_is_keeps_the_whole_optimistic_draft():
    """Every token skipped (or the LLM unreachable under a lossy policy): no extra token, so
    everything drafted after the block was drafted from the decided context."""
    assert optimistic_start([1, 2, 3], [1, 2, 3], [7, 8, 9]) == 0


def test_an_empty_optimistic_draft():
    assert optimistic_start([1], [1, 4], []) is None

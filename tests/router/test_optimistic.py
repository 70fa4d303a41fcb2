"""Which optimistically drafted tokens may become the next block, and when a request drafts
ahead at all (pure logic)."""

from __future__ import annotations

from hilm_vllm.router.engine import optimistic_keep_chance, optimistic_start


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


def test_the_keep_chance_starts_at_a_quarter_and_follows_the_requests_agreement():
    assert optimistic_keep_chance(0, 0, 0, 0) == 0.25
    # every block of 4 kept whole: rises past 1/2 after one round
    assert optimistic_keep_chance(0, 0, 0, 0) < 0.5 <= optimistic_keep_chance(1, 1, 4, 4)
    assert optimistic_keep_chance(20, 20, 80, 80) > 0.9
    # a drafter cut in every block (about 1.6 of 4 tokens kept, as the demo family at T = 1)
    assert optimistic_keep_chance(20, 2, 80, 32) < 0.06

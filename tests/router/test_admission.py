"""The router's fair admission (pure asyncio): slots, round-robin across clients, 429s."""

from __future__ import annotations

import asyncio

import pytest

from hilm_vllm.router.admission import AdmissionLimits, FairAdmission, TooBusy


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_requests_beyond_the_slots_wait_and_are_let_in_round_robin_across_clients():
    async def main():
        adm = FairAdmission(AdmissionLimits(max_active_choices=2))
        held = [await adm.acquire("a"), await adm.acquire("a")]
        order: list[str] = []

        async def wait(client, tag):
            slot = await adm.acquire(client)
            order.append(tag)
            return slot

        # A heavy client queues five requests, then a light one queues one.
        tasks = [asyncio.ensure_future(wait("heavy", f"h{i}")) for i in range(5)]
        await settle()
        tasks.append(asyncio.ensure_future(wait("light", "l0")))
        await settle()
        assert adm.queued == 6 and order == []
        for s in held:
            s.release()
        await settle()
        # Two slots: the heavy client's first, then the light one's (not heavy's second).
        assert order == ["h0", "l0"]
        slots = [t.result() for t in tasks if t.done()]
        for s in slots:
            s.release()
            s.release()  # idempotent
        await settle()
        assert order == ["h0", "l0", "h1", "h2"]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            if not t.cancelled():
                t.result().release()
        await settle()
        assert adm.active == 0 and adm.queued == 0

    asyncio.run(main())


def test_a_full_client_queue_is_429_with_retry_after_while_other_clients_still_queue():
    async def main():
        adm = FairAdmission(AdmissionLimits(max_active_choices=1, max_queued_requests=3,
                                            max_queued_per_client=2))
        first = await adm.acquire("a")
        waiting = [asyncio.ensure_future(adm.acquire("a")) for _ in range(2)]
        await settle()
        with pytest.raises(TooBusy) as e:
            await adm.acquire("a")
        assert "max-queued-per-client" in str(e.value) and e.value.retry_after_s >= 1
        assert e.value.http_status == 429
        other = asyncio.ensure_future(adm.acquire("b"))  # b still gets a place
        await settle()
        assert adm.queued == 3
        with pytest.raises(TooBusy, match="max-queued-requests"):
            await adm.acquire("c")
        first.release()
        await settle()
        assert waiting[0].done() and not other.done()
        waiting[0].result().release()
        await settle()
        assert other.done()  # b's turn before a's second
        for t in [*waiting, other]:
            t.cancel()
        await asyncio.gather(*waiting, other, return_exceptions=True)

    asyncio.run(main())


def test_n_choices_take_n_slots_and_are_not_passed_over():
    async def main():
        adm = FairAdmission(AdmissionLimits(max_active_choices=4))
        with pytest.raises(TooBusy, match="max-active-choices"):
            await adm.acquire("a", 5)
        small = await adm.acquire("a", 3)
        big = asyncio.ensure_future(adm.acquire("b", 4))
        await settle()
        later = asyncio.ensure_future(adm.acquire("c", 1))  # would fit now, but b is ahead
        await settle()
        assert not big.done() and not later.done()
        small.release()
        await settle()
        assert big.done() and not later.done() and adm.active == 4
        big.result().release()
        await settle()
        assert later.done()
        later.result().release()
        assert adm.active == 0

    asyncio.run(main())


def test_a_waiter_that_leaves_gives_back_its_place():
    async def main():
        adm = FairAdmission(AdmissionLimits(max_active_choices=1))
        held = await adm.acquire("a")
        w = asyncio.ensure_future(adm.acquire("b"))
        await settle()
        w.cancel()
        await asyncio.gather(w, return_exceptions=True)
        assert adm.queued == 0
        held.release()
        assert adm.active == 0
        s = await adm.acquire("c")  # straight in
        assert adm.active == 1
        s.release()

    asyncio.run(main())


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="--max-active-choices"):
        AdmissionLimits(max_active_choices=0)

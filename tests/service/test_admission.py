"""Admission: at most ``limit`` calls hold a turn; the others wait in the event loop, and one that
waits too long, or finds too many waiting, is refused with 503 ``overloaded`` and Retry-After."""

from __future__ import annotations

import asyncio

import pytest

from service.admission import Admission
from service.errors import Overloaded


def test_calls_beyond_the_limit_wait_their_turn_and_all_finish():
    admission = Admission(limit=2, max_waiting=100, wait_seconds=5)
    holding, most = 0, 0

    async def call() -> None:
        nonlocal holding, most
        async with admission.turn():
            holding += 1
            most = max(most, holding)
            await asyncio.sleep(0.01)
            holding -= 1

    async def burst() -> None:
        await asyncio.gather(*(call() for _ in range(30)))

    asyncio.run(burst())
    assert most == 2
    assert holding == 0


def test_a_call_that_waits_longer_than_the_queue_time_is_overloaded_with_retry_after():
    admission = Admission(limit=1, max_waiting=100, wait_seconds=0.05)

    async def scenario() -> Overloaded:
        async with admission.turn():
            with pytest.raises(Overloaded) as refused:
                async with admission.turn():
                    pass
        async with admission.turn():  # the turn was given back: the next call gets it at once
            pass
        return refused.value

    refused = asyncio.run(scenario())
    assert refused.status == 503 and refused.code == "overloaded"
    assert int(refused.headers["Retry-After"]) > 0
    assert "LETHE_API_QUEUE_SECONDS" in refused.detail


def test_a_call_that_finds_the_waiting_room_full_is_refused_at_once():
    admission = Admission(limit=1, max_waiting=1, wait_seconds=30)

    async def scenario() -> None:
        async with admission.turn():
            waiter = asyncio.create_task(_enter(admission))
            await asyncio.sleep(0.01)
            assert admission.waiting() == 1
            with pytest.raises(Overloaded, match="already waiting"):
                async with admission.turn():
                    pass
        await waiter  # the one that waited gets its turn

    asyncio.run(scenario())


def test_a_waiter_that_is_cancelled_gives_up_its_place_without_losing_a_turn():
    admission = Admission(limit=1, max_waiting=10, wait_seconds=30)

    async def scenario() -> None:
        async with admission.turn():
            waiter = asyncio.create_task(_enter(admission))
            await asyncio.sleep(0.01)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        assert admission.waiting() == 0
        async with asyncio.timeout(1):
            await _enter(admission)

    asyncio.run(scenario())


async def _enter(admission: Admission) -> None:
    async with admission.turn():
        pass

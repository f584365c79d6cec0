"""The coalescer on its own: one call per event-loop turn, each caller its own answer or failure."""

from __future__ import annotations

import asyncio

import pytest

from api.coalescing import Coalescer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recorder:
    """A `run` that records each call's arguments and answers every argument doubled."""

    def __init__(self, release: asyncio.Event | None = None) -> None:
        self.calls: list[list[int]] = []
        self.release = release
        self.cancelled = False

    async def __call__(self, arguments: list[int]) -> list[int]:
        self.calls.append(arguments)
        try:
            if self.release:
                await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if any(a < 0 for a in arguments):
            raise ValueError("negative")
        return [2 * a for a in arguments]


async def test_callers_of_one_turn_share_one_call_in_order() -> None:
    run = Recorder()
    coalesced = Coalescer(run)
    assert await asyncio.gather(*(coalesced(i) for i in range(5))) == [0, 2, 4, 6, 8]
    assert run.calls == [[0, 1, 2, 3, 4]]


async def test_callers_of_later_turns_get_calls_of_their_own() -> None:
    run = Recorder()
    coalesced = Coalescer(run)
    assert await coalesced(1) == 2
    assert await coalesced(2) == 4
    assert run.calls == [[1], [2]]


async def test_a_call_failing_fails_each_of_its_callers() -> None:
    coalesced = Coalescer(Recorder())
    results = await asyncio.gather(coalesced(1), coalesced(-1), return_exceptions=True)
    assert [type(r) for r in results] == [ValueError, ValueError]
    assert await coalesced(3) == 6  # the next turn is a call of its own


async def test_a_caller_giving_up_leaves_the_others_their_answer() -> None:
    release = asyncio.Event()
    run = Recorder(release)
    coalesced = Coalescer(run)
    patient = asyncio.create_task(coalesced(1))
    hasty = asyncio.create_task(coalesced(2))
    await asyncio.sleep(0.01)
    hasty.cancel()
    await asyncio.sleep(0.01)
    release.set()
    assert await patient == 2
    with pytest.raises(asyncio.CancelledError):
        await hasty
    assert run.calls == [[1, 2]] and not run.cancelled


async def test_the_call_is_cancelled_when_every_caller_gave_up() -> None:
    run = Recorder(asyncio.Event())  # never released
    coalesced = Coalescer(run)
    callers = [asyncio.create_task(coalesced(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    for caller in callers:
        caller.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    await asyncio.sleep(0.01)
    assert run.cancelled
    assert not coalesced._tasks  # nothing left running


async def test_callers_cut_before_the_turn_ends_cost_no_call() -> None:
    run = Recorder()
    coalesced = Coalescer(run)
    caller = asyncio.create_task(coalesced(1))
    await asyncio.sleep(0)  # the caller joins this turn
    caller.cancel()
    await asyncio.gather(caller, return_exceptions=True)
    await asyncio.sleep(0.01)
    assert run.calls == []

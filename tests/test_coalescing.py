"""The coalescer on its own: one call per event-loop turn, each caller its own answer or failure; by
examples, then as a state machine."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from api.coalescing import Coalescer
from tests.conftest import LoopMachine, examples

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


@dataclass
class Caller:
    """A caller in `CoalescerMachine`: its argument, its task, the turn it came in, whether it gave up."""

    argument: int
    task: asyncio.Task[int]
    turn: int
    gave_up: bool = False


MISCOUNTED = ValueError("the call answered the wrong number of callers")


class CoalescerMachine(LoopMachine):
    """The coalescer as a state machine: turns of callers, callers giving up, and calls answering or
    failing, whenever Hypothesis says. What it promises:

    - each turn makes one call, with its callers' arguments in the order they came;
    - a caller that has not given up waits until its turn's call ends, then gets its own answer, or
      the call's failure (a call answering another number of answers than callers, a failure too);
    - a call whose callers have all given up is cancelled; one with a caller left is not.
    """

    def __init__(self) -> None:
        super().__init__()
        self.coalescer: Coalescer[int, int] = Coalescer(self.run)
        self.calls: list[tuple[list[int], asyncio.Future[list[int]]]] = []  # each call's arguments and answer
        self.callers: list[Caller] = []
        self.turns = 0
        self.ended: dict[int, Exception | None] = {}  # the calls that ended, by turn: None, or what they raised

    async def run(self, arguments: list[int]) -> list[int]:
        answer: asyncio.Future[list[int]] = self.loop.create_future()
        self.calls.append((arguments, answer))
        return await answer

    @rule(callers=st.integers(1, 4))
    def a_turn_of_callers(self, callers: int) -> None:
        for _ in range(callers):
            argument = len(self.callers)
            task = self.loop.create_task(self.coalescer(argument))
            self.callers.append(Caller(argument, task, self.turns))
        self.settle()
        self.turns += 1
        assert len(self.calls) == self.turns  # the turn's call has started

    @precondition(lambda self: any(not c.gave_up for c in self.callers))
    @rule(data=st.data())
    def a_caller_gives_up(self, data: st.DataObject) -> None:
        caller = data.draw(st.sampled_from([c for c in self.callers if not c.gave_up]))
        caller.task.cancel()
        caller.gave_up = True
        self.settle()

    @precondition(lambda self: any(not answer.done() for _, answer in self.calls))
    @rule(data=st.data(), fails=st.booleans())
    def a_call_ends(self, data: st.DataObject, fails: bool) -> None:
        turn = data.draw(st.sampled_from([t for t, (_, answer) in enumerate(self.calls) if not answer.done()]))
        arguments, answer = self.calls[turn]
        failure = ValueError(f"call {turn} failed") if fails else None
        if failure is not None:
            answer.set_exception(failure)
        else:
            answer.set_result([10 * a for a in arguments])
        self.ended[turn] = failure
        self.settle()

    @precondition(lambda self: any(not answer.done() for _, answer in self.calls))
    @rule(data=st.data(), more=st.booleans())
    def a_call_answers_the_wrong_number_of_callers(self, data: st.DataObject, more: bool) -> None:
        turn = data.draw(st.sampled_from([t for t, (_, answer) in enumerate(self.calls) if not answer.done()]))
        arguments, answer = self.calls[turn]
        answer.set_result([10 * a for a in arguments] + [0] if more else [10 * a for a in arguments[:-1]])
        self.ended[turn] = MISCOUNTED
        self.settle()

    @invariant()
    def each_turn_one_call_with_its_callers_arguments(self) -> None:
        assert [arguments for arguments, _ in self.calls] == [
            [c.argument for c in self.callers if c.turn == turn] for turn in range(self.turns)
        ]

    @invariant()
    def each_caller_gets_its_own_answer_once_its_call_ended(self) -> None:
        for caller in self.callers:
            if caller.gave_up:
                assert caller.task.cancelled() or caller.task.done()
            elif caller.turn not in self.ended:
                assert not caller.task.done()
            elif (failure := self.ended[caller.turn]) is MISCOUNTED:  # (a bug in `run`: nobody left waiting)
                assert isinstance(caller.task.exception(), ValueError), "a caller of a miscounted call still waits"
            elif failure is not None:
                assert caller.task.exception() is failure
            else:
                assert caller.task.result() == 10 * caller.argument

    @invariant()
    def a_call_nobody_waits_for_is_cancelled(self) -> None:
        for turn, (_, answer) in enumerate(self.calls):
            if turn not in self.ended:
                everyone_gave_up = all(c.gave_up for c in self.callers if c.turn == turn)
                assert answer.cancelled() == everyone_gave_up


TestCoalescerMachine = CoalescerMachine.TestCase
TestCoalescerMachine.settings = settings(max_examples=examples(150), stateful_step_count=30, deadline=None)

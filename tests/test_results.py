"""A request's wait for its result (`api.results.ResultWait`) as a state machine."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from api.results import ResultWait
from tests.conftest import HANG_GUARD_S, Gate, LoopMachine, examples

RESULT = b'{"id": "r", "predictions": []}'


class GetdelGate:
    """A Redis whose GETDELs wait on the machine (`Gate`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.getdel: Gate[bytes | None] = Gate(loop)


class ResultWaitMachine(LoopMachine):
    """One wait, its worker writing the result key and publishing a message that carries the result,
    or not, or is lost; the subscription coming back; the poll; the client going away; and GETDELs of
    the key that answer or fail whenever Hypothesis says. What the wait promises:

    - it returns the worker's result, and nothing else; it raises the client's going away only where
      no message had carried the result, and Redis's failure only where a GETDEL failed and none had;
    - woken (a message, the subscription back, the poll, the client gone), it never waits on: it ends,
      or looks at the key, and a wake that comes while it looks makes it look again;
    - a message that carries the result ends it once what it sent to Redis has ended, whatever else
      happens.

    The poll's own timer (`poll_s`) never fires here: `the_poll_comes` stands for it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.redis = GetdelGate(self.loop)
        self.wait = self.make_wait()
        self.task = self.loop.create_task(self.wait.result())
        self.key: bytes | None = None  # the result key, as the worker left it (GETDEL takes it)
        self.written = False
        self.carried = False  # a message carried the result before the wait ended
        self.gone: Exception | None = None  # the client went away
        self.failed = False  # a GETDEL failed
        self.unlooked = False  # woken since the wait's last look began
        self.looks = 0  # GETDELs the wait sent
        self.comebacks = 0  # times the subscription came back
        self.settle()

    def make_wait(self) -> ResultWait:
        return ResultWait(cast(Redis, self.redis), "result-key", poll_s=HANG_GUARD_S)

    def settle(self) -> None:
        super().settle()
        if len(self.redis.getdel.calls) > self.looks:
            self.looks, self.unlooked = len(self.redis.getdel.calls), False

    @precondition(lambda self: not self.written)
    @rule(message=st.sampled_from(["carries the result", "bare", "lost"]))
    def the_worker_answers(self, message: str) -> None:
        self.key, self.written = RESULT, True
        if message != "lost":
            self.carried = self.carried or (message == "carries the result" and not self.task.done())
            self.unlooked = True
            self.wait.deliver(RESULT if message == "carries the result" else None)
        self.settle()

    @rule()
    def the_subscription_comes_back(self) -> None:
        self.comebacks += 1
        self.unlooked = True
        self.wait.reconnected()
        self.settle()

    @rule()
    def the_poll_comes(self) -> None:
        """What `poll_s` of waiting does: the wait stops waiting for a wake, and looks."""
        self.unlooked = True
        self.wait.arrived.set()
        self.settle()

    @precondition(lambda self: self.gone is None)
    @rule()
    def the_client_goes_away(self) -> None:
        self.gone = ConnectionAbortedError("the client went away")
        self.unlooked = True
        self.wait.abort(self.gone)
        self.settle()

    @precondition(lambda self: self.redis.getdel.on_its_way())
    @rule(fails=st.booleans())
    def a_getdel_ends(self, fails: bool) -> None:
        [call] = self.redis.getdel.on_its_way()
        if fails:
            self.failed = True
            call.set_exception(RedisConnectionError("Redis went away"))
            self.settle()
            return
        found, self.key = self.key, None  # (GETDEL takes it)
        call.set_result(found)
        self.settle()
        if found is None:
            self.found_nothing()

    def busy(self) -> bool:
        """Whether the wait waits on Redis: a look on its way."""
        return bool(self.redis.getdel.on_its_way())

    def found_nothing(self) -> None:
        """A look that found no result has ended (and the wait has gone as far as it can)."""

    @invariant()
    def it_ends_as_promised(self) -> None:
        if not self.task.done():
            busy = self.busy()  # (what it sent ends first, within Redis's timeout)
            assert not self.carried or busy, "a message carried the result, and the wait goes on"
            assert not self.unlooked or busy, "woken, the wait neither ended nor looked"
            return
        error: Any = self.task.exception()
        if error is None:
            assert self.task.result() == RESULT
        elif error is self.gone:
            assert not self.carried, "the result had come, and the wait raised the client's going away"
        else:
            assert isinstance(error, RedisConnectionError) and self.failed
            assert not self.carried, "the result had come, and the wait raised Redis's failure"


TestResultWaitMachine = ResultWaitMachine.TestCase
TestResultWaitMachine.settings = settings(max_examples=examples(200), stateful_step_count=30, deadline=None)


class RequeueWaitMachine(ResultWaitMachine):
    """The wait behind Sentinel (`requeue`): its work item, which a failover may have lost, is pushed
    again (`PUSH_IF_LOST`) once the subscription is back and a look finds no result. The rules above,
    and pushes that end or fail whenever Hypothesis says; beyond what a wait promises:

    - an outage never ends it (only its result, or its client going away; the caller's deadline);
    - it pushes only after the subscription came back, and only after a look found no result;
    - once the subscription came back, every look that finds no result pushes, until a push sent
      after the comeback succeeded (a failed push is tried again at the next look).
    """

    def __init__(self) -> None:
        self.sent_for: list[int] = []  # each push, the comebacks before it was sent
        self.pushed_for = 0  # the comebacks before the latest push that succeeded
        super().__init__()
        self.pushes: Gate[None] = Gate(self.loop)

    def make_wait(self) -> ResultWait:
        return ResultWait(cast(Redis, self.redis), "result-key", HANG_GUARD_S, b"item", self.push_if_lost)

    async def push_if_lost(self, item: bytes) -> None:
        self.sent_for.append(self.comebacks)
        await self.pushes()

    def busy(self) -> bool:
        return super().busy() or bool(self.pushes.on_its_way())

    @precondition(lambda self: self.pushes.on_its_way())
    @rule(fails=st.booleans())
    def a_push_ends(self, fails: bool) -> None:
        [push] = self.pushes.on_its_way()  # (the latest: one at a time)
        if fails:
            push.set_exception(RedisConnectionError("Redis went away"))
        else:
            push.set_result(None)
            self.pushed_for = max(self.pushed_for, self.sent_for[-1])
        self.settle()

    def found_nothing(self) -> None:
        if not self.task.done() and self.pushed_for < self.comebacks:
            assert self.pushes.on_its_way(), "the subscription came back, a look found no result, and no push went"

    @invariant()
    def it_pushes_as_promised(self) -> None:
        assert all(comebacks > 0 for comebacks in self.sent_for), "a push before the subscription came back"
        if self.task.done():
            assert not isinstance(self.task.exception(), RedisConnectionError), "an outage ended the wait"


TestRequeueWaitMachine = RequeueWaitMachine.TestCase
TestRequeueWaitMachine.settings = settings(max_examples=examples(200), stateful_step_count=30, deadline=None)


def test_a_result_delivered_while_a_failing_look_was_out_is_answered() -> None:
    """A sequence `ResultWaitMachine` found, replayed, so that no search has to find it again."""
    state = ResultWaitMachine()
    try:
        state.the_subscription_comes_back()  # (a look goes out)
        state.the_worker_answers(message="carries the result")
        state.a_getdel_ends(fails=True)
        state.it_ends_as_promised()
        assert state.task.result() == RESULT
    finally:
        state.teardown()


def test_a_failed_push_is_tried_again_at_the_next_look() -> None:
    """The sequence `RequeueWaitMachine` found, replayed: the machine's search reaches it only now and
    then, and the promise matters behind every failover."""
    state = RequeueWaitMachine()
    try:
        state.the_subscription_comes_back()
        state.the_poll_comes()  # (while the first look is out: it looks again after)
        state.a_getdel_ends(fails=False)
        state.a_push_ends(fails=True)
        state.a_getdel_ends(fails=False)  # (asserts that a push went)
        state.it_pushes_as_promised()
        state.it_ends_as_promised()
    finally:
        state.teardown()

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
from tests.conftest import HANG_GUARD_S, LoopMachine

RESULT = b'{"id": "r", "predictions": []}'


class GetdelGate:
    """A Redis whose GETDELs each wait on a future of their own, which the machine ends (or fails)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls: list[asyncio.Future[bytes | None]] = []

    async def getdel(self, key: str) -> bytes | None:
        call: asyncio.Future[bytes | None] = self.loop.create_future()
        self.calls.append(call)
        return await call

    def on_its_way(self) -> list[asyncio.Future[bytes | None]]:
        return [call for call in self.calls if not call.done()]


class ResultWaitMachine(LoopMachine):
    """One wait, its worker writing the result key and publishing a message that carries the result,
    or not, or is lost; the subscription coming back; the client going away; and GETDELs of the key
    that answer or fail whenever Hypothesis says. What the wait promises:

    - it returns the worker's result, and nothing else; it raises the client's going away only where
      no message had carried the result, and Redis's failure only where a GETDEL failed;
    - woken (a message, the subscription back, the client gone), it never waits on: it ends, or looks
      at the key, and a wake that comes while it looks makes it look again;
    - a message that carries the result ends it, whatever else happens.

    The poll (`poll_s`) never fires here: every look is one the wait was woken for.
    """

    def __init__(self) -> None:
        super().__init__()
        self.redis = GetdelGate(self.loop)
        self.wait = ResultWait(cast(Redis, self.redis), "result-key", poll_s=HANG_GUARD_S)
        self.task = self.loop.create_task(self.wait.result())
        self.key: bytes | None = None  # the result key, as the worker left it (GETDEL takes it)
        self.written = False
        self.carried = False  # a message carried the result before the wait ended
        self.gone: Exception | None = None  # the client went away
        self.failed = False  # a GETDEL failed
        self.unlooked = False  # woken since the wait's last look began
        self.looks = 0
        self.settle()

    def settle(self) -> None:
        super().settle()
        if len(self.redis.calls) > self.looks:
            self.looks, self.unlooked = len(self.redis.calls), False

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
        self.unlooked = True
        self.wait.reconnected()
        self.settle()

    @precondition(lambda self: self.gone is None)
    @rule()
    def the_client_goes_away(self) -> None:
        self.gone = ConnectionAbortedError("the client went away")
        self.unlooked = True
        self.wait.abort(self.gone)
        self.settle()

    @precondition(lambda self: self.redis.on_its_way())
    @rule(fails=st.booleans())
    def a_getdel_ends(self, fails: bool) -> None:
        [call] = self.redis.on_its_way()
        if fails:
            self.failed = True
            call.set_exception(RedisConnectionError("Redis went away"))
        else:
            call.set_result(self.key)
            self.key = None
        self.settle()

    @invariant()
    def it_ends_as_promised(self) -> None:
        if not self.task.done():
            looking = bool(self.redis.on_its_way())  # (a look on its way ends first, within Redis's timeout)
            assert not self.carried or looking, "a message carried the result, and the wait goes on"
            assert not self.unlooked or looking, "woken, the wait neither ended nor looked"
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
TestResultWaitMachine.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)

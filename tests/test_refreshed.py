"""A shared value read again in the background (`api.refreshed`), on a clock the test moves: when a
request waits for a read, and what a failed read leaves; by examples, then as a state machine."""

from __future__ import annotations

import asyncio
import logging
import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule
from redis.exceptions import ConnectionError as RedisConnectionError

from api.refreshed import Refreshed
from tests.conftest import Gate, LoopMachine, examples

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Source:
    """A read that answers its next value, or raises what the test puts in `failure`."""

    def __init__(self) -> None:
        self.reads = 0
        self.failure: Exception | None = None

    async def __call__(self) -> int:
        self.reads += 1
        if self.failure is not None:
            raise self.failure
        return self.reads


async def settled(refreshed: Refreshed[int]) -> None:
    """Let the read on its way end, whatever it raises."""
    if refreshed.reading is not None:
        await asyncio.wait([refreshed.reading])


async def test_a_stale_value_is_read_again_behind_the_requests_and_an_old_one_is_waited_for() -> None:
    now = [0.0]
    source = Source()
    refreshed = Refreshed(source, 0, refresh_s=1.0, max_age_s=5.0, clock=lambda: now[0])
    assert await refreshed.current() == 1  # the first read, waited for
    now[0] += 1.0
    assert [await refreshed.current() for _ in range(3)] == [1, 1, 1]  # by the last read, one read on its way
    await settled(refreshed)
    assert (await refreshed.current(), source.reads) == (2, 2)
    now[0] += 5.0  # a quiet spell
    assert await refreshed.current() == 3


async def test_a_failed_read_leaves_the_value_and_the_next_request_reads_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    source = Source()
    refreshed = Refreshed(source, 0, refresh_s=1.0, max_age_s=5.0, clock=lambda: now[0])
    assert await refreshed.current() == 1
    source.failure = RedisConnectionError("Redis went away")
    now[0] += 1.0
    assert await refreshed.current() == 1
    await settled(refreshed)
    assert await refreshed.current() == 1 and refreshed.reading is not None  # a read again, at once
    await settled(refreshed)
    now[0] += 5.0
    with pytest.raises(RedisConnectionError):  # too old to go by: the request meets the failure
        await refreshed.current()
    assert not caplog.records  # Redis's failures are the requests' to meet, not a log line each
    source.failure = ValueError("a bug")
    with caplog.at_level(logging.ERROR), pytest.raises(ValueError):
        await refreshed.current()
    assert [r.message for r in caplog.records] == ["a background read from Redis failed"]
    source.failure = None
    assert await refreshed.current() == source.reads


REFRESH_S, MAX_AGE_S = 1.0, 5.0


class RefreshedMachine(LoopMachine):
    """`Refreshed` as a state machine: requests, the clock moving on, and reads that end or fail
    whenever Hypothesis says, against what it promises:

    - one read at a time, whatever the requests, and `reading` says whether one is on its way;
    - a request starts a read where the value is `REFRESH_S` old and none is on its way;
    - it goes on with the value at once, unless the value is `MAX_AGE_S` old (or was never read):
      then it waits for the read on its way, and gets what that read gets, its value or its failure;
    - a failed read leaves the value and its age as they were.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.gate: Gate[int] = Gate(self.loop)
        self.refreshed = Refreshed(self.gate, 0, REFRESH_S, MAX_AGE_S, clock=lambda: self.now)
        self.value, self.read_at = 0, -math.inf  # what the value and its age should be
        self.waiting: list[asyncio.Task[int]] = []  # requests waiting for the read on its way

    @rule(seconds=st.floats(0, 2 * MAX_AGE_S))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def a_request(self) -> None:
        age, reads, on_its_way = self.now - self.read_at, len(self.gate.calls), bool(self.gate.on_its_way())
        request = self.loop.create_task(self.refreshed.current())
        self.settle()
        assert len(self.gate.calls) == reads + (age >= REFRESH_S and not on_its_way)
        if age >= MAX_AGE_S:
            assert not request.done()
            self.waiting.append(request)
        else:
            assert request.done() and request.result() == self.value

    @precondition(lambda self: self.gate.on_its_way())
    @rule(value=st.integers(), fails=st.booleans())
    def the_read_ends(self, value: int, fails: bool) -> None:
        [read] = self.gate.on_its_way()
        if fails:
            read.set_exception(RedisConnectionError("Redis went away"))
        else:
            read.set_result(value)
            self.value, self.read_at = value, self.now
        self.settle()
        for request in self.waiting:
            assert request.done()
            if fails:
                assert isinstance(request.exception(), RedisConnectionError)
            else:
                assert request.result() == value
        self.waiting.clear()

    @invariant()
    def one_read_at_a_time(self) -> None:
        assert len(self.gate.on_its_way()) <= 1
        assert (self.refreshed.reading is None) == (not self.gate.on_its_way())


TestRefreshedMachine = RefreshedMachine.TestCase
TestRefreshedMachine.settings = settings(max_examples=examples(200), stateful_step_count=40, deadline=None)

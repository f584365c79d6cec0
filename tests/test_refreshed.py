"""A shared value read again in the background (`api.refreshed`), on a clock the test moves: when a
request waits for a read, and what a failed read leaves."""

from __future__ import annotations

import asyncio
import logging

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from api.refreshed import Refreshed

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

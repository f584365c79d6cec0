"""Redis errors as the API and the workers tell them apart and log them.

An outage (connection lost, refused or timed out) heals by itself; an error reply (OOM at
maxmemory, READONLY, NOPERM, MISCONF for a full disk) needs an operator. An outage is logged by
class and message; an error reply by its class, and where that is a bare ResponseError (MISCONF,
NOREPLICAS) by Redis's own first line too, bounded, without what redis-py adds to it for a failed
pipeline: its commands, work items and their text included.
"""

from __future__ import annotations

import logging
import threading

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

OUTAGE = (RedisConnectionError, RedisTimeoutError, OSError)
PIPELINE = "of pipeline caused error: "  # redis-py's, before Redis's words
REPLY_MAX = 120  # characters of an error reply logged: a disk-full MISCONF whole, a longer reply cut


def describe(exc: Exception) -> str:
    """`ConnectionError: Error 111 connecting to ...` for an outage, `OutOfMemoryError` for a reply
    redis-py names, and Redis's words for one it does not, which its class alone would not say:
    `ResponseError: MISCONF Errors writing to the AOF file: No space left on device`."""
    if isinstance(exc, OUTAGE):
        return f"{type(exc).__name__}: {exc}"
    if type(exc) is not ResponseError:  # (its class names Redis's error: OutOfMemoryError, ReadOnlyError)
        return type(exc).__name__
    said = str(exc.args[0]) if exc.args else ""
    # A pipeline's: "Command # 2 (LPUSH queue <item>) of pipeline caused error: <Redis's words>", the
    # words as the asyncio client's `repr` of the args tuple.
    if (at := said.find(PIPELINE)) >= 0:
        said = said[at + len(PIPELINE) :]
        if said.startswith(("('", '("')):
            said = said[2:].split(said[1], 1)[0]
    said = said.strip().split("\n", 1)[0]
    if len(said) > REPLY_MAX:
        said = said[:REPLY_MAX] + "…"
    return f"{type(exc).__name__}: {said}" if said else type(exc).__name__


class Backoff:
    """The wait between tries after a Redis error: 0.1 s doubling to 2 s, each failure logged by its
    class; `reset` after a success. The one such loop: the /predict worker's stages, the API's result
    subscription (`next` in an `asyncio.sleep`), the jobs worker's restarts (`pause`) and its webhook looks."""

    FIRST_S, MOST_S = 0.1, 2.0

    def __init__(self, log: logging.Logger, stopping: threading.Event | None = None) -> None:
        self.log = log
        self.stopping = stopping
        self.delay = self.FIRST_S

    def reset(self) -> None:
        self.delay = self.FIRST_S

    def next(self) -> float:
        """The delay to wait now (`delay`); the one after doubles, up to `MOST_S`."""
        delay, self.delay = self.delay, min(self.delay * 2, self.MOST_S)
        return delay

    def pause(self) -> bool:
        """Wait the next delay; True when the process is stopping (`stopping` set)."""
        if self.stopping is None:
            raise TypeError("Backoff.pause needs the `stopping` event")
        return self.stopping.wait(self.next())

    def wait(self, exc: Exception) -> bool:
        """Log `exc`, then wait; True when the process is stopping."""
        self.log.warning("redis failed (%s); retrying in %.1f s", describe(exc), self.delay)
        self.log.debug("redis failed with", exc_info=exc)
        return self.pause()

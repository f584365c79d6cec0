"""One stage thread's Redis connection: commands sent in one write, replies read back in order.

redis-py's own connection and parser, without its client's per-command bookkeeping (a connection
taken from the pool and checked for stray data on every call, retry wrappers, response callbacks):
a transaction of four SETs costs the worker a third of the CPU it costs through `Redis.pipeline`
(docs/tuning.md, "The worker's Redis round trips"). Commands are packed by hiredis in one call each,
without redis-py's packer around it (which splits a command name holding spaces: none here has
one). Replies come back raw, as Redis sends them. Not thread-safe: each stage thread has its own.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

import hiredis
from redis import Redis
from redis.connection import Connection, ConnectionPool
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.redis_errors import describe

log = logging.getLogger(__name__)

Command = tuple[Any, ...]

# (monotonic) when a call over each pool last timed out: a peer gone silent
_silent_at: weakref.WeakKeyDictionary[ConnectionPool, float] = weakref.WeakKeyDictionary()


class Link:
    """A connection of `redis`'s pool, held by one thread for its hot-path commands."""

    def __init__(self, redis: Redis) -> None:
        self._pool = redis.connection_pool
        self._connection: Connection | None = None
        self._taken_at = 0.0  # (monotonic) when this link took its connection from the pool
        self._failed_alone: set[tuple[Any, str]] = set()  # (command, error class) a transaction logged

    def call(self, *commands: Command, raise_errors: bool = True) -> list[Any]:
        """Send `commands` together and return their replies; an error reply raises once every reply
        is read (or, not `raise_errors`, takes its place). Any other failure drops the connection (the
        next call takes a fresh one from the pool): replies left unread on it would answer the next call.
        A timeout (a peer gone silent) drops the pool's idle connections too, and every other link of
        the pool drops the one it holds before its next call: they lead to the same peer, and each
        would cost a call (a thread's next reply, its next beat) a timeout of its own."""
        if self._connection is not None and self._taken_at < _silent_at.get(self._pool, 0.0):
            self._drop(self._connection)
        if self._connection is None:
            self._connection, self._taken_at = self._pool.get_connection(), time.monotonic()
        connection = self._connection
        try:
            connection.send_packed_command([b"".join(map(hiredis.pack_command, commands))])
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(connection.read_response())
                except ResponseError as error:
                    replies.append(error)
        except BaseException as exc:
            self._drop(connection)
            if isinstance(exc, RedisTimeoutError):
                self._pool.disconnect(inuse_connections=False)
                _silent_at[self._pool] = time.monotonic()  # (after: a link taking one meanwhile drops it)
            raise
        if raise_errors and (errors := [reply for reply in replies if isinstance(reply, ResponseError)]):
            raise errors[0]
        return replies

    def _drop(self, connection: Connection) -> None:
        """Back to the pool, which opens the next one: a connection reconnecting by itself goes back
        to its old address, where a Sentinel pool asks the sentinels for the primary's."""
        connection.disconnect()
        self._connection = None
        self._pool.release(connection)

    def transaction(self, *commands: Command) -> list[Any]:
        """`commands` in MULTI/EXEC: all applied, or (an error reply as they are queued, such as OOM)
        none, raised. One that fails as EXEC runs it (WRONGTYPE on a key something else wrote) fails
        alone, the rest applied (Redis has no rollback): its error takes its reply's place, logged once
        per command and error class, not raised, since sending the rest again would publish twice."""
        replies: list[Any] = self.call(("MULTI",), *commands, ("EXEC",))[-1]
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, ResponseError) and (command[0], describe(reply)) not in self._failed_alone:
                self._failed_alone.add((command[0], describe(reply)))
                log.error("redis refused a transaction's %s (%s); the rest was applied", command[0], describe(reply))
                log.debug("redis refused %s with", command[0], exc_info=reply)
        return replies

"""Which workers are alive: their heartbeats, and the named Redis connections a killed process loses
at once (no torch needed: probes, /ready, admission and the worker's death watch read it).

A heartbeat says when it lapses (`WorkerStatus.lapses_at`, the writer's wall clock, read by the
reader's: hosts' clocks must agree to well within a heartbeat TTL, as RQ's own heartbeats need);
its key has no expiry, so no memory policy evicts a live worker's."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from rq import Queue
from rq import Worker as RQWorker

from core.protocol import Keys, Unreadable, WorkerStatus, new_id
from core.redis_connect import sync_client
from core.redis_replies import raw, raws, text

log = logging.getLogger(__name__)

# How long a registered worker may have no open connection before it is taken for dead: longer than a
# live worker's reconnect after a blip or a failover (`redis_errors.Backoff.MOST_S`, then a connect).
RECONNECT_S = 3.0


def worker_client(url: str, timeout_s: float, keys: Keys) -> Redis:
    """A worker's Redis client, every connection of it named after this process (`Keys.worker_connection`)
    so that other workers see it die when its connections close. Unnamed where Redis refuses CLIENT
    SETNAME (an ACL without it): the heartbeat's expiry alone then says when it died."""
    client = sync_client(url, timeout_s, client_name=keys.worker_connection(new_id()))
    try:
        client.ping()
    except ResponseError as exc:
        log.warning("redis refuses to name this worker's connections (%s): its death is noticed by its heartbeat", exc)
        client = sync_client(url, timeout_s)
    except RedisConnectionError:
        pass  # Redis not up yet: the worker waits for it, named
    return client


class DeathWatch:
    """Which registered workers died, as seen by the worker `me`.

    A worker is dead when its heartbeat lapsed (hung, partitioned from Redis, or its Redis refuses
    CLIENT LIST; one missing or unreadable, which says no lapse time, once it stayed so for `ttl_s`:
    a live worker's next beat writes it again within a third of that), or when none of its named
    connections was open at any look for `RECONNECT_S`: the kernel closes a killed process's
    sockets at once, while a live worker that lost its connections
    (a network blip, a failover) opens new ones within its reconnect backoff, and its work must not
    be computed twice. A live worker in a long forward keeps its connections open and its heartbeat
    thread beating, so it is never taken for dead. An unreadable heartbeat is logged once and read
    as a heartbeat without a connection name: alive until it lapses. After `me` failed to reach or
    write to Redis (`redis_failed`), every heartbeat may have lapsed in the same outage, live workers'
    too: a lapsed heartbeat is death again only once the workers had a heartbeat TTL to beat again.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        me: str,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.me = me
        self.ttl_s = ttl_s
        self.clock = clock
        self.wall = wall
        self._unknown_since: dict[str, tuple[bytes | None, float]] = {}  # worker -> its heartbeat, missing or
        # unreadable, since when (our clock)
        self._gone_since: dict[str, float] = {}  # workers without an open connection, since when (our clock)
        self._client_list = True  # False once Redis refused CLIENT LIST: heartbeats only
        self._lapses_from = float("-inf")  # (our clock) from when a lapsed heartbeat is a death
        self._grace_s: float | None = None  # set by `redis_failed`: how long after the next look that is

    def dead(self) -> dict[str, bytes | None]:
        """The workers that died, each with its heartbeat as this look read it (None: lapsed)."""
        others = [w for w in self._registered() if w != self.me]
        beats = raws(self.redis.mget([self.keys.heartbeat(w) for w in others]) if others else [])
        now, wall = self.clock(), self.wall()
        named = {w: _status(w, b) for w, b in zip(others, beats, strict=True) if b is not None}
        alive = {w for w, s in named.items() if s is not None and not s.lapsed(wall)}
        alive |= self._unknown_beating({w: b for w, b in zip(others, beats, strict=True) if named.get(w) is None}, now)
        connections = {w: s.connection for w, s in named.items() if s is not None and s.connection}
        open_now = self._open_connections() if connections else None
        if self._grace_s is not None:
            self._lapses_from, self._grace_s = now + self._grace_s, None
        lapses = now >= self._lapses_from
        gone = [w for w, name in connections.items() if open_now is not None and name not in open_now]
        self._gone_since = {w: self._gone_since.get(w, now) for w in gone}
        dead = [w for w in others if (lapses and w not in alive) or now - self._gone_since.get(w, now) >= RECONNECT_S]
        for worker in dead:
            self._gone_since.pop(worker, None)
        read = dict(zip(others, beats, strict=True))
        return {worker: read[worker] for worker in dead}

    def _unknown_beating(self, unknown: dict[str, bytes | None], now: float) -> set[str]:
        """The workers whose heartbeat, missing (lost: deleted, or a Redis that dropped it) or unreadable,
        has not yet stayed so, the same, for `ttl_s`."""
        self._unknown_since = {
            w: kept if (kept := self._unknown_since.get(w)) and kept[0] == b else (b, now) for w, b in unknown.items()
        }
        return {w for w, (_, since) in self._unknown_since.items() if now - since < self.ttl_s}

    def redis_failed(self, grace_s: float) -> None:
        """`me` failed to reach or write to Redis: the other workers may have failed to beat as long, so
        their lapsed heartbeats count only `grace_s` (a heartbeat TTL) after the next look, by which
        the live ones beat again; and their connections have `RECONNECT_S` from the next look to open."""
        self._grace_s = grace_s
        self._gone_since.clear()

    def _registered(self) -> list[str]:
        """The ids in `Keys.workers`; one that is not an id (not UTF-8: written by something else) is dropped."""
        ids = []
        for member in self.redis.smembers(self.keys.workers):
            try:
                ids.append(raw(member).decode())
            except UnicodeDecodeError:
                log.error("dropped an unreadable member of %s (%d bytes)", self.keys.workers, len(member))
                self.redis.srem(self.keys.workers, member)
        return ids

    def _open_connections(self) -> set[str] | None:
        if not self._client_list:
            return None
        try:
            return {client["name"] for client in self.redis.client_list()}
        except ResponseError as exc:
            log.warning("redis refuses CLIENT LIST (%s): a killed worker is noticed when its heartbeat lapses", exc)
            self._client_list = False
            return None


_UNREADABLE_LOGGED: set[str] = set()  # workers whose unreadable heartbeat was logged


def _status(worker: str, raw: bytes | str) -> WorkerStatus | None:
    """A worker's heartbeat; None, logged once per worker, when it is unreadable."""
    try:
        return WorkerStatus.decode(raw)
    except Unreadable as exc:
        if worker not in _UNREADABLE_LOGGED:
            _UNREADABLE_LOGGED.add(worker)
            log.error("worker %s has an unreadable heartbeat (%s): skipped", worker, exc)
        return None


def beating(workers: list[str], beats: list[bytes | str | None], now: float | None = None) -> list[WorkerStatus]:
    """The statuses of `workers` whose heartbeats (`beats`, as read from Redis, in their order) are
    there, readable and not lapsed at `now` (seconds since the epoch; by default, now)."""
    now = time.time() if now is None else now
    statuses = (_status(w, b) for w, b in zip(workers, beats, strict=True) if b is not None)
    return [s for s in statuses if s is not None and not s.lapsed(now)]


def live_workers(redis: Redis, key_prefix: str) -> list[WorkerStatus]:
    """The status of every registered worker whose heartbeat beats."""
    keys = Keys(key_prefix)
    ids = [text(w) for w in redis.smembers(keys.workers)]
    return beating(ids, redis.mget([keys.heartbeat(w) for w in ids]) if ids else [])


def worker_alive_on_this_host(redis: Redis, key_prefix: str, pid: int | None = None) -> bool:
    """True when a worker on this host (a Kubernetes pod is one host), process `pid` if given, has a
    fresh heartbeat."""
    host = socket.gethostname()
    return any(s.host == host and pid in (None, s.pid) for s in live_workers(redis, key_prefix))


def jobs_worker_alive_on_this_host(redis: Redis, queue: str, pid: int | None = None) -> bool:
    """True when an RQ worker on this host, process `pid` if given, is registered on the jobs queue
    (RQ refreshes it while it works)."""
    host = socket.gethostname()
    workers = RQWorker.all(connection=redis, queue=Queue(queue, connection=redis))
    return any(w.hostname == host and pid in (None, w.pid) for w in workers)

"""Which workers are alive: their heartbeats, and the named Redis connections a killed process loses
at once (no torch needed: probes, /ready and the worker's death watch read it)."""

from __future__ import annotations

import logging
import socket

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from rq import Queue
from rq import Worker as RQWorker

from core.protocol import Keys, WorkerStatus, new_id
from core.redis_connect import sync_client
from core.redis_replies import text

log = logging.getLogger(__name__)


def worker_client(url: str, keys: Keys) -> Redis:
    """A worker's Redis client, every connection of it named after this process (`Keys.worker_connection`)
    so that other workers see it die when its connections close. Unnamed where Redis refuses CLIENT
    SETNAME (an ACL without it): the heartbeat's expiry alone then says when it died."""
    client = sync_client(url, socket_connect_timeout=2, client_name=keys.worker_connection(new_id()))
    try:
        client.ping()
    except ResponseError as exc:
        log.warning("redis refuses to name this worker's connections (%s): its death is noticed by its heartbeat", exc)
        client = sync_client(url, socket_connect_timeout=2)
    except RedisConnectionError:
        pass  # Redis not up yet: the worker waits for it, named
    return client


class DeathWatch:
    """Which registered workers died, as seen by the worker `me`.

    A worker is dead when its heartbeat lapsed (hung, partitioned from Redis, or its Redis refuses
    CLIENT LIST), or when none of its named connections was open on two looks in a row: the kernel
    closes a killed process's sockets at once, while a live worker reconnecting after a network blip
    has none open only for a moment. A live worker in a long forward keeps its connections open and
    its heartbeat thread beating, so it is never taken for dead.
    """

    def __init__(self, redis: Redis, keys: Keys, me: str) -> None:
        self.redis = redis
        self.keys = keys
        self.me = me
        self._unconnected: set[str] = set()  # workers whose connections were gone at the last look
        self._client_list = True  # False once Redis refused CLIENT LIST: heartbeats only

    def dead(self) -> list[str]:
        others = [w for w in map(text, self.redis.smembers(self.keys.workers)) if w != self.me]
        beats = self.redis.mget([self.keys.heartbeat(w) for w in others]) if others else []
        named = {w: WorkerStatus.decode(b).connection for w, b in zip(others, beats, strict=True) if b is not None}
        open_now = self._open_connections() if any(named.values()) else None
        unconnected = {w for w, name in named.items() if name and open_now is not None and name not in open_now}
        dead = [w for w in others if w not in named or w in unconnected & self._unconnected]
        self._unconnected = unconnected - set(dead)
        return dead

    def _open_connections(self) -> set[str] | None:
        if not self._client_list:
            return None
        try:
            return {client["name"] for client in self.redis.client_list()}
        except ResponseError as exc:
            log.warning("redis refuses CLIENT LIST (%s): a killed worker is noticed when its heartbeat lapses", exc)
            self._client_list = False
            return None


def live_workers(redis: Redis, key_prefix: str) -> list[WorkerStatus]:
    """The status of every registered worker whose heartbeat has not expired."""
    keys = Keys(key_prefix)
    ids = [text(w) for w in redis.smembers(keys.workers)]
    beats = redis.mget([keys.heartbeat(w) for w in ids]) if ids else []
    return [WorkerStatus.decode(b) for b in beats if b is not None]


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

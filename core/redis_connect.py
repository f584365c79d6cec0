"""The one place a Redis client is built from SENTIMENT_REDIS_URL: a plain Redis, or the primary that
Redis Sentinel names.

A plain ``redis://`` or ``rediss://`` URL is handed to redis-py's ``from_url`` as it always was. The
Sentinel form names the sentinels and the primary's service name::

    redis+sentinel://[[username]:password@]host1[:26379],host2[:26379],.../service_name[/db][?sentinel_password=...]

The credentials are the primary's (and its replicas'); ``sentinel_password`` is the sentinels' own
``requirepass``, when they have one. The client's pool asks the sentinels for the primary's address
each time it opens a connection, so after a failover the clients reconnect to the promoted replica
by themselves; until then their commands fail as in any outage (`core.redis_errors.OUTAGE`).

Every client, of every process, gets `link_options`: a peer that goes silent without closing the
connection (a host gone, a partition, a failover behind a proxy) is noticed within seconds, not
after TCP's retry limit (about 15 minutes).

A URL is shown (logs, refusals) only as `masked` shows it, its passwords hidden; a process reaches
its Redis once as it starts (`reach`), to tell a Redis not up yet from a URL that is wrong.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio
import redis.connection
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.connection import BlockingConnectionPool as AsyncBlockingPool
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool
from redis.asyncio.sentinel import SentinelManagedConnection
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.sentinel import Sentinel

from core.redis_errors import OUTAGE
from core.redis_replies import raw

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
SENTINEL_TIMEOUT_S = 2.0  # a sentinel that does not answer is passed over for the next
KEEPALIVE_PROBES = 3


def _for_socket(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` less TCP keepalive for a unix:// URL: redis-py refuses it for a unix socket's
    connection (a TypeError), and a local Redis that dies closes its socket."""
    if urlsplit(url).scheme != "unix":
        return options
    return {k: v for k, v in options.items() if k not in ("socket_keepalive", "socket_keepalive_options")}


def link_options(timeout_s: float) -> dict[str, Any]:
    """Socket options that notice a dead peer within about `timeout_s`: a reply later than that (past
    a blocking command's own wait, which callers keep below it) drops its connection, and the command
    is sent once more, over a new one (a pooled connection to a peer that went silent fails once, not
    every request that takes it); TCP keepalive probes an idle one after `timeout_s` of silence;
    TCP_USER_TIMEOUT ends one whose sent data goes unacknowledged that long (Linux)."""
    options = {
        socket.TCP_KEEPIDLE: max(1, round(timeout_s)),
        socket.TCP_KEEPINTVL: max(1, round(timeout_s / KEEPALIVE_PROBES)),
        socket.TCP_KEEPCNT: KEEPALIVE_PROBES,
    }
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        options[socket.TCP_USER_TIMEOUT] = int(timeout_s * 1000)
    return {
        "socket_connect_timeout": timeout_s,
        "socket_timeout": timeout_s,
        "socket_keepalive": True,
        "socket_keepalive_options": options,
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],  # once, at once (redis-py's retry of a connection)
    }


@dataclass(frozen=True)
class SentinelUrl:
    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None
    sentinel_password: str | None

    @classmethod
    def parse(cls, url: str) -> SentinelUrl | None:
        """The Sentinel form's parts; None for any other URL. Errors never quote the URL: it may hold
        a password."""
        parts = urlsplit(url)
        if parts.scheme != SENTINEL_SCHEME:
            return None
        userinfo, _, hosts = parts.netloc.rpartition("@")
        username, _, password = userinfo.partition(":")
        sentinels = [_sentinel(host) for host in hosts.split(",")]
        path = [p for p in parts.path.split("/") if p]
        if not 1 <= len(path) <= 2 or (len(path) == 2 and not _number(path[1])):
            raise ValueError(f"{SENTINEL_SCHEME} URL: the path must be /service_name or /service_name/db")
        query = parse_qs(parts.query)
        if unknown := set(query) - {"sentinel_password"}:
            raise ValueError(f"{SENTINEL_SCHEME} URL: unknown option(s) {sorted(unknown)}")
        return cls(
            sentinels=sentinels,
            service=unquote(path[0]),
            db=int(path[1]) if len(path) == 2 else 0,
            username=unquote(username) or None,
            password=unquote(password) or None,
            sentinel_password=query["sentinel_password"][0] if "sentinel_password" in query else None,
        )

    def primary_kwargs(self) -> dict[str, Any]:
        return {"db": self.db, "username": self.username, "password": self.password}

    def sentinel_kwargs(self) -> dict[str, Any]:
        return {"password": self.sentinel_password, **link_options(SENTINEL_TIMEOUT_S)}


def _number(digits: str) -> bool:
    """Whether `digits` is a whole number as a URL writes one (ASCII digits: `int` refuses `²`)."""
    return digits.isascii() and digits.isdigit()


def _sentinel(host: str) -> tuple[str, int]:
    """One sentinel of the URL, `host[:port]` or `[ipv6][:port]`: ValueError for a port that is not
    1-65535 or an IPv6 address out of brackets, which would otherwise name another host or port."""
    name, port = host, ""
    if host.startswith("["):
        name, bracket, after = host[1:].partition("]")
        if not bracket or after[:1] not in ("", ":"):
            raise ValueError(f"{SENTINEL_SCHEME} URL: an IPv6 sentinel must be [address] or [address]:port")
        port = after[1:]
    elif host.count(":") > 1:
        raise ValueError(f"{SENTINEL_SCHEME} URL: an IPv6 sentinel must be in brackets, [address]:port")
    else:
        name, _, port = host.partition(":")
    if not name:
        raise ValueError(f"{SENTINEL_SCHEME} URL: a sentinel without a host")
    if port and not (_number(port) and 1 <= int(port) <= 65535):
        raise ValueError(f"{SENTINEL_SCHEME} URL: a sentinel's port must be a number from 1 to 65535")
    return name, int(port or SENTINEL_PORT)


def is_sentinel(url: str) -> bool:
    """Whether `url` is the Sentinel form: a failover may lose the last writes (replication is
    asynchronous), which the API's waiting requests then push again (`api.results`)."""
    return urlsplit(url).scheme == SENTINEL_SCHEME


def check_url(url: str) -> str:
    """`url` when redis-py can connect by it; else ValueError saying why (never quoting it). redis-py
    itself reads port 0 as 6379 and a path that is not a number as database 0 (`/1/2` as 12): refused."""
    if SentinelUrl.parse(url) is None:
        redis.connection.parse_url(url)
        parts = urlsplit(url)
        if parts.scheme in ("redis", "rediss"):
            if parts.port == 0:
                raise ValueError("the port must be a number from 1 to 65535")
            if (db := unquote(parts.path).removeprefix("/")) and not _number(db):
                raise ValueError("the path must be /db, a number")
    return url


def masked(url: str) -> str:
    """`url` as logs and refusals show it: the password of its user part and of its query
    (`password`, `sentinel_password`) as `***`, a user part without a `:` all of it, malformed or not."""
    scheme, sep, rest = url.rpartition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}:***@{hosts}" if colon else f"***@{hosts}"
    return re.sub(r"((?:^|[?&])(?:sentinel_)?password=)[^&]*", r"\1***", scheme + sep + rest)


class RedisAtStart(Exception):
    """Redis, as a process starts, is not what SENTIMENT_REDIS_URL promised: the message is one line
    naming the URL, masked, and what failed."""


class RedisUnreachable(RedisAtStart):
    """Nothing answers at the URL: Redis may be down, or not up yet."""


class RedisRefused(RedisAtStart):
    """Redis answered and turned this service away: no wait fixes that, a person must."""


def reach(url: str, timeout_s: float) -> None:
    """PING Redis at `url` once, as a process starts. `RedisRefused` when it answers but refuses the
    URL's credentials (a wrong password, an unknown user), its database or the PING, when its TLS
    certificate fails verification, when it is a Sentinel, when its memory policy would evict the
    service's state (`_evicts_state`), or when the sentinels refuse the URL or know no such service;
    `RedisUnreachable` when nothing answers within `timeout_s` (a Redis still loading its data
    counts: it will answer)."""
    if (sentinel := SentinelUrl.parse(url)) is not None:
        _ask_sentinels(url, sentinel)
    client = sync_client(url, timeout_s)
    try:
        client.ping()
        if _role(client) == b"sentinel":  # (it answers PING, then refuses every command of ours)
            raise RedisRefused(
                f"Redis at {masked(url)} refused this service (it is a Sentinel, which holds no data): "
                "check SENTIMENT_REDIS_URL"
            )
        if policy := _evicts_state(client):
            raise RedisRefused(
                f"Redis at {masked(url)} evicts any key at its maxmemory (maxmemory-policy {policy}), this service's "
                "queues and jobs too: set maxmemory-policy to volatile-lru or noeviction (docs/reliability.md)"
            )
    except (RedisError, OSError) as exc:
        said = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, OUTAGE) and not isinstance(exc, AuthenticationError) and not _untrusted(exc):
            raise RedisUnreachable(f"Redis at {masked(url)} is unreachable ({said})") from None
        raise RedisRefused(f"Redis at {masked(url)} refused this service ({said}): check SENTIMENT_REDIS_URL") from None
    finally:
        client.close()


def _ask_sentinels(url: str, sentinel: SentinelUrl) -> None:
    """What redis-py reads as "no master found", an outage, told apart: `RedisRefused` when no sentinel
    monitors the service and one refused the URL's sentinel_password, or answered without it;
    `RedisUnreachable`, said short, when none answers."""
    refusal, answered, failure = "", False, ""
    for host, port in sentinel.sentinels:
        client = redis.Redis(host, port, **sentinel.sentinel_kwargs())
        try:
            if sentinel.service in client.sentinel_masters():
                return
            answered = True
        except (AuthenticationError, ResponseError) as exc:
            refusal = refusal or f"{type(exc).__name__}: {exc}"
        except (RedisError, OSError) as exc:
            failure = failure or f"{type(exc).__name__}: {exc}"
        finally:
            client.close()
    if refusal or answered:
        why = refusal or f"no sentinel monitors {sentinel.service!r}"
        raise RedisRefused(f"Redis at {masked(url)} refused this service ({why}): check SENTIMENT_REDIS_URL")
    raise RedisUnreachable(f"Redis at {masked(url)} is unreachable (no sentinel answers: {failure})")


def _role(client: redis.Redis) -> bytes | None:
    """The server's ROLE (`master`, `slave`, `sentinel`); None where an ACL refuses it."""
    try:
        return raw(client.execute_command("ROLE")[0])
    except ResponseError:
        return None


def _evicts_state(client: redis.Redis) -> str | None:
    """The server's maxmemory-policy where it may evict a key without an expiry (`allkeys-*`): every
    key of the service's state has none, its cache entries one each (docs/reliability.md, "When Redis
    is full"). None where the policy spares them, or where Redis refuses CONFIG GET (a managed Redis,
    an ACL without it: the operator's word stands)."""
    try:
        policy = str(client.config_get("maxmemory-policy").get("maxmemory-policy") or "")  # (redis-py decodes it)
    except ResponseError:
        return None
    return policy if policy.startswith("allkeys-") else None


def _untrusted(exc: BaseException) -> bool:
    """Whether `exc` (redis-py's ConnectionError, as its AuthenticationError is) comes of a TLS server
    certificate that failed verification: an unknown CA, another host's name; no wait fixes that."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    return cause is not None


def sync_client(url: str, timeout_s: float, **options: Any) -> redis.Redis:
    """A synchronous client (the workers, RQ, the probes, the API's jobs client): `Redis.from_url(url)`
    with `link_options(timeout_s)` and `options` (which win), or for the Sentinel form the primary's
    client with the same options."""
    options = {**link_options(timeout_s), **options}
    if (sentinel := SentinelUrl.parse(url)) is None:
        return redis.Redis.from_url(url, **_for_socket(url, options))
    manager = Sentinel(sentinel.sentinels, sentinel_kwargs=sentinel.sentinel_kwargs())
    return manager.master_for(sentinel.service, **sentinel.primary_kwargs(), **options)


class _PooledConnection:
    """Mixed into the API's asyncio connections, one class per pool (`_pooled`), for two failures.

    A read that times out (a peer gone silent: a host gone, a partition) marks the pool, and every
    connection of it opened before that is opened again before its next command: they lead to the
    same peer, and each would otherwise cost a request a timeout of its own.

    Under uvloop (uvicorn's loop), a write to a connection the peer has reset raises RuntimeError
    ("the handler is closed", uvloop issue 506) where asyncio's own loop raises OSError: as a
    ConnectionError it is retried on a new connection like any lost one, not a 500.
    """

    silent_at = float("-inf")  # (monotonic) a read of this pool last timed out; set on the class
    opened_at = float("inf")

    async def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        if not self.is_connected:  # type: ignore[attr-defined]
            self.opened_at = time.monotonic()  # (before the handshake's own commands are sent)
        await super().connect_check_health(*args, **kwargs)  # type: ignore[misc]

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except RedisTimeoutError:
            type(self).silent_at = time.monotonic()
            raise

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if self.opened_at < type(self).silent_at and self.is_connected:  # type: ignore[attr-defined]
            await self.disconnect()  # type: ignore[attr-defined]
        try:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except RuntimeError as exc:  # (redis-py disconnected it already)
            raise RedisConnectionError(f"the connection was closed under the write ({exc})") from exc


def peer_went_silent(client: redis.asyncio.Redis) -> None:
    """What a read timeout does to the API client's pool (`_PooledConnection`), for a silence found
    another way (the result subscription's watch): every connection opened before now is opened
    again before its next command."""
    connection_class = client.connection_pool.connection_class
    if issubclass(connection_class, _PooledConnection):
        connection_class.silent_at = time.monotonic()


def _pooled(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """`cls` with `_PooledConnection` mixed in: a class of its own, so its pool's mark is its own."""
    return type(cls.__name__, (_PooledConnection, cls), {})


class _BlockingSentinelPool(AsyncSentinelPool, AsyncBlockingPool):
    """The primary's connections, found through Sentinel, at most `max_connections` of them: a
    request waits up to `timeout` for one to be free, as with a plain URL's BlockingConnectionPool."""


def async_client(url: str, timeout_s: float, *, max_connections: int, pool_wait_s: float) -> redis.asyncio.Redis:
    """The API's asyncio client, with `link_options(timeout_s)`: a BlockingConnectionPool of
    `max_connections` that waits `pool_wait_s` for a free connection, for a plain URL or the Sentinel
    form alike."""
    options, timeout = link_options(timeout_s), pool_wait_s
    if (sentinel := SentinelUrl.parse(url)) is None:
        options = _for_socket(url, options)
        pool = AsyncBlockingPool.from_url(url, max_connections=max_connections, timeout=timeout, **options)
        pool.connection_class = _pooled(pool.connection_class)
        return redis.asyncio.Redis(connection_pool=pool)
    manager = AsyncSentinel(sentinel.sentinels, sentinel_kwargs=sentinel.sentinel_kwargs())
    return manager.master_for(
        sentinel.service,
        connection_pool_class=_BlockingSentinelPool,
        connection_class=_pooled(SentinelManagedConnection),
        max_connections=max_connections,
        timeout=timeout,
        **sentinel.primary_kwargs(),
        **options,
    )

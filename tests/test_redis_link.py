"""A stage's Redis connection (`batcher.redis_link.Link`) on a real redis-server: what it packs
reaches Redis byte for byte, and a call cut short by any failure must not leave its replies on the
connection for the next call to read."""

from __future__ import annotations

import fakeredis
import pytest
import redis
from redis.connection import Connection

from batcher.redis_link import Link


def test_every_kind_of_argument_reaches_redis_as_redis_py_sends_it(redis_url: str) -> None:
    """Its own packing (hiredis, one call a command) against redis-py's: text with spaces and
    non-ASCII, bytes holding the protocol's own CRLF and NUL, integers and floats, and a large value."""
    client = redis.Redis.from_url(redis_url)
    values: list[str | bytes | int | float] = ["two words", "é ü 😀", b"\r\n$3\r\nbad\x00", 7, 2.5, -1, b"x" * 100_000]
    link = Link(client)
    replies = link.call(*(("SET", f"link:v{i}", v) for i, v in enumerate(values)), ("ECHO", "a b"))
    assert replies == [b"OK"] * len(values) + [b"a b"]
    client.mset({f"link:r{i}": v for i, v in enumerate(values)})  # (redis-py packs these)
    for i in range(len(values)):
        assert client.get(f"link:v{i}") == client.get(f"link:r{i}")
    assert link.call(("LPUSH", "link:l", 1, "2", b"3"), ("LRANGE", "link:l", 0, -1)) == [3, [b"3", b"2", b"1"]]


def test_a_call_cut_short_by_any_error_leaves_no_reply_for_the_next(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.mset({"link:a": "a", "link:b": "b", "link:c": "c"})
    link = Link(client)
    assert link.call(("GET", "link:a")) == [b"a"]
    real_read = Connection.read_response
    reads = 0

    def read_response(self: Connection, *args: object, **kwargs: object) -> object:
        nonlocal reads
        reads += 1
        if reads == 2:  # the second reply of the call below: a bug, a parser failure, an interrupt
            raise ValueError("not a connection error")
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Connection, "read_response", read_response)
    with pytest.raises(ValueError):
        link.call(("GET", "link:a"), ("GET", "link:b"))
    assert link.call(("GET", "link:c")) == [b"c"]  # not "b", the reply left unread on the old connection


def test_an_error_reply_keeps_the_connection_and_every_reply_in_its_place(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set("link:n", "not a number")
    link = Link(client)
    replies = link.call(("INCR", "link:n"), ("GET", "link:n"), raise_errors=False)
    assert isinstance(replies[0], redis.ResponseError) and replies[1] == b"not a number"
    connection = link._connection
    with pytest.raises(redis.ResponseError):
        link.call(("INCR", "link:n"))
    assert link._connection is connection  # an error reply is an answer: the connection is fine


def test_a_command_that_fails_as_exec_runs_it_is_logged_once_and_the_rest_applied(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis reports a command that fails inside EXEC (WRONGTYPE on a key something else wrote) in
    EXEC's own reply, having applied the others: not raised (sent again, the rest would publish twice),
    but never silent. fakeredis answers as redis-server does."""
    for client in (redis.Redis.from_url(redis_url), fakeredis.FakeRedis()):
        client.set("link:workers", "garbage")
        link = Link(client)
        caplog.clear()
        for _ in range(2):
            replies = link.transaction(("SET", "link:beat", "1"), ("SADD", "link:workers", "w"))
            assert replies[0] == b"OK" and isinstance(replies[1], redis.ResponseError)
        assert client.get("link:beat") == b"1"
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert errors == [
            "redis refused a transaction's SADD (ResponseError: WRONGTYPE Operation against a key holding the wrong kind of value); the rest was applied"
        ]

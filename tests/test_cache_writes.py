"""`benchmarks.cache_writes`: computations counted per text off Redis' MONITOR stream, against a real
redis-server, with the worker's own connection (`batcher.redis_link`) writing as its reply stage does."""

from __future__ import annotations

import redis

from batcher.redis_link import Command, Link
from benchmarks.cache_writes import CacheWrites
from core.protocol import Keys, new_id, text_digest
from tests.conftest import wait_for


def test_a_transaction_sent_again_is_one_computation_and_another_workers_is_another(redis_url: str) -> None:
    keys = Keys(f"writes-{new_id()[:8]}")

    def reply(worker: str, *texts: str) -> list[Command]:
        """A worker's reply transaction: its computed texts' cache entries, then its beat."""
        return [
            *(("SET", keys.cache("v1", text), b'[{"label": "POSITIVE"}]', "EX", 60) for text in texts),
            ("SET", keys.heartbeat(worker), worker, "PX", 3000),
        ]

    with CacheWrites(redis_url, keys.prefix) as writes:
        first = reply("w1", "resent", "again")
        Link(redis.Redis.from_url(redis_url)).transaction(*first)
        Link(redis.Redis.from_url(redis_url)).transaction(*first)  # its reply lost: sent again, on a new connection
        Link(redis.Redis.from_url(redis_url)).transaction(*reply("w2", "again"))  # computed again, by another worker
        Link(redis.Redis.from_url(redis_url)).transaction(*reply("w1", "last"))
        wait_for("the last write to be seen", lambda: text_digest("last") in writes.counts)
    digest = {text: text_digest(text) for text in ("resent", "again", "last")}
    assert writes.counts == {digest["resent"]: 1, digest["again"]: 2, digest["last"]: 1}
    assert writes.computed_more_than_once() == {digest["again"]: 2}
    assert writes.first_written[digest["again"]] == writes.first_written[digest["resent"]]  # the first write's time
    assert writes.first_written[digest["again"]] < writes.first_written[digest["last"]]

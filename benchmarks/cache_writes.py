"""How often the service computed each distinct text, read off Redis: every computed text's cache
entry is written once per computation (the /predict worker's reply transaction, a bulk job's chunk),
so counting the cache SETs per text digest in Redis' MONITOR stream counts the computations, with
nothing added to the service. The fault tests and the chaos run use it to show that recovery
computes nothing twice but what a dead worker was computing.

MONITOR costs Redis throughput: for tests and the chaos run only. The monitor reconnects by itself
when Redis restarts.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter

import redis


class CacheWrites:
    """Counts, on a thread of its own, the cache entries written under `key_prefix` per text digest."""

    def __init__(self, redis_url: str, key_prefix: str) -> None:
        self._url = redis_url
        self._pattern = re.compile(rf"^SET {re.escape(key_prefix)}:cache:[^: ]+:([0-9a-f]{{64}}) ")
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._watching = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cache-writes", daemon=True)

    def __enter__(self) -> CacheWrites:
        self._thread.start()
        if not self._watching.wait(30):
            raise RuntimeError("MONITOR did not start")
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def computed_more_than_once(self) -> dict[str, int]:
        """Digest -> writes, for every text written more than once."""
        return {digest: n for digest, n in self.counts.items() if n > 1}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                client = redis.Redis.from_url(self._url, socket_timeout=1.0)
                with client.monitor() as monitor:
                    self._watching.set()
                    while not self._stop.is_set():
                        try:
                            command = monitor.next_command()["command"]
                        except redis.TimeoutError:
                            continue
                        if match := self._pattern.match(command):
                            self.counts[match.group(1)] += 1
            except (redis.ConnectionError, OSError):
                time.sleep(0.2)

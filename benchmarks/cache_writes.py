"""How often the service computed each distinct text, read off Redis: every computation of a text
writes its cache entry once (the /predict worker's reply transaction, a bulk job's part), so
counting the cache SETs per text digest in Redis' MONITOR stream counts the computations, with
nothing added to the service. A reply transaction whose reply a broken connection lost is sent
again as it was (`batcher.reply`): a transaction byte for byte the same as one already applied is
that one again, one computation. The fault tests and the chaos run use it to show that recovery
computes nothing twice but what a fault put back.

MONITOR costs Redis throughput: for tests and the chaos run only. The monitor reconnects by itself
when Redis restarts.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import Counter

import redis


class CacheWrites:
    """Counts, on a thread of its own, the computations written to cache entries under `key_prefix`,
    per text digest, and when each was written."""

    def __init__(self, redis_url: str, key_prefix: str) -> None:
        self._url = redis_url
        self._pattern = re.compile(rf"^SET {re.escape(key_prefix)}:cache:[^: ]+:([0-9a-f]{{64}}) ")
        self.counts: Counter[str] = Counter()
        self.written: dict[str, list[float]] = {}  # digest -> unix s (Redis's clock) of each of its cache writes
        self._transactions: dict[str, list[str]] = {}  # client -> its commands since MULTI
        self._applied: set[bytes] = set()  # digests of the transactions that wrote cache entries
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
        """Digest -> computations, for every text computed more than once."""
        return {digest: n for digest, n in self.counts.items() if n > 1}

    def _seen(self, command: str, client: str, at: float) -> None:
        """One command of the MONITOR stream (`client`: its connection, `at`: when Redis ran it). A
        transaction's commands are kept until its EXEC, then counted, unless it is one already
        counted, sent again."""
        name = command.split(" ", 1)[0].upper()
        if name == "MULTI":
            self._transactions[client] = []
        elif name in ("EXEC", "DISCARD"):
            commands = self._transactions.pop(client, [])
            digests = [match.group(1) for c in commands if (match := self._pattern.match(c))]
            if name == "EXEC" and digests:
                sent = hashlib.sha256("\n".join(commands).encode()).digest()
                if sent not in self._applied:
                    self._applied.add(sent)
                    self._computed(digests, at)
        elif client in self._transactions:
            self._transactions[client].append(command)
        elif match := self._pattern.match(command):
            self._computed([match.group(1)], at)

    @property
    def first_written(self) -> dict[str, float]:
        """Digest -> when its entry was first written."""
        return {digest: times[0] for digest, times in self.written.items()}

    def _computed(self, digests: list[str], at: float) -> None:
        self.counts.update(digests)
        for digest in digests:
            self.written.setdefault(digest, []).append(at)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._transactions.clear()  # (a new connection: the clients of the last one are gone)
            try:
                client = redis.Redis.from_url(self._url, socket_timeout=1.0)
                with client.monitor() as monitor:
                    self._watching.set()
                    while not self._stop.is_set():
                        try:
                            seen = monitor.next_command()
                        except redis.TimeoutError:
                            continue
                        self._seen(seen["command"], f"{seen['client_address']}:{seen['client_port']}", seen["time"])
            except (redis.ConnectionError, OSError):
                time.sleep(0.2)

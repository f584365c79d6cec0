"""Dead workers' work reclaimed, as a state machine (Hypothesis's stateful testing) over the real
death watch (`core.liveness.DeathWatch`), heartbeat thread's tick (`batcher.heartbeat.Heartbeat`) and
work queue (`batcher.queue.WorkQueue`), on fakeredis.

Two to four workers, each on a client whose connections carry its name, take work as `Worker.run`
does (some takes lose their replies to a broken connection), answer it (the reply stage's
transaction: the result, the LREM, the beat riding along), tick (beat when due, look for the dead
and requeue their work), hang (no beat, no take; the thread still looks) and come back, lose
their heartbeat keys, leave (`Worker._leave`) or are killed (their connections closed); new ones start; Redis goes down, closing
every connection, and comes back with its keys, their expiry run on (an append-only Redis). Between a watcher's look and its requeue, another worker may beat and take,
or reclaim too. The clock, Redis's as well, moves half a second at a time (`DEATH_WATCH_S`), every
worker's heartbeat thread ticking in between. After every step:

- no work is lost: an item pushed and not answered is queued, or in the processing list of a worker
  that runs or is registered (whose death a look will see);
- an item is in one list at most, and answered once unless a hung worker held it;
- a running worker keeps its work: an item it holds leaves its processing list only with its answer,
  unless it hung holding it (a hung worker's lapsed heartbeat is its death: docs/reliability.md);
- a killed worker is deregistered, its work requeued, once its connections have been gone
  `RECONNECT_S` (or its heartbeat lapsed) and a running worker looked.

Sequences it found are kept below it as plain tests (`test_found_*`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from unittest import mock

import fakeredis
from fakeredis._socket import _base as fakeredis_socket
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from batcher import heartbeat as heartbeat_module
from batcher.heartbeat import DEATH_WATCH_S, Heartbeat
from batcher.queue import WorkQueue
from batcher.redis_link import Link
from core.liveness import RECONNECT_S
from core.protocol import Keys, ModelInfo, WorkerStatus, WorkItem, new_id
from tests.conftest import examples

KEYS = Keys("reclaim")
TTL_S = 1.5  # (a beat every tick: a lapse within a few steps)
MODEL = ModelInfo(name="m", version="v", labels=["NEGATIVE", "POSITIVE"], device="cpu", dtype="fp32")
MOST_WORKERS = 4


class Clock:
    """The test's time: Redis's (key expiry), the heartbeat's (its lapse time too) and the death watch's,
    moved by the test."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class SimWorker:
    """A worker process as the reclaim sees it: its heartbeat thread (real), its take and reply
    stages' Redis writes (those of `Intake` and `Replies`), and what it holds in memory."""

    def __init__(self, server: fakeredis.FakeServer, number: int, clock: Clock) -> None:
        self.id = f"w{number}"
        self.connection = KEYS.worker_connection(f"process-{number}")
        self.client = fakeredis.FakeRedis(server=server, client_name=self.connection)
        self.queue = WorkQueue(self.client, KEYS, self.id, TTL_S)
        self.queue.deaths.clock = self.queue.deaths.wall = clock
        self.heartbeat = Heartbeat(self.client, KEYS, self.queue, TTL_S, self.status, self.healthy, MODEL)
        self.replies = Link(self.client)
        self.state = "running"  # or "hung", "killed", "left"
        self.held: dict[str, bytes] = {}  # item id -> raw: taken, not answered
        self.forfeit: set[str] = set()  # held while it hung: its lapsed heartbeat may hand them to another
        self.lost = False  # a take's replies were lost: the next take requeues what it does not hold first
        self.away = False  # hung, or Redis failed it: it beats before its next take (`Worker._rejoin`)
        self.ticked = False  # since the clock last moved
        self.killed_at = 0.0

    def status(self) -> WorkerStatus:
        return WorkerStatus(id=self.id, host="h", pid=1, model_version="v", started_at=0, connection=self.connection)

    def healthy(self) -> bool:
        return self.state == "running"


class ReclaimMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self._patches = [
            mock.patch.object(fakeredis_socket, "time", SimpleNamespace(time=self.clock, sleep=time.sleep)),
            mock.patch.object(heartbeat_module, "time", SimpleNamespace(monotonic=self.clock, time=self.clock)),
        ]
        for patch in self._patches:
            patch.start()
        self.server = fakeredis.FakeServer()
        self.api = fakeredis.FakeRedis(server=self.server)
        self.workers: list[SimWorker] = []
        self.raws: dict[str, bytes] = {}  # every item pushed
        self.answered: set[str] = set()
        self.forfeit: set[str] = set()  # items a hung worker held: they may be computed, and answered, twice
        self.down = False
        self.up_at = self.clock.now  # when Redis last came back

    def teardown(self) -> None:
        for patch in reversed(self._patches):
            patch.stop()

    # --- the workers -----------------------------------------------------------------------------

    @initialize(count=st.integers(2, 3))
    def start(self, count: int) -> None:
        for _ in range(count):
            self.start_worker()

    @precondition(lambda self: not self.down and len(self.workers) < MOST_WORKERS)
    @rule()
    def start_worker(self) -> None:
        """A worker starts: its first beat and announcement (`Worker._announce`), then its thread."""
        worker = SimWorker(self.server, len(self.workers), self.clock)
        worker.heartbeat.beat()
        worker.heartbeat.announce(anyway=True)
        worker.heartbeat._next_beat = self.clock.now + TTL_S / 3
        worker.ticked = True
        self.workers.append(worker)

    def _worker(self, index: int, *states: str) -> SimWorker | None:
        worker = self.workers[index % len(self.workers)]
        return worker if worker.state in states else None

    @precondition(lambda self: not self.down)
    @rule(texts=st.integers(1, 3))
    def push(self, texts: int) -> None:
        """The API queues items."""
        for _ in range(texts):
            item = WorkItem(new_id(), ["a text"], self.clock.now, self.clock.now + 1e6, "done:api")
            self.raws[item.id] = item.encode()
            self.api.lpush(KEYS.queue, self.raws[item.id])

    @precondition(lambda self: not self.down)
    @rule(index=st.integers(0, MOST_WORKERS - 1), most=st.integers(1, 3), replies_lost=st.booleans())
    def take(self, index: int, most: int, replies_lost: bool) -> None:
        """A running worker's take (`Worker.run`): first the items a lost take left in its processing
        list requeued, and a beat if it was away, then LMOVEs; with `replies_lost`, Redis moved them but
        the replies never came."""
        if (worker := self._worker(index, "running")) is None:
            return
        if worker.lost:
            worker.queue.requeue_unheld()
            worker.lost = False
        if worker.away:
            worker.queue.link.transaction(*worker.heartbeat.writes())
            worker.away = False
        raws = worker.queue.take_queued(most)
        if replies_lost:
            worker.lost = worker.away = True
            return
        worker.queue.held_raws.update(raws)
        worker.held.update({WorkItem.decode(raw).id: raw for raw in raws})

    @precondition(lambda self: not self.down)
    @rule(index=st.integers(0, MOST_WORKERS - 1), which=st.integers(0, 5))
    def answer(self, index: int, which: int) -> None:
        """The reply stage's transaction for one held item: its result, its LREM, the beat."""
        if (worker := self._worker(index, "running")) is None or not worker.held:
            return
        item_id = sorted(worker.held)[which % len(worker.held)]
        raw = worker.held[item_id]
        writes = [
            ("SET", KEYS.result(item_id), b"result", "PX", 10_000),
            ("LREM", worker.queue.processing, 1, raw),
            *worker.heartbeat.writes(),
        ]
        worker.replies.transaction(*writes)
        assert item_id not in self.answered or item_id in self.forfeit, f"{item_id} answered twice"
        del worker.held[item_id]
        worker.queue.held_raws.discard(raw)
        self.answered.add(item_id)

    @rule(index=st.integers(0, MOST_WORKERS - 1), meanwhile=st.sampled_from(["nothing", "beat and take", "reclaim"]))
    def tick(self, index: int, meanwhile: str) -> None:
        """A heartbeat thread's tick; `meanwhile`, between its look for the dead and its requeue, another
        worker beats (a hung one coming back) and takes an item, or another watcher reclaims too."""
        if (worker := self._worker(index, "running", "hung")) is None:
            return
        others = [w for w in self.workers if w is not worker and w.state in ("running", "hung")]
        with self._between_look_and_requeue(worker, others[0] if others and not self.down else None, meanwhile):
            worker.heartbeat._tick()
        worker.ticked = True

    @contextmanager
    def _between_look_and_requeue(self, watcher: SimWorker, other: SimWorker | None, meanwhile: str) -> Iterator[None]:
        look = watcher.queue.deaths.dead
        if other is None or meanwhile == "nothing":
            yield
            return
        actions: dict[str, Callable[[], object]] = {
            "beat and take": lambda: self._comes_back_and_takes(other),
            "reclaim": other.heartbeat._tick,
        }

        def dead() -> dict[str, bytes | None]:
            found = look()
            if found:
                actions[meanwhile]()
            return found

        with mock.patch.object(watcher.queue.deaths, "dead", dead):
            yield

    def _comes_back_and_takes(self, worker: SimWorker) -> None:
        if worker.state == "hung":
            worker.state = "running"
        worker.heartbeat.beat()
        self.push(1)
        self.take(self.workers.index(worker), 1, False)

    @rule(index=st.integers(0, MOST_WORKERS - 1))
    def hang(self, index: int) -> None:
        """A lane hangs past its deadlines: no beat, no take, no answer (`Worker._healthy`)."""
        if (worker := self._worker(index, "running")) is not None:
            worker.state = "hung"
            worker.forfeit |= set(worker.held)
            self.forfeit |= set(worker.held)
            worker.away = True

    @precondition(lambda self: not self.down)
    @rule(index=st.integers(0, MOST_WORKERS - 1))
    def its_heartbeat_is_lost(self, index: int) -> None:
        """A worker's heartbeat key goes (deleted by hand, or by a Redis told to evict it): a running
        worker beats again within a third of a TTL, before a watcher may take it for dead."""
        if (worker := self._worker(index, "running", "hung")) is not None:
            self.api.delete(KEYS.heartbeat(worker.id))

    @rule(index=st.integers(0, MOST_WORKERS - 1))
    def resume(self, index: int) -> None:
        if (worker := self._worker(index, "hung")) is not None:
            worker.state = "running"

    @precondition(lambda self: not self.down and sum(w.state not in ("killed", "left") for w in self.workers) > 1)
    @rule(index=st.integers(0, MOST_WORKERS - 1))
    def leave(self, index: int) -> None:
        """SIGTERM (`Worker._leave`), once its lanes' results are written: the rest handed back, then
        its heartbeat deleted and its registration."""
        if (worker := self._worker(index, "running")) is None:
            return
        worker.queue.give_back()
        worker.client.delete(KEYS.heartbeat(worker.id))
        worker.client.srem(KEYS.workers, worker.id)
        worker.state = "left"
        worker.held.clear()

    @precondition(lambda self: sum(w.state not in ("killed", "left") for w in self.workers) > 1)
    @rule(index=st.integers(0, MOST_WORKERS - 1))
    def kill(self, index: int) -> None:
        """SIGKILL: the kernel closes its connections; what it held in memory is gone."""
        if (worker := self._worker(index, "running", "hung")) is not None:
            worker.state = "killed"
            worker.killed_at = self.clock.now
            worker.client.connection_pool.disconnect()

    # --- Redis and the clock -------------------------------------------------------------------------

    @precondition(lambda self: not self.down)
    @rule()
    def redis_goes_down(self) -> None:
        """Redis stops (every connection closed); it comes back with its keys (append-only)."""
        self.down = True
        self.server.connected = False
        for client in [self.api, *(w.client for w in self.workers)]:
            client.connection_pool.disconnect()
        for worker in self.workers:  # each take stage meets the outage
            worker.lost = worker.away = True

    @precondition(lambda self: self.down)
    @rule()
    def redis_comes_back(self) -> None:
        self.down = False
        self.server.connected = True
        self.up_at = self.clock.now

    @rule()
    def time_passes(self) -> None:
        """Half a second, in which every worker's heartbeat thread ticked (those that did not yet, now)."""
        for worker in self.workers:
            if worker.state in ("running", "hung") and not worker.ticked:
                worker.heartbeat._tick()
        self.clock.now += DEATH_WATCH_S
        for worker in self.workers:
            worker.ticked = False

    # --- what it promises ----------------------------------------------------------------------------

    def check(self) -> None:
        self.no_work_is_lost_nor_listed_twice()
        self.a_running_worker_keeps_its_work()
        self.a_killed_worker_is_reclaimed()

    def _lists(self) -> dict[str, list[bytes]]:
        lists = {KEYS.queue: self.api.lrange(KEYS.queue, 0, -1)}
        for worker in self.workers:
            lists[worker.id] = self.api.lrange(worker.queue.processing, 0, -1)
        return lists

    @invariant()
    def no_work_is_lost_nor_listed_twice(self) -> None:
        if self.down:
            return
        lists = self._lists()
        registered = {m.decode() for m in self.api.smembers(KEYS.workers)}
        for item_id, raw in self.raws.items():
            where = [name for name, items in lists.items() for listed in items if listed == raw]
            assert len(where) <= 1, f"{item_id} is in {where}"
            if item_id in self.answered:
                continue
            assert where, f"{item_id} is nowhere, never answered"
            holder = next((w for w in self.workers if w.id == where[0]), None)
            if holder is not None and holder.state in ("killed", "left"):
                assert holder.id in registered, (
                    f"{item_id} is with {holder.state} {holder.id}, which nobody will reclaim"
                )

    @invariant()
    def a_running_worker_keeps_its_work(self) -> None:
        if self.down:
            return
        for worker in self.workers:
            if worker.state not in ("running", "hung"):
                continue
            listed = set(self.api.lrange(worker.queue.processing, 0, -1))
            for item_id in set(worker.held) - worker.forfeit:
                assert worker.held[item_id] in listed, f"{item_id} was taken from {worker.id}, which holds it"

    @invariant()
    def a_killed_worker_is_reclaimed(self) -> None:
        """Once its connections were gone `RECONNECT_S` from a look after its death (and after Redis
        came back: a watcher's count starts again after an outage), by the next look after that."""
        if self.down:
            return
        registered = {m.decode() for m in self.api.smembers(KEYS.workers)}
        for worker in self.workers:
            if worker.state == "killed" and worker.id in registered:
                due = max(worker.killed_at, self.up_at) + DEATH_WATCH_S + RECONNECT_S + DEATH_WATCH_S
                assert self.clock.now <= due, f"{worker.id}, killed at {worker.killed_at}, is still registered"


ReclaimMachine.TestCase.settings = settings(
    max_examples=examples(350), stateful_step_count=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_dead_workers_work_is_reclaimed_once_and_a_live_workers_never = ReclaimMachine.TestCase


# --- sequences it found, kept as plain tests ------------------------------------------------------


def replay(*steps: Callable[[ReclaimMachine], object], workers: int = 2) -> None:
    """Run `steps` on `workers` workers, checking every invariant after each."""
    machine = ReclaimMachine()
    try:
        machine.start(workers)
        machine.check()
        for step in steps:
            step(machine)
            machine.check()
    finally:
        machine.teardown()


def test_found_a_worker_that_beat_and_took_work_after_the_look_that_found_it_dead_keeps_that_work() -> None:
    """Its heartbeat lapsed while it hung; it came back, beat and took an item between a watcher's
    look and that watcher's requeue, which took the item from under it and deregistered it."""
    replay(
        lambda m: m.hang(index=1),
        *[ReclaimMachine.time_passes] * 4,
        lambda m: m.tick(index=0, meanwhile="beat and take"),
    )

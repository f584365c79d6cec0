"""Admission by predicted completion (`api.admission`) on fakeredis with a clock the test moves: what
is refused, with which Retry-After, how often the fleet's load is read, and that a cold start admits;
then the count of admitted texts across reads, as a state machine."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import fakeredis
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule
from redis.exceptions import ConnectionError as RedisConnectionError

from api.admission import MAX_AGE_S, REFRESH_S, Admission, Fleet, Load
from api.errors import ErrorType, ServiceError
from core.protocol import Keys, WorkerStatus, WorkItem, new_id
from tests.conftest import HANG_GUARD_S, LoopMachine, examples

pytestmark = pytest.mark.anyio
KEYS = Keys("t")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def status(texts_per_s: float | None = 100.0, forward_s: float | None = 0.1, held: int = 0) -> WorkerStatus:
    return WorkerStatus(
        id=new_id(), host="h", pid=1, model_version="v", started_at=0.0,
        texts_per_s=texts_per_s, forward_s=forward_s, texts_ahead=held,
    )  # fmt: skip


async def beat(redis: fakeredis.FakeAsyncRedis, worker: WorkerStatus) -> None:
    await redis.sadd(KEYS.workers, worker.id)
    await redis.set(KEYS.heartbeat(worker.id), worker.encode())


async def queue(redis: fakeredis.FakeAsyncRedis, items: int) -> None:
    item = WorkItem(id="i", texts=["x"], enqueued_at=0.0, deadline=0.0, reply_to="r")
    await redis.lpush(KEYS.queue, *[item.encode()] * items)


async def queued_by(admission: Admission, redis: fakeredis.FakeAsyncRedis, texts: int) -> None:
    """A request of `texts` texts, admitted, none in the cache: its work item queued."""
    await admission.admit(texts, timeout_s=HANG_GUARD_S)
    item = WorkItem(id=new_id(), texts=[f"text {i}" for i in range(texts)], enqueued_at=0.0, deadline=0.0, reply_to="r")
    await redis.lpush(KEYS.queue, item.encode())


async def refused(admission: Admission, texts: int, timeout_s: float) -> ServiceError | None:
    try:
        await admission.admit(texts, timeout_s)
    except ServiceError as exc:
        assert exc.error_type is ErrorType.OVERLOADED
        return exc
    return None


async def read_again(load: Load) -> None:
    """Start the read of a stale view, and let it end (requests meanwhile decide by the last one)."""
    await load.current()
    if load.view.reading is not None:
        await load.view.reading


def admitting(redis: fakeredis.FakeAsyncRedis) -> tuple[Admission, Clock]:
    """Admission by the load `redis` holds, on a clock the test moves."""
    clock = Clock()
    return Admission(Load(redis, KEYS, clock)), clock


def held_reads(redis: fakeredis.FakeAsyncRedis, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Make Redis answer the view's reads only once the returned event is set (a slow peer)."""
    answer = asyncio.Event()
    pipeline = redis.pipeline

    def slow(*args: object, **kwargs: object) -> object:
        pipe = pipeline(*args, **kwargs)
        execute = pipe.execute

        async def answered(*a: object, **k: object) -> object:
            await answer.wait()
            return await execute(*a, **k)

        pipe.execute = answered
        return pipe

    monkeypatch.setattr(redis, "pipeline", slow)
    return answer


@pytest.fixture
def redis() -> fakeredis.FakeAsyncRedis:
    return fakeredis.FakeAsyncRedis()


async def test_a_request_that_would_be_answered_past_its_deadline_is_refused_with_retry_after_from_the_prediction(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    await beat(redis, status(texts_per_s=100.0, forward_s=0.1, held=20))
    await queue(redis, 290)  # 310 texts ahead: answered in 3.1 s (counted twice) + 0.1 s
    admission = Admission(Load(redis, KEYS, Clock()))
    refusal = await refused(admission, 1, timeout_s=1.0)
    assert refusal is not None and refusal.retry_after_s == 6  # 6.3 s - 1 s, rounded up
    assert await refused(admission, 1, timeout_s=6.2) is not None
    assert await refused(admission, 1, timeout_s=6.4) is None


async def test_the_texts_admitted_since_the_last_read_count_until_the_next(redis: fakeredis.FakeAsyncRedis) -> None:
    await beat(redis, status(texts_per_s=10.0, forward_s=0.1))
    admission, clock = admitting(redis)
    answers = [await refused(admission, 1, timeout_s=1.0) for _ in range(12)]
    assert [a is None for a in answers] == [True] * 5 + [False] * 7  # 2 x (4 ahead) / 10 + 0.1 = 0.9 s: the last in
    clock.now += REFRESH_S
    await read_again(admission.load)  # nothing was queued after all
    assert await refused(admission, 1, timeout_s=1.0) is None


async def test_the_load_is_read_once_per_refresh_whatever_the_requests(
    redis: fakeredis.FakeAsyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await beat(redis, status(texts_per_s=100.0, forward_s=0.1))
    clock = Clock()
    load = Load(redis, KEYS, clock)
    reads = []
    pipeline = redis.pipeline
    monkeypatch.setattr(redis, "pipeline", lambda *a, **k: reads.append(1) or pipeline(*a, **k))
    await asyncio.gather(*(load.current() for _ in range(50)))
    assert len(reads) == 1
    await queue(redis, 1000)  # a backlog the view has not read yet
    admission = Admission(load)
    assert await refused(admission, 1, timeout_s=1.0) is None and len(reads) == 1
    clock.now += REFRESH_S
    await asyncio.gather(*(load.current() for _ in range(50)), read_again(load))
    assert await refused(admission, 1, timeout_s=1.0) is not None and len(reads) == 2


async def test_a_stale_view_is_read_again_in_the_background_while_requests_decide_by_it(
    redis: fakeredis.FakeAsyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await beat(redis, status(texts_per_s=100.0, forward_s=0.1))
    admission, clock = admitting(redis)
    assert await refused(admission, 1, timeout_s=1.0) is None  # the first read, waited for
    await queue(redis, 1000)
    answer = held_reads(redis, monkeypatch)
    clock.now += REFRESH_S
    assert await asyncio.wait_for(refused(admission, 1, timeout_s=1.0), HANG_GUARD_S) is None  # by the last view
    answer.set()
    await read_again(admission.load)
    assert await refused(admission, 1, timeout_s=1.0) is not None  # the backlog, read


async def test_a_view_from_before_a_quiet_spell_is_read_again_before_a_request_decides_by_it(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    await beat(redis, status(texts_per_s=100.0, forward_s=0.1))
    await queue(redis, 1000)
    admission, clock = admitting(redis)
    assert await refused(admission, 1, timeout_s=1.0) is not None  # a backlog
    await redis.delete(KEYS.queue)  # answered meanwhile
    clock.now += MAX_AGE_S
    assert await refused(admission, 1, timeout_s=1.0) is None


async def test_the_texts_admitted_while_a_read_is_on_its_way_count_after_it(
    redis: fakeredis.FakeAsyncRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await beat(redis, status(texts_per_s=10.0, forward_s=0.1))
    admission, clock = admitting(redis)
    assert await refused(admission, 1, timeout_s=1.0) is None  # after the first read
    await queue(redis, 1)  # its work item
    answer = held_reads(redis, monkeypatch)
    clock.now += REFRESH_S
    answers = [await refused(admission, 1, timeout_s=1.0) for _ in range(4)]  # the next read on its way
    assert [a is None for a in answers] == [True] * 4  # the last: 2 x (1 + 3 ahead) / 10 + 0.1 = 0.9 s
    answer.set()
    await read_again(admission.load)  # read before their work items were queued: one item ahead
    assert await refused(admission, 1, timeout_s=1.0) is not None  # 2 x (1 + 4 ahead) / 10 + 0.1 s: past 1 s


@pytest.mark.parametrize("cold", [status(texts_per_s=None, forward_s=None), None])
async def test_a_cold_start_admits(redis: fakeredis.FakeAsyncRedis, cold: WorkerStatus | None) -> None:
    # A worker that has not timed a forward yet, or none at all: nothing to predict by.
    if cold is not None:
        await beat(redis, cold)
    await queue(redis, 10_000)
    assert await refused(Admission(Load(redis, KEYS, Clock())), 1, timeout_s=0.01) is None


async def test_a_failed_read_admits(redis: fakeredis.FakeAsyncRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    await beat(redis, status(texts_per_s=1.0))
    await queue(redis, 100)
    admission, clock = admitting(redis)
    assert await refused(admission, 1, timeout_s=1.0) is not None
    pipeline = redis.pipeline

    def failing(*args: object, **kwargs: object) -> object:
        pipe = pipeline(*args, **kwargs)
        pipe.execute = lambda *_, **__: _raise()
        return pipe

    async def _raise() -> None:
        raise RedisConnectionError("Redis went away")

    monkeypatch.setattr(redis, "pipeline", failing)
    clock.now += REFRESH_S
    await read_again(admission.load)
    assert await refused(admission, 1, timeout_s=1.0) is None  # the request meets the outage itself


async def test_with_nothing_ahead_a_request_is_admitted_however_slow_the_forwards_seem(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    # A first forward far slower than the rest (a warm-up) must not refuse an idle service for good:
    # no forward would run to correct it.
    await beat(redis, status(texts_per_s=1.0, forward_s=5.0))
    admission = Admission(Load(redis, KEYS, Clock()))
    assert await refused(admission, 1, timeout_s=1.0) is None
    assert await refused(admission, 1, timeout_s=1.0) is not None  # one ahead now: 7 s


async def test_queued_items_count_as_the_texts_they_hold_not_as_the_largest_item_taken_last(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    # A worker whose last take was one 64-text item holds it; the 1-text items queued behind it are
    # one text each, not 64.
    await beat(redis, status(texts_per_s=200.0, forward_s=0.1, held=64))
    admission, clock = admitting(redis)
    for _ in range(20):
        await queued_by(admission, redis, 1)
    clock.now += REFRESH_S
    await read_again(admission.load)
    assert await refused(admission, 1, timeout_s=1.0) is None  # 2 x (64 + 20) / 200 + 0.1 s: in time
    await queued_by(admission, redis, 64)
    clock.now += REFRESH_S
    await read_again(admission.load)
    assert await refused(admission, 1, timeout_s=1.0) is not None  # 2 x (64 + 20 + 64) / 200 + 0.1 s: late


class AdmittedTextsMachine(LoopMachine):
    """`Load`'s count of the texts admitted and not yet seen queued, as a state machine: requests
    admitted, their work items pushed in that order a round trip later, and reads of the queue asked for and ending
    whenever Hypothesis says, one at a time, behind one API process and no worker taking. What it
    promises:

    - the count holds the texts of each request admitted since the last ended read was asked for,
      pushed or not; a request the read on its way or an earlier one took is no longer counted;
    - an ended read sees as ahead exactly the texts queued by then, once every admitted item is pushed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.redis = fakeredis.FakeAsyncRedis()
        self.answers: list[asyncio.Future[None]] = []  # the reads' round trips, answered when a rule says
        pipeline = self.redis.pipeline

        def gated(*args: object, **kwargs: object) -> object:
            pipe = pipeline(*args, **kwargs)
            execute = pipe.execute

            async def answered(*a: object, **k: object) -> object:
                answer = self.loop.create_future()
                self.answers.append(answer)
                await answer
                return await execute(*a, **k)

            pipe.execute = answered
            return pipe

        self.redis.pipeline = gated  # type: ignore[method-assign]
        self.loop.run_until_complete(beat(self.redis, status(texts_per_s=100.0, forward_s=0.1)))
        self.load = Load(self.redis, KEYS, clock=lambda: self.now)
        self.requests: list[Request] = []
        self.asked = 0  # the reads asked for so far: a request admitted now is taken by read `asked + 1`
        self.ended = 0  # the reads that ended
        self.queued_texts = 0

    def on_its_way(self) -> bool:
        return self.load.view.reading is not None

    @rule(texts=st.integers(1, 8))
    def a_request_is_admitted(self, texts: int) -> None:
        self.load.admit(texts)
        self.requests.append(Request(texts, taken_by=self.asked + 1))

    @precondition(lambda self: any(not r.pushed for r in self.requests))
    @rule()
    def the_next_work_item_is_pushed(self) -> None:
        request = next(r for r in self.requests if not r.pushed)  # each request pushes right after its admission
        request.pushed = True
        self.loop.run_until_complete(queue_texts(self.redis, request.texts))
        self.queued_texts += request.texts

    @precondition(lambda self: not self.on_its_way())
    @rule()
    def a_read_is_asked_for(self) -> None:
        self.now += MAX_AGE_S  # stale: the next request's look starts a read
        self.loop.create_task(self.load.current())
        self.settle()
        assert self.on_its_way()
        self.asked += 1

    @precondition(lambda self: self.on_its_way())
    @rule()
    def the_read_ends(self) -> None:
        [answer] = [a for a in self.answers if not a.done()]
        answer.set_result(None)
        self.settle()
        assert not self.on_its_way()
        self.ended += 1
        view = self.loop.run_until_complete(self.load.current())
        assert isinstance(view, Fleet)
        if all(r.pushed for r in self.requests):  # (else the newest admitted stand for the newest queued)
            assert view.texts_ahead == self.queued_texts

    @invariant()
    def the_count_holds_the_requests_no_ended_read_took(self) -> None:
        assert self.load.admitted == sum(r.texts for r in self.requests if r.taken_by > self.ended)


@dataclass
class Request:
    """A request admitted in `AdmittedTextsMachine`: its texts, the read that takes it (the count of
    reads asked for, then one more), and whether its work item was pushed."""

    texts: int
    taken_by: int
    pushed: bool = False


async def queue_texts(redis: fakeredis.FakeAsyncRedis, texts: int) -> None:
    """One work item of `texts` texts queued."""
    item = WorkItem(id=new_id(), texts=[f"text {i}" for i in range(texts)], enqueued_at=0.0, deadline=0.0, reply_to="r")
    await redis.lpush(KEYS.queue, item.encode())


TestAdmittedTextsMachine = AdmittedTextsMachine.TestCase
TestAdmittedTextsMachine.settings = settings(max_examples=examples(150), stateful_step_count=40, deadline=None)


# What a heartbeat can hold and still decode: any finite number where the fields are numbers.
rates = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False))


@settings(max_examples=examples(200), deadline=None)
@example(beats=[(5.0, 0.1, 10), (-5.0, 0.1, 0)], queued=0, texts=1, timeout_s=1.0)  # throughputs summing to 0
@example(beats=[(1e-308, 1.0, 10)], queued=0, texts=1, timeout_s=1.0)  # an endless wait
@given(
    beats=st.lists(st.tuples(rates, rates, st.integers(-(2**40), 2**40)), min_size=1, max_size=3),
    queued=st.integers(0, 50),
    texts=st.integers(1, 64),
    timeout_s=st.floats(0.001, 60),
)
def test_a_heartbeat_that_decodes_to_nonsense_never_makes_admission_fail(
    beats: list[tuple[float | None, float | None, int]], queued: int, texts: int, timeout_s: float
) -> None:
    """Whatever numbers the workers' heartbeats hold, a request is admitted or refused with the 503's
    whole-number Retry-After: never a 500 (a division by throughputs summing to 0, an endless wait's
    Retry-After)."""

    async def admit() -> None:
        redis = fakeredis.FakeAsyncRedis()
        for texts_per_s, forward_s, held in beats:
            await beat(redis, status(texts_per_s, forward_s, held))
        if queued:
            await queue(redis, queued)
        try:
            await Admission(Load(redis, KEYS)).admit(texts, timeout_s)
        except ServiceError as refusal:
            assert refusal.error_type is ErrorType.OVERLOADED
            assert isinstance(refusal.retry_after_s, int) and refusal.retry_after_s >= 1
        await redis.aclose()

    asyncio.run(admit())

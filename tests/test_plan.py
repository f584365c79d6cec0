"""The batching policy (`batcher.plan`), the take stage on fakeredis, and the work queue: what a
forward holds, when it goes, how much is taken, and that work is held until answered or reclaimed."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable

import fakeredis
import numpy as np
import orjson
import pytest
from redis.exceptions import NoPermissionError

from batcher import intake as intake_module
from batcher.batches import Forward, batch, spread
from batcher.forward_time import OUTLIER, SMOOTHING
from batcher.intake import Intake
from batcher.plan import INTERACTIVE_FLOWS_S, Window
from batcher.policy import TAKE_AT_ONCE, Policy
from batcher.queue import WorkQueue
from batcher.reply import Replies
from batcher.thread_failure import ThreadFailure
from batcher.work import Chunks, Held, Text
from core.liveness import RECONNECT_S, live_workers
from core.protocol import DEFAULT_CLIENT, Keys, Result, WorkerStatus, WorkItem, new_id
from core.settings import Settings
from model_store.cost import ForwardCost
from model_store.long_texts import Tokenized
from tests.conftest import HANG_GUARD_S, wait_for

KEYS = Keys("t")
HOUR_S = 3600.0  # a wait no test sits out: a forward that waited this long trips the hang guard
PADDED = ForwardCost(overhead_tokens=64, attention_tokens=1024, packs=False)  # a model that only pads
PACKS = ForwardCost(overhead_tokens=64, attention_tokens=1024, packs=True)


def policy(
    max_texts: int = 8,
    max_tokens: int = 1000,
    max_wait_s: float = HOUR_S,
    window: int = 100,
    cost: ForwardCost = PADDED,
    bulk_delay_s: float = math.inf,
    bulk_share: float = 0.0,
) -> Policy:
    return Policy(max_texts, max_tokens, max_wait_s, window, cost, bulk_delay_s, bulk_share)


def word_ids(texts: list[str]) -> list[list[int]]:
    """A stand-in tokenizer: one token per word."""
    return [[1] * len(t.split()) for t in texts]


def whole(tokenize: Callable[[list[str]], list[list[int]]]) -> Callable[[list[str]], list[Tokenized]]:
    """The intake's tokenizer from a stand-in: each text one window, never long."""
    return lambda texts: [Tokenized([ids], [len(ids)], len(ids)) for ids in tokenize(texts)]


def work_item(*texts: str, ttl: float = 60, enqueued_at: float | None = None, client: str = DEFAULT_CLIENT) -> WorkItem:
    now = time.time() if enqueued_at is None else enqueued_at
    return WorkItem(
        id=new_id(),
        texts=list(texts),
        enqueued_at=now,
        deadline=now + ttl,
        reply_to=KEYS.reply_channel("x"),
        client=client,
    )


def push(redis: fakeredis.FakeRedis, *texts: str, ttl: float = 60) -> WorkItem:
    item = work_item(*texts, ttl=ttl)
    redis.lpush(KEYS.queue, item.encode())
    return item


def held_text(words: str, arrived: float | None = None, client: str = DEFAULT_CLIENT) -> Text:
    """A taken text of one work item of its own, `arrived` (enqueued) now unless given."""
    item = work_item(words, enqueued_at=arrived, client=client)
    return Text(words, KEYS.cache("v", words), [(Held(item.encode(), item), 0)], item.enqueued_at, word_ids([words])[0])


def add(window: Window, *words: str, arrived: float | None = None, client: str = DEFAULT_CLIENT) -> list[Text]:
    """Each text as a work item of its own, taken one at a time (arrivals as close as a test makes them)."""
    texts = [held_text(w, arrived, client) for w in words]
    for text in texts:
        window.add([text], 1)
    return texts


def texts_of(forward: Forward | None) -> list[str]:
    assert forward is not None
    return [t.text for t in forward.texts]


def next_forward(window: Window) -> Forward | None:
    """`window.next_forward()` from a lane thread, within the hang guard: a forward that waits for
    company it should not (an hour, in these tests) fails here instead of hanging."""
    got: list[Forward | None] = []
    lane = threading.Thread(target=lambda: got.append(window.next_forward()), daemon=True)
    lane.start()
    lane.join(HANG_GUARD_S)
    if lane.is_alive():
        window.close()  # let the lane go
        pytest.fail(f"the forward was still waiting after {HANG_GUARD_S} s")
    return got[0]


# --- batch: which texts go in the next forward -----------------------------------------------------


def choose(lengths: list[int], policy: Policy) -> tuple[list[int], bool, bool]:
    """The next batch's first forward: (indices, packed, full), `full` when a cap or a cut ended it."""
    forwards, full = batch(lengths, policy)
    indices, packed = forwards[0]
    return indices, packed, full or len(forwards) > 1


@pytest.mark.parametrize(
    ("lengths", "max_texts", "max_tokens", "cost", "expected"),
    [
        ([3, 3, 3], 8, 100, PADDED, ([0, 1, 2], False, False)),  # everything fits; the texts ran out: not full
        ([3, 3, 3], 2, 100, PADDED, ([0, 1], False, True)),  # max_texts stopped it
        ([3, 3, 3], 3, 100, PADDED, ([0, 1, 2], False, True)),  # exactly max_texts: a full forward
        ([2, 2, 10], 8, 20, PADDED, ([0, 1], False, True)),  # the 10-token text would pad all three to 30
        ([10, 2, 2], 8, 20, PADDED, ([0, 2], False, True)),  # 2 x 10 padded fits, 3 x 10 does not
        ([50], 8, 20, PADDED, ([0], False, False)),  # a lone oversized text still goes
        ([50, 1, 1], 8, 20, PADDED, ([0], False, True)),  # ... alone, when nothing fits beside it
        ([5, 1, 9, 5, 1, 9], 2, 100, PADDED, ([0, 3], False, True)),  # the oldest with its equal, not the short ones
        ([1, 9, 1, 9, 1], 3, 100, PADDED, ([0, 2, 4], False, True)),  # the short ones together
        ([9, 1, 1, 8, 2], 2, 100, PADDED, ([0, 3], False, True)),  # a long oldest takes its nearest neighbour below
        ([9, 1, 1, 8, 2], 2, 9, PADDED, ([0], False, True)),  # ... unless the token cap leaves room for it alone
        ([1, 2, 30, 31, 3], 3, 100, PADDED, ([0, 1, 4], False, True)),
        ([5, 4, 6], 2, 100, PADDED, ([0, 1], False, True)),  # a tie in distance goes to the shorter
        # a long oldest text goes alone where padding three short ones to it costs more than a call
        ([60, 15, 15, 15, 15, 15], 4, 1000, PADDED, ([0], False, True)),
        # Mixed lengths: packed into one row where the engine packs and it costs less than padding...
        ([5, 8, 11, 14, 17, 20, 23, 26], 32, 8192, PACKS, ([0, 1, 2, 3, 4, 5, 6, 7], True, False)),
        # ... never where it does not pack
        ([5, 8, 11, 14, 17, 20, 23, 26], 32, 8192, PADDED, ([0, 1, 2, 3, 4, 5, 6, 7], False, False)),
        # one length: padding wastes nothing, packing only adds attention
        ([10] * 20, 32, 8192, PACKS, (list(range(20)), False, False)),
        # runs of two lengths: cut in two padded forwards, cheaper than padding all to 16 or packing;
        # the oldest text's run goes, the other stays held
        ([8] * 16 + [16] * 16, 32, 8192, PACKS, (list(range(16)), False, True)),
        # Past the padded budget (4 x 30 = 120 > 95), a packed row of 95 tokens still fits...
        ([5, 30, 30, 30], 32, 95, PACKS, ([0, 1, 2, 3], True, False)),
        # ... only where the engine packs
        ([5, 30, 30, 30], 32, 95, PADDED, ([0, 1, 2], False, True)),
        # and a packed row keeps the token cap too (95 > 90): the cheaper layout of what fits
        ([5, 30, 30, 30], 32, 90, PACKS, ([0, 1, 2], True, True)),
    ],
)
def test_choose_takes_the_oldest_and_its_nearest_neighbours_in_length_within_the_caps(
    lengths: list[int], max_texts: int, max_tokens: int, cost: ForwardCost, expected: tuple[list[int], bool, bool]
) -> None:
    assert choose(lengths, policy(max_texts, max_tokens, cost=cost)) == expected


# --- Window: when a forward goes ----------------------------------------------------------------


def test_a_full_forward_goes_at_once() -> None:
    window = Window(policy(max_texts=2))
    add(window, "a", "b", "c")  # arrivals a moment apart: company is likely, but the forward is full
    assert texts_of(next_forward(window)) == ["a", "b"]


@pytest.mark.parametrize("history", [[], [99.0, 100.0, 101.0]], ids=["first request", "requests a second apart"])
def test_a_lone_client_never_waits_for_company(history: list[float]) -> None:
    """Company is waited for only while requests arrive less than max_wait apart (here 0.5 s)."""
    now = [0.0]
    window = Window(policy(max_wait_s=0.5), clock=lambda: now[0])
    for when in history:
        now[0] = when
        window.add([], 1)  # an earlier request's take
    now[0] = 102.0
    add(window, "alone", arrived=102.0)
    # The clock stands still: a forward that waited for company would wait for ever.
    assert texts_of(next_forward(window)) == ["alone"]


def test_a_forward_that_is_not_full_waits_for_company_while_requests_arrive_densely() -> None:
    window = Window(policy(max_texts=4))
    add(window, "a", "b", "c")  # three requests a moment apart
    threading.Timer(0.1, add, (window, "d")).start()  # the fourth fills the forward: it goes then
    assert texts_of(next_forward(window)) == ["a", "b", "c", "d"]


def test_company_is_waited_for_until_the_oldest_text_has_been_queued_max_wait() -> None:
    """The wait counts from the oldest text's enqueue time, not from when the lane asked: with an
    hour's max_wait, a wait counted from the ask would trip the hang guard."""
    window = Window(policy(max_texts=8))
    first = time.time() - HOUR_S + 0.2  # queued for all but 0.2 s of max_wait
    add(window, "a", arrived=first)
    add(window, "b", "c")
    assert texts_of(next_forward(window)) == ["a", "b", "c"]


def test_a_backlog_never_waits_again() -> None:
    """A text queued longer than max_wait already goes at once, though requests keep arriving densely."""
    window = Window(policy(max_texts=8))
    add(window, "late", arrived=time.time() - HOUR_S - 1)
    add(window, "b", "c")
    assert texts_of(next_forward(window)) == ["late", "b", "c"]


def test_close_wakes_a_waiting_lane_and_returns_the_texts_still_held() -> None:
    window = Window(policy(max_texts=8))
    add(window, "a", "b", "c")  # dense arrivals, not full: a lane waits an hour for company
    threading.Timer(0.1, window.close).start()
    assert next_forward(window) is None
    assert len(window) == 0
    window = Window(policy(max_texts=8))
    texts = add(window, "a", "b", "c")
    assert window.close() == texts
    assert next_forward(window) is None  # closed: no more forwards, ever


def test_a_text_held_already_gains_the_waiters_of_a_later_request() -> None:
    """One forward computes a text however many requests hold it."""
    window = Window(policy(max_texts=2))
    [first] = add(window, "same")
    waiters = list(first.waiters)
    [again] = add(window, "same")
    add(window, "other")
    assert len(window) == 2
    forward = next_forward(window)
    assert texts_of(forward) == ["same", "other"] and forward.texts[0] is first
    assert first.waiters == [*waiters, *again.waiters] and len(first.waiters) == 2


def test_a_batch_cut_in_forwards_runs_them_all_before_newer_texts() -> None:
    """The cost model cuts 4 one-word and 4 five-word texts in two forwards; a one-word text taken
    after them waits for the next batch rather than passing the older five-word texts."""
    window = Window(policy(max_texts=8, max_tokens=1000, cost=ForwardCost(2, 1024, packs=False)))
    short, long = ["s1", "s2", "s3", "s4"], [f"l{i} a b c d" for i in range(4)]
    add(window, *short, *long)
    assert texts_of(next_forward(window)) == short
    add(window, "newer", arrived=0.0)  # (queued long ago: it waits for no company)
    assert len(window) == 5  # the batch's second forward still counts in the window
    assert texts_of(next_forward(window)) == long
    assert texts_of(next_forward(window)) == ["newer"]


@pytest.mark.parametrize(
    ("forwards", "lanes", "expected"),
    [
        ([([0, 1, 2, 3], False)], 1, [[0, 1, 2, 3]]),  # one idle lane: the batch as it was cut
        ([([0, 1, 2, 3], False)], 2, [[0, 3], [1, 2]]),  # halved by length: 0 and 3 are the short ones
        ([([0, 1, 2, 3], False)], 3, [[0, 3], [2], [1]]),  # the one with the most tokens halved again
        ([([0], False)], 2, [[0]]),  # one text: nothing to share
        ([([1, 2], False), ([0, 3], False)], 2, [[0, 3], [1, 2]]),  # lanes enough already; the oldest's first
    ],
)
def test_spread_cuts_a_batch_for_the_idle_lanes_by_length(
    forwards: list[tuple[list[int], bool]], lanes: int, expected: list[list[int]]
) -> None:
    lengths = [2, 9, 8, 3]
    assert [indices for indices, _ in spread(forwards, lengths, lanes, policy())] == expected


def test_a_batch_that_one_lane_would_run_alone_is_shared_with_an_idle_lane() -> None:
    window = Window(policy(max_texts=8))
    got: list[Forward | None] = []
    lanes = [threading.Thread(target=lambda: got.append(window.next_forward()), daemon=True) for _ in range(2)]
    for lane in lanes:
        lane.start()
    wait_for("both lanes to wait for texts", lambda: window._idle == 2)
    window.add([held_text(words, arrived=0.0) for words in ("a", "b c", "d", "e f")], 4)  # one take, queued long ago
    for lane in lanes:
        lane.join(HANG_GUARD_S)
    assert sorted(texts_of(forward) for forward in got) == [["a", "d"], ["b c", "e f"]]


def test_the_window_bounds_the_texts_held_and_a_forward_makes_room() -> None:
    window = Window(policy(max_texts=2, window=3))
    add(window, "a", "b")
    assert window.room() == 1
    add(window, "c")
    assert window.wait_for_room(0.01) == 0  # a full window: the intake takes nothing
    blocked: list[int] = []
    intake = threading.Thread(target=lambda: blocked.append(window.wait_for_room(HANG_GUARD_S)))
    intake.start()
    assert texts_of(next_forward(window)) == ["a", "b"]  # the forward wakes the waiting intake
    intake.join(HANG_GUARD_S)
    assert blocked == [2]
    window.close()
    assert window.wait_for_room(HANG_GUARD_S) == 3  # closed: nobody waits for room


def test_a_long_oldest_text_goes_in_the_next_forward_however_many_short_texts_could_fill_it() -> None:
    """Nearest in length never starves an outlier: every forward holds the oldest text then held."""
    window = Window(policy(max_texts=4, window=64))
    backlog = time.time() - HOUR_S  # queued long ago: no forward waits for company
    long = "long " * 20
    order = add(window, long, arrived=backlog)
    order += add(window, *(f"s{i}" for i in range(30)), arrived=backlog)  # enough short ones to fill 7 forwards
    first = next_forward(window)
    assert long in texts_of(first) and len(first.texts) == 4
    order += add(window, long + "again", arrived=backlog)  # a later outlier waits at most until it is the oldest
    taken = set(texts_of(first))
    while len(window):
        forward = next_forward(window)
        oldest = next(t.text for t in order if t.text not in taken)
        assert oldest in texts_of(forward)
        taken |= set(texts_of(forward))
    assert taken == {t.text for t in order}


# --- fairness: clients take turns ----------------------------------------------------------------


def test_a_quiet_clients_text_goes_in_the_next_forward_however_much_a_flood_holds() -> None:
    window = Window(policy(max_texts=4, window=100))
    backlog = time.time() - HOUR_S  # queued long ago: no forward waits for company
    flood = add(window, *(f"flood {i}" for i in range(40)), arrived=backlog, client="flood")
    assert texts_of(next_forward(window)) == [t.text for t in flood[:4]]
    add(window, "the quiet one here", arrived=time.time(), client="quiet")  # longer: no neighbour of the flood's
    assert "the quiet one here" in texts_of(next_forward(window))
    add(window, "the same quiet one", arrived=time.time())  # the default client's: no turn of its own yet either
    assert "the same quiet one" in texts_of(next_forward(window))


def test_one_clients_backlog_keeps_arrival_order_behind_a_flood_of_its_own() -> None:
    window = Window(policy(max_texts=4, window=100))
    backlog = time.time() - HOUR_S
    add(window, *(f"flood {i}" for i in range(40)), arrived=backlog)
    add(window, "the late one here", arrived=backlog)
    served = [texts_of(next_forward(window)) for _ in range(11)]
    assert served[-1] == ["the late one here"]  # one client: first come, first served


def test_a_quiet_clients_turn_goes_before_the_rest_of_a_flood_batch() -> None:
    """The cost model cuts the flood's batch in two forwards; a quiet client's text taken after the
    first left goes next, and the flood's second forward right after it."""
    window = Window(policy(max_texts=8, max_tokens=1000, cost=ForwardCost(2, 1024, packs=False)))
    backlog = time.time() - HOUR_S
    short, long = ["s1", "s2", "s3", "s4"], [f"l{i} a b c d" for i in range(4)]
    add(window, *short, *long, arrived=backlog, client="flood")
    assert texts_of(next_forward(window)) == short
    add(window, "quiet", arrived=backlog, client="quiet")
    assert texts_of(next_forward(window)) == ["quiet"]
    assert texts_of(next_forward(window)) == long


def test_busy_clients_take_turns_text_by_text_within_each_forward() -> None:
    """Each client's texts come in one take; a forward of four holds two of each, oldest turns first."""
    window = Window(policy(max_texts=4))
    backlog = time.time() - HOUR_S
    for client in ("a", "b"):
        window.add([held_text(f"{client}{i}", backlog, client) for i in range(6)], 6)
    served = [texts_of(next_forward(window)) for _ in range(3)]
    assert served == [["a0", "b0", "a1", "b1"], ["a2", "b2", "a3", "b3"], ["a4", "b4", "a5", "b5"]]


# --- Policy: how much a take asks for ------------------------------------------------------------


@pytest.mark.parametrize(
    ("room", "texts_per_item", "last_asked", "last_got", "expected"),
    [
        (100, 1.0, 1, 1, 2),  # the queue kept up: twice as many
        (100, 1.0, 16, 16, 32),
        (1000, 1.0, 64, 64, TAKE_AT_ONCE),  # at most TAKE_AT_ONCE
        (10, 1.0, 8, 8, 10),  # within the window's room
        (100, 4.0, 32, 32, 25),  # room for 25 items of 4 texts
        (10, 0.5, 32, 32, 10),  # items sharing texts: still an item a text of room at most
        (100, 1.0, 16, 5, 6),  # the queue had fewer: what it had (and one more)
        (100, 1.0, 16, 0, 1),  # an emptying queue costs one empty move, not 16
        (2, 5.0, 8, 8, 0),  # no room for an item of 5 texts
        (100, 1.0, 0, 0, 1),  # after no room: counting up again from 1, not stuck at 0 for good
    ],
)
def test_take_count_doubles_while_the_queue_keeps_up_within_the_cap_and_the_room(
    room: int, texts_per_item: float, last_asked: int, last_got: int, expected: int
) -> None:
    assert policy().take_count(room, texts_per_item, last_asked, last_got) == expected


def test_policy_from_settings_caps_a_lane_forwards_tokens_and_keeps_a_forward_in_the_window() -> None:
    settings = Settings(
        max_batch_size=32,
        max_batch_tokens=8192,
        lane_max_tokens=256,
        batch_window=8,
        max_wait_ms=5,
    )
    one, two = Policy.of(settings, PACKS, lanes=1), Policy.of(settings, PACKS, lanes=2)
    assert (one.max_texts, one.max_tokens, one.max_wait_s, one.cost) == (32, 8192, 0.005, PACKS)
    assert two.max_tokens == 256  # a 1-thread lane's forward is cheapest per token near 256 positions
    assert one.window == two.window == 32  # a window smaller than a forward could never fill one


# --- Intake: taking queued work on fakeredis -----------------------------------------------------


class RepliesRecorder:
    """The reply stage's inbox, as the intake fills it."""

    def __init__(self) -> None:
        self.hits: list[tuple[Text, bytes]] = []

    def cached(self, hits: list[tuple[Text, bytes]]) -> None:
        self.hits += hits

    def computed(self, texts: list[Text], probabilities: np.ndarray) -> None:
        raise AssertionError("the intake computes nothing")

    def failed(self, texts: list[Text], error: str) -> None:
        raise AssertionError("the intake fails nothing")


def make_intake(
    redis: fakeredis.FakeRedis,
    window: Window,
    replies: object | None = None,
    tokenize: Callable[[list[str]], list[list[int]]] = word_ids,
) -> Intake:
    return Intake(
        WorkQueue(redis, KEYS, "w1"),
        window,
        replies or RepliesRecorder(),  # type: ignore[arg-type]
        whole(tokenize),
        lambda text, _: KEYS.cache("v", text),
    )


def held_texts(window: Window) -> list[str]:
    return [t.text for t in window.close()]


@pytest.fixture
def short_idle_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """A take that finds nothing (or no room) gives up after 50 ms instead of a quarter second (a second)."""
    monkeypatch.setattr(intake_module, "IDLE_POLL_S", 0.05)
    monkeypatch.setattr(intake_module, "BULK_IDLE_WAIT_S", 0.05)


def test_a_deep_queue_is_taken_in_few_round_trips_and_tokenized_once_a_take(redis: fakeredis.FakeRedis) -> None:
    for i in range(40):
        push(redis, f"t{i}")
    tokenized: list[int] = []

    def tokenize(texts: list[str]) -> list[list[int]]:
        tokenized.append(len(texts))
        return word_ids(texts)

    intake = make_intake(redis, Window(policy(window=100)), tokenize=tokenize)
    moves: list[int] = []
    take_queued = intake.queue.take_queued

    def counted(most: int, bulk: bool = False) -> list[bytes]:
        if not bulk:  # (a busy take looks for bulk work too, at most every BULK_IDLE_WAIT_S)
            moves.append(most)
        return take_queued(most, bulk)

    intake.queue.take_queued = counted  # type: ignore[method-assign]
    takes = 0
    while redis.llen(KEYS.queue):
        assert intake.take()
        takes += 1
    # One LMOVE pipeline and one tokenizer call a take, not an item: the count doubles, 2 + 4 + ... + 32.
    assert takes == len(moves) == len(tokenized) <= 6
    assert sum(tokenized) == 40
    assert redis.llen(KEYS.processing("w1")) == 40  # held until answered
    assert held_texts(intake.window) == [f"t{i}" for i in range(40)]  # arrival order kept across takes


def test_the_take_count_recovers_after_the_window_left_no_room_for_an_item(
    redis: fakeredis.FakeRedis, short_idle_poll: None
) -> None:
    """Items of 3 texts and a window of 10: the third take finds room for no whole item (it takes
    one, blocking). Once the lanes have emptied the window, a deep queue is again taken several items
    a round trip, not one a take for good."""
    window = Window(policy(max_texts=3, window=10))
    intake = make_intake(redis, window)
    for i in range(40):
        push(redis, f"a{i}", f"b{i}", f"c{i}")
    while window.room() > 0:
        assert intake.take()

    def drain() -> None:
        while len(window):
            assert len(next_forward(window).texts) == 3  # full forwards: none waits

    got = []
    for _ in range(3):
        drain()
        before = redis.llen(KEYS.queue)
        assert intake.take()
        got.append(before - redis.llen(KEYS.queue))
    assert max(got) > 1


@pytest.mark.parametrize(
    "junk",
    [
        b"not a work item",
        b"{}",
        b"[]",
        b"1",
        b'{"id": "x", "texts": 5, "enqueued_at": 0, "deadline": 9e9, "reply_to": "c"}',
        b'{"id": "x", "texts": ["a"], "enqueued_at": 0, "deadline": "soon", "reply_to": "c"}',
    ],
    ids=["not json", "no fields", "a list", "a number", "texts not a list", "a deadline not a number"],
)
def test_a_malformed_item_is_dropped_and_acknowledged(redis: fakeredis.FakeRedis, junk: bytes) -> None:
    """Not our protocol: nobody can be answered, and a retry would fail again (the worker must not die)."""
    redis.lpush(KEYS.queue, junk)
    live = push(redis, "in time")
    intake = make_intake(redis, Window(policy()))
    assert intake.take()
    assert redis.lrange(KEYS.processing("w1"), 0, -1) == [live.encode()]
    assert redis.llen(KEYS.queue) == 0
    assert held_texts(intake.window) == ["in time"]


def test_an_expired_item_is_skipped_counted_and_acknowledged(redis: fakeredis.FakeRedis) -> None:
    push(redis, "too late", ttl=-1)
    live = push(redis, "in time")
    intake = make_intake(redis, Window(policy()))
    assert intake.take()
    assert intake.expired == 1
    assert redis.lrange(KEYS.processing("w1"), 0, -1) == [live.encode()]  # only the live item is held
    assert held_texts(intake.window) == ["in time"]


def test_cached_texts_go_to_the_reply_stage_not_to_the_model(redis: fakeredis.FakeRedis) -> None:
    redis.set(KEYS.cache("v", "known"), b'[{"label":"POSITIVE","score":1.0}]')
    item = push(redis, "known", "new")
    replies = RepliesRecorder()
    intake = make_intake(redis, Window(policy()), replies)
    assert intake.take()
    [(hit, cached)] = replies.hits
    assert (hit.text, cached) == ("known", b'[{"label":"POSITIVE","score":1.0}]')
    assert [(held.item.id, index) for held, index in hit.waiters] == [(item.id, 0)]
    assert held_texts(intake.window) == ["new"]


def test_the_window_bounds_the_work_taken_from_the_queue(redis: fakeredis.FakeRedis, short_idle_poll: None) -> None:
    for i in range(20):
        push(redis, f"t{i}")
    window = Window(policy(max_texts=2, window=6))
    intake = make_intake(redis, window)
    while window.room() > 0:
        assert intake.take()
    assert not intake.take()  # a full window: nothing more taken
    assert redis.llen(KEYS.processing("w1")) == len(window) == 6  # read ahead, held (never lost) until answered
    assert redis.llen(KEYS.queue) == 14
    assert texts_of(next_forward(window)) == ["t0", "t1"]
    assert intake.take()
    assert redis.llen(KEYS.processing("w1")) == 8 and len(window) == 6


def test_identical_texts_across_items_become_one_text_with_a_waiter_each(redis: fakeredis.FakeRedis) -> None:
    tokenized: list[str] = []

    def tokenize(texts: list[str]) -> list[list[int]]:
        tokenized.extend(texts)
        return word_ids(texts)

    first, second = push(redis, "same", "own"), push(redis, "other", "same")
    intake = make_intake(redis, Window(policy()), tokenize=tokenize)
    assert intake.take()
    assert sorted(tokenized) == ["other", "own", "same"]  # tokenized once
    same, own, other = intake.window.close()
    assert (same.text, own.text, other.text) == ("same", "own", "other")
    assert [(held.item.id, index) for held, index in same.waiters] == [(first.id, 0), (second.id, 1)]
    assert same.arrived == first.enqueued_at  # its first request's enqueue time


def test_an_item_split_across_forwards_is_held_until_all_its_texts_are_answered(redis: fakeredis.FakeRedis) -> None:
    """A 5-text item and max_texts 3: two forwards; the item leaves the processing list with the second."""
    queue = WorkQueue(redis, KEYS, "w1")
    replies = Replies(redis, KEYS, queue, ["NEGATIVE", "POSITIVE"], lambda logits, _: logits, 60, 60, threading.Event())
    window = Window(policy(max_texts=3))
    intake = Intake(queue, window, replies, whole(word_ids), lambda text, _: KEYS.cache("v", text))
    big = push(redis, "t0", "t1", "t2", "t3", "t4")
    small = push(redis, "u0")
    assert intake.take()
    first, second = next_forward(window), next_forward(window)
    assert (texts_of(first), texts_of(second)) == (["t0", "t1", "t2"], ["t3", "t4", "u0"])
    assert first.texts[0].waiters[0][0] is second.texts[0].waiters[0][0]  # one item, two forwards
    replies.start(ThreadFailure(threading.Event().set, 10))
    try:
        replies.computed(first.texts, np.full((3, 2), 0.5, dtype=np.float32))
        wait_for("the first forward's cache entries", lambda: redis.exists(KEYS.cache("v", "t2")))
        assert redis.llen(KEYS.processing("w1")) == 2  # both items still held: neither answered
        assert not redis.exists(KEYS.result(big.id))
        replies.computed(second.texts, np.full((3, 2), 0.5, dtype=np.float32))
        result = Result.decode(wait_for("the big item's result", lambda: redis.get(KEYS.result(big.id))))
    finally:
        replies.close()
    assert result.predictions is not None and len(result.predictions) == 5
    assert redis.exists(KEYS.result(small.id))
    assert redis.llen(KEYS.processing("w1")) == 0  # both acknowledged with their results


# --- WorkQueue: taking, acknowledging and reclaiming ---------------------------------------------


def test_take_queued_moves_the_oldest_first_and_ack_all_drops_exactly_those_given(redis: fakeredis.FakeRedis) -> None:
    queue = WorkQueue(redis, KEYS, "w1")
    items = [push(redis, f"t{i}") for i in range(3)]
    raws = queue.take_queued(5)  # more than there is: what there is
    assert [WorkItem.decode(raw).id for raw in raws] == [item.id for item in items]
    queue.ack_all([raws[0], raws[2]])
    assert redis.lrange(KEYS.processing("w1"), 0, -1) == [raws[1]]


def register(server: fakeredis.FakeServer, worker_id: str, connection: str | None) -> fakeredis.FakeRedis:
    """A worker as its heartbeat announces it, on a client whose connections carry `connection`."""
    client = fakeredis.FakeRedis(server=server, client_name=connection)
    status = WorkerStatus(id=worker_id, host="h", pid=1, model_version="v", started_at=0, connection=connection)
    client.set(KEYS.heartbeat(worker_id), status.encode())
    client.sadd(KEYS.workers, worker_id)
    return client


def holding_work(server: fakeredis.FakeServer, redis: fakeredis.FakeRedis, worker_id: str) -> fakeredis.FakeRedis:
    """A registered worker, its connections named, holding one taken item in its processing list."""
    client = register(server, worker_id, KEYS.worker_connection(f"process-of-{worker_id}"))
    push(redis, f"held by {worker_id}")
    assert WorkQueue(client, KEYS, worker_id).take_queued(1)
    return client


def lapsed(redis: fakeredis.FakeRedis, worker_id: str) -> None:
    """A registered worker whose heartbeat lapsed (it says so: the key has no expiry)."""
    status = WorkerStatus(id=worker_id, host="h", pid=1, model_version="v", started_at=0, lapses_at=1.0)
    redis.set(KEYS.heartbeat(worker_id), status.encode())
    redis.sadd(KEYS.workers, worker_id)


def test_dead_workers_work_is_reclaimed_oldest_first(redis: fakeredis.FakeRedis) -> None:
    dead = WorkQueue(redis, KEYS, "dead")
    lapsed(redis, "dead")
    first, second = push(redis, "one"), push(redis, "two")
    assert len(dead.take_queued(2)) == 2
    assert redis.llen(KEYS.queue) == 0
    alive = WorkQueue(redis, KEYS, "alive")
    redis.set(KEYS.heartbeat("alive"), b"{}")
    assert alive.reclaim_dead() == 2
    assert not redis.sismember(KEYS.workers, "dead")
    assert [WorkItem.decode(raw).id for raw in alive.take_queued(2)] == [first.id, second.id]


def test_a_dead_workers_bulk_work_is_reclaimed_onto_the_bulk_list_as_its_interactive_work_onto_the_queue(
    redis: fakeredis.FakeRedis,
) -> None:
    dead = WorkQueue(redis, KEYS, "dead")
    lapsed(redis, "dead")
    interactive = push(redis, "asked")
    now = time.time()
    chunk = [WorkItem(new_id(), [f"bulk {i}"], now, now + 30, "jobs") for i in range(2)]
    redis.lpush(KEYS.bulk, *(item.encode() for item in chunk))
    assert len(dead.take_queued(1)) == 1 and len(dead.take_queued(2, bulk=True)) == 2
    assert redis.llen(KEYS.bulk) == 0 and redis.llen(KEYS.bulk_processing("dead")) == 2
    alive = WorkQueue(redis, KEYS, "alive")
    redis.set(KEYS.heartbeat("alive"), b"{}")
    assert alive.reclaim_dead() == 3
    assert not redis.exists(KEYS.bulk_processing("dead"))
    assert [WorkItem.decode(raw).id for raw in alive.take_queued(3)] == [interactive.id]  # bulk stays bulk
    assert [WorkItem.decode(raw).id for raw in alive.take_queued(3, bulk=True)] == [item.id for item in chunk]


def test_live_workers_work_is_left_alone(fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis) -> None:
    holding_work(fake_server, redis, "busy")
    assert WorkQueue(redis, KEYS, "other").reclaim_dead() == 0
    assert redis.llen(KEYS.processing("busy")) == 1


def watching_at(queue: WorkQueue, clock: list[float]) -> WorkQueue:
    """`queue`, its death watch reading the time from `clock[0]`."""
    queue.deaths.clock = lambda: clock[0]
    return queue


def test_a_worker_whose_connections_stay_closed_past_a_reconnect_is_reclaimed_before_its_heartbeat_lapses(
    fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis
) -> None:
    killed = holding_work(fake_server, redis, "killed")
    now = [0.0]
    alive = watching_at(WorkQueue(redis, KEYS, "alive"), now)
    assert alive.reclaim_dead() == 0  # connected
    killed.connection_pool.disconnect()  # what the kernel does to a killed process's sockets
    assert alive.reclaim_dead() == 0  # gone: maybe a live worker reconnecting
    now[0] = RECONNECT_S - 0.1
    assert alive.reclaim_dead() == 0  # still within a reconnect's time
    now[0] = RECONNECT_S
    assert alive.reclaim_dead() == 1  # dead, though its heartbeat had not lapsed: deregistered, heartbeat and all
    assert not redis.exists(KEYS.heartbeat("killed")) and not redis.sismember(KEYS.workers, "killed")


def test_a_worker_that_reconnects_slower_than_several_looks_keeps_its_work(
    fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis
) -> None:
    # After a failover a live worker may take its whole backoff to reconnect: many looks, one reconnect.
    blip = holding_work(fake_server, redis, "blip")
    now = [0.0]
    alive = watching_at(WorkQueue(redis, KEYS, "alive"), now)
    blip.connection_pool.disconnect()
    for now[0] in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5):
        assert alive.reclaim_dead() == 0
    blip.ping()  # reconnected, with its name
    for now[0] in (3.0, 3.5, 10.0):
        assert alive.reclaim_dead() == 0
    assert redis.llen(KEYS.processing("blip")) == 1
    blip.connection_pool.disconnect()  # gone again later: its time counts from this look on
    now[0] = 10.5
    assert alive.reclaim_dead() == 0
    now[0] = 10.5 + RECONNECT_S
    assert alive.reclaim_dead() == 1


@pytest.mark.parametrize("garbage", [b"not json", b"[1, 2]", b'{"id": 7}', b'{"connection": ["a list"]}'])
def test_an_unreadable_heartbeat_is_logged_once_and_read_as_alive_until_it_stayed_a_ttl(
    fake_server: fakeredis.FakeServer,
    redis: fakeredis.FakeRedis,
    garbage: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One bad value must not break every worker's death watch (and the probes, /metrics) at once. It
    # says no lapse time: a live worker's next beat overwrites it, a dead one's stays as it is.
    holding_work(fake_server, redis, "odd")
    redis.set(KEYS.heartbeat("odd"), garbage)
    redis.sadd(KEYS.workers, "\udcff".encode("utf-8", "surrogatepass"))  # a member that is not even UTF-8
    now = [0.0]
    alive = watching_at(WorkQueue(redis, KEYS, "alive", heartbeat_ttl_s=10.0), now)
    assert [alive.reclaim_dead() for _ in range(3)] == [0, 0, 0]
    assert redis.smembers(KEYS.workers) == {b"odd"}  # the member that is no id is gone
    assert live_workers(redis, KEYS.prefix) == []
    assert redis.llen(KEYS.processing("odd")) == 1
    assert len([r for r in caplog.records if "unreadable heartbeat" in r.getMessage()]) <= 1
    now[0] = 9.5
    redis.set(KEYS.heartbeat("odd"), garbage + b" ")  # another value: its time starts again
    assert alive.reclaim_dead() == 0
    now[0] = 19.25
    assert alive.reclaim_dead() == 0
    now[0] = 19.5
    assert alive.reclaim_dead() == 1


def test_a_worker_whose_heartbeat_key_is_lost_keeps_its_work_until_it_stayed_missing_a_ttl(
    fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis
) -> None:
    # Deleted by hand, or by a Redis told to evict it: a live worker writes it again within a third of
    # a TTL. One that stays missing (a worker hung, its key lost) is a death a TTL after it was seen so.
    holding_work(fake_server, redis, "lost")
    now = [0.0]
    alive = watching_at(WorkQueue(redis, KEYS, "alive", heartbeat_ttl_s=10.0), now)
    redis.delete(KEYS.heartbeat("lost"))
    assert alive.reclaim_dead() == 0
    now[0] = 9.5
    assert alive.reclaim_dead() == 0 and redis.llen(KEYS.processing("lost")) == 1
    now[0] = 10.0
    assert alive.reclaim_dead() == 1


def test_a_heartbeat_past_its_lapse_time_is_a_death_though_its_key_stands(redis: fakeredis.FakeRedis) -> None:
    # No memory policy evicts a heartbeat (no expiry): the time it carries says when it lapsed.
    status = WorkerStatus(id="hung", host="h", pid=1, model_version="v", started_at=0, lapses_at=1000.0)
    redis.set(KEYS.heartbeat("hung"), status.encode())
    redis.sadd(KEYS.workers, "hung")
    push(redis, "held by hung")
    assert WorkQueue(redis, KEYS, "hung").take_queued(1)
    alive = WorkQueue(redis, KEYS, "alive")
    alive.deaths.wall = lambda: 999.9
    assert alive.reclaim_dead() == 0
    alive.deaths.wall = lambda: 1000.0
    assert alive.reclaim_dead() == 1
    assert redis.llen(KEYS.queue) == 1 and not redis.exists(KEYS.heartbeat("hung"))
    assert live_workers(redis, KEYS.prefix) == []


def test_without_client_list_a_dead_worker_is_reclaimed_when_its_heartbeat_lapses(
    fake_server: fakeredis.FakeServer, redis: fakeredis.FakeRedis, monkeypatch
) -> None:
    killed = holding_work(fake_server, redis, "killed")
    killed.connection_pool.disconnect()

    def refused() -> None:
        raise NoPermissionError("this user has no permissions to run the 'client|list' command")

    monkeypatch.setattr(redis, "client_list", refused)  # an ACL user with -@dangerous, as docs/security.md's
    alive = WorkQueue(redis, KEYS, "alive")
    assert [alive.reclaim_dead() for _ in range(3)] == [0, 0, 0]
    beat = WorkerStatus.decode(redis.get(KEYS.heartbeat("killed")))
    redis.set(KEYS.heartbeat("killed"), dataclasses.replace(beat, lapses_at=time.time() - 1).encode())  # lapsed
    assert alive.reclaim_dead() == 1


def test_give_back_requeues_everything_held(redis: fakeredis.FakeRedis) -> None:
    queue = WorkQueue(redis, KEYS, "w1")
    first, second = push(redis, "x"), push(redis, "y")
    assert queue.take_queued(2)
    assert queue.give_back() == 2
    assert redis.llen(KEYS.processing("w1")) == 0
    assert [WorkItem.decode(redis.rpop(KEYS.queue)).id for _ in range(2)] == [first.id, second.id]  # oldest first again


# --- deadlines: earliest first within the turns, late work dropped at the plan ---------------------


def due_text(words: str, now: float, due_in: float, client: str = DEFAULT_CLIENT) -> Text:
    """A taken text of a work item of its own, queued at `now` and due `due_in` seconds later."""
    item = work_item(words, ttl=due_in, enqueued_at=now, client=client)
    return Text(words, KEYS.cache("v", words), [(Held(item.encode(), item), 0)], now, word_ids([words])[0])


@pytest.mark.parametrize("deadlines", [True, False])
def test_each_clients_turns_go_to_its_earliest_deadlines_and_the_clients_still_take_turns(deadlines: bool) -> None:
    now = time.time() - HOUR_S  # a backlog: no forward waits for company
    window = Window(policy(max_texts=1), clock=lambda: now, deadlines=deadlines)
    for words in ("flood0", "flood1", "flood2"):
        window.add([due_text(words, now, 60, client="flood")], 1)
    window.add([due_text("quiet", now, 60, client="quiet")], 1)
    window.add([due_text("urgent", now, 1, client="flood")], 1)
    served = [texts_of(next_forward(window))[0] for _ in range(5)]
    if deadlines:  # the flood's urgent text takes the flood's first turn, not the quiet client's
        assert served == ["urgent", "quiet", "flood0", "flood1", "flood2"]
    else:
        assert served == ["flood0", "quiet", "flood1", "flood2", "urgent"]


def timed_window(now: float, late: list[Text], seconds_a_forward: float | None, max_texts: int = 8) -> Window:
    """A window with deadlines on, its clock stopped at `now`, where a one-text forward of one token
    has taken `seconds_a_forward` (None: no forward timed yet)."""
    window = Window(policy(max_texts=max_texts, max_wait_s=0), clock=lambda: now, deadlines=True, late=late.extend)
    if seconds_a_forward is not None:
        window.forward_took(Forward([due_text("timed", now, 60)], packed=False), seconds_a_forward)
    return window


def test_a_text_whose_forward_would_end_past_its_deadline_is_dropped_as_late_and_the_rest_goes() -> None:
    now, late = time.time() - HOUR_S, []
    window = timed_window(now, late, seconds_a_forward=0.65)  # a forward of two one-token texts: about 0.66 s
    window.add([due_text("hurried", now, 0.5), due_text("patient", now, 60)], 2)
    assert texts_of(next_forward(window)) == ["patient"]
    assert [t.text for t in late] == ["hurried"]
    [(held, _)] = late[0].waiters
    assert held.item.texts == ["hurried"] and len(window) == 0


def test_a_late_item_leaves_the_window_whole() -> None:
    now, late = time.time() - HOUR_S, []
    window = timed_window(now, late, seconds_a_forward=0.65, max_texts=1)
    item = work_item("first", "second", ttl=0.5, enqueued_at=now)
    held = Held(item.encode(), item)
    window.add([Text(w, KEYS.cache("v", w), [(held, i)], now, [1]) for i, w in enumerate(item.texts)], 1)
    window.add([due_text("patient", now, 60)], 1)
    assert texts_of(next_forward(window)) == ["patient"]  # "first" was late, and "second" left with it
    assert [t.text for t in late] == ["first"] and len(window) == 0


def chunked(words: str, now: float, due_in: float, chunks: int = 2) -> tuple[Held, list[Text]]:
    """A work item of one text chunked into `chunks` chunks of one token, queued at `now`, due
    `due_in` s later: its held item, and the chunks as the intake holds them."""
    item = work_item(words, ttl=due_in, enqueued_at=now)
    held = Held(item.encode(), item)
    text = Text(words, KEYS.cache("v", words), [(held, 0)], now)
    return held, Chunks.of(text, [[1]] * chunks, [1] * chunks).texts


def test_an_item_is_not_dropped_while_a_chunk_of_its_chunked_text_is_in_a_forward() -> None:
    now = time.time() - HOUR_S
    window = Window(policy(max_texts=1, max_wait_s=0), clock=lambda: now)
    held, chunks = chunked("long", now, 60)
    window.add(chunks, 1)
    running = next_forward(window)  # the first chunk goes; the second stays held
    assert running is not None and window.unstarted() == []
    assert window.drop([held]) == ([], 0)  # abandoned: started, so it stays, to be answered
    assert running.texts[0].waiters == [(held, 0)] and texts_of(next_forward(window)) == ["long"]


def test_a_late_item_on_a_chunked_text_is_answered_late_though_another_chunk_is_held() -> None:
    now, late = time.time() - HOUR_S, []
    window = timed_window(now, late, seconds_a_forward=0.65, max_texts=1)
    held, chunks = chunked("long", now, 0.5)
    window.add(chunks, 1)
    window.add([due_text("patient", now, 60)], 1)
    assert texts_of(next_forward(window)) == ["patient"]  # both chunks late, and the item with them
    assert [t.waiters for t in late] == [[(held, 0)]] and len(window) == 0


def bulk_text(words: str, now: float, due_in: float) -> Text:
    """A taken text of a bulk work item of its own (a /jobs chunk's), queued at `now`, due `due_in` s later."""
    item = work_item(words, ttl=due_in, enqueued_at=now)
    return Text(words, KEYS.cache("v", words), [(Held(item.encode(), item, bulk=True), 0)], now, word_ids([words])[0])


def test_bulk_work_is_never_dropped_as_late_alone_or_with_an_interactive_request_on_its_text() -> None:
    now, late = time.time() - HOUR_S, []
    window = timed_window(now, late, seconds_a_forward=0.65)  # any forward ends past 0.5 s
    window.add([bulk_text("shared", now, 0.5)], 1, bulk=True)
    window.add([due_text("shared", now, 0.5)], 1)  # asked for interactively too: it goes as such
    window.add([bulk_text("rider", now, 0.5)], 1, bulk=True)
    assert texts_of(next_forward(window)) == ["shared", "rider"]  # its jobs worker waits for it
    window.add([bulk_text("alone", now, 0.5)], 1, bulk=True)
    assert texts_of(next_forward(window)) == ["alone"]
    assert late == []


@pytest.mark.parametrize(("due_in", "riders"), [(0.655, 0), (0.665, 1), (60, 3)])
def test_bulk_rides_in_an_interactive_forward_only_as_far_as_it_leaves_its_texts_in_time(
    due_in: float, riders: int
) -> None:
    now, late = time.time() - HOUR_S, []
    window = timed_window(now, late, seconds_a_forward=0.65)  # one text 0.65 s, each one more about 0.01 s
    for words in ("bulk0", "bulk1", "bulk2"):
        window.add([bulk_text(words, now, 60)], 1, bulk=True)
    window.add([due_text("asked", now, due_in)], 1)
    assert texts_of(next_forward(window)) == ["asked", *(f"bulk{i}" for i in range(riders))]
    assert late == []


def bulk_window(clock: list[float], bulk_delay_s: float) -> Window:
    """A window (deadlines off) whose clock reads `clock[0]`, where a one-text forward of one token has
    taken 0.65 s (each text more, about 0.01 s), and one interactive text was taken now and has gone."""
    window = Window(policy(max_wait_s=0, bulk_delay_s=bulk_delay_s), clock=lambda: clock[0])
    window.forward_took(Forward([due_text("timed", clock[0], 60)], packed=False), 0.65)
    window.add([due_text("asked", clock[0], 60)], 1)
    assert texts_of(next_forward(window)) == ["asked"]
    return window


@pytest.mark.parametrize(("bulk_delay_s", "riders"), [(0.005, 0), (0.015, 1), (math.inf, 3)])
def test_while_interactive_work_flows_bulk_rides_only_as_far_as_the_bulk_delay_lengthens_the_forward(
    bulk_delay_s: float, riders: int
) -> None:
    clock = [time.time() - HOUR_S]
    window = bulk_window(clock, bulk_delay_s)
    for words in ("bulk0", "bulk1", "bulk2"):
        window.add([bulk_text(words, clock[0], 60)], 1, bulk=True)
    window.add([due_text("again", clock[0], 60)], 1)
    assert texts_of(next_forward(window)) == ["again", *(f"bulk{i}" for i in range(riders))]


def test_while_interactive_work_flows_a_bulk_forward_lasts_at_most_the_bulk_delay_and_an_idle_services_is_full() -> (
    None
):
    clock = [time.time() - HOUR_S]
    window = bulk_window(clock, bulk_delay_s=0.705)
    for i in range(16):
        window.add([bulk_text(f"bulk{i}", clock[0], 60)], 1, bulk=True)
    assert texts_of(next_forward(window)) == [f"bulk{i}" for i in range(6)]  # 0.70 s of 0.705
    clock[0] += INTERACTIVE_FLOWS_S  # nothing interactive since: a full forward
    assert texts_of(next_forward(window)) == [f"bulk{i}" for i in range(6, 14)]


@pytest.mark.parametrize("share", [0.05, 0.25])
def test_under_sustained_interactive_load_bulk_work_gets_its_share_of_the_texts(share: float) -> None:
    """Interactive texts always held, so bulk work never finds room or a forward of its own but for
    its floor: its share of the texts computed, within a forward's worth."""
    clock = [time.time() - HOUR_S]
    window = Window(policy(max_texts=4, max_wait_s=0, bulk_delay_s=0.0, bulk_share=share), clock=lambda: clock[0])
    for i in range(200):  # more than its share of what follows
        window.add([bulk_text(f"bulk{i}", clock[0], 60)], 1, bulk=True)
    sent = {True: 0, False: 0}
    for i in range(100):
        add(window, *(f"asked{i}.{n}" for n in range(4)), arrived=clock[0])
        forward = next_forward(window)
        assert forward is not None
        for text in forward.texts:
            sent[all(held.bulk for held, _ in text.waiters)] += 1
    assert share * sum(sent.values()) - 4 <= sent[True] <= share * sum(sent.values()) + 4


def test_while_it_holds_no_bulk_work_a_busy_take_takes_some_for_bulk_works_floor(redis: fakeredis.FakeRedis) -> None:
    window = Window(policy(max_texts=2, bulk_share=0.05))
    intake = make_intake(redis, window)
    for i in range(4):
        redis.lpush(KEYS.queue, work_item(f"asked {i}").encode())
    redis.lpush(KEYS.bulk, work_item("bulk one").encode())
    assert intake.take()
    assert window.holds_bulk() and redis.llen(KEYS.bulk) == 0
    assert redis.llen(KEYS.queue) < 4  # interactive items in the same take


@pytest.mark.parametrize("seconds_a_forward", [None, 0.1])
def test_nothing_is_late_before_a_forward_was_timed_or_where_the_forward_ends_in_time(
    seconds_a_forward: float | None,
) -> None:
    now, late = time.time() - HOUR_S, []
    window = timed_window(now, late, seconds_a_forward)
    window.add([due_text("hurried", now, 0.5), due_text("patient", now, 60)], 2)
    assert texts_of(next_forward(window)) == ["hurried", "patient"]
    assert late == []


def test_one_slow_forward_moves_the_estimate_a_bounded_step() -> None:
    now, late = time.time() - HOUR_S, []
    window = timed_window(now, late, seconds_a_forward=0.1)
    window.forward_took(Forward([due_text("stalled", now, 60)], packed=False), 100.0)  # preempted, say
    took = window.forward_time.predict([1], packed=False)
    assert took is not None and 0.1 < took <= 0.1 * (1 + SMOOTHING * (OUTLIER - 1))


def test_an_item_with_no_texts_is_dropped_and_the_next_take_goes_on(redis: fakeredis.FakeRedis) -> None:
    """An item of no texts has nothing to compute: left held it would sit in the processing list for
    good, and the next take divided by its zero texts a take."""
    now = time.time()
    empty = orjson.dumps({"id": "e", "texts": [], "enqueued_at": now, "deadline": now + 60, "reply_to": "c"})
    redis.lpush(KEYS.queue, empty)
    intake = make_intake(redis, Window(policy()))
    intake.take()
    assert redis.llen(KEYS.processing("w1")) == 0
    assert not intake.queue.held_raws
    live = push(redis, "after it")
    assert intake.take()
    assert redis.lrange(KEYS.processing("w1"), 0, -1) == [live.encode()]
    assert held_texts(intake.window) == ["after it"]


def test_after_a_run_of_one_text_an_idle_worker_takes_a_burst_only_for_its_window(
    redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items that all asked for one text make a take's texts an item a fraction: the next take from an
    empty queue sized itself by it, and took a burst ten windows deep, leaving the other workers idle."""
    monkeypatch.setattr(intake_module, "BULK_IDLE_WAIT_S", 0.05)  # (the empty take's wait)
    window = Window(policy(window=100))
    intake = make_intake(redis, window)
    for _ in range(200):
        push(redis, "the same text")
    while redis.llen(KEYS.queue):
        intake.take()
    assert intake.texts_per_item < 1
    assert not intake.take()  # the queue empty: the next take blocks for the first item
    for n in range(1000):
        push(redis, f"text {n}")
    assert intake.take()
    assert len(window) <= window.policy.window


def test_a_text_queued_ahead_of_the_workers_clock_waits_for_company_at_most_max_wait() -> None:
    """The wait for company runs from a text's enqueue time, on the API's clock: one far ahead (a
    skewed clock, or a bad item) made a lane wait that far, or fail outright past the longest wait
    a lock takes."""
    clock = [time.time()]
    window = Window(policy(max_wait_s=0.05), clock=lambda: clock[0])
    add(window, "far ahead", arrived=clock[0] + 1e10)
    add(window, "now")  # close behind it: company looks likely, so the batch waits for more
    lane: list[object] = []

    def run() -> None:
        try:
            lane.append(window.next_forward())
        except Exception as exc:  # (a failed lane thread stops the worker)
            lane.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    clock[0] += 0.05  # the oldest text has now waited max_wait on the worker's clock
    thread.join(HANG_GUARD_S)
    if thread.is_alive():
        window.close()
    assert len(lane) == 1 and not isinstance(lane[0], Exception), lane
    assert texts_of(lane[0]) == ["far ahead", "now"]  # type: ignore[arg-type]

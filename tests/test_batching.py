"""Batch forming on fakeredis: caps, waiting rules, splitting, expiry, and reclaiming work."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import fakeredis
import pytest

from batcher.batching import Batcher, batch_cut, nearest_in_length, split_by_length
from batcher.inference import LANE_FORWARD_TOKENS, Inference
from batcher.protocol import Keys, WorkItem, new_id
from batcher.queue import WorkQueue
from model_store.classifier import Classifier
from model_store.cost import ForwardCost

KEYS = Keys("t")


def word_ids(texts: list[str]) -> list[list[int]]:
    """A stand-in tokenizer: one token per word."""
    return [[1] * len(t.split()) for t in texts]


def push(redis: fakeredis.FakeRedis, *texts: str, ttl: float = 60) -> WorkItem:
    now = time.time()
    item = WorkItem(id=new_id(), texts=list(texts), enqueued_at=now, deadline=now + ttl, reply_to="t:done:x")
    redis.lpush(KEYS.queue, item.encode())
    return item


def make_batcher(
    redis: fakeredis.FakeRedis, size: int = 8, tokens: int = 1000, wait_s: float = 60.0, window: int | None = None
) -> Batcher:
    return Batcher(WorkQueue(redis, KEYS, "w1"), word_ids, size, tokens, wait_s, window)


def busy(batcher: Batcher) -> Batcher:
    """As if requests had been arriving a millisecond apart: company is worth waiting for."""
    now = time.monotonic()
    for i in range(3):
        batcher.arrivals.add(now - 0.003 + i * 0.001)
    return batcher


def texts_of(batch) -> list[str]:
    return [slot.text for slot in batch]


@pytest.mark.parametrize(
    ("lengths", "size", "tokens", "expected"),
    [
        ([3, 3, 3], 8, 100, 3),  # everything fits
        ([3, 3, 3], 2, 100, 2),  # size cap
        ([2, 2, 10], 8, 20, 2),  # the 10-token text would pad all three to 30 tokens
        ([50], 8, 20, 1),  # one oversized text still makes a batch
        ([], 8, 20, 0),
    ],
)
def test_batch_cut(lengths: list[int], size: int, tokens: int, expected: int) -> None:
    assert batch_cut(lengths, size, tokens) == expected


PADDED = ForwardCost(overhead_tokens=64, attention_tokens=1024, packs=False)  # a model that only pads
PACKS = ForwardCost(overhead_tokens=64, attention_tokens=1024, packs=True)


@pytest.mark.parametrize(
    ("lengths", "size", "tokens", "cost", "forwards"),
    [
        ([], 32, 8192, PADDED, []),
        ([10] * 20, 32, 8192, PADDED, [(20, False)]),  # one length: one forward
        ([5] * 16 + [60] * 16, 32, 8192, PADDED, [(16, False), (32, False)]),  # the short texts are not padded to 60
        # a costly call (a GPU): one forward after all
        ([5] * 16 + [60] * 16, 32, 8192, replace(PADDED, overhead_tokens=2000), [(32, False)]),
        ([5, 6, 7, 8] + [9] * 8, 4, 8192, PADDED, [(4, False), (8, False), (12, False)]),  # at most `size` texts a forward
        ([10, 10, 10, 10, 500], 32, 1000, PADDED, [(4, False), (5, False)]),  # the token cap holds; a lone long text still runs
        # Mixed lengths, as a shallow queue brings them: packed, one forward instead of padding or cutting.
        ([5, 8, 11, 14, 17, 20, 23, 26], 32, 8192, PACKS, [(8, True)]),
        ([10] * 20, 32, 8192, PACKS, [(20, False)]),  # one length: padding wastes nothing, packing adds attention
        ([8] * 16 + [16] * 16, 32, 8192, PACKS, [(16, False), (32, False)]),  # runs of one length: padded, nothing wasted
        # A packed row's attention grows as T x T: past some length a second call is cheaper.
        ([5, 6, 7, 480, 500], 32, 8192, PACKS, [(4, True), (5, False)]),
        ([5, 30, 30, 30], 32, 90, PACKS, [(1, False), (4, False)]),  # packed rows keep the token cap too (95 > 90)
    ],
)
def test_split_by_length(lengths: list[int], size: int, tokens: int, cost: ForwardCost, forwards: list[tuple[int, bool]]) -> None:
    assert split_by_length(lengths, size, tokens, cost) == forwards


def test_a_batch_is_dealt_to_the_forward_lanes_in_equal_shares_and_a_lone_text_takes_all_threads(
    tiny_model_dir: Path,
) -> None:
    two = Classifier(tiny_model_dir, device="cpu", threads=2, precision="fp32", engine="torch")
    calls: list[tuple[int | None, list[int]]] = []
    forward = two.forward

    def recording(batch: list[list[int]], packed: bool = False) -> list[list[float]]:
        calls.append((two.lane, sorted(map(len, batch))))
        return forward(batch, packed)

    two.forward = recording  # type: ignore[method-assign]
    inference = Inference(two, fakeredis.FakeRedis(), KEYS, 32, 8192, 60)
    texts = [" ".join(["word"] * n) for n in (9, 1, 5, 3, 7, 2, 8, 4, 6)]
    ids = two.tokenize(texts)
    got = inference.run(ids)
    assert len(calls) == 2 and {lane for lane, _ in calls} <= {0, 1}  # a share each, one forward each here
    first, second = sorted(lengths for _, lengths in calls)
    assert (len(first), len(second)) == (5, 4) and sorted(first + second) == sorted(map(len, ids))
    assert all(a < b for a, b in zip(first, second, strict=False))  # dealt in turn by length: every length in each
    for text_ids, probs in zip(ids, got, strict=True):  # input order kept
        assert probs == pytest.approx(forward([text_ids])[0], abs=1e-5)
    assert inference.forwards == len(calls) and inference.computed == len(texts)

    calls.clear()
    inference.run(ids[:1])
    assert calls == [(None, [len(ids[0])])]


def test_a_lane_forward_stays_within_the_lane_token_cap(tiny_model_dir: Path) -> None:
    """On a lane, a share is cut into forwards of at most LANE_FORWARD_TOKENS positions (a single
    text may exceed it)."""
    two = Classifier(tiny_model_dir, device="cpu", threads=2, precision="fp32", engine="torch")
    calls: list[tuple[int | None, int]] = []
    forward = two.forward

    def recording(batch: list[list[int]], packed: bool = False) -> list[list[float]]:
        positions = sum(map(len, batch)) if packed else len(batch) * max(map(len, batch))
        calls.append((two.lane, positions if len(batch) > 1 else 0))
        return forward(batch, packed)

    two.forward = recording  # type: ignore[method-assign]
    inference = Inference(two, fakeredis.FakeRedis(), KEYS, 32, 8192, 60)
    ids = two.tokenize([" ".join(["word"] * (50 + n)) for n in range(12)])  # 6 a lane: over 300 positions each
    assert sum(map(len, ids[::2])) > LANE_FORWARD_TOKENS
    got = inference.run(ids)
    assert len(got) == 12 and all(probs for probs in got)
    assert len(calls) > 2 and all(lane is not None and positions <= LANE_FORWARD_TOKENS for lane, positions in calls)


def test_a_free_lane_takes_the_next_share_while_another_lane_is_held_up(tiny_model_dir: Path) -> None:
    """Lanes take shares from one queue: a lane stuck in a long forward holds up no other batch's share."""
    two = Classifier(tiny_model_dir, device="cpu", threads=2, precision="fp32", engine="torch")
    forward = two.forward
    first_call, stalled, release = threading.Lock(), threading.Event(), threading.Event()
    lanes: list[int | None] = []
    stuck: list[int | None] = []

    def one_stalls(batch: list[list[int]], packed: bool = False) -> list[list[float]]:
        lanes.append(two.lane)
        if first_call.acquire(blocking=False):  # the very first forward holds its lane up
            stuck.append(two.lane)
            stalled.set()
            release.wait(10)
        return forward(batch, packed)

    two.forward = one_stalls  # type: ignore[method-assign]
    inference = Inference(two, fakeredis.FakeRedis(), KEYS, 32, 8192, 60)
    ids = two.tokenize(["a b c", "d", "e f", "g h i j"])
    held_up = threading.Thread(target=inference.run, args=(ids,))
    held_up.start()
    try:
        assert stalled.wait(10)
        got = inference.run(ids[:2])  # both its shares must run on the lane that is free
        assert len(got) == 2 and held_up.is_alive()
        assert stuck[0] in (0, 1) and lanes[-2:] == [1 - stuck[0]] * 2  # type: ignore[operator]
    finally:
        release.set()
        held_up.join(10)
    assert not held_up.is_alive()


def test_queued_work_goes_without_waiting(redis: fakeredis.FakeRedis) -> None:
    # max_wait is a minute: returning at all shows that queued work does not wait for more.
    push(redis, "a")
    push(redis, "b c")
    push(redis, "d")
    batch = make_batcher(redis).next_batch(idle_timeout=1)
    assert texts_of(batch) == ["a", "b c", "d"]  # FIFO across items


def test_full_batch_goes_at_once(redis: fakeredis.FakeRedis) -> None:
    push(redis, "first")
    threading.Timer(0.2, push, (redis, "second")).start()
    batch = busy(make_batcher(redis, size=2)).next_batch(idle_timeout=1)  # would sit out the minute if not full
    assert texts_of(batch) == ["first", "second"]


def test_lone_request_waits_at_most_max_wait(redis: fakeredis.FakeRedis) -> None:
    push(redis, "alone")
    batch = busy(make_batcher(redis, wait_s=0.05)).next_batch(idle_timeout=1)
    assert texts_of(batch) == ["alone"]


def test_lone_request_gets_company_arriving_within_the_wait(redis: fakeredis.FakeRedis) -> None:
    push(redis, "first")
    threading.Timer(0.05, push, (redis, "second")).start()
    batch = busy(make_batcher(redis, size=8, wait_s=0.5)).next_batch(idle_timeout=1)
    assert texts_of(batch) == ["first", "second"]


@pytest.mark.parametrize("history", [[], [0.0, 1.0, 2.0]], ids=["first request", "requests a second apart"])
def test_lone_request_at_low_load_does_not_wait_for_company(redis: fakeredis.FakeRedis, history: list[float]) -> None:
    batcher = make_batcher(redis, size=8, wait_s=5)
    for when in history:
        batcher.arrivals.add(when)
    push(redis, "first")
    threading.Timer(0.3, push, (redis, "second")).start()  # would be company if the batcher waited
    assert texts_of(batcher.next_batch(idle_timeout=1)) == ["first"]
    assert texts_of(batcher.next_batch(idle_timeout=1, company=False)) == ["second"]


def test_no_company_wanted_means_no_waiting_even_at_high_load(redis: fakeredis.FakeRedis) -> None:
    batcher = busy(make_batcher(redis, size=8, wait_s=5))
    push(redis, "first")
    threading.Timer(0.3, push, (redis, "second")).start()
    assert texts_of(batcher.next_batch(idle_timeout=1, company=False)) == ["first"]
    assert texts_of(batcher.next_batch(idle_timeout=1, company=False)) == ["second"]


def test_arrival_gap_is_the_mean_of_recent_gaps() -> None:
    batcher = make_batcher(fakeredis.FakeRedis())
    assert batcher.arrivals.mean_gap() == float("inf")
    for when in (10.0, 10.5, 11.0, 12.5):
        batcher.arrivals.add(when)
    assert batcher.arrivals.mean_gap() == pytest.approx(2.5 / 3)


@pytest.mark.parametrize(
    ("lengths", "size", "tokens", "expected"),
    [
        ([5, 1, 9, 5, 1, 9], 2, 100, [0, 3]),  # the oldest with its equal, not with the short ones
        ([1, 9, 1, 9, 1], 3, 100, [0, 2, 4]),  # the short ones together
        ([9, 1, 1, 8, 2], 2, 100, [0, 3]),  # the longest oldest takes its nearest neighbour below
        ([9, 1, 1, 8, 2], 2, 9, [0]),  # ... unless the token cap leaves room for it alone
        ([1, 2, 30, 31, 3], 3, 100, [0, 1, 4]),
        # a long oldest text fills its batch with the longest of the rest rather than going alone
        ([60, 15, 15, 15, 15, 15], 4, 1000, [0, 3, 4, 5]),
    ],
)
def test_nearest_in_length_always_takes_the_oldest(
    lengths: list[int], size: int, tokens: int, expected: list[int]
) -> None:
    assert nearest_in_length(lengths, size, tokens) == expected


def test_deep_queue_is_grouped_by_length_within_the_window(redis: fakeredis.FakeRedis) -> None:
    for i in range(4):
        push(redis, f"s{i}")
        push(redis, " ".join(["long"] * 10) + f" {i}")
    batcher = make_batcher(redis, size=2, window=6)
    batches = [texts_of(batcher.next_batch(idle_timeout=1)) for _ in range(4)]
    assert batches[0] == ["s0", "s1"]  # the oldest and the nearest in length, not the long one queued between
    assert all(len({len(t.split()) for t in b}) == 1 for b in batches)  # no batch mixes 1 and 11 words
    assert sorted(t for b in batches for t in b) == sorted(
        [f"s{i}" for i in range(4)] + [" ".join(["long"] * 10) + f" {i}" for i in range(4)]
    )


def test_window_bounds_the_work_taken_from_the_queue(redis: fakeredis.FakeRedis) -> None:
    for i in range(20):
        push(redis, f"t{i}")
    batcher = make_batcher(redis, size=2, window=6)
    assert texts_of(batcher.next_batch(idle_timeout=1)) == ["t0", "t1"]
    assert redis.llen(KEYS.processing("w1")) == 6  # read ahead, held (never lost) until answered
    assert redis.llen(KEYS.queue) == 14


def test_a_deep_queue_is_taken_in_few_round_trips_and_tokenized_together(redis: fakeredis.FakeRedis) -> None:
    for i in range(40):
        push(redis, f"t{i}")
    redis.lpush(KEYS.queue, b"not a work item")  # dropped and acknowledged on the way
    push(redis, "too late", ttl=-1)  # skipped on the way
    calls: list[int] = []

    def tokenize(texts: list[str]) -> list[list[int]]:
        calls.append(len(texts))
        return word_ids(texts)

    batcher = Batcher(WorkQueue(redis, KEYS, "w1"), tokenize, 8, 1000, 60.0, 100)
    moves = []
    take_queued = batcher.queue.take_queued
    batcher.queue.take_queued = lambda most: moves.append(most) or take_queued(most)  # type: ignore[method-assign]
    assert texts_of(batcher.next_batch(idle_timeout=1)) == [f"t{i}" for i in range(8)]
    assert len(moves) <= 8 and len(calls) <= 8  # one LMOVE pipeline and one tokenizer call per take, not per item
    assert sum(calls) == 40 and batcher.expired == 1
    assert redis.llen(KEYS.queue) == 0 and redis.llen(KEYS.processing("w1")) == 40  # held until answered
    taken = texts_of(batcher.next_batch(idle_timeout=1)) + [s.text for s in batcher._slots]
    assert taken == [f"t{i}" for i in range(8, 40)]  # arrival order kept across takes


def test_an_outlier_oldest_text_is_never_starved(redis: fakeredis.FakeRedis) -> None:
    push(redis, " ".join(["long"] * 20))
    batcher = make_batcher(redis, size=4, window=8)
    first = batcher.next_batch(idle_timeout=1)
    for i in range(30):  # a steady stream of short texts, always enough to fill a batch without it
        push(redis, f"s{i}")
    assert len(first[0].ids) == 20
    # and once it is not the oldest, later outliers wait at most until they are
    push(redis, " ".join(["long"] * 20) + " again")
    seen: list[str] = []
    while batch := batcher.next_batch(idle_timeout=0.05):
        oldest_before = min(batch, key=lambda s: s.held.item.enqueued_at)
        seen += texts_of(batch)
        assert oldest_before.held.item.enqueued_at <= min(
            (s.held.item.enqueued_at for s in batcher._slots), default=float("inf")
        )
    assert len(seen) == 31 and seen[-1].endswith("again")


def test_no_work_returns_empty_batch(redis: fakeredis.FakeRedis) -> None:
    assert make_batcher(redis).next_batch(idle_timeout=0.05) == []


def test_size_cap_splits_a_large_item_and_acks_only_when_done(redis: fakeredis.FakeRedis) -> None:
    batcher = make_batcher(redis, size=3)
    push(redis, "t0", "t1", "t2", "t3", "t4")
    push(redis, "u0")
    first = batcher.next_batch(idle_timeout=1)
    assert texts_of(first) == ["t0", "t1", "t2"]
    second = batcher.next_batch(idle_timeout=1)
    assert texts_of(second) == ["t3", "t4", "u0"]
    assert first[0].held is second[0].held  # one item, two batches
    assert redis.llen(KEYS.processing("w1")) == 2  # both items still held: nothing acknowledged yet


def test_token_cap_limits_padded_tokens(redis: fakeredis.FakeRedis) -> None:
    push(redis, "a b", "c d", "e f g h i j k l m n")  # 2, 2 and 10 tokens
    batcher = make_batcher(redis, tokens=20)
    assert texts_of(batcher.next_batch(idle_timeout=1)) == ["a b", "c d"]  # 3 x 10 would be 30 tokens
    assert texts_of(batcher.next_batch(idle_timeout=1)) == ["e f g h i j k l m n"]


def test_expired_item_is_skipped_and_dropped(redis: fakeredis.FakeRedis) -> None:
    push(redis, "too late", ttl=-1)
    push(redis, "in time")
    batcher = make_batcher(redis, wait_s=0.05)
    assert texts_of(batcher.next_batch(idle_timeout=1)) == ["in time"]
    assert batcher.expired == 1
    assert redis.llen(KEYS.processing("w1")) == 1  # only the live item is held


def test_dead_workers_work_is_reclaimed_oldest_first(redis: fakeredis.FakeRedis) -> None:
    dead = WorkQueue(redis, KEYS, "dead")
    redis.sadd(KEYS.workers, "dead")  # registered, but its heartbeat key has expired
    first, second = push(redis, "one"), push(redis, "two")
    assert dead.take(0) and dead.take(0)
    assert redis.llen(KEYS.queue) == 0
    alive = WorkQueue(redis, KEYS, "alive")
    redis.set(KEYS.heartbeat("alive"), b"{}")
    assert alive.reclaim_dead() == 2
    assert not redis.sismember(KEYS.workers, "dead")
    assert [WorkItem.decode(alive.take(0)).id for _ in range(2)] == [first.id, second.id]


def test_live_workers_work_is_left_alone(redis: fakeredis.FakeRedis) -> None:
    busy = WorkQueue(redis, KEYS, "busy")
    redis.sadd(KEYS.workers, "busy")
    redis.set(KEYS.heartbeat("busy"), b"{}")
    push(redis, "mine")
    assert busy.take(0)
    assert WorkQueue(redis, KEYS, "other").reclaim_dead() == 0
    assert redis.llen(KEYS.processing("busy")) == 1


def test_give_back_requeues_everything_held(redis: fakeredis.FakeRedis) -> None:
    queue = WorkQueue(redis, KEYS, "w1")
    item = push(redis, "x")
    assert queue.take(0)
    assert queue.give_back() == 1
    assert redis.llen(KEYS.processing("w1")) == 0
    assert WorkItem.decode(redis.rpop(KEYS.queue)).id == item.id

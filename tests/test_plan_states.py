"""The plan as a state machine (Hypothesis's stateful testing), between the real take and reply stages.

`batcher.plan.Window` grew turns, deadlines, lateness, bulk riders and the chunks of long texts;
its defects sit where two of them meet, which examples rarely reach. Here Hypothesis takes work items
(1-3 texts, texts shared between items and takes, chunked texts of 2-3 chunks, bulk items,
deadlines, three clients) through the real intake (`Intake.hold`, on fakeredis), runs forwards on 1-3
lanes that finish (or fail) in any order, abandons items as the API does, moves the clock past
deadlines, forgets cached texts, and closes; the reply stage (`Replies`) writes every outcome to
fakeredis. After every step it checks what the worker promises:

- every text in the window, in the last batch's forwards or in a lane has a waiter (so its `deadline`
  is defined), and one held or ready has a waiter still unanswered;
- every item taken is answered exactly once (results, late, an error, or dropped as abandoned),
  results only once all of its texts, every chunk of them pooled, were computed, and with the scores
  of an independent computation; an item not answered yet can still be: each of its unanswered texts,
  each chunk of a chunked one, is held, ready or in a lane;
- an item dropped as abandoned had no text in a forward; bulk work is never late and never dropped;
- the items held in memory are those in the processing lists, and are those not answered;
- no client waits more than a turn: a forward goes only with a text whose turn comes no later than
  every turn held (`batcher.turns`).

The lanes run in the test's own thread, one step at a time: a wait of the window's with a timeout moves
the test's clock past it, and one without (nothing to do) leaves the lane idle (`Stepped`). Sequences it
found are kept below it as plain tests (`test_found_*`), as Hypothesis prints them.
"""

from __future__ import annotations

import math
import threading
import time
import zlib
from collections.abc import Callable
from random import Random
from typing import Any

import fakeredis
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from batcher.batches import Forward
from batcher.intake import Intake
from batcher.plan import Window
from batcher.policy import Policy
from batcher.queue import WorkQueue
from batcher.reply import Replies
from batcher.work import Chunks, Held, Text
from core.protocol import Keys, Result, ScoreFunction, WorkItem
from model_store import scoring
from model_store.cost import ForwardCost
from model_store.long_texts import Tokenized
from tests.conftest import examples

KEYS = Keys("s")
LABELS = ["NEGATIVE", "POSITIVE"]
CLIENTS = ("a", "b", "c")
# A text by name: "s<n>" one chunk, "c<n>" chunked into 2-3 chunks (as often: they meet where the bugs are).
TEXT = st.one_of(st.sampled_from(["s0", "s1", "s2", "s3"]), st.sampled_from(["c0", "c1"]))
TTLS = (0.05, 0.3, 1.0, 60.0)  # seconds from queueing to deadline
WINDOW = 16  # `batch_window`: texts held ahead of the model


def _number(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def chunks_of(name: str) -> list[list[int]]:
    """Token ids of each chunk of the text `name` (the test's tokenizer)."""
    count = 2 + _number(name, "chunks") % 2 if name.startswith("c") else 1
    return [[_number(name, n, p) % 1000 for p in range(1 + _number(name, n) % 9)] for n in range(count)]


def split(texts: list[str]) -> list[Tokenized]:
    """The intake's tokenizer: each chunk weighs its tokens."""
    return [Tokenized(ws, [len(w) for w in ws], sum(map(len, ws))) for ws in map(chunks_of, texts)]


def logits(ids: list[int]) -> np.ndarray:
    """The test's model: two logits from a chunk's ids."""
    return np.array([sum(ids) % 97 / 10 - 4.8, len(ids) % 13 / 3 - 2], dtype=np.float32)


def expected(name: str) -> list[float]:
    """A text's scores computed apart from the worker: the softmax of its chunks' logits averaged,
    each weighted by its tokens."""
    ws = chunks_of(name)
    mean = np.average(np.stack([logits(w) for w in ws]).astype(np.float64), axis=0, weights=[len(w) for w in ws])
    return list(np.exp(mean) / np.exp(mean).sum())


class Clock:
    """The window's clock, moved by the test; ahead of the real one, so the intake (on real time)
    never takes an item as expired."""

    def __init__(self) -> None:
        self.now = time.time() + 10_000

    def __call__(self) -> float:
        return self.now


class LaneIdle(Exception):
    """A lane would wait for work: nothing to run now."""


class Stepped(threading.Condition):
    """The window's condition, for lanes run one step at a time in the test's thread: a wait with a
    timeout (company, or `max_wait`) is the clock moved past it; one without raises `LaneIdle`."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is None:
            raise LaneIdle
        self.clock.now += timeout
        return False


class PlanMachine(RuleBasedStateMachine):
    """The plan between the real intake and reply stage; rules as the module docstring says."""

    @initialize(
        lanes=st.integers(1, 3),
        max_texts=st.integers(1, 4),
        max_tokens=st.sampled_from([12, 30, 1000]),
        max_wait_s=st.sampled_from([0.0, 0.05]),
        packs=st.booleans(),
        deadlines=st.booleans(),
        bulk_delay_s=st.sampled_from([math.inf, 0.02]),
        bulk_share=st.sampled_from([0.0, 0.2]),
    )
    def start(
        self,
        lanes: int,
        max_texts: int,
        max_tokens: int,
        max_wait_s: float,
        packs: bool,
        deadlines: bool,
        bulk_delay_s: float,
        bulk_share: float,
    ) -> None:
        self.clock = Clock()
        self.redis = fakeredis.FakeRedis()
        self.queue = WorkQueue(self.redis, KEYS, "w")
        stopping = threading.Event()
        score = lambda rows, function: scoring.apply(function or ScoreFunction.SOFTMAX, rows)  # noqa: E731
        self.replies = Replies(self.redis, KEYS, self.queue, LABELS, score, 3600, 60, stopping)
        cost = ForwardCost(overhead_tokens=4, attention_tokens=64, packs=packs)
        policy = Policy(max_texts, max_tokens, max_wait_s, WINDOW, cost, bulk_delay_s, bulk_share)
        self.window = Window(policy, self.clock, deadlines, self.replies.late)
        self.window._changed = Stepped(self.clock)
        self.intake = Intake(self.queue, self.window, self.replies, split, lambda text, _: KEYS.cache("v", text))
        self.lanes = lanes
        self.running: dict[int, Forward] = {}
        self.items: dict[str, WorkItem] = {}  # every item taken, by id
        self.raws: dict[str, bytes] = {}
        self.bulk: set[str] = set()
        self.answered: dict[str, Result] = {}  # by the reply stage
        self.dropped: set[str] = set()  # acknowledged unanswered: abandoned
        self.marked: set[str] = set()  # marked abandoned, as the API does
        # Per client with texts held: (the round its wait began, forwards gone without it since).
        self.waits: dict[str, tuple[float, int]] = {}
        self.unpaid = 0  # interactive texts sent since bulk work, held all the while, last had one sent
        self.broken: list[str] = []  # promises seen broken inside the stages' calls (`_check`)
        self._record_answers()

    def _record_answers(self) -> None:
        """Watch the reply stage's transactions and the intake's acknowledgements: each item answered
        once, and rightly."""
        transaction, ack_all = self.replies.link.transaction, self.queue.ack_all

        def recorded(*commands: Any) -> list[Any]:
            for command in commands:
                if command[0] == "SET" and command[1].startswith(KEYS.result("")):
                    self._answer(command[1].removeprefix(KEYS.result("")), Result.decode(command[2]))
            return transaction(*commands)

        def acknowledged(raws: list[bytes], bulk: bool = False) -> None:
            for raw in raws:
                self._drop(WorkItem.decode(raw).id)
            ack_all(raws, bulk)

        self.replies.link.transaction = recorded  # type: ignore[method-assign]
        self.queue.ack_all = acknowledged  # type: ignore[method-assign]

    def _answer(self, item_id: str, result: Result) -> None:
        self._once(item_id)
        self.answered[item_id] = result
        item = self.items[item_id]
        if result.late:
            self._check(item_id not in self.bulk, f"bulk work {item_id} answered as late")
        elif result.predictions is not None:
            for name, prediction in zip(item.texts, result.predictions, strict=True):
                scores = [p["score"] for p in prediction]
                self._check(scores == pytest.approx(expected(name), abs=1e-5), f"{name} of {item_id}: {scores}")
        else:
            self._check(result.error == "the model failed", f"{item_id}: {result}")

    def _drop(self, item_id: str) -> None:
        self._once(item_id)
        self._check(item_id not in self.bulk, f"bulk work {item_id} dropped")
        self._check(item_id in self.marked, f"{item_id} dropped, never abandoned")
        going = {h.item.id for t in self._in_lanes() for h, _ in t.waiters}
        going.update(h.item.id for f in self.window._ready for t in f.texts for h, _ in t.waiters)
        self._check(item_id not in going, f"{item_id} dropped while a text of it is in a forward")
        self.dropped.add(item_id)

    def _once(self, item_id: str) -> None:
        self._check(item_id not in self.answered and item_id not in self.dropped, f"{item_id} answered twice")

    def _check(self, holds: bool, broken: str) -> None:
        """A promise checked inside the stages' calls: kept for `answered_as_promised`, so the call ends
        as it would (an assertion raised there would leave the stage half done)."""
        if not holds:
            self.broken.append(broken)

    def _settle(self) -> None:
        """The reply stage's round: write everything put so far (its thread would, meanwhile)."""
        inbox, outcomes = self.replies._inbox, []
        while not inbox.empty():
            outcomes.append(inbox.get_nowait())
        if outcomes:
            self.replies._write([o for o in outcomes if o is not None])

    # --- rules -----------------------------------------------------------------------------------

    @precondition(lambda self: self.window.room() > 0)
    @rule(
        takes=st.lists(
            st.tuples(
                st.lists(TEXT, min_size=1, max_size=3, unique=True),
                st.sampled_from(CLIENTS),
                st.sampled_from(TTLS),
            ),
            min_size=1,
            max_size=3,
        ),
        bulk=st.booleans(),
    )
    def take(self, takes: list[tuple[list[str], str, float]], bulk: bool) -> None:
        """Items queued now and taken in one take (of one class), as `Intake.take` takes them."""
        source = KEYS.bulk if bulk else KEYS.queue
        for texts, client, ttl in takes:
            now = self.clock.now
            item_id = f"i{len(self.items)}"  # (not `new_id`: a run must replay the same)
            item = WorkItem(item_id, texts, now, now + ttl, KEYS.reply_channel("api"), client=client)
            self.items[item.id], self.raws[item.id] = item, item.encode()
            if bulk:
                self.bulk.add(item.id)
            self.redis.lpush(source, item.encode())
        raws = self.queue.take_queued(len(takes), bulk=bulk)
        self.intake.hold(raws, bulk=bulk)
        self._settle()

    @precondition(lambda self: len(self.running) < self.lanes)
    @rule()
    def forward(self) -> None:
        """A free lane asks for its next forward, as `Lanes._run` does; the other idle lanes wait beside it."""
        lane = min(set(range(self.lanes)) - set(self.running))
        round_before, held_bulk = self.window._turns.round, self.window.holds_bulk()
        self.window._idle = self.lanes - len(self.running) - 1  # (`next_forward` counts this lane)
        try:
            forward = self.window.next_forward()
        except LaneIdle:
            forward = None
        finally:
            self.window._idle = 0
        self._settle()
        if forward is None:
            return
        self.running[lane] = forward
        self._turns_taken(forward, round_before)
        self._bulk_floor(forward, held_bulk)

    def _turns_taken(self, forward: Forward, round_before: float) -> None:
        """Count the forwards that went without a client that has texts held. A client's texts take
        turns, one a turn, from the round it came in (`Turns.take`), and each new batch takes the held
        text of the earliest turn: so a client that waits from round r with its earliest held text at
        turn t sees at most every client's turns in between go first, each a batch of at most
        `max_texts` forwards, and the rest of the batch under way."""
        served = {h.item.client for t in forward.texts for h, _ in t.waiters}
        earliest: dict[str, float] = {}
        for text in self.window._texts.values():
            client = text.waiters[0][0].item.client
            earliest[client] = min(earliest.get(client, math.inf), text.turn)
        self.waits = {c: w for c, w in self.waits.items() if c in earliest and c not in served}
        for client, turn in earliest.items():
            if client in served:
                continue
            since, passed = self.waits.get(client, (round_before, 0))
            self.waits[client] = (since, passed + 1)
            bound = (len(CLIENTS) * (turn - since + 1) + 1) * self.window.policy.max_texts
            assert passed + 1 <= bound, f"client {client} passed over {passed + 1} times (turn {turn}, from {since})"

    def _bulk_floor(self, forward: Forward, held_bulk: bool) -> None:
        """Count the interactive texts sent while bulk work waits without a text sent: at most what
        owes it a forward's worth at its share (`Policy.bulk_share`), and the rest of a batch under way."""
        bulk = sum(all(h.bulk for h, _ in t.waiters) for t in forward.texts)
        self.unpaid = 0 if bulk or not held_bulk else self.unpaid + len(forward.texts)
        if share := self.window.policy.bulk_share:
            most = self.window.policy.max_texts * ((1 - share) / share + 2)
            assert self.unpaid <= most, f"bulk work waited through {self.unpaid} interactive texts"

    @precondition(lambda self: self.running)
    @rule(data=st.data(), seconds=st.sampled_from([0.001, 0.02, 0.2]), fails=st.booleans())
    def finish(self, data: st.DataObject, seconds: float, fails: bool) -> None:
        """A lane's forward ends, in any order: its logits (timed), or a model failure for all its texts."""
        self._finish(data.draw(st.sampled_from(sorted(self.running))), seconds, fails)

    def _finish(self, lane: int, seconds: float, fails: bool) -> None:
        forward = self.running.pop(lane)
        self.clock.now += seconds
        if fails:
            self.replies.failed(forward.texts, "the model failed")
        else:
            self.window.forward_took(forward, seconds)
            self.replies.computed(forward.texts, np.stack([logits(t.ids) for t in forward.texts]))
        self._settle()

    @rule(seconds=st.sampled_from([0.001, 0.02]))
    def catch_up(self, seconds: float) -> None:
        """The lanes run forwards, each `seconds` long, until they have nothing to run."""
        while True:
            if len(self.running) < self.lanes:
                before = len(self.running)
                self.forward()
                if len(self.running) > before:
                    continue
            if not self.running:
                return
            self._finish(min(self.running), seconds, fails=False)

    def _abandonable(self) -> list[str]:
        """Items the API may stop waiting for: interactive ones, answered or not (its wait may end as
        the answer comes)."""
        return [i for i in self.items if i not in self.marked and i not in self.bulk]

    @precondition(lambda self: self._abandonable())
    @rule(data=st.data(), look=st.booleans())
    def abandon(self, data: st.DataObject, look: bool) -> None:
        self._abandon(data.draw(st.sampled_from(self._abandonable())), look)

    def _abandon(self, item_id: str, look: bool) -> None:
        """The API stops waiting for an item: its mark and the epoch, as `Predictions._set_abandoned`
        writes them; the intake looks now, or at its next take."""
        self.marked.add(item_id)
        self.redis.set(KEYS.abandoned(item_id), 1)
        self.redis.incr(KEYS.abandoned_epoch)
        if look:
            self.intake.recheck_abandoned()
        self._settle()

    @rule(seconds=st.sampled_from([0.01, 0.1, 0.5, 2.0]))
    def wait(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def forget_cache(self) -> None:
        """Cached texts lapse: the next take of them computes them again."""
        if keys := self.redis.keys(KEYS.cache("v", "*").rsplit(":", 1)[0] + ":*"):
            self.redis.delete(*keys)

    def teardown(self) -> None:
        """The worker's stop: the window closes, the lanes finish their forwards, their results are
        written; what is still held is handed back (it stays in the processing lists)."""
        if not hasattr(self, "window"):
            return
        self.window.close()
        assert self.window.next_forward() is None
        for lane in sorted(self.running):
            forward = self.running.pop(lane)
            self.replies.computed(forward.texts, np.stack([logits(t.ids) for t in forward.texts]))
        self._settle()
        self.answered_as_promised()
        self.held_as_listed()

    # --- invariants ------------------------------------------------------------------------------

    def _in_lanes(self) -> list[Text]:
        return [t for f in self.running.values() for t in f.texts]

    def _held(self) -> list[Text]:
        """The texts in the window: held, interactive and bulk, and in the last batch's forwards."""
        w = self.window
        return [*w._texts.values(), *w._bulk.texts.values(), *(t for f in w._ready for t in f.texts)]

    def check(self) -> None:
        """Every invariant (Hypothesis checks them after each step; a replayed sequence calls this)."""
        self.answered_as_promised()
        self.every_text_has_a_waiter()
        self.every_unanswered_item_can_still_be_answered()
        self.held_as_listed()

    @invariant()
    def answered_as_promised(self) -> None:
        assert not self.broken, self.broken

    @invariant()
    def every_text_has_a_waiter(self) -> None:
        for text in self._in_lanes() + self._held():
            assert text.waiters, f"{text.text} (chunk {text.chunk}) has no waiter"
            assert math.isfinite(text.deadline)
        for text in self._held():  # (a model failure answers an item at once: its other texts still go)
            waiting = [h for h, _ in text.waiters if self._waits(h.item.id)]
            assert waiting, f"{text.text} (chunk {text.chunk}) is held for nobody"

    def _waits(self, item_id: str) -> bool:
        """Whether the item's requester still waits for its texts: not answered, or answered as failed."""
        answer = self.answered.get(item_id)
        return item_id not in self.dropped and (answer is None or answer.error is not None)

    @invariant()
    def every_unanswered_item_can_still_be_answered(self) -> None:
        """Each unanswered text of an unanswered item is held, ready or in a lane, for it; for a chunked
        text, each of its chunks not computed yet."""
        places: dict[tuple[int, int], list[Text]] = {}  # (id of the item, index of its text) -> where
        for text in self._in_lanes() + self._held():
            for held, index in text.waiters:
                places.setdefault((id(held), index), []).append(text)
        for held in self._outstanding():
            for index, prediction in enumerate(held.predictions):
                if prediction is not None:
                    continue
                found = places.get((id(held), index), [])
                assert found, f"{held.item.texts[index]} of {held.item.id} is nowhere: never answered"
                if all(t.chunks is not None for t in found):
                    [chunks] = {id(t.chunks): t.chunks for t in found}.values()
                    assert chunks is not None
                    computing = {t.chunk for t in found}
                    missing = {n for n, row in enumerate(chunks.logits) if row is None}
                    assert missing <= computing, f"a chunk of {held.item.texts[index]} is nowhere: never answered"

    def _outstanding(self) -> list[Held]:
        """The items taken and not answered, each as a text held, ready or in a lane waits for it."""
        found = {h.item.id: h for t in self._in_lanes() + self._held() for h, _ in t.waiters}
        unanswered = [i for i in self.items if i not in self.answered and i not in self.dropped]
        for item_id in unanswered:
            assert item_id in found, f"{item_id} ({self.items[item_id].texts}) is nowhere: never answered"
        return [found[i] for i in unanswered]

    @invariant()
    def held_as_listed(self) -> None:
        """In memory (`WorkQueue.held_raws`), in the processing lists, and not answered: the same items."""
        unanswered = {self.raws[i] for i in self.items if i not in self.answered and i not in self.dropped}
        listed = set(
            self.redis.lrange(KEYS.processing("w"), 0, -1) + self.redis.lrange(KEYS.bulk_processing("w"), 0, -1)
        )
        assert self.queue.held_raws == unanswered == listed, (self.queue.held_raws ^ unanswered, unanswered ^ listed)


PlanMachine.TestCase.settings = settings(
    max_examples=examples(300), stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_the_plan_keeps_its_promises_in_any_sequence = PlanMachine.TestCase


# --- sequences it found, kept as plain tests ------------------------------------------------------


def replay(
    deadlines: bool,
    *steps: Callable[[PlanMachine], object],
    lanes: int = 1,
    max_texts: int = 1,
    packs: bool = False,
    bulk_share: float = 0.0,
) -> None:
    """Run `steps` (by default on one lane that takes one text a forward), checking every invariant after each."""
    machine = PlanMachine()
    machine.start(
        lanes, max_texts, 12, 0.0, packs=packs, deadlines=deadlines, bulk_delay_s=math.inf, bulk_share=bulk_share
    )
    for step in steps:
        step(machine)
        machine.check()
    machine.teardown()


def test_found_the_bulk_floor_put_off_while_each_new_batch_passed_the_last_ones_rest() -> None:
    """A held text's earlier turn sent a new batch ahead of the last batch's rest at each step, and the
    floor waited for no rest to be left: 13 interactive texts went by bulk work owed a forward after 8."""
    replay(
        False,
        lambda m: m.take([(["s1", "c0", "c1"], "a", 0.05)], bulk=False),
        lambda m: m.take([(["c0"], "a", 0.05)], bulk=False),
        lambda m: m.take([(["c0"], "a", 0.05)], bulk=True),
        lambda m: m.take([(["s0", "c0"], "a", 0.05)], bulk=False),
        lambda m: m.catch_up(0.001),
        lanes=2,
        max_texts=2,
        packs=True,
        bulk_share=0.2,
    )


def test_found_an_abandoned_item_dropped_while_a_chunk_of_its_chunked_text_ran() -> None:
    """The drop took the item's waiter off every window, the one in the lane too: no waiter, no deadline."""
    replay(
        False,
        lambda m: m.take([(["s0"], "a", 0.05), (["s0", "c0"], "a", 0.05)], bulk=False),
        PlanMachine.forward,
        lambda m: m._finish(0, 0.001, fails=False),
        PlanMachine.forward,
        lambda m: m._abandon("i1", look=True),
    )


def test_found_a_late_item_on_a_chunked_text_never_answered() -> None:
    """Late at its first chunk, it was taken off the second, which emptied the late chunk's waiters."""
    replay(
        True,
        lambda m: m.take([(["s0"], "a", 0.05), (["s0", "c0"], "a", 0.05)], bulk=False),
        PlanMachine.forward,
        lambda m: m._finish(0, 0.2, fails=False),
        PlanMachine.forward,
    )


def test_found_an_abandoned_item_answered_again_by_its_chunked_texts_pooled_scores() -> None:
    """Dropped while another item kept the text's chunks held, it was answered again once they pooled."""
    replay(
        False,
        lambda m: m.take([(["s0"], "a", 0.05), (["s0", "s1", "c0"], "a", 0.05), (["c0"], "a", 0.05)], bulk=False),
        lambda m: m._abandon("i2", look=True),
        lambda m: m.catch_up(0.001),
    )


# --- the reply stage's pooling of chunks ---------------------------------------------------------


@given(
    chunks=st.lists(st.tuples(st.integers(1, 512), st.floats(-30, 30), st.floats(-30, 30)), min_size=2, max_size=6),
    order=st.randoms(use_true_random=False),
)
def test_a_chunked_texts_pooled_logits_are_the_same_whatever_order_its_chunks_come_in(
    chunks: list[tuple[int, float, float]], order: Random
) -> None:
    weights, rows = [w for w, _, _ in chunks], [np.array(r, dtype=np.float32) for _, *r in chunks]
    item = WorkItem("i", ["long"], 0.0, 60.0, KEYS.reply_channel("api"))
    text = Text("long", KEYS.cache("v", "long"), [(Held(item.encode(), item), 0)], 0.0)
    chunked = Chunks.of(text, [[1] * w for w in weights], weights)
    arrivals = list(range(len(chunks)))
    order.shuffle(arrivals)
    pooled = [chunked.computed(n, rows[n]) for n in arrivals]
    assert pooled[:-1] == [None] * (len(chunks) - 1)
    assert pooled[-1] is not None
    whole, scores = pooled[-1]
    mean = np.average(np.stack(rows).astype(np.float64), axis=0, weights=weights)
    assert whole.key == text.key and whole.waiters == text.waiters
    assert scores == pytest.approx(mean, abs=1e-4)


# ---------------------------------------------------------------- items no API sends, among the plan's


def _item(now: float, n: int, **fields: object) -> bytes:
    """A work item's JSON with `fields` over a good one's."""
    good = {"id": f"junk{n}", "texts": ["s0"], "enqueued_at": now, "deadline": now + 60, "reply_to": "r"}
    return orjson.dumps(good | fields)


JUNK: dict[str, Callable[[float, int], bytes]] = {
    "not json": lambda now, n: b"not json %d" % n,
    "no texts": lambda now, n: _item(now, n, texts=[]),
    "texts of numbers": lambda now, n: _item(now, n, texts=[1, 2]),
    "no deadline": lambda now, n: orjson.dumps(
        {"id": f"junk{n}", "texts": ["s1"], "enqueued_at": now, "reply_to": "r"}
    ),
    "past its deadline": lambda now, n: _item(now, n, deadline=now - 1e6),  # (the intake's clock is the real one)
    "no such score function": lambda now, n: _item(now, n, function="tanh"),
}


class OddItemsMachine(PlanMachine):
    """`PlanMachine` (every promise of the plan, checked after each step), with two more kinds of take:
    an item that names a text more than once (each place gets its prediction, in order), and good
    items taken together with junk (dropped and acknowledged, never held, never answered)."""

    junk: set[bytes]

    @precondition(lambda self: self.window.room() > 0)
    @rule(
        texts=st.lists(TEXT, min_size=2, max_size=4).filter(lambda texts: len(set(texts)) < len(texts)),
        client=st.sampled_from(CLIENTS),
        ttl=st.sampled_from(TTLS),
        bulk=st.booleans(),
    )
    def take_repeats(self, texts: list[str], client: str, ttl: float, bulk: bool) -> None:
        self.take([(texts, client, ttl)], bulk)

    @precondition(lambda self: self.window.room() > 0)
    @rule(
        junk=st.lists(st.sampled_from(sorted(JUNK)), min_size=1, max_size=3),
        texts=st.lists(TEXT, min_size=1, max_size=2, unique=True),
        bulk=st.booleans(),
    )
    def take_with_junk(self, junk: list[str], texts: list[str], bulk: bool) -> None:
        if not hasattr(self, "junk"):
            self._ack_junk_apart()
        source = KEYS.bulk if bulk else KEYS.queue
        for kind in junk:
            raw = JUNK[kind](self.clock.now, len(self.junk))
            self.junk.add(raw)
            self.redis.lpush(source, raw)
        now = self.clock.now
        item = WorkItem(f"i{len(self.items)}", texts, now, now + 60, KEYS.reply_channel("api"))
        self.items[item.id], self.raws[item.id] = item, item.encode()
        if bulk:
            self.bulk.add(item.id)
        self.redis.lpush(source, item.encode())
        self.intake.hold(self.queue.take_queued(len(junk) + 1, bulk=bulk), bulk=bulk)
        self._settle()
        listed = self.redis.lrange(KEYS.processing("w"), 0, -1) + self.redis.lrange(KEYS.bulk_processing("w"), 0, -1)
        assert not self.junk & (set(listed) | self.queue.held_raws), "junk held"

    def _ack_junk_apart(self) -> None:
        """Junk is acknowledged as any dropped item, but is no item of the machine's to count."""
        self.junk = set()
        counted = self.queue.ack_all

        def acknowledged(raws: list[bytes], bulk: bool = False) -> None:
            WorkQueue.ack_all(self.queue, [r for r in raws if r in self.junk], bulk)
            if items := [r for r in raws if r not in self.junk]:
                counted(items, bulk)

        self.queue.ack_all = acknowledged  # type: ignore[method-assign]


OddItemsMachine.TestCase.settings = settings(
    max_examples=examples(150), stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_odd_items_keep_the_plans_promises = OddItemsMachine.TestCase

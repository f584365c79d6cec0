"""The batching policy, all of it: how much to take, when a forward goes, and which texts go in it.

Forward lanes pull: a lane that is free asks `Window.next_forward` for its next forward, so each
batch is chosen when the model can start it, from everything taken by then (as TEI's queue does).
While the model computes, the intake keeps taking, so the next forward is chosen from a fuller pool
at no cost in latency. The rules (docs/tuning.md, "Batching"):

1. Take: the intake takes what is queued in one round trip, up to `batch_window` texts held ahead
   of the model (`Policy.take_count` sizes it); from an empty queue it blocks for the next item,
   then takes what came with it.
2. Choose: the oldest held text and the held texts nearest to it in token length make the next
   batch, up to `max_batch_size` texts and the forward's token budget (`max_batch_tokens`, or
   `lane_max_tokens` on a CPU lane); the engine's cost model cuts it into the forwards that cost
   least, each padded or packed into one row (`batches.batch`); a batch with fewer forwards than
   there are idle lanes is cut further so each runs one (`batches.spread`). Free lanes run those forwards
   before the next batch is chosen, unless a client with nothing held came in: its turn goes first
   (`batcher.turns`).
3. Wait: a batch that is not full waits for company only while requests arrive less than
   `max_wait_ms` apart, and at most until its oldest text has been queued `max_wait_ms`: a lone
   client never waits, a backlog never waits again (`Window.next_forward`).
4. Bulk: /jobs texts (`Keys.bulk`) are held apart, up to `batch_window` more texts. They ride in
   an interactive forward only where its caps leave room (`batches.fill`), and make a forward of their
   own (one forward at a time) only when nothing interactive is held: interactive work waits
   for at most the one bulk forward a lane is running. While interactive work flows (some taken in
   the last `INTERACTIVE_FLOWS_S`), bulk texts may lengthen an interactive forward, and a bulk
   forward may last, at most `bulk_delay_ms` by the measured forward time; an idle service's bulk
   forwards are full. A floor under it (`bulk_share`) gives bulk work its share of the texts
   computed however busy interactive work keeps the model, so a job finishes
   (`batcher.bulk_texts`).
5. Deadlines (the `deadline` overload policy): each client's held texts take its turns earliest
   deadline first (`turns.by_deadline`), and a forward as it goes to a lane leaves out the work
   items it could not answer by their deadlines, by the measured forward time (`Window._in_time`):
   they are answered as late, unstarted, rather than computed for nobody. Bulk work is never late
   (its jobs worker queues again what passed its deadline, and a late answer still fills the cache),
   and rides in an interactive forward only as far as it leaves that forward's texts in time.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection
from operator import attrgetter

from batcher import turns
from batcher.batches import Forward, batch, spread
from batcher.bulk_texts import BulkTexts
from batcher.forward_time import ForwardTime
from batcher.policy import Policy
from batcher.turns import Turns
from batcher.work import Held, Text

_TURN = attrgetter("turn")
ARRIVALS = 8  # work items whose take times estimate the arrival rate
INTERACTIVE_FLOWS_S = 1.0  # interactive work taken this recently bounds bulk work by `bulk_delay_s` (rule 4)


class Window:
    """The worker's window (`batch_window`): texts taken and not yet in a forward, oldest first; the
    intake adds, the lanes take forwards."""

    def __init__(
        self,
        policy: Policy,
        clock: Callable[[], float] = time.time,
        deadlines: bool = False,
        late: Callable[[list[Text]], None] | None = None,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.deadlines = deadlines  # rule 5; off: first come, first served within the turns
        self.late = late  # where the texts of items dropped as late go (the reply stage answers them)
        self.forward_time = ForwardTime(policy.cost)  # timed by the lanes (`Lanes`)
        self._texts: dict[str, Text] = {}  # by cache key (a text, and its score function), in arrival order
        self._bulk = BulkTexts(policy, clock, self.forward_time, deadlines)  # only for room `_texts` leaves
        self._turns = Turns()
        self._ready: deque[Forward] = deque()  # the rest of the last batch's forwards, run before a new batch
        self._arrivals: deque[float] = deque(maxlen=ARRIVALS)
        self._idle = 0  # lanes in `next_forward`
        self._changed = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._texts) + sum(len(forward.texts) for forward in self._ready)

    def count(self) -> int:
        """Texts held, counted under the lock: for threads other than the intake and the lanes (the
        heartbeat's status), which would otherwise count while a lane takes a forward."""
        with self._changed:
            return len(self)

    def room(self) -> int:
        """Texts the window can still take."""
        return self.policy.window - len(self)

    def bulk_room(self) -> int:
        """Bulk texts the window can still take: as many again as interactive ones, held apart."""
        return self.policy.window - len(self._bulk.texts)

    def holds_bulk(self) -> bool:
        """Whether bulk texts are held (the intake takes more under interactive load only when not)."""
        return bool(self._bulk.texts)

    def wait_for_room(self, timeout: float) -> int:
        with self._changed:
            self._changed.wait_for(lambda: self.room() > 0 or self._closed, timeout)
            return self.room()

    def add(self, texts: list[Text], items: int, bulk: bool = False) -> None:
        """Hold `texts` (from `items` work items) for the lanes; a text held already gains their
        waiters. Each new text takes its client's next turn (`Turns.take`); bulk texts are held apart,
        with no turns and no arrivals (they never make interactive work wait for company)."""
        with self._changed:
            if bulk:
                for text in texts:
                    if held := self._texts.get(text.key) or self._bulk.texts.get(text.key):
                        held.waiters.extend(text.waiters)
                    else:
                        self._bulk.texts[text.key] = text
                self._changed.notify_all()
                return
            now = self.clock()
            self._arrivals.extend([now] * min(items, ARRIVALS))
            clients = set()
            for text in texts:
                if waiting := self._bulk.texts.pop(text.key, None):  # asked for interactively too: it goes as such
                    text.waiters.extend(waiting.waiters)
                if held := self._texts.get(text.key):
                    held.waiters.extend(text.waiters)
                else:
                    # Queued by the API's clock: one ahead of ours would stretch the wait for company (rule 3).
                    text.arrived = min(text.arrived, now)
                    clients.add(self._turns.take(text))
                    self._texts[text.key] = text
            if self.deadlines:
                turns.by_deadline(self._texts.values(), clients)
            self._changed.notify_all()

    def next_forward(self) -> Forward | None:
        """The next forward by the policy, waiting for texts or company as it says; None once closed.
        A batch's forwards all go before the next batch is chosen, so no text of it is passed over
        twice; only a turn that comes before theirs goes first (`turns.comes_first`)."""
        with self._changed:
            self._idle += 1
            try:
                return self._next_forward()
            finally:
                self._idle -= 1

    def _next_forward(self) -> Forward | None:
        """`next_forward`'s loop, under the lock: the rest of the last batch, the bulk floor's
        forward between two batches, a new batch, or bulk work alone when nothing interactive is held."""
        while not self._closed:
            if self._ready and not turns.comes_first(self._texts.values(), self._ready):
                if ready := self._in_time(self._ready.popleft()):
                    return self._bulk.sent(ready)
                continue
            timeout = None
            if self._texts and self._bulk.due():  # (between batches: the last one's rest waits for a turn first)
                return self._bulk_forward(owed=True)
            if self._texts:
                # (stable: oldest first on a tie; with deadlines, the earliest deadline)
                texts = sorted(self._texts.values(), key=attrgetter("turn", "deadline") if self.deadlines else _TURN)
                lengths = [len(t.ids) for t in texts]
                forwards, full = batch(lengths, self.policy)
                timeout = texts[0].arrived + self.policy.max_wait_s - self.clock()
                if full or len(forwards) > 1 or timeout <= 0 or self._ready or not self._company_likely():
                    forwards = spread(forwards, lengths, self._idle, self.policy)
                    made = [Forward([texts[i] for i in indices], packed) for indices, packed in forwards]
                    for text in (text for forward in made for text in forward.texts):
                        del self._texts[text.key]
                    self._turns.batch_went(texts[0], len(self._texts))
                    self._ready.extend(made[1:])
                    self._changed.notify_all()  # room for the intake, forwards for idle lanes
                    if first := self._in_time(made[0]):
                        return self._bulk.sent(self._bulk.filled(first, self._flows()))
                    continue
            elif self._bulk.texts and not self._ready:
                return self._bulk_forward()
            self._changed.wait(timeout)
        return None

    def _bulk_forward(self, owed: bool = False) -> Forward:
        """A forward of bulk texts alone (`BulkTexts.forward`), which makes room for the intake's bulk take."""
        forward = self._bulk.forward(self._flows(), owed)
        self._changed.notify_all()
        return forward

    def _flows(self) -> bool:
        """Whether interactive work flows: some taken in the last `INTERACTIVE_FLOWS_S` (rule 4)."""
        return bool(self._arrivals) and self.clock() - self._arrivals[-1] < INTERACTIVE_FLOWS_S

    def _in_time(self, forward: Forward) -> Forward | None:
        """`forward` without the texts of work items it could not answer by their deadlines, were it
        to start now and take as long as forwards have been taking (rule 5); None when nothing is
        left. Such an item leaves the window whole (its other texts too, where nobody else waits for
        them) and its texts go to `late`, to be answered as late. Before any forward was timed,
        every item is in time."""
        if not self.deadlines:
            return forward
        took = self.forward_time.predict([len(t.ids) for t in forward.texts], forward.packed)
        if took is None:
            return forward
        finish = self.clock() + took
        # (every waiter of it is late; a text a bulk item waits for goes: bulk work is never late)
        late = [text for text in forward.texts if text.deadline < finish and not _bulk_waits(text)]
        if not late:
            return forward
        items = {held for text in late for held, _ in text.waiters}
        gone = {id(text) for text in late}
        kept = [t for t in forward.texts if id(t) not in gone and _without(t, items)]
        for key, text in list(self._texts.items()):
            if not _without(text, items):
                del self._texts[key]
        ready = [(waiting, [t for t in waiting.texts if _without(t, items)]) for waiting in self._ready]
        self._ready = deque(_forward(texts, waiting.packed) for waiting, texts in ready if texts)
        if self.late is not None:
            self.late(late)
        self._changed.notify_all()  # room for the intake
        return _forward(kept, forward.packed) if kept else None

    def unstarted(self) -> list[Held]:
        """The work items whose unanswered texts all still wait here: none is in a forward or on its
        way to the reply, so `drop` can still take such an item out whole."""
        with self._changed:
            return [held for held, waiting in self._waiting().items() if waiting == held.missing]

    def drop(self, items: Collection[Held]) -> tuple[list[Held], int]:
        """Take out those of `items` still `unstarted`, and how many texts left with them: their
        waiters leave every held text, and a text nobody else waits for leaves too (one another item
        waits for stays). The rest of `items` stay, to be answered."""
        with self._changed:
            waiting = self._waiting()
            out = {held for held in items if 0 < waiting[held] == held.missing and not held.answered}
            gone = 0
            for key, text in list(self._texts.items()) if out else []:
                if not _without(text, out):
                    del self._texts[key]
                    gone += 1
            self._changed.notify_all()  # room for the intake; a waiting lane's oldest text may have left
            return list(out), gone

    def _waiting(self) -> Counter[Held]:
        """Per work item, its texts held here: a chunked text once, and only while every chunk of it
        is (once one has gone into a forward, its requests have started)."""
        pairs = set()
        for text in self._texts.values():
            if text.chunks is None or all(self._texts.get(c.key) is c for c in text.chunks.texts):
                pairs.update(text.waiters)
        return Counter(held for held, _ in pairs)

    def close(self) -> list[Text]:
        """No more forwards: wake every lane, and return the texts still held."""
        with self._changed:
            self._closed = True
            left = [
                *self._texts.values(),
                *self._bulk.texts.values(),
                *(text for forward in self._ready for text in forward.texts),
            ]
            self._texts, self._bulk.texts, self._ready = {}, {}, deque()
            self._changed.notify_all()
            return left

    def forward_took(self, forward: Forward, seconds: float) -> None:
        """A lane ran `forward` in `seconds`: the measure of rule 5's predictions."""
        self.forward_time.record([len(t.ids) for t in forward.texts], forward.packed, seconds)

    def _company_likely(self) -> bool:
        """Whether recent requests arrived less than the wait apart."""
        if len(self._arrivals) < 2:
            return False
        gap = (self._arrivals[-1] - self._arrivals[0]) / (len(self._arrivals) - 1)
        return gap <= self.policy.max_wait_s


def _forward(texts: list[Text], packed: bool) -> Forward:
    """A forward of what is left of one: one text is never packed."""
    return Forward(texts, packed and len(texts) > 1)


def _bulk_waits(text: Text) -> bool:
    """Whether a bulk work item waits for `text` (it was asked for interactively too)."""
    return any(held.bulk for held, _ in text.waiters)


def _without(text: Text, items: Collection[Held]) -> bool:
    """Take `items`' waiters off `text`; whether anybody still waits for it."""
    if any(held in items for held, _ in text.waiters):
        text.waiters[:] = [(held, index) for held, index in text.waiters if held not in items]
    return bool(text.waiters)

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
   least, each padded or packed into one row (`batch`); a batch with fewer forwards than there
   are idle lanes is cut further so each runs one (`spread`). Free lanes run those forwards
   before the next batch is chosen, unless a client with nothing held came in: its turn goes first.
3. Wait: a batch that is not full waits for company only while requests arrive less than
   `max_wait_ms` apart, and at most until its oldest text has been queued `max_wait_ms`: a lone
   client never waits, a backlog never waits again (`Window.next_forward`).
4. Bulk: /jobs texts (`Keys.bulk`) are held apart, up to `batch_window` more texts. They ride in
   an interactive forward only where its caps leave room (`fill`), and make a forward of their own
   (`batch`, one forward at a time) only when nothing interactive is held: interactive work waits
   for at most the one bulk forward a lane is running. While interactive work flows (some taken in
   the last `INTERACTIVE_FLOWS_S`), bulk texts may lengthen an interactive forward, and a bulk
   forward may last, at most `bulk_delay_ms` by the measured forward time (`Window._bulk_bound`); an
   idle service's bulk forwards are full.
   A floor under it (`bulk_share`): while bulk texts are held, the interactive texts sent owe bulk
   work its share of the texts computed, which riders and bulk forwards pay back; once it is owed a
   forward's worth (or all it holds), a bulk forward of that many goes between two batches, beyond
   the bulk bound (`Window._bulk_owed`), so a job finishes under sustained interactive load.
5. Deadlines (the `deadline` overload policy): each client's held texts take its turns earliest
   deadline first (`Window._by_deadline`), and a forward as it goes to a lane leaves out the work
   items it could not answer by their deadlines, by the measured forward time (`Window._in_time`):
   they are answered as late, unstarted, rather than computed for nobody. Bulk work is never late
   (its jobs worker queues again what passed its deadline, and a late answer still fills the cache),
   and rides in an interactive forward only as far as it leaves that forward's texts in time.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from operator import attrgetter

from batcher.forward_time import ForwardTime
from batcher.work import Held, Text
from core.settings import Settings
from model_store.cost import ForwardCost

_TURN = attrgetter("turn")
ARRIVALS = 8  # work items whose take times estimate the arrival rate
TAKE_AT_ONCE = 64  # most items one take asks for: the count doubles from 1 while the queue keeps up
INTERACTIVE_FLOWS_S = 1.0  # interactive work taken this recently bounds bulk work by `bulk_delay_s` (rule 4)


@dataclass(frozen=True)
class Policy:
    """The knobs of the policy above, from settings and the engine."""

    max_texts: int
    max_tokens: int
    max_wait_s: float
    window: int
    cost: ForwardCost
    bulk_delay_s: float  # most a bulk text may add to an interactive one's wait (rule 4); inf: no bound
    bulk_share: float = 0.0  # bulk work's floor: its share of the texts computed while it waits (rule 4)

    @classmethod
    def of(cls, settings: Settings, cost: ForwardCost, lanes: int) -> Policy:
        tokens = min(settings.max_batch_tokens, settings.lane_max_tokens) if lanes > 1 else settings.max_batch_tokens
        window = max(settings.batch_window, settings.max_batch_size)
        return cls(
            settings.max_batch_size,
            tokens,
            settings.max_wait_ms / 1000,
            window,
            cost,
            settings.bulk_delay_ms / 1000,
            settings.bulk_share,
        )

    def take_count(self, room: int, texts_per_item: float, last_asked: int, last_got: int) -> int:
        """Items a take under load asks for: twice the last count while the queue kept up, else what
        it had, within the window's room; an emptying queue costs few empty moves."""
        burst = min(max(2 * last_asked, 1), TAKE_AT_ONCE) if last_got == last_asked else last_got + 1
        return max(0, min(burst, int(room / max(texts_per_item, 1.0))))


@dataclass(frozen=True)
class Forward:
    """What a lane runs next: texts, padded to the longest or packed into one row."""

    texts: list[Text]
    packed: bool


def batch(lengths: Sequence[int], policy: Policy) -> tuple[list[tuple[list[int], bool]], bool]:
    """The next batch from texts of these token lengths, index 0 the oldest: its forwards (indices
    in ascending order, packed), the oldest text's first, and whether a cap, not the end of the
    texts, ended it. The batch is the oldest text and its nearest neighbours in length, one by one
    (the shorter on a tie), while they fit `max_texts` and `max_tokens` (padded, or packed where the
    engine packs); the engine's cost model cuts it, sorted by length, into the forwards that cost
    least in all (`cheapest_cuts`)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    lo = order.index(0)
    hi = lo + 1  # the candidates are order[lo:hi]
    anchor = longest = total = lengths[0]

    def fits(length: int) -> bool:
        count, top, tokens = hi - lo + 1, max(longest, length), total + length
        return count * top <= policy.max_tokens or (policy.cost.packs and tokens <= policy.max_tokens)

    full = True
    while hi - lo < policy.max_texts:
        below = lengths[order[lo - 1]] if lo > 0 else None
        above = lengths[order[hi]] if hi < len(order) else None
        if below is None and above is None:
            full = False
            break
        nearer_below = above is None or (below is not None and anchor - below <= above - anchor)
        for take_below in (nearer_below, not nearer_below):
            length = below if take_below else above
            if length is not None and fits(length):
                lo, hi = (lo - 1, hi) if take_below else (lo, hi + 1)
                longest, total = max(longest, length), total + length
                break
        else:
            break  # the token cap: neither neighbour fits
    candidates = order[lo:hi]
    sizes = [lengths[i] for i in candidates]
    if policy.cost.overhead_tokens >= len(sizes) * longest - total:  # no cut can save a call in padding
        return [(sorted(candidates), packs_cheaper(sizes, policy))], full
    forwards = [(sorted(candidates[start:end]), packed) for start, end, packed in cheapest_cuts(sizes, policy)]
    forwards.sort(key=lambda forward: 0 not in forward[0])  # the oldest text's forward first
    return forwards, full


def fill(lengths: Sequence[int], packed: bool, spare: Sequence[int], policy: Policy) -> list[int]:
    """Which of the `spare` texts (bulk, by token length, oldest first) ride along in a forward of texts
    of `lengths`: the oldest that fit its caps (`max_texts`; `max_tokens` as the forward is laid
    out, packed or padded) and are no longer than its longest text, so its padding does not grow."""
    count, longest, total = len(lengths), max(lengths), sum(lengths)
    chosen = []
    for index, length in enumerate(spare):
        if count >= policy.max_texts:
            break
        room = total + length <= policy.max_tokens if packed else (count + 1) * longest <= policy.max_tokens
        if length <= longest and room:
            chosen.append(index)
            count, total = count + 1, total + length
    return chosen


def spread(
    forwards: list[tuple[list[int], bool]], lengths: Sequence[int], lanes: int, policy: Policy
) -> list[tuple[list[int], bool]]:
    """The forwards of a batch (as `batch` gives them) for `lanes` idle lanes: the one with the most
    tokens halved by length while there are fewer forwards than lanes and it has two texts. Lanes run side by side,
    so a batch one lane would run while the others idle ends sooner shared; the oldest text's
    forward stays first."""
    forwards = list(forwards)
    while len(forwards) < lanes:
        largest = max(range(len(forwards)), key=lambda f: sum(lengths[i] for i in forwards[f][0]))
        by_length = sorted(forwards[largest][0], key=lengths.__getitem__)
        if len(by_length) < 2:
            break
        halves = [sorted(by_length[: len(by_length) // 2]), sorted(by_length[len(by_length) // 2 :])]
        forwards[largest : largest + 1] = [(h, packs_cheaper([lengths[i] for i in h], policy)) for h in halves]
    forwards.sort(key=lambda forward: 0 not in forward[0])
    return forwards


def packs_cheaper(lengths: Sequence[int], policy: Policy) -> bool:
    """Whether one forward of these texts goes packed: where the engine packs and the row fits the
    token cap, when padding would not fit or costs more."""
    cost, count, longest, total = policy.cost, len(lengths), max(lengths), sum(lengths)
    if not cost.packs or count == 1 or total > policy.max_tokens:
        return False
    return count * longest > policy.max_tokens or cost.packed(total) < cost.padded(count, longest)


def cheapest_cuts(lengths: Sequence[int], policy: Policy) -> list[tuple[int, int, bool]]:
    """Where to cut texts sorted by length into forwards within the caps, and which layout each
    takes, so that the forwards cost least in all: (start, end, packed) per forward. A padded
    forward computes texts x longest positions, a packed one the texts' total plus attention across
    them, each call a fixed cost on top (`model_store.cost`); dynamic programming over the cuts."""
    cost, count = policy.cost, len(lengths)
    before = [0]  # tokens before each index
    for length in lengths:
        before.append(before[-1] + length)
    best = [0.0] + [float("inf")] * count
    choice = [(0, False)] * (count + 1)  # (start, packed) of the cheapest last forward ending here
    for end in range(1, count + 1):
        for start in range(max(0, end - policy.max_texts), end):
            size, total = end - start, before[end] - before[start]
            if (size == 1 or size * lengths[end - 1] <= policy.max_tokens) and (
                c := best[start] + cost.padded(size, lengths[end - 1])
            ) < best[end]:
                best[end], choice[end] = c, (start, False)
            if (
                cost.packs
                and size > 1
                and total <= policy.max_tokens
                and (c := best[start] + cost.packed(total)) < best[end]
            ):
                best[end], choice[end] = c, (start, True)
    cuts, end = [], count
    while end > 0:
        start, packed = choice[end]
        cuts.append((start, end, packed))
        end = start
    return cuts[::-1]


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
        self._bulk: dict[str, Text] = {}  # the bulk class's texts, the same way: only for room `_texts` leaves
        self._turns: dict[str, float] = {}  # per client, the turn after its last text held
        self._round = 0.0  # the turn of the last batch's first text: where a client with nothing held comes in
        self._ready: deque[Forward] = deque()  # the rest of the last batch's forwards, run before a new batch
        self._arrivals: deque[float] = deque(maxlen=ARRIVALS)
        self._bulk_owed = 0.0  # bulk texts owed to bulk work's floor (rule 4), at most a forward's worth
        self._idle = 0  # lanes in `next_forward`
        self._changed = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._texts) + sum(len(forward.texts) for forward in self._ready)

    def held(self) -> int:
        """Texts held, counted under the lock: for threads other than the intake and the lanes (the
        heartbeat's status), which would otherwise count while a lane takes a forward."""
        with self._changed:
            return len(self)

    def room(self) -> int:
        """Texts the window can still take."""
        return self.policy.window - len(self)

    def bulk_room(self) -> int:
        """Bulk texts the window can still take: as many again as interactive ones, held apart."""
        return self.policy.window - len(self._bulk)

    def wait_for_room(self, timeout: float) -> int:
        with self._changed:
            self._changed.wait_for(lambda: self.room() > 0 or self._closed, timeout)
            return self.room()

    def add(self, texts: list[Text], items: int, bulk: bool = False) -> None:
        """Hold `texts` (from `items` work items) for the lanes; a text held already gains their waiters.
        Each new text takes its client's next turn, one text a turn, from the current round on: so
        clients take turns text by text, and one with nothing held comes in at the next batch. Bulk
        texts are held apart (`_add_bulk`)."""
        with self._changed:
            if bulk:
                self._add_bulk(texts)
                return
            now = self.clock()
            self._arrivals.extend([now] * min(items, ARRIVALS))
            clients = set()
            for text in texts:
                if waiting := self._bulk.pop(text.key, None):  # asked for interactively too: it goes as such
                    text.waiters.extend(waiting.waiters)
                if held := self._texts.get(text.key):
                    held.waiters.extend(text.waiters)
                else:
                    client = _client(text)
                    text.turn = max(self._round, self._turns.get(client, 0.0))
                    self._turns[client] = text.turn + 1
                    self._texts[text.key] = text
                    clients.add(client)
            if self.deadlines:
                self._by_deadline(clients)
            self._changed.notify_all()

    def _add_bulk(self, texts: list[Text]) -> None:
        """`add`, for bulk texts: no turns, no arrivals (they never make interactive work wait for
        company); a text held already, of either class, gains their waiters."""
        for text in texts:
            if held := self._texts.get(text.key) or self._bulk.get(text.key):
                held.waiters.extend(text.waiters)
            else:
                self._bulk[text.key] = text
        self._changed.notify_all()

    def _by_deadline(self, clients: Collection[str]) -> None:
        """Each of `clients`' held texts take its turns earliest deadline first: the turns a client
        holds stay its own (fairness between clients is unchanged), their order within it is EDF."""
        own: dict[str, list[Text]] = {client: [] for client in clients}
        for text in self._texts.values():
            if (mine := own.get(_client(text))) is not None:
                mine.append(text)
        for mine in own.values():
            turns = sorted(text.turn for text in mine)
            for text, turn in zip(sorted(mine, key=attrgetter("deadline", "arrived")), turns, strict=True):
                text.turn = turn

    def next_forward(self) -> Forward | None:
        """The next forward by the policy, waiting for texts or company as it says; None once closed.
        A batch's forwards all go before the next batch is chosen, so no text of it is passed over
        twice; only a turn that comes before theirs goes first (`_turn_comes_first`)."""
        with self._changed:
            self._idle += 1
            try:
                return self._next_forward()
            finally:
                self._idle -= 1

    def _next_forward(self) -> Forward | None:
        """`next_forward`'s loop, under the lock."""
        while not self._closed:
            if self._ready and not self._turn_comes_first():
                if ready := self._in_time(self._ready.popleft()):
                    return self._sent(ready)
                continue
            timeout = None
            if (
                self._bulk
                and self._texts
                and not self._ready
                and self._bulk_owed >= min(self.policy.max_texts, len(self._bulk))
            ):
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
                    self._round = texts[0].turn
                    if len(self._turns) > len(self._texts):  # forget clients whose turn has come round
                        self._turns = {c: t for c, t in self._turns.items() if t > self._round}
                    self._ready.extend(made[1:])
                    self._changed.notify_all()  # room for the intake, forwards for idle lanes
                    if first := self._in_time(made[0]):
                        return self._sent(self._filled(first))
                    continue
            elif self._bulk and not self._ready:
                return self._bulk_forward()
            self._changed.wait(timeout)
        return None

    def _sent(self, forward: Forward) -> Forward:
        """`forward`, on its way to a lane, in bulk work's account (rule 4's floor): its interactive
        texts owe bulk work its share while bulk texts are held, its bulk texts pay it back."""
        bulk = sum(all(held.bulk for held, _ in text.waiters) for text in forward.texts)
        if self._bulk and (share := self.policy.bulk_share):
            owed = self._bulk_owed + (len(forward.texts) - bulk) * share / (1 - share)
            self._bulk_owed = min(owed, self.policy.max_texts)
        self._bulk_owed = max(self._bulk_owed - bulk, 0.0)
        return forward

    def holds_bulk(self) -> bool:
        """Whether bulk texts are held (the intake takes more under interactive load only when not)."""
        return bool(self._bulk)

    def _filled(self, forward: Forward) -> Forward:
        """`forward` with the bulk texts that fit its spare room (`fill`), as many of them as keep it
        within the bulk bound and its texts in time (`_riders_within`)."""
        if not self._bulk:
            return forward
        spare = list(self._bulk.values())
        lengths = [len(t.ids) for t in forward.texts]
        riders = [spare[i] for i in fill(lengths, forward.packed, [len(t.ids) for t in spare], self.policy)]
        riders = self._riders_within(forward, riders)
        for text in riders:
            del self._bulk[text.key]
        return Forward(forward.texts + riders, forward.packed) if riders else forward

    def _riders_within(self, forward: Forward, riders: list[Text]) -> list[Text]:
        """The oldest of `riders` that `forward` can take and still take at most the bulk bound longer than
        without them (rule 4), and end by the deadline of each of its texts it would end in time for
        without them (rule 5): bulk work never makes interactive work late."""
        bound = self._bulk_bound()
        if not riders or (bound is None and not self.deadlines):
            return riders
        lengths = [len(t.ids) for t in forward.texts]
        if (took := self.forward_time.predict(lengths, forward.packed)) is None:
            return riders
        most = took + bound if bound is not None else math.inf
        if self.deadlines:
            start = self.clock()
            due = min((t.deadline for t in forward.texts if t.deadline >= start + took), default=math.inf)
            most = min(most, due - start)
        return riders[: self._fitting(lengths, [len(t.ids) for t in riders], forward.packed, most)]

    def _bulk_forward(self, owed: bool = False) -> Forward:
        """The next forward of bulk texts alone: the first of the batch `batch` makes of them, its
        oldest texts within the bulk bound (rule 4); the rest stay held, so an interactive text taken
        meanwhile goes next. Nothing interactive is held, or (`owed`) the floor is due: then as many
        as are owed, beyond the bound."""
        texts = list(self._bulk.values())
        forwards, _ = batch([len(t.ids) for t in texts], self.policy)
        indices, packed = forwards[0]
        bound = None if owed else self._bulk_bound()
        if owed or bound is not None:
            lengths = [len(texts[i].ids) for i in indices]
            most = int(self._bulk_owed) if bound is None else 1 + self._fitting(lengths[:1], lengths[1:], packed, bound)
            indices = indices[:most]
            packed = packs_cheaper([len(texts[i].ids) for i in indices], self.policy)
        for index in indices:
            del self._bulk[texts[index].key]
        self._changed.notify_all()  # room for the intake's bulk take
        return self._sent(Forward([texts[i] for i in indices], packed))

    def _bulk_bound(self) -> float | None:
        """Seconds bulk texts may add to an interactive text's wait (rule 4): `bulk_delay_s` while
        interactive work flows, else None (no bound: an idle service's bulk forwards are full)."""
        flows = bool(self._arrivals) and self.clock() - self._arrivals[-1] < INTERACTIVE_FLOWS_S
        return self.policy.bulk_delay_s if flows and math.isfinite(self.policy.bulk_delay_s) else None

    def _fitting(self, lengths: list[int], extra: list[int], packed: bool, seconds: float) -> int:
        """How many of `extra` (token lengths, oldest first) a forward of texts of `lengths` can add and
        still be predicted to take at most `seconds`; all of them before any forward was timed."""
        count = len(extra)
        while count and (took := self.forward_time.predict(lengths + extra[:count], packed)) is not None:
            if took <= seconds:
                break
            count -= 1
        return count

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

    def _turn_comes_first(self) -> bool:
        """Whether a held text's turn comes before every text of the last batch's forwards still to
        run (a client with nothing held came in): then a new batch goes first, and those wait one
        forward more."""
        if not self._texts:
            return False
        ready = min(text.turn for forward in self._ready for text in forward.texts)
        return any(text.turn < ready for text in self._texts.values())

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
        """Per work item, its texts held here: a chunked text once, and only while every window of it
        is (once one has gone into a forward, its requests have started)."""
        pairs = set()
        for text in self._texts.values():
            if text.windows is None or all(self._texts.get(w.key) is w for w in text.windows.texts):
                pairs.update(text.waiters)
        return Counter(held for held, _ in pairs)

    def close(self) -> list[Text]:
        """No more forwards: wake every lane, and return the texts still held."""
        with self._changed:
            self._closed = True
            left = [
                *self._texts.values(),
                *self._bulk.values(),
                *(text for forward in self._ready for text in forward.texts),
            ]
            self._texts, self._bulk, self._ready = {}, {}, deque()
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


def _client(text: Text) -> str:
    """The client whose turn a held text takes: its first request's."""
    return text.waiters[0][0].item.client


def _bulk_waits(text: Text) -> bool:
    """Whether a bulk work item waits for `text` (it was asked for interactively too)."""
    return any(held.bulk for held, _ in text.waiters)


def _without(text: Text, items: Collection[Held]) -> bool:
    """Take `items`' waiters off `text`; whether anybody still waits for it."""
    if any(held in items for held, _ in text.waiters):
        text.waiters[:] = [(held, index) for held, index in text.waiters if held not in items]
    return bool(text.waiters)

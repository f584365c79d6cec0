"""The take stage: queued work items into held texts, on the worker's main thread.

One take moves what is queued into this worker's processing list in one round trip
(`Policy.take_count` says how many items to ask for); it takes bulk work (`Keys.bulk`, /jobs
parts) for the window's bulk room when the queue is empty, or when the window holds none (bulk
work's floor, `plan` rule 4); an empty queue blocks it for the next item. Malformed and
expired items are dropped, and so is the work of requests nobody waits for any more (`_abandoned`);
the rest become distinct texts, answered from the cache where another request or worker computed
them already, else tokenized in one call and held for the lanes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

from redis.exceptions import OutOfMemoryError, RedisError, ResponseError

from batcher import metrics
from batcher.plan import Window
from batcher.policy import TAKE_AT_ONCE
from batcher.queue import WorkQueue
from batcher.redis_link import Command
from batcher.reply import Replies
from batcher.thread_failure import stops
from batcher.work import Chunks, Held, Text, traceparents
from core import tracing
from core.protocol import ScoreFunction, Unreadable, WorkItem, read_prediction
from core.redis_errors import describe
from model_store.long_texts import Tokenized

log = logging.getLogger(__name__)

SCORE_FUNCTIONS = frozenset(ScoreFunction)
IDLE_POLL_S = 1.0  # longest a take waits for the window's room, so a stop request is seen
# How long a take blocks on an empty queue (an interactive item ends the wait at once): while bulk work
# flows (held, or taken in the last BULK_FLOWS_S), BULK_FLOWING_WAIT_S, so the lanes never run dry of bulk;
# else BULK_IDLE_WAIT_S, so a job's first part waits no longer than that.
BULK_FLOWING_WAIT_S = 0.02
BULK_IDLE_WAIT_S = 0.25
BULK_FLOWS_S = 1.0
CLOCK_SKEW_S = 1.0  # how far the API's clock (a work item's times) may be from this worker's
# While requests are being abandoned (the epoch moved in the last ABANDONING_FOR_S) and the window is
# full, the held work is looked over every ABANDONED_RECHECK_S, so the next forward leaves out what was
# abandoned since the last take: under overload, a take waits a whole forward for room.
ABANDONED_RECHECK_S = 0.01
ABANDONING_FOR_S = 1.0
# Work whose deadline passed in the queue (a backlog kept across a restart, a worker stalled): each
# item at DEBUG, and at most one INFO line this often, counting the items since the last one.
EXPIRED_SAID_EVERY_S = 10.0


class Intake:
    """Takes work into `window`; cache hits and dropped items go straight to `replies`."""

    def __init__(
        self,
        queue: WorkQueue,
        window: Window,
        replies: Replies,
        split: Callable[[list[str]], list[Tokenized]],
        cache_key: Callable[[str, ScoreFunction | None], str],
        drop_abandoned: bool = True,
        reject_past: int | None = None,
    ) -> None:
        self.queue = queue
        self.window = window
        self.replies = replies
        # Texts to token ids: one chunk each, or a chunked text's chunks (`model_store.long_texts`).
        self.split = split
        self.reject_past = reject_past  # `reject`: texts of more tokens than this are refused (None: none is)
        self.cache_key = cache_key
        self.drop_abandoned = drop_abandoned
        self.expired = 0  # items dropped because their deadline had passed
        self._expired_unsaid = 0  # of them, those the INFO line has not counted yet
        self._expired_said = float("-inf")  # monotonic time of that line's last saying
        self.abandoned = 0  # items dropped because nobody waits for them any more
        self._epoch: bytes | None = None  # `Keys.abandoned_epoch` at the last look (None: never moved)
        self._epoch_moved = float("-inf")  # when this worker saw it move last (unix s)
        self._asked = self._got = 1  # items the last take asked for, and got
        self.texts_per_item = 1.0  # distinct texts an interactive item brought, at the last take
        self._bulk_taken = float("-inf")  # monotonic time of the last take that got bulk work
        self._bulk_looked = float("-inf")  # monotonic time of the last look for bulk work
        self._bulk_refused = False  # Redis refused the last look for bulk work (said once a run of refusals)
        self.busy_since: float | None = None  # monotonic start of the take under way; None between takes

    def take(self) -> bool:
        """One take; False when no work came within `_idle_wait`, or the window stayed full (while
        work is being abandoned, `ABANDONED_RECHECK_S`, after `recheck_abandoned`)."""
        self.busy_since = time.monotonic()
        try:
            return self._take()
        finally:
            self.busy_since = None
            if self._expired_unsaid:
                self._say_expired()

    def _take(self) -> bool:
        looking = self.drop_abandoned and time.time() - self._epoch_moved < ABANDONING_FOR_S
        room = self.window.wait_for_room(ABANDONED_RECHECK_S if looking else IDLE_POLL_S)
        if room <= 0:
            if looking:
                self.recheck_abandoned()
            return False
        cpu, raws = time.thread_time(), []
        # What the window has room for (items that shared texts bring a fraction of one each: room at most).
        items = max(1, int(room / max(self.texts_per_item, 1.0)))
        try:
            if self._got:  # the queue had work at the last take: take what is queued, one round trip
                asked = self.window.policy.take_count(room, self.texts_per_item, self._asked, self._got)
                raws = self.queue.take_queued(asked)
                self._asked, self._got = asked, len(raws)
            # Idle, bulk work fills it; under load, it comes for bulk work's floor (`plan`, rule 4).
            if (not raws or not self.window.holds_bulk()) and self._bulk_due() and self._take_bulk():
                return True
            if not raws and (first := self.queue.take(self._idle_wait())) is not None:  # idle: block for the next
                raws = [first]
                raws += self.queue.take_queued(min(self.queue.depth(), items - 1))  # and what came with it
                self._asked = self._got = len(raws)
        finally:
            if raws:  # taken, so held, even where the rest of the take failed
                self.hold(raws)
            metrics.STAGE_CPU_SECONDS.labels("take").inc(time.thread_time() - cpu)
        return bool(raws)

    def _bulk_due(self) -> bool:
        """Whether to look for bulk work now: at every idle take while it flows, else once a
        `BULK_IDLE_WAIT_S` (a lone request's take costs no round trip to an empty bulk list)."""
        return self._bulk_flows() or time.monotonic() - self._bulk_looked >= BULK_IDLE_WAIT_S

    def _bulk_flows(self) -> bool:
        """Bulk work is held, or was taken in the last `BULK_FLOWS_S`."""
        held = self.window.bulk_room() < self.window.policy.window
        return held or time.monotonic() - self._bulk_taken < BULK_FLOWS_S

    def _take_bulk(self) -> bool:
        """Bulk items for the window's bulk room (one round trip; an item is at most a forward of texts),
        only once it has room for a whole forward; whether any came. Redis refusing the bulk list alone
        (WRONGTYPE on a key something else wrote, an ACL without it) leaves bulk work waiting, said once
        a run of refusals, and the take going on to the queue: raised, it backed every take off, and
        took no interactive work once a take had found the queue empty. A full Redis (OOM) refuses
        every take alike: raised, as an outage."""
        self._bulk_looked = time.monotonic()
        most = min(self.window.bulk_room() // self.window.policy.max_texts, TAKE_AT_ONCE)
        try:
            raws = self.queue.take_queued(most, bulk=True)
        except OutOfMemoryError:
            raise
        except ResponseError as exc:
            if not self._bulk_refused:
                log.error("redis refuses the bulk list (%s): bulk work waits, interactive work goes on", describe(exc))
            self._bulk_refused = True
            return False
        self._bulk_refused = False
        if raws:
            self._bulk_taken = time.monotonic()
            self.hold(raws, bulk=True)
        return bool(raws)

    def _idle_wait(self) -> float:
        """How long a take blocks on an empty queue: briefly while bulk work flows (`BULK_FLOWING_WAIT_S`)."""
        return BULK_FLOWING_WAIT_S if self._bulk_flows() else BULK_IDLE_WAIT_S

    def hold(self, raws: list[bytes], bulk: bool = False) -> None:
        """Decode taken items, drop malformed and expired ones, answer cached texts, hold the rest.
        Never fails on Redis: what was taken is held (a failed cache check computes the texts; a
        failed drop leaves the item for the next worker to drop). `bulk`: items of the bulk class."""
        now, items, dropped = time.time(), [], []
        for raw in raws:
            try:
                item = WorkItem.decode(raw)
            except Unreadable as exc:  # nobody can be answered: never retry it
                log.error("dropped an unreadable work item (%s)", exc)
                dropped.append(raw)
                continue
            if item.function is not None and item.function not in SCORE_FUNCTIONS:
                log.error("dropped a work item asking for scores by %r, no score function", item.function[:32])
                dropped.append(raw)
                continue
            if not item.texts:  # nothing to answer it with: held, it would stay in the processing list for good
                log.error("dropped a work item of no texts")
                dropped.append(raw)
                continue
            if item.deadline < now:
                self.expired += 1
                self._expired_unsaid += 1
                metrics.WORK_ITEMS_EXPIRED.inc()
                log.debug("skipped work item %s: its deadline passed in the queue", item.id)
                dropped.append(raw)
                continue
            items.append(Held(raw, item, bulk=bulk))
        self.queue.held_raws.update(held.raw for held in items)
        try:
            if items:
                dropped += self._hold_items(items, bulk)
        finally:
            self._acknowledge(dropped, bulk)

    def _say_expired(self) -> None:
        """The INFO line on work dropped as expired, unless said in the last `EXPIRED_SAID_EVERY_S`."""
        now = time.monotonic()
        if now - self._expired_said >= EXPIRED_SAID_EVERY_S:
            count, self._expired_unsaid, self._expired_said = self._expired_unsaid, 0, now
            log.info(
                "dropped %d work item%s whose deadline passed before a worker took them (queued before a restart?)",
                count,
                "" if count == 1 else "s",
            )

    def recheck_abandoned(self) -> None:
        """Drop the held work abandoned since the last look (`ABANDONED_RECHECK_S`): one GET of the epoch,
        and when it moved, the markers of the items held unstarted."""
        cpu = time.thread_time()
        try:
            [epoch] = self.queue.link.call(("GET", self.queue.keys.abandoned_epoch))
            _, dropped = self._abandoned([], epoch)
            self._acknowledge([held.raw for held in dropped])
        except RedisError:
            pass  # the next take meets the outage, and backs off
        finally:
            metrics.STAGE_CPU_SECONDS.labels("take").inc(time.thread_time() - cpu)

    def _acknowledge(self, dropped: list[bytes], bulk: bool = False) -> None:
        """The one acknowledgement of items dropped unanswered (malformed, expired, abandoned): one
        round trip; a failed one leaves them for the next worker to drop."""
        if dropped:
            self.queue.held_raws.difference_update(dropped)
            with contextlib.suppress(RedisError):
                self.queue.ack_all(dropped, bulk)

    def _hold_items(self, items: list[Held], bulk: bool) -> list[bytes]:
        """Answer the items' cached texts and hold the rest for the lanes, leaving out abandoned work
        (bulk work is never marked abandoned); the abandoned items, taken now or held before, to acknowledge."""
        texts: dict[str, Text] = {}  # by cache key: a text asked for under another score function is another
        for held in items:
            function = ScoreFunction(held.item.function) if held.item.function is not None else None
            for index, sentence in enumerate(held.item.texts):
                key = self.cache_key(sentence, function)
                if (known := texts.get(key)) is None:
                    known = texts[key] = Text(sentence, key, [], held.item.enqueued_at, function=function)
                known.waiters.append((held, index))
        if not bulk:  # (what sizes the queue's takes)
            self.texts_per_item = len(texts) / len(items)
        commands: list[Command] = [("MGET", *(t.key for t in texts.values()))]
        if self.drop_abandoned and not bulk:  # the epoch rides along: no round trip of its own
            commands.append(("GET", self.queue.keys.abandoned_epoch))
        try:
            cached, *epoch = self.queue.link.call(*commands)
        except RedisError as exc:
            log.warning("cache check failed (%s); computing the texts", describe(exc))
            cached, epoch = [None] * len(texts), []
        # (an entry that holds no prediction is a miss: computed, and written over)
        checked = [
            (t, c if c is None or read_prediction(c) is not None else None)
            for t, c in zip(texts.values(), cached, strict=True)
        ]
        taken, unstarted = self._abandoned(items, epoch[0]) if epoch else (set(), [])
        if taken:
            for text in texts.values():
                text.waiters[:] = [(h, index) for h, index in text.waiters if h not in taken]
            metrics.ABANDONED_TEXTS.inc(sum(not t.waiters and c is None for t, c in checked))
        hits = [(t, c) for t, c in checked if c is not None and t.waiters]
        if hits:
            self.replies.cached(hits)
        todo = [t for t, c in checked if c is None and t.waiters]
        if todo:
            tokenizing = (
                tracing.linked_span("worker.tokenize", traceparents(todo), texts=len(todo))
                if tracing.enabled
                else tracing.OFF
            )
            with tokenizing as span:
                todo = self._windows(self._tokenized(todo))
                if span.is_recording():
                    span.set_attribute("sentiment.tokens", sum(len(t.ids) for t in todo))
            self.window.add(todo, len(items) - len(taken), bulk)
        return [h.raw for h in (*taken, *unstarted)]

    def _tokenized(self, texts: list[Text]) -> list[tuple[Text, Tokenized]]:
        """`texts` with their tokens, tokenized in one call; if that fails, one by one, and a text
        the tokenizer cannot take fails only the requests that hold it (never the worker: another
        worker would take the same item and fail the same way)."""
        try:
            return list(zip(texts, self.split([t.text for t in texts]), strict=True))
        except BaseException as exc:  # (a Rust panic too: `stops`)
            if stops(exc):
                raise
            log.warning("tokenizing %d texts failed (%s); one by one", len(texts), type(exc).__name__)
        tokenized = []
        for text in texts:
            try:
                [tokens] = self.split([text.text])
                tokenized.append((text, tokens))
            except BaseException as exc:
                if stops(exc):
                    raise
                log.warning("a text failed in the tokenizer (%s)", type(exc).__name__)
                self.replies.failed([text], f"the tokenizer failed on this request's texts ({type(exc).__name__})")
        return tokenized

    def _windows(self, tokenized: list[tuple[Text, Tokenized]]) -> list[Text]:
        """The texts for the lanes: each text as one, a chunked text as its chunks (each a `Text` the
        batches take as any other, `Chunks` pooling their logits back into the text's); a text past
        `reject_past` refused with its request (and that request's other texts left out)."""
        refused = [(text, tokens.tokens) for text, tokens in tokenized if self._refused(tokens)]
        if refused:
            metrics.LONG_TEXTS.labels("rejected").inc(len(refused))
            gone = {held for text, _ in refused for held, _ in text.waiters}
            tokenized = [(text, tokens) for text, tokens in tokenized if not self._refused(tokens)]
            for text, _ in tokenized:  # their requests' other texts: nobody waits for them any more
                text.waiters[:] = [(held, index) for held, index in text.waiters if held not in gone]
            self.replies.refused(refused, self.reject_past or 0)
        todo: list[Text] = []
        for text, tokens in tokenized:
            if not text.waiters:
                continue
            if len(tokens.chunks) == 1:
                text.ids = tokens.ids
                if tokens.tokens > len(text.ids):
                    metrics.LONG_TEXTS.labels("truncated").inc()
                todo.append(text)
            else:
                metrics.LONG_TEXTS.labels("chunked").inc()
                todo += Chunks.of(text, tokens.chunks, tokens.weights).texts
        return todo

    def _refused(self, tokens: Tokenized) -> bool:
        return self.reject_past is not None and tokens.tokens > self.reject_past

    def _abandoned(self, items: list[Held], epoch: bytes | None) -> tuple[set[Held], list[Held]]:
        """The abandoned work (`Keys.abandoned`, set by the API): of `items`, just taken, and of the
        items held unstarted, which `Window.drop` takes out. Markers are looked up (one MGET) only
        where one may be new: every held item when `epoch` moved since the last look, and an item
        just taken if it was queued before the epoch last moved (one abandoned after it was queued
        moved the epoch). In the normal case, no abandonment, that is never."""
        before, now = self._epoch, time.time()
        if epoch != before:
            self._epoch, self._epoch_moved = epoch, now
            suspects = [*items, *self.window.unstarted()]
        else:
            suspects = [h for h in items if h.item.enqueued_at <= self._epoch_moved + CLOCK_SKEW_S]
        if not suspects:
            return set(), []
        keys = self.queue.keys
        try:
            [marks] = self.queue.link.call(("MGET", *(keys.abandoned(h.item.id) for h in suspects)))
        except RedisError as exc:
            log.warning("abandoned work not looked up (%s); computing it", describe(exc))
            self._epoch = before  # look again at the next take
            return set(), []
        gone = [h for h, mark in zip(suspects, marks, strict=True) if mark is not None]
        taken = set(items)
        dropped, texts = self.window.drop([h for h in gone if h not in taken])
        taken.intersection_update(gone)
        self.abandoned += len(taken) + len(dropped)
        metrics.WORK_ITEMS_ABANDONED.labels("queued").inc(len(taken))
        metrics.WORK_ITEMS_ABANDONED.labels("held").inc(len(dropped))
        metrics.ABANDONED_TEXTS.inc(texts)
        if taken or dropped:
            log.debug("dropped %d abandoned work items (%d held)", len(taken) + len(dropped), len(dropped))
        return taken, dropped

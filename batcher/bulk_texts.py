"""The bulk class in the worker's window (`batcher.plan`, rule 4): /jobs texts held apart from the
interactive ones, riding in the room interactive forwards leave, in forwards of their own when
nothing interactive is held, and kept from starving by a floor.

While interactive work flows, bulk texts may lengthen an interactive forward, and a bulk forward may
last, at most `bulk_delay_s` by the measured forward time (`bound`); an idle service's bulk forwards
are full. Under the `deadline` policy riders never make an interactive text late. The floor
(`bulk_share`): while bulk texts are held, the interactive texts sent owe bulk work its share of the
texts computed, which riders and bulk forwards pay back; once a forward's worth (or all it holds)
is owed, a bulk forward of that many goes between two batches, beyond the bound (`due`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from batcher.batches import Forward, batch, fill, packs_cheaper
from batcher.forward_time import ForwardTime
from batcher.policy import Policy
from batcher.work import Text


class BulkTexts:
    """The bulk texts held, by cache key in arrival order, and what bulk work is owed."""

    def __init__(self, policy: Policy, clock: Callable[[], float], forward_time: ForwardTime, deadlines: bool) -> None:
        self.policy = policy
        self.clock = clock
        self.forward_time = forward_time
        self.deadlines = deadlines
        self.texts: dict[str, Text] = {}
        self.owed = 0.0  # bulk texts owed to the floor, at most a forward's worth

    def due(self) -> bool:
        """Whether the floor's forward is due: a forward's worth owed, or all that is held."""
        return bool(self.texts) and self.owed >= min(self.policy.max_texts, len(self.texts))

    def sent(self, forward: Forward) -> Forward:
        """`forward`, on its way to a lane, in the floor's account: its interactive texts owe bulk
        work its share while bulk texts are held, its bulk texts pay it back."""
        bulk = sum(all(held.bulk for held, _ in text.waiters) for text in forward.texts)
        if self.texts and (share := self.policy.bulk_share):
            self.owed = min(self.owed + (len(forward.texts) - bulk) * share / (1 - share), self.policy.max_texts)
        self.owed = max(self.owed - bulk, 0.0)
        return forward

    def filled(self, forward: Forward, flows: bool) -> Forward:
        """`forward` with the bulk texts that fit its spare room (`fill`), as many of them as keep it
        within the bound and its texts in time (`_riders_within`)."""
        if not self.texts:
            return forward
        spare = list(self.texts.values())
        lengths = [len(t.ids) for t in forward.texts]
        riders = [spare[i] for i in fill(lengths, forward.packed, [len(t.ids) for t in spare], self.policy)]
        riders = self._riders_within(forward, riders, self.bound(flows))
        for text in riders:
            del self.texts[text.key]
        return Forward(forward.texts + riders, forward.packed) if riders else forward

    def _riders_within(self, forward: Forward, riders: list[Text], bound: float | None) -> list[Text]:
        """The oldest of `riders` that `forward` can take and still take at most `bound` longer than
        without them, and end by the deadline of each of its texts it would end in time for without
        them (rule 5): bulk work never makes interactive work late."""
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

    def forward(self, flows: bool, owed: bool = False) -> Forward:
        """The next forward of bulk texts alone: the first of the batch `batch` makes of them, its
        oldest texts within the bound; the rest stay held, so an interactive text taken meanwhile goes
        next. Nothing interactive is held, or (`owed`) the floor is due: then as many as are owed,
        beyond the bound."""
        texts = list(self.texts.values())
        forwards, _ = batch([len(t.ids) for t in texts], self.policy)
        indices, packed = forwards[0]
        bound = None if owed else self.bound(flows)
        if owed or bound is not None:
            lengths = [len(texts[i].ids) for i in indices]
            most = int(self.owed) if bound is None else 1 + self._fitting(lengths[:1], lengths[1:], packed, bound)
            indices = indices[:most]
            packed = packs_cheaper([len(texts[i].ids) for i in indices], self.policy)
        for index in indices:
            del self.texts[texts[index].key]
        return self.sent(Forward([texts[i] for i in indices], packed))

    def bound(self, flows: bool) -> float | None:
        """Seconds bulk texts may add to an interactive text's wait: `bulk_delay_s` while interactive
        work `flows`, else None (no bound: an idle service's bulk forwards are full)."""
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

"""What a batch holds and how it is cut into forwards (`batcher.plan`, rules 2 and 4): pure
functions of the held texts' token lengths, the policy's caps and the engine's cost model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from batcher.policy import Policy
from batcher.work import Text


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

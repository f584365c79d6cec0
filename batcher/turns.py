"""Fairness between clients (`batcher.plan`, rules 2 and 5): held texts take turns, one text a turn
per client, and under the `deadline` policy each client's own turns go earliest deadline first.

Each new text takes its client's next turn, from the current round on (the turn of the last batch's
first text): so clients take turns text by text, and one with nothing held comes in at the next
batch. A batch starts at the lowest turn held; the rest of its forwards go before the next batch
unless a held text's turn comes before all of theirs (`comes_first`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from operator import attrgetter

from batcher.batches import Forward
from batcher.work import Text


class Turns:
    """Each client's next turn, and the round."""

    def __init__(self) -> None:
        self.round = 0.0  # the turn of the last batch's first text: where a client with nothing held comes in
        self._next: dict[str, float] = {}  # per client, the turn after its last text held

    def take(self, text: Text) -> str:
        """`text`, newly held, takes its client's next turn; returns the client."""
        client = client_of(text)
        text.turn = max(self.round, self._next.get(client, 0.0))
        self._next[client] = text.turn + 1
        return client

    def batch_went(self, first: Text, held: int) -> None:
        """A batch went, starting with `first`; with `held` texts still held, forget the clients whose
        turn has come round (their next text comes in at the round anyway)."""
        self.round = first.turn
        if len(self._next) > held:
            self._next = {c: t for c, t in self._next.items() if t > self.round}


def by_deadline(held: Iterable[Text], clients: Collection[str]) -> None:
    """Each of `clients`' held texts take its turns earliest deadline first: the turns a client holds
    stay its own (fairness between clients is unchanged), their order within it is EDF."""
    own: dict[str, list[Text]] = {client: [] for client in clients}
    for text in held:
        if (mine := own.get(client_of(text))) is not None:
            mine.append(text)
    for mine in own.values():
        turns = sorted(text.turn for text in mine)
        for text, turn in zip(sorted(mine, key=attrgetter("deadline", "arrived")), turns, strict=True):
            text.turn = turn


def comes_first(held: Collection[Text], ready: Iterable[Forward]) -> bool:
    """Whether a held text's turn comes before every text of the last batch's forwards still to run
    (a client with nothing held came in): then a new batch goes first, and those wait one forward more."""
    if not held:
        return False
    first_ready = min(text.turn for forward in ready for text in forward.texts)
    return any(text.turn < first_ready for text in held)


def client_of(text: Text) -> str:
    """The client whose turn a held text takes: its first request's."""
    return text.waiters[0][0].item.client

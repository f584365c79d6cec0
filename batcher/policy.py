"""The batching policy's knobs (`batcher.plan` has its rules), from settings and the engine."""

from __future__ import annotations

from dataclasses import dataclass

from core.settings import Settings
from model_store.cost import ForwardCost

TAKE_AT_ONCE = 64  # most items one take asks for: the count doubles from 1 while the queue keeps up


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

"""What one model forward costs, for cutting a batch into forwards and choosing each one's layout.

Pure arithmetic (no torch): the worker's batching imports it; the classifier sets its constants.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardCost:
    """What one forward costs, in units of one token position through the model.

    A call costs `overhead_tokens` whatever its size (dispatch, thread wake-ups, small ops); a
    row of L positions also costs L * L / `attention_tokens` for its attention. Padded:
    `size` rows of the longest text's L; packed: one row of the texts' total length.
    """

    overhead_tokens: float
    attention_tokens: float
    packs: bool  # whether this model can run packed forwards at all

    def padded(self, size: int, longest: int) -> float:
        return self.overhead_tokens + size * (longest + longest * longest / self.attention_tokens)

    def packed(self, total: int) -> float:
        return self.overhead_tokens + total + total * total / self.attention_tokens

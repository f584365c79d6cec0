"""How a batch of token ids is laid out for one forward: padded rows, or packed into one row.

Padded, every text is a row padded to the batch's longest: a batch of mixed lengths computes
mostly padding (a shallow queue has nothing to sort, so 32 clients' sentences cost 1.4-2.9 padded
positions per real token on 2 CPU cores). Packed, the texts are concatenated into one row with no
padding at all, as text-embeddings-inference does: positions restart at every text, and attention
stays within a text through a block-diagonal mask built from each token's segment (its text's
index). Every position computed is then a real token; the price is attention over all T x T
pairs of the row instead of each text's own, which the worker's cost model weighs
(`model_store.cost`) before it picks a layout for each forward.

Both layouts are the same inputs to one module (`Segments`), so the torch and ONNX Runtime
engines run a single graph: padded is `len(batch)` rows of one segment each, packed one row of
`len(batch)` segments. Only DistilBERT is wired this way (its head reads each text's first
token); any other architecture runs padded through its own forward (`Padded`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DistilBertForSequenceClassification

PAD_SEGMENT = -1  # padding positions: a segment of their own, so no text attends to them


class Segments(torch.nn.Module):
    """DistilBERT over rows that each hold one or more texts: logits per text, in batch order."""

    def __init__(self, model: DistilBertForSequenceClassification) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, segments: torch.Tensor, starts: torch.Tensor
    ) -> torch.Tensor:
        same_text = (segments.unsqueeze(2) == segments.unsqueeze(1)).unsqueeze(1)  # (rows, 1, L, L)
        hidden = self.model.distilbert(
            input_ids=input_ids, position_ids=position_ids, attention_mask=same_text
        ).last_hidden_state
        first = hidden.flatten(0, 1)[starts]  # each text's [CLS] position, as the stock head reads it
        return self.model.classifier(torch.relu(self.model.pre_classifier(first)))


class Padded(torch.nn.Module):
    """Any sequence-classification model, padded rows only: logits per row."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def wrap(model: torch.nn.Module) -> Segments | Padded:
    return (Segments(model) if isinstance(model, DistilBertForSequenceClassification) else Padded(model)).eval()


def inputs(
    batch: Sequence[list[int]], pad_id: int, *, segments: bool, packed: bool, granule: int = 1
) -> dict[str, torch.Tensor]:
    """The tensors for `batch`: `Segments`' (packed into one row, or padded to the longest text)
    when `segments`, else `Padded`'s; a packed row padded up to a multiple of `granule` positions.

    A text of no tokens (a tokenizer without special tokens, given "") is refused: it would read the
    next text's first token packed, or padding alone padded, and answer scores that are not its own."""
    if not all(batch):
        raise ValueError("a text of no tokens: the model has nothing of it to read")
    if not segments:
        if packed:
            raise ValueError("this model runs padded forwards only")
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    rows = [list(batch)] if packed else [[ids] for ids in batch]
    width = max(sum(map(len, texts)) for texts in rows)
    if packed:
        width = -(-width // granule) * granule
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), PAD_SEGMENT, dtype=torch.long)
    starts = []
    text = 0
    for row, texts in enumerate(rows):
        at = 0
        for ids in texts:
            input_ids[row, at : at + len(ids)] = torch.tensor(ids)
            position_ids[row, at : at + len(ids)] = torch.arange(len(ids))
            segment[row, at : at + len(ids)] = text
            starts.append(row * width + at)
            at += len(ids)
            text += 1
    return {"input_ids": input_ids, "position_ids": position_ids, "segments": segment, "starts": torch.tensor(starts)}

"""Texts longer than the model's length: truncated, rejected, or cut into chunks whose logits pool.

The choice (`SENTIMENT_LONG_TEXTS`) is made where texts become token ids, by the tokenizer itself:

- `truncate`: the first `max_length` tokens (specials included), as transformers' pipeline does;
- `reject`: the whole text's tokens, which the worker refuses past `max_length` (it names the count);
- `chunk`: overlapping chunks of `max_length` tokens, `max_length // 8` shared between neighbours,
  exactly as transformers' `tokenizer(text, truncation=True, max_length=..., stride=...,
  return_overflowing_tokens=True)` cuts them; each chunk is a forward's text of its own, and the
  text's logits are the chunks' mean weighted by the text tokens each holds (`pool`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from tokenizers import Encoding, Tokenizer

STRIDE_FRACTION = 8  # a chunk shares 1/8 of its length with the next: context across the cut (docs/tuning.md)


class LongTexts(StrEnum):
    TRUNCATE = "truncate"
    REJECT = "reject"
    CHUNK = "chunk"


@dataclass(frozen=True, slots=True)
class Tokenized:
    """One text as the model will see it: the token ids of each forward (one, or a chunked text's
    chunks), each chunk's weight in the pooled logits (its text tokens), and the whole text's
    token count with special tokens (what `reject` compares with the model's length)."""

    chunks: list[list[int]]
    weights: list[int]
    tokens: int

    @property
    def ids(self) -> list[int]:
        """The only chunk's ids (a text within the model's length, or truncated)."""
        [ids] = self.chunks
        return ids


class Splitter:
    """Token ids of texts by the chosen handling of long ones (the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, handling: LongTexts) -> None:
        self.max_length = max_length
        self.handling = handling
        self.stride = max_length // STRIDE_FRACTION if handling == LongTexts.CHUNK else 0
        self._tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.no_padding()
        if handling == LongTexts.REJECT:
            self._tokenizer.no_truncation()
        else:
            self._tokenizer.enable_truncation(max_length, stride=self.stride)

    def __call__(self, texts: list[str]) -> list[Tokenized]:
        """Each text's `Tokenized`, in one call of the Rust tokenizer."""
        return [self._tokenized(encoding) for encoding in self._tokenizer.encode_batch_fast(texts)]

    def _tokenized(self, encoding: Encoding) -> Tokenized:
        rest = encoding.overflowing
        if self.handling != LongTexts.CHUNK or not rest:
            tokens = len(encoding.ids) + sum(_text_tokens(piece) for piece in rest)  # (truncate: disjoint pieces)
            return Tokenized([encoding.ids], [_text_tokens(encoding)], tokens)
        pieces = [encoding, *rest]
        weights = [_text_tokens(piece) for piece in pieces]
        tokens = len(encoding.ids) + sum(weight - self.stride for weight in weights[1:])
        return Tokenized([piece.ids for piece in pieces], weights, tokens)


def _text_tokens(encoding: Encoding) -> int:
    """Tokens of the text in an encoding: its special tokens ([CLS], [SEP]) left out."""
    return len(encoding.special_tokens_mask) - sum(encoding.special_tokens_mask)


def pool(logits: np.ndarray, weights: list[int]) -> np.ndarray:
    """A chunked text's logits, (labels,), from its chunks' (chunks, labels): their mean weighted by
    each chunk's text tokens. In logits, so one rule serves every score function (softmax, sigmoid,
    a regression's raw value) and any `function_to_apply`; weighted, so a short last chunk counts
    for the little text it holds (docs/tuning.md, "Long texts")."""
    if len(weights) == 1:  # (a text of one chunk is its chunk, an empty text included: no tokens to weigh)
        return np.asarray(logits[0], dtype=np.float32)
    w = np.asarray(weights, dtype=np.float64)
    return (np.asarray(logits, dtype=np.float64) * (w / w.sum())[:, None]).sum(axis=0).astype(np.float32)

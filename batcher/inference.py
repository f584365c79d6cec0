"""Cache-aware batched inference: the one path from texts to predictions.

The micro-batching worker calls it per batch; bulk jobs call it per chunk. Texts already in the
cache (computed by another request, another worker, or an earlier try of this work) are not
computed again; fresh predictions go into the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson
from redis import Redis
from redis.client import Pipeline

from batcher.batching import split_by_length
from batcher.metrics import timed_forward
from batcher.protocol import Keys, Prediction, prediction
from model_store.classifier import Classifier


class Inference:
    """Runs texts through the classifier in length-sorted batches, with the Redis result cache."""

    def __init__(
        self, classifier: Classifier, redis: Redis, keys: Keys, max_batch_size: int, max_batch_tokens: int,
        cache_ttl_s: int,
    ) -> None:
        self.classifier = classifier
        self.redis = redis
        self.keys = keys
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.cache_ttl_s = cache_ttl_s
        self.forwards = 0  # model calls so far
        self.computed = 0  # texts that went through the model

    def predict(
        self, texts: Sequence[str], token_ids: Sequence[list[int]] | None = None, writes: Pipeline | None = None
    ) -> list[Prediction]:
        """Predictions in input order; identical texts are computed once.

        `token_ids` spares re-tokenizing texts the caller has tokenized already. Cache writes go
        into `writes` when given (the caller executes it with its own writes: one round trip).
        """
        found, todo = self.lookup(texts)
        if todo:
            ids_of = dict(zip(texts, token_ids, strict=True)) if token_ids is not None else {}
            ids = [ids_of[t] for t in todo] if ids_of else self.classifier.tokenize(todo)
            pipe = writes if writes is not None else self.redis.pipeline(transaction=False)
            found |= self.store(todo, self.run(ids), pipe)
            if writes is None:
                pipe.execute()
        return [found[t] for t in texts]

    def lookup(self, texts: Sequence[str]) -> tuple[dict[str, Prediction], list[str]]:
        """The cached predictions among `texts`, and the distinct texts still to compute."""
        unique = list(dict.fromkeys(texts))
        cached = self.redis.mget([self.keys.cache(self.classifier.version, t) for t in unique])
        found = {t: orjson.loads(c) for t, c in zip(unique, cached, strict=True) if c is not None}
        return found, [t for t in unique if t not in found]

    def store(self, texts: Sequence[str], probabilities: Sequence[list[float]], writes: Pipeline) -> dict[str, Prediction]:
        """Fresh predictions for `texts`, queued into `writes` as cache entries."""
        fresh = {t: prediction(self.classifier.labels, p) for t, p in zip(texts, probabilities, strict=True)}
        for text, pred in fresh.items():
            writes.set(self.keys.cache(self.classifier.version, text), orjson.dumps(pred), ex=self.cache_ttl_s)
        return fresh

    def run(self, token_ids: Sequence[list[int]]) -> list[list[float]]:
        """Model probabilities for token ids: sorted by length, cut into the cheapest forwards (each
        padded or packed), input order kept."""
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        lengths = [len(token_ids[i]) for i in order]
        probabilities: list[list[float]] = [[] for _ in token_ids]
        start = 0
        for end, packed in split_by_length(lengths, self.max_batch_size, self.max_batch_tokens, self.classifier.cost):
            batch = order[start:end]
            batch_probs = timed_forward(self.classifier.forward, [token_ids[i] for i in batch], packed)
            for i, probs in zip(batch, batch_probs, strict=True):
                probabilities[i] = probs
            self.forwards += 1
            self.computed += len(batch)
            start = end
        return probabilities

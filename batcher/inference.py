"""Bulk jobs' path from texts to predictions, on the calling thread, with the shared cache.

Texts already cached (by /predict, another job, or an earlier try of this one) are not computed
again; the rest are cut into forwards by the worker's own policy (`plan.batch`) and cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import numpy as np
import orjson
from redis import Redis

from batcher.metrics import timed_forward
from batcher.plan import Policy, batch
from core.protocol import Keys, Prediction, prediction
from core.settings import Settings
from model_store.classifier import Classifier
from model_store.long_texts import LongTexts, pool


class Inference:
    """Predictions for lists of texts: identical texts computed once, the cache read and filled."""

    def __init__(self, classifier: Classifier, redis: Redis, keys: Keys, policy: Policy, cache_ttl_s: int) -> None:
        self.classifier = classifier
        self.redis = redis
        self.keys = keys
        self.policy = policy
        self.cache_ttl_s = cache_ttl_s

    @classmethod
    def for_jobs(cls, settings: Settings, classifier: Classifier, redis: Redis, keys: Keys | None = None) -> Self:
        """As the jobs worker runs it: one forward at a time on the calling thread, the configured cache."""
        policy = Policy.of(settings, classifier.cost, lanes=1)
        return cls(classifier, redis, keys or Keys(settings.key_prefix), policy, settings.cache_ttl_s)

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Predictions in input order."""
        unique = list(dict.fromkeys(texts))
        keys = [self.keys.cache(self.classifier.version, t) for t in unique]
        found = {t: orjson.loads(c) for t, c in zip(unique, self.redis.mget(keys), strict=True) if c is not None}
        todo = [t for t in unique if t not in found]
        if todo:
            scores = self._scores(todo)
            fresh = {t: prediction(self.classifier.labels, p) for t, p in zip(todo, scores, strict=True)}
            pipe = self.redis.pipeline(transaction=False)
            for text, pred in fresh.items():
                pipe.set(self.keys.cache(self.classifier.version, text), orjson.dumps(pred), ex=self.cache_ttl_s)
            pipe.execute()
            found |= fresh
        return [found[t] for t in texts]

    def _scores(self, texts: list[str]) -> list[list[float]]:
        """Each text's scores, its long texts handled as the worker handles them (`model_store.long_texts`):
        a chunked text's windows are computed as texts and their logits pooled; under `reject`, a text
        longer than the model takes fails the job, naming it."""
        tokenized = self.classifier.split(texts)
        if self.classifier.long_texts == LongTexts.REJECT:
            most = self.classifier.max_length
            if too_long := [t.tokens for t in tokenized if t.tokens > most]:
                raise ValueError(
                    f"{len(too_long)} texts are longer than the model's {most} tokens (SENTIMENT_LONG_TEXTS=reject), "
                    f"the first of {too_long[0]:,} tokens"
                )
        logits = iter(self._compute([ids for t in tokenized for ids in t.windows]))
        rows = [pool(np.stack([next(logits) for _ in t.windows]), t.weights) for t in tokenized]
        return self.classifier.scores(np.stack(rows)).tolist()

    def _compute(self, ids: list[list[int]]) -> list[np.ndarray]:
        """Logits for token ids, in order, a forward at a time as the policy cuts them."""
        left = list(range(len(ids)))
        out: list[np.ndarray] = [np.empty(0) for _ in ids]
        while left:
            forwards, _ = batch([len(ids[i]) for i in left], self.policy)
            for chosen, packed in forwards:
                texts = [left[i] for i in chosen]
                logits = timed_forward(self.classifier.engine.forward, [ids[i] for i in texts], packed)
                for i, row in zip(texts, logits, strict=True):
                    out[i] = row
            taken = {i for chosen, _ in forwards for i in chosen}
            left = [i for n, i in enumerate(left) if n not in taken]
        return out

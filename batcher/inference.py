"""Cache-aware batched inference: the one path from texts to predictions.

The micro-batching worker calls it per batch; bulk jobs call it per chunk. Texts already in the
cache (computed by another request, another worker, or an earlier try of this work) are not
computed again; fresh predictions go into the cache.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import orjson
from redis import Redis
from redis.client import Pipeline

from batcher.batching import split_by_length
from batcher.metrics import timed_forward
from batcher.protocol import Keys, Prediction, prediction
from model_store.classifier import Classifier

# Most token positions in one forward on a lane. A lane's forward runs on one core and is cheapest
# per token at about 256 positions; from 448-512 on, its activations outgrow the core's cache and a
# token costs 15-25% more, which the linear cost model cannot see (docs/tuning.md, "A lane's
# forward and the core's cache"). Cut at 256, a saturated worker's batches took 2.4-3.5% less model time.
LANE_FORWARD_TOKENS = 256


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
        self._counting = threading.Lock()
        self._in_flight = 0  # `run` calls under way
        self._all_threads = threading.Lock()  # held by a forward on all the threads: no lane runs beside it
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
        """Model probabilities for token ids: sorted by length and dealt in turn into a share per lane
        (equal shares of every length), which the lanes take as they come free (`Classifier.on_lane`);
        each share cut into the cheapest forwards (each padded or packed); input order kept. A lone
        text takes all the threads, unless another batch is computing."""
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        probabilities: list[list[float]] = [[] for _ in token_ids]
        with self._counting:  # (a worker runs two batches at once when it has lanes)
            alone = self._in_flight == 0
            self._in_flight += 1
        try:
            if self.classifier.lanes == 1 or (alone and len(order) == 1):
                with self._all_threads:
                    forwards = self._run_share(order, token_ids, probabilities)
            else:
                lanes = min(self.classifier.lanes, len(order))
                shares = [self.classifier.on_lane(self._run_share, order[k::lanes], token_ids, probabilities)
                          for k in range(lanes)]
                forwards = sum(share.result() for share in shares)
            with self._counting:
                self.forwards += forwards
                self.computed += len(order)
        finally:
            with self._counting:
                self._in_flight -= 1
        return probabilities

    def _run_share(self, order: list[int], token_ids: Sequence[list[int]], probabilities: list[list[float]]) -> int:
        """Forward the texts at `order` (sorted by length), on the lane this runs on or else on all the
        threads, filling `probabilities`; returns the forwards."""
        on_lane = self.classifier.lane is not None
        if on_lane:
            with self._all_threads:  # wait out a lone text's forward on all the threads, if one runs
                pass
        lengths = [len(token_ids[i]) for i in order]
        tokens = min(self.max_batch_tokens, LANE_FORWARD_TOKENS) if on_lane else self.max_batch_tokens
        cuts = split_by_length(lengths, self.max_batch_size, tokens, self.classifier.cost)
        start = 0
        for end, packed in cuts:
            batch = order[start:end]
            computed = timed_forward(self.classifier.forward, [token_ids[i] for i in batch], packed)
            for i, probs in zip(batch, computed, strict=True):
                probabilities[i] = probs
            start = end
        return len(cuts)

"""The HTTP service (`sentiment api`): /predict, the Open Inference Protocol and /jobs.

It validates, checks access, answers from its two cache tiers (a local LRU, then Redis), queues the
misses for the model workers and waits for their results, and answers every refusal from one map.
Never imports torch or transformers (the API image does not have them).
"""

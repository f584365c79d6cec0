"""The HTTP API: validates, answers cache hits from Redis, queues misses, waits for the worker.

Never imports torch or transformers (the API image does not have them).
"""

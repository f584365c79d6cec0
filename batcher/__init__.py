"""The micro-batching worker and the wire protocol it shares with the API.

`protocol` is light (the API imports it); `worker` and `inference` need the model (torch).
"""

"""The workers: the micro-batching /predict worker and the bulk jobs worker.

`worker` is one pipeline (take: `intake`, batching: `plan`, the model: `forward`, results: `reply`,
liveness: `heartbeat`) and needs the model (`model_store`, torch); `jobs` runs /jobs on RQ, sends
their texts through the model workers as bulk work (`bulk`) and their webhooks (`webhooks`), and
loads no model. What they share with the API is in `core`.
"""

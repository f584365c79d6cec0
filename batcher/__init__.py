"""The workers: the micro-batching /predict worker and the bulk jobs worker.

`worker` is one pipeline (take: `intake`, batching: `plan`, the model: `forward`, results: `reply`,
liveness: `heartbeat`); `jobs` runs /jobs on RQ and sends their webhooks (`webhooks`). Both need the
model (`model_store`, torch); what they share with the API is in `core`.
"""

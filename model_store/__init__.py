"""The model: Hugging Face checkpoints on local disk and their fingerprint, the engines that run them
(torch, ONNX Runtime, null) with their cost model and padded or packed layouts, `sentiment model pull`
and `quantize` (random-weight checkpoints for tests and benchmarks are `benchmarks.checkpoints`).

The engines need torch and transformers; the API never imports this package.
"""

"""Model loading: Hugging Face checkpoints on local disk, their fingerprint, and test/benchmark factories.

Imports torch and transformers; the API never imports this package.
"""

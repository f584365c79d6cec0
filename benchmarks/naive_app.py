"""The naive baseline (a benchmark subject, not product code): the design users run today.

A FastAPI app that calls the transformers pipeline once per request: no queue, no batching across
requests, no cache. Same model as the worker, loaded by the worker's `Classifier` from the same
settings (`SENTIMENT_MODEL_DIR`, `SENTIMENT_DEVICE`, `SENTIMENT_TORCH_THREADS`,
`SENTIMENT_PRECISION`), so both run the same arithmetic, not a cheaper precision. The pipeline
runs on torch, as users run it; the worker's engine (ONNX Runtime for fp32 on the CPU) is part of
what the service adds.
Run: `python -m uvicorn benchmarks.naive_app:app`.
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline

from model_store.classifier import Classifier
from sentiment.settings import Settings

settings = Settings()
model = Classifier(settings.model_dir, settings.device, settings.torch_threads, settings.precision, engine="torch")
classify = pipeline(
    "text-classification", model=model.model, tokenizer=model.tokenizer, top_k=None, device=model.device
)
app = FastAPI(title="naive baseline")


class PredictRequest(BaseModel):
    text: list[str]


@app.post("/predict")
def predict(body: PredictRequest) -> dict[str, list[list[dict[str, float | str]]]]:
    """One pipeline call per request (FastAPI runs it in its thread pool, as a plain `def` route)."""
    with model.arithmetic():
        return {"predictions": classify(body.text, truncation=True)}


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "healthy"}

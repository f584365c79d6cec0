"""The naive baseline (a benchmark subject, not product code): the design users run today.

A FastAPI app that calls the transformers pipeline once per request: no queue, no batching across
requests, no cache. Same model, device and torch threads as the worker, from the same settings
(`SENTIMENT_MODEL_DIR`, `SENTIMENT_DEVICE`, `SENTIMENT_TORCH_THREADS`).
Run: `python -m uvicorn benchmarks.naive_app:app`.
"""

from __future__ import annotations

import torch
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline

from model_store.classifier import pick_device
from sentiment.settings import Settings

settings = Settings()
device = pick_device(settings.device)
if device.type == "cpu" and settings.torch_threads:
    torch.set_num_threads(settings.torch_threads)
classify = pipeline(
    "text-classification", model=str(settings.model_dir), top_k=None, device=device,
    dtype=torch.float16 if device.type == "cuda" else torch.float32,
)
app = FastAPI(title="naive baseline")


class PredictRequest(BaseModel):
    text: list[str]


@app.post("/predict")
def predict(body: PredictRequest) -> dict[str, list[list[dict[str, float | str]]]]:
    """One pipeline call per request (FastAPI runs it in its thread pool, as a plain `def` route)."""
    return {"predictions": classify(body.text, truncation=True)}


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "healthy"}

"""The naive baseline (a benchmark subject, not product code): the design users run today.

A FastAPI app that calls the transformers pipeline once per request: no queue, no batching across
requests, no cache. Same model as the worker, loaded by the worker's loader from the same settings
(`SENTIMENT_MODEL_DIR`, `SENTIMENT_DEVICE`, `SENTIMENT_TORCH_THREADS`, `SENTIMENT_PRECISION`), so
both run the same arithmetic, not a cheaper precision. The pipeline
runs on torch, as users run it; the worker's engine (ONNX Runtime for fp32 on the CPU) is part of
what the service adds.
Run: `python -m uvicorn benchmarks.naive_app:app`.
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoTokenizer, pipeline

from core.settings import Settings
from model_store import torch_engine
from model_store.checkpoint import Checkpoint
from model_store.engine import pick_device, resolve_precision

settings = Settings()
checkpoint = Checkpoint(settings.model_dir)
device = pick_device(settings.device)
precision = resolve_precision(settings.precision, device)
if device.type == "cpu":
    torch_engine.set_threads(settings.torch_threads, settings.torch_interop_threads)
classify = pipeline(  # type: ignore[call-overload]  # its overloads want a PreTrainedModel; load_model says nn.Module
    "text-classification",
    model=torch_engine.load_model(checkpoint, device, precision),
    tokenizer=AutoTokenizer.from_pretrained(checkpoint.dir, local_files_only=True),
    top_k=None,
    device=device,
)
app = FastAPI(title="naive baseline")


class PredictRequest(BaseModel):
    text: list[str]


@app.post("/predict")
def predict(body: PredictRequest) -> dict[str, list[list[dict[str, float | str]]]]:
    """One pipeline call per request (FastAPI runs it in its thread pool, as a plain `def` route)."""
    with torch_engine.arithmetic(device, precision):
        return {"predictions": classify(body.text, truncation=True)}


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "healthy"}

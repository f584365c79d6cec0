"""The bare endpoint (a benchmark subject): FastAPI answering /predict with a constant of the
service's response shape. The ceiling the cache-hit path is compared against: HTTP + JSON only.
Run: `python -m uvicorn benchmarks.bare_app:app`.
"""

from __future__ import annotations

import orjson
from fastapi import FastAPI, Request, Response

ANSWER = orjson.dumps(
    {"predictions": [[{"label": "POSITIVE", "score": 0.9998}, {"label": "NEGATIVE", "score": 0.0002}]]}
)
app = FastAPI(title="bare endpoint")


@app.post("/predict")
async def predict(request: Request) -> Response:
    await request.body()
    return Response(ANSWER, media_type="application/json")


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "healthy"}

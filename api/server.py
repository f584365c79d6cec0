"""Runs the API under uvicorn (`sentiment api`, and the API half of `sentiment serve`)."""

from __future__ import annotations

import uvicorn

from api.app import create_app
from sentiment.settings import Settings


def run(settings: Settings, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM; uvicorn then stops accepting and drains in-flight requests."""
    uvicorn.run(
        create_app(settings), host=host, port=port, log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5, log_config=None,
    )

"""Runs the API under uvicorn (`sentiment api`, and the API half of `sentiment serve`)."""

from __future__ import annotations

import signal
import sys

import uvicorn

from api.app import create_app
from sentiment.settings import Settings


def run(settings: Settings, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM; uvicorn then stops accepting and drains in-flight requests."""
    # uvicorn re-raises the stop signal once drained: make that a clean exit (status 0, callers'
    # `finally` blocks run) instead of death by signal or a KeyboardInterrupt traceback.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(0))
    uvicorn.run(
        create_app(settings), host=host, port=port, log_level=settings.log_level.lower(),
        access_log=settings.log_level.upper() in ("DEBUG", "INFO"),  # else uvicorn still builds each line
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5, log_config=None,
    )

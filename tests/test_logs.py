"""Quiet logs: an idle jobs worker logs nothing at INFO (RQ's routine maintenance is DEBUG)."""

from __future__ import annotations

import logging

import fakeredis
import pytest

from batcher.inference import Inference
from batcher.jobs import serve_jobs
from core.settings import Settings
from model_store.classifier import Classifier

CLEANING = "cleaning registries"


def maintenance_records(caplog: pytest.LogCaptureFixture, settings: Settings, classifier: Classifier) -> list:
    """The records of one burst run of the jobs worker on an empty queue, which runs RQ's maintenance once."""
    redis = fakeredis.FakeRedis()
    caplog.clear()
    serve_jobs(settings, Inference.for_jobs(settings, classifier, redis), redis, burst=True)
    return [r for r in caplog.records if r.name.startswith("rq")]


def test_rqs_routine_maintenance_logs_at_debug_not_info(
    settings: Settings, classifier: Classifier, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen = maintenance_records(caplog, settings.model_copy(update={"log_level": "DEBUG"}), classifier)
    cleaning = [r for r in seen if CLEANING in r.getMessage()]
    assert cleaning and {r.levelno for r in cleaning} == {logging.DEBUG}  # it ran, at DEBUG
    seen = maintenance_records(caplog, settings.model_copy(update={"log_level": "INFO"}), classifier)
    assert seen and not [r for r in seen if "cleaning" in r.getMessage()]  # at INFO: RQ's other lines only

"""The FastAPI application: Redis pool, result waiter, routes and the gRPC service, wired in the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import redis as sync_redis
from cachetools import TTLCache
from fastapi import FastAPI
from redis.asyncio import Redis

from api import docs_page, errors, hugging_face, metrics
from api.access import AccessControl, ApiKeys, document
from api.admission import Admission, Load
from api.hot_path import HotPathApp
from api.inference import infer_body_limit
from api.inference_grpc import GrpcServer
from api.inference_protocol import INFER_PATHS, inference_protocol_router
from api.job_store import JobStore
from api.jobs import jobs_router
from api.limits import BodyLimit, body_limit
from api.predictions import ModelInfoCache, Predictor
from api.rate_limit import RateLimit
from api.results import ResultWaiter
from api.routes import add_predict_route, router
from core.protocol import Keys, Prediction
from core.redis_connect import async_client, is_sentinel, sync_client
from core.settings import Settings


def create_app(
    settings: Settings | None = None,
    redis: Redis | None = None,
    jobs_redis: sync_redis.Redis | None = None,
    problem: Callable[[], str | None] | None = None,
    grpc: GrpcServer | None = None,
) -> FastAPI:
    """The app for `settings` (default: from the environment); tests may hand in their own Redis
    (`jobs_redis`: the synchronous client bulk jobs use, as RQ is synchronous). `problem`: what else
    /ready reports, when it has something to say (`sentiment serve`'s supervisor: a worker down).
    `grpc`: the gRPC service to run beside the routes, on the same `Predictor` (`api.server`)."""
    settings = settings or Settings()
    app = HotPathApp(
        title="sentiment-batcher",
        summary="DistilBERT SST-2 sentiment, micro-batched behind a Redis queue.",
        version="0.1.0",
        lifespan=_lifespan(settings, redis, jobs_redis, problem, grpc),
        docs_url=None,  # FastAPI's pages load from a CDN: docs_page serves them from the app
        redoc_url=None,
        # FastAPI's own OpenTelemetry keeps its span of each request, which a configured tracer provider
        # (`core.tracing`'s, or one the user set up) picks up; its metrics and logs are off, since the
        # service exports Prometheus metrics and logs through `logging`: each signal left on looks up
        # its provider on every request (docs/tuning.md, "/predict without FastAPI's request handler").
        telemetry={"metrics": False, "logs": False},
    )
    _add_routes(app, settings)
    _add_middleware(app, settings)
    errors.document(app)
    document(app, keys_on=bool(settings.api_keys), rate_limit_on=settings.rate_limit_per_s is not None)
    return app


def _lifespan(
    settings: Settings,
    redis: Redis | None,
    jobs_redis: sync_redis.Redis | None,
    problem: Callable[[], str | None] | None,
    grpc: GrpcServer | None,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """What the app holds while it serves (`app.state`), made at start-up and closed at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = redis or async_client(
            settings.redis_url,
            settings.redis_timeout_s,
            max_connections=settings.redis_max_connections,
            pool_wait_s=settings.request_timeout_s,
        )
        keys = Keys(settings.key_prefix)
        # Behind Sentinel a failover may lose work: waits push it again (`api.results`).
        waiter = ResultWaiter(client, keys, requeue=is_sentinel(settings.redis_url), silence_s=settings.redis_timeout_s)
        waiter.start()
        _predicting(app, settings, client, keys, waiter, problem)
        jobs_client = jobs_redis or sync_client(
            settings.redis_url, settings.redis_timeout_s, max_connections=settings.redis_max_connections
        )
        app.state.jobs = JobStore(jobs_client, settings)
        app.state.scrape = metrics.scrape_state(jobs_client, app.state.jobs.queue, settings.key_prefix)
        try:
            if grpc is not None:
                await grpc.start(app)
            yield
        finally:
            if grpc is not None:  # (its calls in flight end by their deadline)
                await grpc.stop(settings.request_timeout_s)
            await waiter.stop()
            if redis is None:
                await client.aclose()
            if jobs_redis is None:
                jobs_client.close()

    return lifespan


def _predicting(
    app: FastAPI,
    settings: Settings,
    client: Redis,
    keys: Keys,
    waiter: ResultWaiter,
    problem: Callable[[], str | None] | None,
) -> None:
    """The prediction path's state: Redis, the announced model, the `Predictor` and its caches, the rate limit."""
    app.state.redis = client
    app.state.keys = keys
    app.state.problem = problem
    app.state.models = ModelInfoCache(client, keys)
    local_cache: TTLCache[str, Prediction] | None = (
        TTLCache(settings.local_cache_size, settings.cache_ttl_s) if settings.local_cache_size else None
    )
    admission = Admission(Load(client, keys)) if settings.overload_policy == "deadline" else None
    app.state.predictor = Predictor(
        client,
        keys,
        waiter,
        app.state.models,
        settings.request_timeout_s,
        settings.max_queue_depth,
        local_cache,
        settings.max_request_chars,
        admission,
    )
    if settings.rate_limit_per_s is not None:
        app.state.rate_limit = RateLimit(client, keys, settings.rate_limit_per_s, settings.rate_limit_burst)


def _add_routes(app: FastAPI, settings: Settings) -> None:
    """Every route, and the handlers that answer their errors."""
    add_predict_route(app, settings)  # first: the router tries routes in order, and /predict is the hot one
    docs_page.install(app)
    app.include_router(jobs_router(settings))
    app.include_router(inference_protocol_router(settings))
    hugging_face.add_text_classification_route(app, settings.max_texts, settings.max_chars, settings.request_timeout_s)
    app.include_router(router)
    app.include_router(metrics.router)
    errors.install(app)


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    """The layers every request passes; the last added runs first, so a caller is checked before its
    body is read, and refused requests are timed too."""
    app.add_middleware(
        BodyLimit,
        limits={
            "/predict": body_limit(settings.max_texts, settings.max_chars),
            "/jobs": body_limit(settings.jobs_max_texts, settings.max_chars),
            **dict.fromkeys(INFER_PATHS, infer_body_limit(settings.max_texts, settings.max_chars)),
            hugging_face.PATH: hugging_face.body_limit_of(settings.max_texts, settings.max_chars),
        },
        timeout_s=settings.request_timeout_s,
        timed=("/predict", *INFER_PATHS, hugging_face.PATH),
    )
    if settings.api_keys or settings.rate_limit_per_s is not None:  # nothing to check: no layer to pass
        app.add_middleware(AccessControl, keys=ApiKeys(settings.api_keys or []), timeout_s=settings.request_timeout_s)
    app.add_middleware(metrics.RequestMetrics)  # outermost

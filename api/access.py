"""Who may call the API: optional API keys, then an optional per-client rate limit.

One ASGI middleware in front of every route and mount, so /metrics and any route added later are
covered by default; the gRPC service asks the same `check` (`api.inference_grpc`). Only `OPEN_PATHS`
are exempt: the probes (/health, /ready, and the Open Inference Protocol's, which Triton's and KServe's
deployments probe), since a kubelet HTTP probe cannot send a secret header and they tell only whether
this pod can serve; and the docs (/docs, /redoc, their assets, /openapi.json), since a browser loads
them before anyone can type a key into Swagger's Authorize dialog, which then sends it with each call
(the schema's `securitySchemes`). Prometheus' scrapes of /metrics (`SCRAPES`) need a key like any
call but are never rate-limited: a scraper sharing a client's key or address must not use its bucket.

Keys are compared as SHA-256 digests with `hmac.compare_digest` against every configured key:
constant time, no early exit on a match, no length leak. A client is named by its key's digest
(never the key) or, with keys off, by its address (`address_client`: one name over HTTP and gRPC);
the name keys its token bucket.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
from dataclasses import dataclass
from typing import Any, Never, cast

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from api.deadline import Deadline, Stage, request_deadline
from api.docs_page import ASSETS, DOCS, OPENAPI, REDOC
from api.errors import ErrorType, ServiceError, error_response, responses
from api.rate_limit import RateLimit
from core.protocol import DEFAULT_CLIENT

PROBES = frozenset({"/health", "/ready", "/v2/health/live", "/v2/health/ready"})
OPEN_PATHS = PROBES | {DOCS, REDOC, OPENAPI}  # the README's Security section names the same
SCRAPES = frozenset({"/metrics"})
SCHEMES = {
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "Bearer": {"type": "http", "scheme": "bearer"},
}


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class ApiKeys:
    """The configured keys, held only as digests."""

    def __init__(self, keys: list[SecretStr]) -> None:
        self._digests = [_digest(k.get_secret_value()) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def client(self, presented: str) -> str | None:
        """The client name of a configured key (a digest prefix), else None."""
        digest = _digest(presented)
        known = False
        for d in self._digests:  # every key, always: the time says nothing about which matched
            known |= hmac.compare_digest(digest, d)
        return f"key-{digest.hex()[:16]}" if known else None


def client_of(scope: Scope) -> str:
    """The client a request queues work for, to be served in turn with others (`batcher.plan`) and
    refused first when it holds the most (`api.predictions`): its API key's name, else the one default."""
    state: dict[str, str] = scope.get("state") or {}
    return state.get("client", DEFAULT_CLIENT)


def address_client(address: str) -> str:
    """The client named by its address, one name however a transport writes it: `::1` (HTTP's),
    `[::1]` (gRPC's peer), or an IPv4 address mapped into IPv6 (`::ffff:10.0.0.1`, from a dual-stack
    socket) as the IPv4 address. An IPv6 address is named by its /64 (`2001:db8::/64`): one host or
    home holds a whole /64 and could take a new address, and bucket, for each request. What is no IP
    address (a Unix socket's) is kept as it is."""
    try:
        ip = ipaddress.ip_address(address.removeprefix("[").removesuffix("]"))
    except ValueError:
        return f"addr-{address}"
    if isinstance(ip, ipaddress.IPv4Address):
        return f"addr-{ip}"
    return f"addr-{ip.ipv4_mapped or ipaddress.IPv6Network((ip, 64), strict=False)}"


class ForwardedFor:
    """A gRPC caller's address as uvicorn names an HTTP caller's: behind a proxy `FORWARDED_ALLOW_IPS`
    names, the `x-forwarded-for` entry that proxy vouches for (else every client behind it would share
    the proxy's bucket); unset, the peer's own. uvicorn's own layer applies its own rules to a call's
    metadata, so that the two transports cannot differ."""

    def __init__(self) -> None:
        trusted = os.environ.get("FORWARDED_ALLOW_IPS")
        self._proxy = None if trusted is None else ProxyHeadersMiddleware(_nothing, trusted)

    async def client(self, peer: str, metadata: list[tuple[bytes, bytes]]) -> str:
        """The address of the caller whose gRPC peer is `peer` (bare, or `[IPv6]`)."""
        address = peer.removeprefix("[").removesuffix("]")
        if self._proxy is None:
            return address
        scope = {"type": "http", "client": (address, 0), "headers": metadata}
        await self._proxy(cast("Any", scope), _unused, _unused)  # (uvicorn types its scope in a private module)
        return str(scope["client"][0])


async def _nothing(scope: object, receive: object, send: object) -> None:
    """The app behind `ForwardedFor`'s uvicorn layer: only the scope that layer rewrites is wanted."""


async def _unused(*_: object) -> Never:
    raise AssertionError("uvicorn's proxy layer neither reads nor sends")


def is_open(path: str) -> bool:
    """Whether `path` needs no key and counts against no rate limit (`OPEN_PATHS`, the docs' assets)."""
    return path in OPEN_PATHS or path.startswith(ASSETS + "/")


def presented_key(headers: Headers) -> str | None:
    """The key from `X-API-Key`, else from `Authorization: Bearer`; without the whitespace around it,
    which is no part of a header's value (RFC 9110) but which uvicorn and gRPC pass on."""
    if key := headers.get("x-api-key", "").strip():
        return key
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


@dataclass(frozen=True)
class Denied:
    """Why a caller is turned away, and when it may come back."""

    error_type: ErrorType
    message: str
    retry_after_s: int | None = None


async def check(
    keys: ApiKeys, limit: RateLimit | None, presented: str | None, address: str, deadline: Deadline
) -> str | Denied:
    """The client a call comes from (its key's name, or `address_client` with keys off), or why it
    is refused: no key (401), a wrong key (403), its token bucket empty (429), its deadline reached
    (504: the rate limit waits on Redis no longer than the request's deadline)."""
    try:
        deadline.enter(Stage.AUTHENTICATION)
        return await _check(keys, limit, presented, address, deadline)
    except ServiceError as exc:
        return Denied(exc.error_type, exc.message)


async def _check(
    keys: ApiKeys, limit: RateLimit | None, presented: str | None, address: str, deadline: Deadline
) -> str | Denied:
    if keys:
        if presented is None:
            return Denied(ErrorType.UNAUTHORIZED, "an API key is required (X-API-Key or Authorization: Bearer)")
        client = keys.client(presented)
        if client is None:
            return Denied(ErrorType.FORBIDDEN, "this API key is not valid")
    else:
        client = address_client(address)
    if limit is None:
        return client
    async with deadline.redis_call(Stage.RATE_LIMIT):
        wait = await limit.take(client)
    if wait is not None:
        return Denied(
            ErrorType.RATE_LIMITED, "too many requests from this client; retry later", max(1, math.ceil(wait))
        )
    return client


class AccessControl:
    """ASGI middleware: 401 without a key, 403 with a wrong one, 429 once the client's bucket is empty,
    504 at the request's deadline, which it fixes (`api.deadline`; a bad `X-Request-Timeout` is the
    route's to refuse, the default meanwhile): `timeout_s`, the service's request timeout."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, timeout_s: float) -> None:
        self.app = app
        self.keys = keys
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            deadline = request_deadline(scope, headers, self.timeout_s)
        except RequestValidationError:
            deadline = Deadline(self.timeout_s)
        presented = presented_key(headers) if self.keys else None
        address = (scope.get("client") or ("unknown",))[0]
        limit = None if scope["path"] in SCRAPES else getattr(scope["app"].state, "rate_limit", None)
        client = await check(self.keys, limit, presented, address, deadline)
        if isinstance(client, Denied):
            await error_response(client.error_type, client.message, client.retry_after_s)(scope, receive, send)
            return
        if self.keys:
            scope.setdefault("state", {})["client"] = client  # whose work it queues (`client_of`)
        await self.app(scope, receive, send)


def document(app: FastAPI, keys_on: bool, rate_limit_on: bool) -> None:
    """State in the OpenAPI schema what `AccessControl` enforces: the key schemes, 401/403/429."""
    refusals = [ErrorType.UNAUTHORIZED, ErrorType.FORBIDDEN] if keys_on else []
    if rate_limit_on:
        refusals.append(ErrorType.RATE_LIMITED)
    if not refusals:
        return
    build = app.openapi
    error_body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    extra = {
        str(status): {"description": spec["description"], "content": error_body}
        for status, spec in responses(*refusals).items()
    }

    def openapi() -> dict[str, Any]:
        if (schema := app.openapi_schema) is None:
            schema = build()  # (and kept as `app.openapi_schema`)
            if keys_on:
                schema.setdefault("components", {})["securitySchemes"] = SCHEMES
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    if path in OPEN_PATHS:
                        operation["security"] = []
                        continue
                    if keys_on:
                        operation["security"] = [{name: []} for name in SCHEMES]
                    operation["responses"].update(extra)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend its schema

"""One error shape, `{"error", "error_type", ...}` (`api/errors.py`), for every status the API answers,
on every route family (REST, the Open Inference Protocol, /jobs, Hugging Face's `POST /`), and an
OpenAPI document that says so: each answer is checked against the schema the document gives for it."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import fakeredis
import grpc
import httpx
import jsonschema
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from starlette.types import Message

from api.app import create_app
from api.errors import ERRORS, ErrorBody, ErrorType
from core.protocol import Keys
from core.settings import Settings
from tests.conftest import examples
from tests.test_abandoned import asgi_post
from tests.test_api import announce

pytestmark = pytest.mark.anyio

KEY = "k" * 20 + "-errors-test"
INFER = "/v2/models/tiny/infer"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def started(settings: Settings, fake_server: fakeredis.FakeServer) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, fakeredis.FakeAsyncRedis(server=fake_server), fakeredis.FakeRedis(server=fake_server))

    @app.get("/raises", include_in_schema=False)
    async def raises() -> None:
        """A bug, to see the 500's shape."""
        raise RuntimeError("a bug")

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


@pytest.fixture
async def client(settings: Settings, fake_server: fakeredis.FakeServer) -> AsyncIterator[httpx.AsyncClient]:
    announce(fakeredis.FakeRedis(server=fake_server), Keys(settings.key_prefix))  # a model, no worker
    async for client in started(settings.model_copy(update={"max_chars": 20}), fake_server):
        yield client


@pytest.fixture
async def keyed(settings: Settings, fake_server: fakeredis.FakeServer) -> AsyncIterator[httpx.AsyncClient]:
    async for client in started(settings.model_copy(update={"api_keys": [SecretStr(KEY)]}), fake_server):
        yield client


# (method, path, request keywords, status, error_type): every route family, every error it answers
# on its own (the worker's 424/502/504 and Redis' 503 come through the same `error_response`).
CASES: list[tuple[str, str, dict[str, Any], int, ErrorType]] = [
    ("GET", "/no-such-path", {}, 404, ErrorType.NOT_FOUND),
    ("GET", "/docs/assets/no-such-file.js", {}, 404, ErrorType.NOT_FOUND),
    ("GET", "/jobs/" + "0" * 32, {}, 404, ErrorType.NOT_FOUND),
    ("DELETE", "/jobs/" + "0" * 32, {}, 404, ErrorType.NOT_FOUND),
    ("GET", "/v2/models/another", {}, 404, ErrorType.NOT_FOUND),
    ("POST", "/v2/models/another/infer", {"json": {}}, 404, ErrorType.NOT_FOUND),
    ("GET", "/predict", {}, 405, ErrorType.METHOD_NOT_ALLOWED),
    ("PUT", "/jobs", {}, 405, ErrorType.METHOD_NOT_ALLOWED),
    ("GET", INFER, {}, 405, ErrorType.METHOD_NOT_ALLOWED),
    ("GET", "/", {}, 405, ErrorType.METHOD_NOT_ALLOWED),
    ("DELETE", "/health", {}, 405, ErrorType.METHOD_NOT_ALLOWED),
    ("POST", "/predict", {"json": {"text": ["x" * 21]}}, 422, ErrorType.INVALID_REQUEST),
    ("POST", "/predict", {"content": b"{"}, 422, ErrorType.INVALID_REQUEST),
    # a Content-Length that is no number ("²" passes str.isdigit) is no size: the body is counted as it comes
    ("POST", "/predict", {"content": b"{", "headers": {"content-length": b"\xb2"}}, 422, ErrorType.INVALID_REQUEST),
    ("POST", "/jobs", {"json": {"text": []}}, 422, ErrorType.INVALID_REQUEST),
    ("POST", "/jobs", {"content": b"[" * 10_000 + b"]" * 10_000}, 422, ErrorType.INVALID_REQUEST),
    ("POST", INFER, {"json": {"inputs": [{"name": "text"}]}}, 422, ErrorType.INVALID_REQUEST),
    ("POST", "/", {"json": {"inputs": "x", "parameters": {"top_k": 0}}}, 422, ErrorType.INVALID_REQUEST),
    (
        "POST",
        "/predict",
        {"content": b"text", "headers": {"content-type": "text/plain"}},
        415,
        ErrorType.UNSUPPORTED_MEDIA_TYPE,
    ),
    ("POST", "/", {"content": b"x" * 1_000_000}, 413, ErrorType.TOO_LARGE),
    ("GET", "/ready", {}, 503, ErrorType.NOT_READY),
    ("GET", "/v2/health/ready", {}, 503, ErrorType.NOT_READY),
    ("GET", "/raises", {}, 500, ErrorType.INTERNAL),
]


def test_every_error_type_has_its_http_status_and_its_grpc_status_code() -> None:
    """One spec per kind carries both: a kind cannot be added with one only."""
    assert set(ERRORS) == set(ErrorType)
    for error_type, spec in ERRORS.items():
        assert 400 <= spec.status < 600, error_type
        assert isinstance(spec.grpc_status, grpc.StatusCode) and spec.grpc_status is not grpc.StatusCode.OK, error_type


def check_shape(response: httpx.Response, status: int, error_type: ErrorType) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error_type"] == error_type.value and ERRORS[error_type].status == status
    assert isinstance(body["error"], str) and body["error"], body
    return body


@pytest.mark.parametrize(("method", "path", "request_", "status", "error_type"), CASES)
async def test_every_status_answers_the_one_shape(
    client: httpx.AsyncClient, method: str, path: str, request_: dict[str, Any], status: int, error_type: ErrorType
) -> None:
    response = await client.request(method, path, **request_)
    body = check_shape(response, status, error_type)
    if status == 405:
        assert response.headers["allow"] and response.headers["allow"] in body["error"]
    if status == 422:  # FastAPI's list, inside: each offending field
        assert body["detail"] and all({"loc", "msg", "type"} <= set(error) for error in body["detail"])
        assert body["error"].startswith(".".join(str(part) for part in body["detail"][0]["loc"]))
    if status == 503 and error_type is ErrorType.NOT_READY and path == "/ready":
        assert (body["status"], body["reason"]) == ("not ready", body["error"])  # /ready's own fields too


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/health", "GET, HEAD"),  # HEAD is answered as GET (api/hot_path.py)
        ("PUT", "/jobs/" + "0" * 32, "DELETE, GET, HEAD"),  # two routes, one path
        ("HEAD", "/predict", "POST"),
        ("HEAD", "/jobs", "POST"),
        ("POST", "/docs/assets/app.js", "GET, HEAD"),  # (a mount's own 405)
        ("POST", "/docs/assets/", "GET, HEAD"),  # (not POST /'s, the path past the mount)
    ],
)
async def test_a_405_says_every_method_the_path_takes_and_the_method_sent(
    client: httpx.AsyncClient, method: str, path: str, allow: str
) -> None:
    """RFC 9110 10.2.1: `Allow` lists the methods the resource takes: HEAD with GET, and those of
    every route of the path, not the first's; the message names the method the client sent."""
    response = await client.request(method, path)
    assert (response.status_code, response.headers["allow"]) == (405, allow)
    error = {"error": f"{method} {path}: this path takes {allow}", "error_type": "method_not_allowed"}
    body = json.dumps(error, separators=(",", ":")).encode()
    assert response.headers["content-length"] == str(len(body))  # (a HEAD's, of the body it leaves out)
    assert response.content == (b"" if method == "HEAD" else body)


async def test_refused_callers_get_the_one_shape(keyed: httpx.AsyncClient) -> None:
    check_shape(await keyed.get("/no-such-path"), 401, ErrorType.UNAUTHORIZED)
    check_shape(await keyed.post("/predict", json={"text": ["x"]}), 401, ErrorType.UNAUTHORIZED)
    check_shape(await keyed.get("/model", headers={"X-API-Key": "w" * 20}), 403, ErrorType.FORBIDDEN)


def schema_of(document: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any]:
    """The schema the OpenAPI document gives this operation's answer with `status` (else its `default`)."""
    answers = document["paths"][path][method.lower()]["responses"]
    answer = answers.get(str(status), answers["default"])
    return {**answer["content"]["application/json"]["schema"], "components": document["components"]}


async def test_each_error_is_what_the_openapi_document_says(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    templates = {"/jobs/" + "0" * 32: "/jobs/{job_id}", "/v2/models/another": "/v2/models/{name}"}
    for method, path, request_, status, _ in CASES:
        template = templates.get(path, path.replace("/another/", "/{name}/").replace("/tiny/", "/{name}/"))
        operation = document["paths"].get(template, {})
        if method.lower() not in operation:
            continue  # (an unknown path or method: the `default` of every operation, checked below)
        response = await client.request(method, path, **request_)
        schema = schema_of(document, template, method, status)
        jsonschema.validate(response.json(), schema)  # `$ref`s resolve against `components`
    unknown = await client.get("/no-such-path")
    jsonschema.validate(unknown.json(), schema_of(document, "/predict", "POST", 404))


async def test_the_openapi_document_gives_every_error_the_one_shape(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]

    def resolved(schema: dict[str, Any]) -> dict[str, Any]:
        return schemas[schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema

    assert "HTTPValidationError" not in str(document)  # FastAPI's own 422 body is nowhere
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            answers = operation["responses"]
            assert "default" in answers, (method, path)
            for status, answer in answers.items():
                if status.startswith("2"):
                    continue
                schema = resolved(answer["content"]["application/json"]["schema"])
                assert {"error", "error_type"} <= set(schema["required"]), (method, path, status)
            if "requestBody" in operation:
                assert {"413", "415", "422"} <= set(answers), (method, path)
    assert set(resolved({"$ref": "#/components/schemas/ErrorType"})["enum"]) == {t.value for t in ErrorType}
    # Every route that answers texts with the model says its 422 may also be texts too long for it.
    for path, method in (("/predict", "post"), (INFER.replace("/tiny/", "/{name}/"), "post"), ("/", "post")):
        described = document["paths"][path][method]["responses"]["422"]["description"]
        assert described.split(", ") == [ErrorType.INVALID_REQUEST.value, ErrorType.TEXT_TOO_LONG.value], path
    assert schemas[ErrorBody.__name__]["required"] == ["error", "error_type"]


# ---------------------------------------------------------------- bodies every client can parse


ROUTES = ["/predict", "/jobs", INFER, "/"]


def strict_json(raw: bytes) -> Any:
    """`raw` parsed as RFC 8259 JSON, which has no NaN or Infinity (Python's parser takes them; a
    browser's `JSON.parse`, Go's and Java's parsers do not)."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(raw, parse_constant=refuse)


def body_for(path: str, value: object) -> dict[str, Any]:
    """`value` where each route wants its texts: a place that takes only strings."""
    if path == INFER:
        return {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": value}]}
    return {"inputs": value} if path == "/" else {"text": value}


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_a_non_finite_number_in_a_bad_body_is_quoted_in_json_a_strict_parser_reads(
    client: httpx.AsyncClient, path: str, constant: str
) -> None:
    """The parsers take NaN and Infinity (a JSON extension); a 422 quoting them must not write them bare."""
    content = json.dumps(body_for(path, ["ok", "CONSTANT"])).replace('"CONSTANT"', constant)
    response = await client.post(path, content=content.encode(), headers={"content-type": "application/json"})
    body = strict_json(response.content)
    assert (response.status_code, body["error_type"]) == (422, "invalid_request")
    assert constant in json.dumps(body["detail"])  # quoted as the client wrote it, as a string


@pytest.fixture(scope="module")
def sync_client() -> Iterator[TestClient]:
    """An app on its own fakeredis, a model announced and no worker, for Hypothesis (which runs no coroutines)."""
    settings = Settings(_env_file=None, key_prefix="strict", request_timeout_s=2)
    server = fakeredis.FakeServer()
    announce(fakeredis.FakeRedis(server=server), Keys(settings.key_prefix))
    with TestClient(
        create_app(settings, fakeredis.FakeAsyncRedis(server=server), fakeredis.FakeRedis(server=server))
    ) as client:
        yield client


# Any JSON document holding at least one non-finite number, anywhere in it.
leaves = (
    st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.sampled_from([math.nan, math.inf, -math.inf])
)
documents = st.recursive(
    leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
)


def non_finite_in(value: object) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(non_finite_in(item) for item in value)
    if isinstance(value, dict):
        return any(non_finite_in(item) for item in value.values())
    return False


@settings(max_examples=examples(60), deadline=None)
@given(value=documents.filter(non_finite_in), path=st.sampled_from(ROUTES))
def test_every_refusal_of_a_body_is_strict_json(sync_client: TestClient, value: object, path: str) -> None:
    response = sync_client.post(path, content=json.dumps(body_for(path, value)).encode())
    assert response.status_code == 422, response.text
    strict_json(response.content)


async def cut_off_upload(path: str, chunked: bool = False) -> list[Message]:
    """What the app sends for a POST whose client goes away after the first bytes of its body: of a
    declared size, or `chunked` (no Content-Length)."""
    server = fakeredis.FakeServer()
    announce(fakeredis.FakeRedis(server=server), Keys("cut"))
    app = create_app(
        Settings(_env_file=None, key_prefix="cut"),
        fakeredis.FakeAsyncRedis(server=server),
        fakeredis.FakeRedis(server=server),
    )
    arrivals: list[Message] = [{"type": "http.request", "body": b'{"text": ["', "more_body": True}]
    sent: list[Message] = []

    async def receive() -> Message:
        return arrivals.pop(0) if arrivals else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = asgi_post(path, b" " * 1000)  # (a body of 1,000 bytes declared, its first sent)
    if chunked:
        scope["headers"] = [(name, value) for name, value in scope["headers"] if name != b"content-length"]
    async with app.router.lifespan_context(app):
        await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("path", ROUTES)
async def test_a_client_gone_mid_upload_is_client_gone_not_a_bug(path: str, chunked: bool) -> None:
    """Nobody reads the answer, but the status is what the metrics record and the logs blame: a
    client that hangs up while sending is the 499 of one that hangs up while waiting, not a 500,
    whether its body was of a declared size or chunked."""
    sent = await cut_off_upload(path, chunked)  # (a bug's 500 would also raise here, for the server to log)
    assert sent and sent[0]["status"] == 499, sent
    assert json.loads(sent[1]["body"])["error_type"] == "client_gone"

"""Hostile input against the real processes (`sentiment api` + `sentiment worker`, tiny model).

schemathesis fuzzes every operation from the app's own /openapi.json; hypothesis throws arbitrary
JSON, deep nesting, surrogates, invalid UTF-8 and huge bodies at /predict and /jobs. Nothing may
answer 5xx but a deadline's own 503/504 (a request may ask for one it cannot meet); what is valid
must be answered correctly. Example counts are bounded to keep this fast.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import allow_header_conformance

from api.app import create_app
from api.limits import body_limit
from api.schemas import is_json
from api.server import MAX_HEAD_BYTES
from core.settings import Settings
from tests.conftest import Service, answers, examples, start_service, wait_for

MAX_TEXTS, MAX_CHARS, JOBS_MAX_TEXTS = 8, 200, 12  # small limits so generated bodies reach and cross them
# (a long deadline for the slow generated bodies; the schema names it: the X-Request-Timeout header's most)
SETTINGS = {"max_texts": MAX_TEXTS, "max_chars": MAX_CHARS, "jobs_max_texts": JOBS_MAX_TEXTS, "request_timeout_s": 30}


@pytest.fixture(scope="module")
def service(redis_url: str, tiny_model_dir: Path) -> Iterator[Service]:
    service = start_service(
        redis_url,
        tiny_model_dir,
        "fuzz",
        **{f"SENTIMENT_{name.upper()}": str(value) for name, value in SETTINGS.items()},
    )
    yield service
    assert service.stop() == [0, 0]


@pytest.fixture(scope="module")
def http(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=60) as client:
        yield client


# The schema the service serves, built from the same settings at collection time (schemathesis'
# lazy fixture loader does not run on this pytest); the first test checks the two are the same.
OPENAPI = create_app(Settings(_env_file=None, **SETTINGS)).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)
# Invalid data may also be refused for its size, before it is parsed (documented on both routes).
schema.config.checks.negative_data_rejection.expected_statuses.append("413")
# A request that asks for a deadline the service cannot meet (X-Request-Timeout: 5e-324) gets the
# deadline's own documented answers, refused at once (503) or cut at its deadline (504); no other 5xx.
schema.config.checks.not_a_server_error.expected_statuses.extend(["503", "504"])


def test_the_fuzzed_schema_is_the_served_one(http: httpx.Client) -> None:
    assert http.get("/openapi.json").json() == OPENAPI


@schema.parametrize()
@settings(max_examples=examples(50), deadline=None, suppress_health_check=list(HealthCheck))
def test_schemathesis_finds_no_server_error_and_no_schema_violation(case: schemathesis.Case, service: Service) -> None:
    # Every check: no 5xx, statuses and bodies as documented, invalid data refused, valid data accepted.
    # Except the 405's Allow header: Starlette lists only the methods of the first route matching the
    # path (GET /jobs/{id} and DELETE /jobs/{id} are two routes), a framework limitation, not input handling.
    case.call_and_validate(base_url=service.url, excluded_checks=[allow_header_conformance])


# Text that may hold lone surrogates (JSON "\ud800"), control characters and astral characters.
any_text = st.text(st.characters(codec=None) | st.characters(categories=["Cs"]), max_size=MAX_CHARS + 20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(any_text, inner, max_size=5),
    max_leaves=30,
)


def encode(body: object, ascii_only: bool) -> bytes:
    """JSON as a client would send it: \\u-escaped, or raw (lone surrogates then make invalid UTF-8)."""
    return json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def post(http: httpx.Client, path: str, content: bytes) -> httpx.Response:
    response = http.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code < 500, (response.status_code, response.text[:300])
    assert response.headers["content-type"] == "application/json"
    return response


def valid(texts: object, max_texts: int) -> bool:
    return (
        isinstance(texts, list)
        and 1 <= len(texts) <= max_texts
        and all(isinstance(t, str) and len(t) <= MAX_CHARS and t == t.encode("utf-8", "ignore").decode() for t in texts)
    )


@settings(max_examples=examples(60), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    texts=st.lists(any_text, max_size=JOBS_MAX_TEXTS + 2) | json_values,
    path=st.sampled_from(["/predict", "/jobs"]),
    ascii_only=st.booleans(),
)
def test_arbitrary_json_bodies_are_answered_or_refused_never_a_5xx(
    http: httpx.Client, texts: object, path: str, ascii_only: bool
) -> None:
    response = post(http, path, encode({"text": texts}, ascii_only))
    if valid(texts, MAX_TEXTS if path == "/predict" else JOBS_MAX_TEXTS):
        assert response.status_code == (200 if path == "/predict" else 202), response.text[:300]
        if path == "/predict":
            assert len(response.json()["predictions"]) == len(texts)  # type: ignore[arg-type]
    else:
        assert response.status_code == 422, response.text[:300]


@settings(max_examples=examples(30), deadline=None, suppress_health_check=list(HealthCheck))
@given(body=json_values, ascii_only=st.booleans())
def test_any_json_document_is_a_clean_4xx_or_an_answer(http: httpx.Client, body: object, ascii_only: bool) -> None:
    post(http, "/predict", encode(body, ascii_only))


@settings(max_examples=examples(20), deadline=None, suppress_health_check=list(HealthCheck))
@given(depth=st.integers(1, 100_000), kind=st.sampled_from(["[]", "{}"]))
def test_deep_nesting_is_refused_without_a_5xx(http: httpx.Client, depth: int, kind: str) -> None:
    opening, closing = kind
    nested = (opening if kind == "[]" else '{"a":') * depth + ("" if kind == "[]" else "1") + closing * depth
    content = f'{{"text": {nested}}}'.encode()
    status = post(http, "/predict", content).status_code
    assert status in (413, 422)


@settings(max_examples=examples(30), deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=2000))
def test_arbitrary_bytes_are_refused_without_a_5xx(http: httpx.Client, raw: bytes) -> None:
    assert post(http, "/predict", raw).status_code == 422


# Content-Type values near the line between JSON and not: parameters, case, `+json` suffixes, extra slashes.
content_types = st.builds(
    "{}/{}{}".format,
    st.sampled_from(["application", "Application", "APPLICATION", "text", "x"]),
    st.sampled_from(["json", "JSON", "vnd.api+json", "+json", "json-seq", "x/+json", "plain", "x-www-form-urlencoded"]),
    st.sampled_from(["", "; charset=utf-8", ";", "; a=b/c"]),
) | st.text(st.sampled_from("ajnosx+/;= -."), max_size=30).filter(lambda value: value == value.strip())


@settings(max_examples=examples(60), deadline=None, suppress_health_check=list(HealthCheck))
@given(content_type=content_types | st.just(""), path=st.sampled_from(["/predict", "/jobs"]))
def test_a_body_is_read_as_json_exactly_when_its_content_type_says_json_or_nothing(
    http: httpx.Client, content_type: str, path: str
) -> None:
    """Both routes draw the line where `is_json` does (`api.schemas.require_json`), so no
    body meets a parser it was not meant for: 415 or an answer, never a 422 or a 5xx."""
    headers = {"content-type": content_type} if content_type else {}
    response = http.post(path, content=b'{"text": ["ok"]}', headers=headers)
    if is_json(content_type):
        assert response.status_code == (200 if path == "/predict" else 202), response.text[:300]
    else:
        assert response.status_code == 415, response.text[:300]
        assert response.json()["error_type"] == "unsupported_media_type"


@pytest.mark.parametrize("path", ["/predict", "/jobs"])
def test_a_body_one_byte_over_the_limit_is_413_and_at_the_limit_is_parsed(http: httpx.Client, path: str) -> None:
    texts = MAX_TEXTS if path == "/predict" else JOBS_MAX_TEXTS
    limit = body_limit(texts, MAX_CHARS)
    over = post(http, path, b" " * (limit + 1))
    assert over.status_code == 413
    assert over.json() == {
        "error": f"request body larger than this route's limit of {limit} bytes",
        "error_type": "too_large",
    }
    at_limit = post(http, path, b'{"text": ["ok"]}'.ljust(limit))  # trailing whitespace is valid JSON
    assert at_limit.status_code in (200, 202)


def raw_request(service: Service, head: bytes, body_chunks: Iterable[bytes] = ()) -> bytes:
    """Send a request head and body chunks over a socket, never finishing the body; the reply."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            sock.sendall(chunk)
        reply = b""
        while not reply.endswith(b"}") and (received := sock.recv(65536)):  # the JSON error, or the close
            reply += received
        return reply


def to_the_close(service: Service, sent: bytes) -> bytes:
    """Send `sent` on a fresh connection; every byte the server answers, to its close."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:  # (a hang guard)
        sock.sendall(sent)
        reply = b""
        while received := sock.recv(65536):
            reply += received
        return reply


def test_an_announced_oversized_body_is_refused_before_a_byte_of_it_is_sent(service: Service) -> None:
    reply = raw_request(
        service,
        b"POST /predict HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 413") and b'"error_type":"too_large"' in reply


def test_a_chunked_body_is_refused_once_it_passes_the_limit_before_it_ends(service: Service) -> None:
    chunk = b" " * 10_000
    over = body_limit(MAX_TEXTS, MAX_CHARS) // len(chunk) + 1
    reply = raw_request(
        service,
        b"POST /predict HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(over)),  # and never the final empty chunk
    )
    assert reply.startswith(b"HTTP/1.1 413") and b'"error_type":"too_large"' in reply


def test_a_request_head_that_never_ends_is_refused_once_it_passes_its_limit(service: Service) -> None:
    """httptools keeps a header however long it grows: one connection sending an endless header would
    hold as much of the API's memory as it sent (200 MB of it, 370 MB more). Past the head's limit it
    is refused, in the error shape, and closed; a client still sending then reads the refusal (closed
    at once with more arriving, the server's socket is reset and the client's kernel drops the 431)."""
    piece = b"a" * 8192
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
        half = piece * (MAX_HEAD_BYTES // len(piece) // 2 + 1)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: api\r\nX-Long: " + half)  # each half under the limit,
        time.sleep(0.5)  # read apart: the read the head begins in counts too
        sock.sendall(half)
        sock.recv(1, socket.MSG_PEEK)  # the refusal has arrived, unread
        for _ in range(8):  # and the head goes on, never ending
            sock.sendall(piece)
        reply = b""
        while received := sock.recv(65536):
            reply += received
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error_type"] == "headers_too_large"
    assert httpx.get(f"{service.url}/health").status_code == 200  # (the server itself unharmed)


@pytest.mark.parametrize("reads", [1, 3])
def test_a_body_read_with_the_end_of_its_head_is_not_counted_as_head(service: Service, reads: int) -> None:
    """A read holding the end of a head and the body after it was counted whole against the head's
    limit: a fresh connection's first request, its head and /jobs body together over 64 KiB, each
    within its limit, was a 431, the body's bytes "headers"; so was a head that came in several reads
    (a long token, a proxy's headers), its body with the last."""
    body = b'{"text": ["a fine film"]}'.ljust(body_limit(JOBS_MAX_TEXTS, MAX_CHARS))  # (whitespace is valid JSON)
    head = b"POST /jobs HTTP/1.1\r\nHost: api\r\nX-Long: %s\r\nContent-Length: %d\r\n\r\n" % (
        b"a" * (MAX_HEAD_BYTES - 1000),
        len(body),
    )
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:  # (a hang guard)
        for sent in (head[:30], head[30:-100], head[-100:] + body) if reads == 3 else (head + body,):
            sock.sendall(sent)
            time.sleep(0.5)  # (each read apart)
        reply = b""
        while not reply.endswith(b"}") and (received := sock.recv(65536)):
            reply += received
    assert reply.startswith(b"HTTP/1.1 202"), reply


@pytest.mark.parametrize("sent", [b"", b"POST /predict HTTP/1.1\r\nHost: api\r\nX-Slow: "])
def test_a_connection_that_never_completes_a_request_head_is_closed(service: Service, sent: bytes) -> None:
    """A connection opened and left silent, or stopped midway through its head, held its socket for
    good: enough of them take every file descriptor the API has. Within uvicorn's keep-alive timeout
    (of the connection's opening, or of a later head's first byte) the server closes it."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:  # (a hang guard)
        sock.sendall(sent)
        assert sock.recv(65536) == b""  # closed, without an answer to a request it never made


@pytest.mark.parametrize(
    "sent",
    [
        b'POST /jobs HTTP/1.1\r\nHost: api\r\nContent-Length: 100\r\n\r\n{"text": [',
        b'POST /jobs HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\na\r\n{"text": [\r\n',
    ],
    ids=["content-length", "chunked"],
)
def test_a_body_that_stops_arriving_is_a_408_and_closed(service: Service, sent: bytes) -> None:
    """/jobs has no deadline (its bodies run to ~120 MB): a body that stopped short held its request and
    its connection for good. As nginx's client_body_timeout, a body with no byte for uvicorn's keep-alive
    timeout (not the whole body's time) is answered 408 and closed."""
    reply = to_the_close(service, sent)
    answered, _, body = reply.partition(b"\r\n\r\n")
    assert answered.startswith(b"HTTP/1.1 408") and b"connection: close" in answered.lower(), reply
    assert json.loads(body)["error_type"] == "upload_stalled"


def test_a_body_that_stops_arriving_after_its_answer_is_closed(service: Service) -> None:
    """Answered before its body was read (a 405), a request whose body went on trickling held its
    connection for good: each byte stopped uvicorn's keep-alive timer, which nothing started again."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:  # (a hang guard)
        sock.sendall(b"POST /health HTTP/1.1\r\nHost: api\r\nContent-Length: 100\r\n\r\n{")
        answer = b""
        while not answer.endswith(b"}"):
            answer += sock.recv(65536)
        sock.sendall(b" ")  # the body goes on, then stops
        assert answer.startswith(b"HTTP/1.1 405") and sock.recv(65536) == b""  # closed


def test_a_pipelined_body_is_not_timed_while_its_request_waits_its_turn(redis_url: str, tiny_model_dir: Path) -> None:
    """A request pipelined behind one still in flight is not read on (nginx reads it only once the first
    is answered), so the silence of its body is not its client's: it is timed once its turn comes.
    With no worker, the /predict ahead of it waits for its deadline."""
    service = Service(redis_url, tiny_model_dir, "pipelined")
    predict = b'{"text": ["a fine film"]}'
    try:
        service.start("api", "--port", str(service.port))  # (no worker)
        wait_for("the API", lambda: answers(f"{service.url}/health"))
        with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:  # (a hang guard)
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: api\r\nX-Request-Timeout: 9\r\nContent-Length: %d\r\n\r\n%s"
                % (len(predict), predict)
                + b'POST /jobs HTTP/1.1\r\nHost: api\r\nConnection: close\r\nContent-Length: 15\r\n\r\n{"text"'
            )
            time.sleep(7)  # (past the keep-alive timeout, before the /predict's deadline)
            sock.sendall(b': ["a"]}')
            reply = b""
            while received := sock.recv(65536):  # to the close, after the last answer
                reply += received
    finally:
        assert service.stop() == [0]
    late, accepted = reply.split(b"HTTP/1.1 ")[1:]
    assert late.startswith(b"504") and accepted.startswith(b"202"), reply


# Request heads httptools cannot parse, and why: uvicorn's own 400 answered them in plain text.
MALFORMED_HEADS = {
    b"GET /health HTTP/1.1\r\nHost: api\r\nX-A: a\x00b\r\n\r\n": "Invalid header value char",
    b"GET /health HTTP/1.1\r\nHost: api\r\nX-A: a\r\n b\r\n\r\n": "Unexpected whitespace after header value",
    b"POST /predict HTTP/1.1\r\nHost: api\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}": "Duplicate Content-Length",
    b"POST /predict HTTP/1.1\r\nHost: api\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}": (
        "Transfer-Encoding can't be present with Content-Length"
    ),
    b"GET /health HTTP/9.Z\r\nHost: api\r\n\r\n": "Invalid minor version",
    # (uvicorn's reading of the target fails: httptools says "User callback error")
    b"CONNECT api:443 HTTP/1.1\r\nHost: api:443\r\n\r\n": "the request target is not a path or a URL",
    b"GET http://[::1/health HTTP/1.1\r\nHost: api\r\n\r\n": "the request target is not a path or a URL",
}


@pytest.mark.parametrize(("head", "reason"), MALFORMED_HEADS.items())
def test_a_request_head_that_is_not_http_is_a_400_in_the_error_shape(
    service: Service, head: bytes, reason: str
) -> None:
    """What httptools refuses to parse is answered as every error is, a JSON body saying why, and the
    connection closed as uvicorn closes it (nothing after it can be read as a request)."""
    reply = to_the_close(service, head)
    answered, _, body = reply.partition(b"\r\n\r\n")
    assert answered.startswith(b"HTTP/1.1 400"), reply
    assert b"content-type: application/json" in answered.lower() and b"connection: close" in answered.lower()
    assert json.loads(body) == {"error": f"the request is not valid HTTP/1.1 ({reason})", "error_type": "bad_request"}


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_request_offering_an_upgrade_the_server_ignores_keeps_its_body(service: Service, framing: str) -> None:
    """`Upgrade: h2c` on a POST (curl --http2, Java's HttpClient and Spring's RestClient): the server
    answers in HTTP/1.1, as RFC 9110 7.8 lets it, the request with its body (httptools takes the
    bytes after such a head for the new protocol's: the app read an empty body, a 422), and the
    connection goes on to its next request."""
    body = b'{"text": ["a fine film"]}'
    framed = {
        "content-length": b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        "chunked": b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
    }[framing]
    offered = (
        b"POST /predict HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\nUpgrade: h2c\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n" + framed
    )
    reply = to_the_close(service, offered * 2 + b"GET /health HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
    *predicted, healthy = reply.split(b"HTTP/1.1 ")[1:]
    assert len(predicted) == 2 and all(p.startswith(b"200") and b'"predictions"' in p for p in predicted), reply
    assert healthy.startswith(b"200") and healthy.endswith(b'{"status":"healthy"}'), reply


def test_a_websocket_upgrade_is_answered_as_the_plain_request_it_also_is(service: Service) -> None:
    """The service has no WebSocket route: uvicorn took the upgrade and answered its own 403, plain text
    with an empty body, outside the error shape, logging two lines each time. As for h2c (RFC 9110 7.8:
    a server may ignore an upgrade), the GET is answered in HTTP/1.1, and the connection goes on."""
    offered = (
        b"GET /health HTTP/1.1\r\nHost: api\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    reply = to_the_close(service, offered + b"GET /missing HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
    healthy, missing = reply.split(b"HTTP/1.1 ")[1:]
    assert healthy.startswith(b"200") and healthy.endswith(b'{"status":"healthy"}'), reply
    assert missing.startswith(b"404") and b'"error_type":"not_found"' in missing, reply


def test_the_largest_valid_request_fits_every_encoding(http: httpx.Client) -> None:
    texts = ["é" * MAX_CHARS] * MAX_TEXTS  # 6 bytes a character once \\u-escaped
    for ascii_only in (True, False):
        response = post(http, "/predict", encode({"text": texts}, ascii_only))
        assert response.status_code == 200


@pytest.mark.parametrize(
    ("path", "coding"),
    [("/predict", b"gzip, chunked"), ("/jobs", b"gzip\r\nTransfer-Encoding: chunked"), ("/", b"x-rot13, Chunked")],
)
def test_a_body_in_a_transfer_coding_not_chunked_is_a_501_and_the_connection_goes_on(
    service: Service, path: str, coding: bytes
) -> None:
    """httptools strips the chunked framing and hands on what is under it, gzip's bytes read as JSON: a
    422 "JSON decode error" that misleads. RFC 9112 6.1: an unknown transfer coding is a 501, as nginx
    answers any but chunked; the framing still says where the body ends, so the connection goes on."""
    body = gzip.compress(b'{"text": ["a fine film"]}')
    head = b"POST %s HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\nTransfer-Encoding: %s\r\n\r\n"
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    reply = to_the_close(
        service,
        head % (path.encode(), coding) + chunked + b"GET /health HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
    )
    refused, healthy = reply.split(b"HTTP/1.1 ")[1:]
    assert refused.startswith(b"501"), reply
    error = json.loads(refused.partition(b"\r\n\r\n")[2])
    assert error["error_type"] == "not_implemented" and "transfer coding" in error["error"], error
    assert healthy.startswith(b"200") and healthy.endswith(b'{"status":"healthy"}'), reply

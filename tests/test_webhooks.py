"""Signed webhooks of bulk jobs: the address check (no server-side request forgery), then end to end
on a real redis-server with `sentiment api` and `sentiment jobs-worker` processes and a receiver on
127.0.0.1: signature checked with docs/jobs.md's own snippet, a 500 retried, a dead letter counted
by /metrics, a canceled job notified, a refused address refused before anything is sent.

Traffic only ever goes to loopback: refused addresses are literal (refused before any connection),
and the in-process tests send through httpx's MockTransport.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import pytest
from fastapi.testclient import TestClient
from redis import Redis

from api.app import create_app
from api.job_store import JobStore
from batcher.webhooks import Sender
from core.protocol import Keys
from core.settings import Settings
from core.webhooks import check_url, refusal
from tests.conftest import REPO, Service, wait_for

SECRET = "webhook-secret-for-tests"
PREFIX = "webhooks-e2e"
LOOPBACK = [ip_network("127.0.0.0/8")]


def docs_verify() -> Callable[[bytes, bytes, str], bool]:
    """The `verify` function docs/jobs.md gives receivers, run as written there."""
    section = (REPO / "docs" / "jobs.md").read_text().split("## Webhooks", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert code, "docs/jobs.md's Webhooks section has no Python snippet"
    scope: dict[str, Any] = {}
    exec(code.group(1), scope)
    return scope["verify"]


# The address check


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://10.1.2.3/hook", "10.1.2.3 is a private address"),
        ("http://192.168.0.10/hook", "private"),
        ("http://127.0.0.1:8000/hook", "127.0.0.1 is a loopback address"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),  # cloud metadata
        ("http://[::1]/hook", "::1 is a loopback address"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://[fd00::1]/hook", "private"),
        ("http://[::ffff:10.0.0.1]/hook", "10.0.0.1 is a private address"),  # IPv4 inside IPv6
        ("http://0.0.0.0/hook", "private"),
        ("http://100.64.0.1/hook", "reserved"),  # carrier-grade NAT
        ("http://224.0.0.1/hook", "reserved"),  # multicast
        ("ftp://example.com/hook", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("https://user:pass@example.com/hook", "no credentials"),
        ("https:///hook", "names a host"),
        ("https://example.com:99999/hook", "port"),
    ],
)
def test_a_callback_url_is_refused_with_the_reason(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        check_url(url, [])


@pytest.mark.parametrize(
    "url",
    ["https://93.184.215.14/hook", "http://[2606:4700::1111]:8080/hook", "https://hooks.example.com/x?token=1"],
)
def test_public_addresses_and_names_pass(url: str) -> None:
    check_url(url, [])  # a name's addresses are checked at each delivery


def test_an_allowed_network_opens_its_addresses_only() -> None:
    allowed = [ip_network("127.0.0.0/8"), ip_network("10.0.0.0/8"), ip_network("fd00::/8")]
    for address in ("127.0.0.1", "127.9.9.9", "10.1.2.3", "::ffff:10.1.2.3", "fd00::1"):
        assert refusal(ip_address(address), allowed) is None, address
    for address in ("::1", "192.168.0.1", "169.254.169.254", "fe80::1"):
        assert refusal(ip_address(address), allowed) is not None, address


# Delivery, in process (fakeredis; requests answered by httpx's MockTransport, nothing leaves the process)


@pytest.fixture
def settings() -> Settings:
    return Settings(
        key_prefix="hooks",
        webhook_secret=SECRET,
        webhook_allowed_networks=LOOPBACK,
        webhook_attempts=2,
        webhook_backoff_s=0.01,
    )


def canceled_job(fake: fakeredis.FakeRedis, settings: Settings, url: str) -> str:
    """A job with a webhook to `url`, canceled while queued: it has ended, its webhook is due."""
    store = JobStore(fake, settings)
    job_id = store.create(["a text"], url)
    store.delete(job_id)
    return job_id


def sender_seeing(
    settings: Settings, fake: fakeredis.FakeRedis, answer: Callable[[httpx.Request], httpx.Response]
) -> tuple[Sender, list[httpx.Request]]:
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return answer(request)

    return Sender(settings, fake, httpx.Client(transport=httpx.MockTransport(record))), sent


def dead_letters(client: Redis, keys: Keys) -> list[dict[str, Any]]:
    return [json.loads(entry) for entry in client.lrange(keys.webhook_dead_letters, 0, -1)]


def resolving(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    """Every name resolves to `address` (as a rebinding DNS server would answer)."""

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_a_name_is_connected_to_at_the_address_it_was_checked_at(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fakeredis.FakeRedis()
    job_id = canceled_job(fake, settings, "http://hooks.internal:8123/hook?x=1")
    resolving(monkeypatch, "127.0.0.5")
    sender, sent = sender_seeing(settings, fake, lambda _: httpx.Response(204))
    sender.tick()
    [request] = sent
    assert (request.url.host, request.url.port, request.url.raw_path) == ("127.0.0.5", 8123, b"/hook?x=1")
    assert request.headers["host"] == "hooks.internal:8123"
    assert json.loads(request.content)["job_id"] == job_id
    assert fake.keys(f"*{job_id}*") == [f"rq:job:{job_id}".encode()]  # delivered: the webhook is gone


def test_a_name_that_resolves_to_a_private_address_is_dead_lettered_without_a_connection(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fakeredis.FakeRedis()
    job_id = canceled_job(fake, settings, "https://rebinding.example/hook")  # a name: it passes POST
    resolving(monkeypatch, "10.0.0.7")
    sender, sent = sender_seeing(settings, fake, lambda _: httpx.Response(204))
    sender.tick()
    assert sent == []
    [letter] = dead_letters(fake, Keys(settings.key_prefix))
    assert letter["job_id"] == job_id and letter["host"] == "rebinding.example" and letter["attempts"] == 1
    assert letter["error"].startswith("rebinding.example resolves to 10.0.0.7 is a private address")


def test_a_redirect_is_not_followed_and_counts_as_a_failed_try(settings: Settings) -> None:
    fake = fakeredis.FakeRedis()
    job_id = canceled_job(fake, settings, "http://127.0.0.1:8123/hook")
    sender, sent = sender_seeing(
        settings, fake, lambda _: httpx.Response(302, headers={"Location": "http://10.0.0.1/"})
    )
    wait_for("the tries to run out", lambda: sender.tick() or dead_letters(fake, sender.keys))
    assert [r.url.host for r in sent] == ["127.0.0.1", "127.0.0.1"]  # webhook_attempts tries, no redirect followed
    assert dead_letters(fake, sender.keys)[0] | {"at": None} == {
        "job_id": job_id,
        "host": "127.0.0.1",
        "attempts": 2,
        "error": "HTTP 302",
        "at": None,
    }


def test_deleting_a_job_drops_its_undelivered_webhook(settings: Settings) -> None:
    fake = fakeredis.FakeRedis()
    job_id = canceled_job(fake, settings, "http://127.0.0.1:8123/hook")
    JobStore(fake, settings).delete(job_id)  # the second DELETE deletes the job
    sender, sent = sender_seeing(settings, fake, lambda _: httpx.Response(204))
    sender.tick()
    assert sent == [] and fake.keys(f"*{job_id}*") == []


def test_a_callback_url_without_a_webhook_secret_is_a_422_that_says_so() -> None:
    server = fakeredis.FakeServer()
    app = create_app(
        Settings(key_prefix="hooks"),
        redis=fakeredis.FakeAsyncRedis(server=server),
        jobs_redis=fakeredis.FakeRedis(server=server),
    )
    with TestClient(app) as client:
        response = client.post("/jobs", json={"text": ["x"], "callback_url": "https://example.com/hook"})
        assert response.status_code == 422
        assert "SENTIMENT_WEBHOOK_SECRET" in response.json()["detail"][0]["msg"]
        assert client.post("/jobs", json={"text": ["x"]}).status_code == 202  # no webhook: as before


# End to end: real processes, real Redis, a receiver on 127.0.0.1


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that records each POST and answers the statuses `plan` lists for its
    path, in turn, then 204."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.received: list[Delivery] = []
        self.plan: dict[str, list[int]] = {}
        self.lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def at(self, path: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.received if d.path == path]


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.received.append(Delivery(self.path, dict(self.headers), body))
            plan = self.server.plan.get(self.path, [])
            status = plan.pop(0) if plan else 204
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Stack:
    client: httpx.Client
    redis: Redis
    receiver: Receiver
    jobs_worker: Any
    keys = Keys(PREFIX)

    def submit(self, path: str) -> str:
        """A two-text job whose webhook goes to `path` on the receiver."""
        response = self.client.post("/jobs", json={"text": ["good", "bad"], "callback_url": self.receiver.url(path)})
        assert response.status_code == 202, response.text
        return response.json()["job_id"]

    def delivered(self, job_id: str) -> bool:
        """Whether the job's webhook is done with: delivered or dead-lettered."""
        return self.redis.zscore(self.keys.webhooks, job_id) is None


@pytest.fixture(scope="module")
def stack(redis_url: str, tiny_model_dir: Path) -> Iterator[Stack]:
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    service = Service(
        redis_url,
        tiny_model_dir,
        PREFIX,
        SENTIMENT_WEBHOOK_SECRET=SECRET,
        SENTIMENT_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
        SENTIMENT_WEBHOOK_ATTEMPTS="3",
        SENTIMENT_WEBHOOK_BACKOFF_S="0.05",
        SENTIMENT_HEARTBEAT_TTL_S="2",
    )
    service.start("api", "--port", str(service.port))
    jobs_worker = service.start("jobs-worker", "--priority", "normal", "--threads", "1")
    client = httpx.Client(base_url=service.url, timeout=10)

    def up() -> bool:
        try:
            return client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for("the API", up)
        yield Stack(client, Redis.from_url(redis_url), receiver, jobs_worker)
    finally:
        client.close()
        service.stop()
        receiver.shutdown()
        receiver.server_close()


def test_a_finished_job_posts_its_status_document_signed_as_the_docs_verify(stack: Stack) -> None:
    job_id = stack.submit("/finished")
    wait_for("the webhook", lambda: stack.receiver.at("/finished"))
    [delivery] = stack.receiver.at("/finished")
    assert delivery.body == stack.client.get(f"/jobs/{job_id}").content  # GET's very bytes
    assert json.loads(delivery.body)["status"] == "finished"
    assert delivery.headers["Content-Type"] == "application/json"
    assert re.fullmatch(r"[0-9a-f]{32}", delivery.headers["X-Sentiment-Delivery"])
    verify, signature = docs_verify(), delivery.headers["X-Sentiment-Signature"]
    assert verify(SECRET.encode(), delivery.body, signature)
    assert not verify(b"another-secret-of-16+", delivery.body, signature)
    assert not verify(SECRET.encode(), delivery.body.replace(b"finished", b"failed"), signature)
    assert not verify(SECRET.encode(), delivery.body, signature, tolerance_s=-1)  # too old: a replay
    wait_for("the webhook to be done with", lambda: stack.delivered(job_id))


def test_a_receiver_answering_500_gets_the_same_delivery_again_once(stack: Stack) -> None:
    stack.receiver.plan["/flaky"] = [500]
    job_id = stack.submit("/flaky")
    wait_for("the webhook to be delivered", lambda: stack.delivered(job_id) and len(stack.receiver.at("/flaky")) >= 2)
    first, second = stack.receiver.at("/flaky")  # a 500, then a 204: and no more
    assert first.body == second.body
    assert first.headers["X-Sentiment-Delivery"] == second.headers["X-Sentiment-Delivery"]
    assert docs_verify()(SECRET.encode(), second.body, second.headers["X-Sentiment-Signature"])
    assert job_id not in {json.loads(e)["job_id"] for e in stack.redis.lrange(stack.keys.webhook_dead_letters, 0, -1)}


def test_a_receiver_that_keeps_failing_ends_on_the_dead_letter_list_which_metrics_count(stack: Stack) -> None:
    stack.receiver.plan["/down"] = [500] * 10
    job_id = stack.submit("/down")
    wait_for("the webhook to give up", lambda: stack.delivered(job_id) and len(stack.receiver.at("/down")) == 3)
    letters = [json.loads(e) for e in stack.redis.lrange(stack.keys.webhook_dead_letters, 0, -1)]
    [letter] = [e for e in letters if e["job_id"] == job_id]
    assert (letter["host"], letter["attempts"], letter["error"]) == ("127.0.0.1", 3, "HTTP 500")
    metrics = stack.client.get("/metrics").text
    assert f"sentiment_webhook_dead_letters {float(len(letters))}" in metrics.splitlines()


def test_a_job_canceled_by_delete_notifies_its_callback(stack: Stack) -> None:
    client, worker = stack.client, stack.jobs_worker
    busy = client.post("/jobs", json={"text": [f"text {i} to keep the worker busy" for i in range(2000)]}).json()
    wait_for("the worker to be busy", lambda: client.get(busy["status_url"]).json()["status"] == "started")
    worker.send_signal(signal.SIGSTOP)  # mid-job, not waiting on the queue: the next job stays queued
    try:
        assert client.get(busy["status_url"]).json()["status"] == "started"
        job_id = stack.submit("/canceled")
        assert client.delete(f"/jobs/{job_id}").status_code == 204
    finally:
        worker.send_signal(signal.SIGCONT)
    assert client.delete(busy["status_url"]).status_code == 204  # the worker stops it at its next chunk
    wait_for("the webhook", lambda: stack.receiver.at("/canceled"))
    [delivery] = stack.receiver.at("/canceled")
    document = json.loads(delivery.body)
    assert (document["job_id"], document["status"]) == (job_id, "canceled")
    assert document["progress"] == {"done": 0, "total": 2}
    assert docs_verify()(SECRET.encode(), delivery.body, delivery.headers["X-Sentiment-Signature"])


@pytest.mark.parametrize(
    "url", ["http://10.1.2.3/hook", "http://169.254.169.254/latest", "http://[::1]:8000/hook", "http://u:p@127.0.0.1/"]
)
def test_a_refused_callback_url_is_a_422_and_nothing_is_sent_or_queued(stack: Stack, url: str) -> None:
    received, pending = len(stack.receiver.received), stack.redis.zcard(stack.keys.webhooks)
    queued = stack.redis.llen(f"rq:queue:{PREFIX}-jobs")
    response = stack.client.post("/jobs", json={"text": ["x"], "callback_url": url})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "callback_url"] and error["input"] == url
    assert "address" in error["msg"] or "credentials" in error["msg"]
    assert stack.redis.zcard(stack.keys.webhooks) == pending and stack.redis.llen(f"rq:queue:{PREFIX}-jobs") == queued
    assert len(stack.receiver.received) == received

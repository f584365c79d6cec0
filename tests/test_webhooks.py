"""Signed webhooks of bulk jobs: the secrets, the address check (no server-side request forgery), one
delivery in process (its own connection, TLS against the URL's host, one deadline, the claim), then
end to end on a real redis-server with `sentiment api` and `sentiment jobs-worker` processes and a
receiver on 127.0.0.1: Standard Webhooks' reference library verifies the deliveries (through
docs/jobs.md's own snippet), a 500 retried, a dead letter counted by /metrics, a canceled job
notified, a refused URL refused before anything is queued or sent.

Traffic only ever goes to loopback: refused addresses are refused before any connection, and names
resolve (monkeypatched) to 127.0.0.0/8, which the tests allow.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import pytest
import standardwebhooks
import trustme
from fastapi.testclient import TestClient
from pydantic import ValidationError
from redis import Redis

from api.app import create_app
from api.job_store import JobStore
from batcher.webhook_http import post
from batcher.webhooks import DUE_WEBHOOKS_EVERY_S, Sender
from core.protocol import Keys
from core.redis_errors import Backoff
from core.settings import Settings
from core.webhooks import check_url, refusal
from tests.conftest import REPO, Service, thread_stacks, wait_for


def whsec(seed: bytes, size: int = 32) -> str:
    """A Standard Webhooks secret of `size` bytes (made from `seed`, so a failure is reproducible)."""
    key = (hashlib.sha512(seed).digest() * 2)[:size]
    return "whsec_" + base64.b64encode(key).decode()


SECRET, OTHER_SECRET, UNKNOWN_SECRET = whsec(b"first"), whsec(b"second"), whsec(b"nobody's")
PREFIX = "webhooks-e2e"
LOOPBACK = [ip_network("127.0.0.0/8")]
# What the allow-list once let through (202) while refusing 169.254.169.254 itself.
CLOUD_METADATA_IN_IPV6 = [
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64
    "http://[2002:a9fe:a9fe::]/",  # 6to4
    "http://[::a9fe:a9fe]/",  # IPv4-compatible
    "http://[fec0::1]/",  # site-local
]


def docs_receive() -> Callable[[str, bytes, dict[str, str]], dict | None]:
    """The `receive` function docs/jobs.md gives receivers, run as written there."""
    section = (REPO / "docs" / "jobs.md").read_text().split("## Webhooks", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert code, "docs/jobs.md's Webhooks section has no Python snippet"
    scope: dict[str, Any] = {}
    exec(code.group(1), scope)
    return scope["receive"]


# The secrets


def test_webhook_secrets_are_standard_webhooks_secrets_listed_comma_separated() -> None:
    settings = Settings(webhook_secrets=f"{SECRET}, {OTHER_SECRET},")
    assert [s.get_secret_value() for s in settings.webhook_secrets or []] == [SECRET, OTHER_SECRET]
    assert Settings(webhook_secrets="").webhook_secrets is None  # none: webhooks off
    assert Settings(webhook_secrets=whsec(b"x", 25).rstrip("=")).webhook_secrets  # unpadded base64 too


@pytest.mark.parametrize(
    ("secrets", "why"),
    [
        ("a-plain-password-of-32-characters", "secret 1 of 1 is refused: it does not start with whsec_"),
        ("whsec_" + "!" * 40, "secret 1 of 1 is refused: it is not whsec_ then base64"),
        (whsec(b"short", 16), "it holds 16 bytes, not 24 to 64"),
        (whsec(b"long", 65), "it holds 65 bytes, not 24 to 64"),
        (f"{SECRET},whsec_dGVzdA", "secret 2 of 2 is refused: it holds 4 bytes"),
    ],
)
def test_a_malformed_webhook_secret_stops_the_settings_saying_why_never_what(secrets: str, why: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(why)) as error:
        Settings(webhook_secrets=secrets)
    assert secrets.split(",")[-1][6:] not in str(error.value)


# The address check: every address that is not global unicast, once the IPv4 inside is unwrapped

REFUSED = {
    "10.1.2.3": "10.1.2.3 is a private address",
    "172.16.0.1": "private",
    "192.168.0.10": "private",
    "127.0.0.1": "127.0.0.1 is a loopback address",
    "169.254.169.254": "169.254.169.254 is a link-local address",  # cloud metadata
    "0.0.0.0": "an unspecified address",
    "100.64.0.1": "a shared (carrier-grade NAT) address",
    "192.0.0.8": "an IETF protocol assignment address",
    "192.0.2.1": "private",  # documentation
    "192.88.99.1": "6to4 relay anycast",
    "198.18.0.1": "private",  # benchmarking
    "224.0.0.1": "a multicast address",
    "240.0.0.1": "a reserved address",
    "255.255.255.255": "reserved",
    "::": "an unspecified address",
    "::1": "::1 is a loopback address",
    "fe80::1": "a link-local address",
    "fd00::1": "a private address",
    "fec0::1": "fec0::1 is a site-local address",
    "ff02::1": "a multicast address",
    "ff0e::1": "a multicast address",
    "2001:db8::1": "private",  # documentation
    "3fff::1": "a documentation address",
    "100::1": "reserved",  # discard
    "4000::1": "a reserved address",  # not allocated
    "64:ff9b:1::a9fe:a9fe": "64:ff9b:1::a9fe:a9fe is a local-use NAT64 address",
    "::ffff:0:a9fe:a9fe": "reserved",  # IPv4-translated (SIIT)
    # IPv4 inside IPv6: judged as the IPv4 it carries
    "::ffff:10.0.0.1": "leads to 10.0.0.1 (IPv4-mapped), a private address",
    "::ffff:127.0.0.1": "leads to 127.0.0.1 (IPv4-mapped), a loopback address",
    "64:ff9b::a9fe:a9fe": "64:ff9b::a9fe:a9fe leads to 169.254.169.254 (NAT64), a link-local address",
    "64:ff9b::7f00:1": "leads to 127.0.0.1 (NAT64)",
    "2002:a9fe:a9fe::": "2002:a9fe:a9fe:: leads to 169.254.169.254 (6to4), a link-local address",
    "2002:a00:1::1": "leads to 10.0.0.1 (6to4), a private address",
    "::a9fe:a9fe": "::a9fe:a9fe leads to 169.254.169.254 (IPv4-compatible), a link-local address",
    "::7f00:1": "leads to 127.0.0.1 (IPv4-compatible)",
    "2001:0:a00:1::f7f7:f7f7": "leads to 10.0.0.1 (Teredo server), a private address",  # client 8.8.8.8
    "2001:0:4136:e378:8000:63bf:3fff:fdd2": "leads to 192.0.2.45 (Teredo client)",  # server public
}
ACCEPTED = [
    "8.8.8.8",
    "93.184.215.14",
    "2606:4700::1111",
    "2a00:1450:4001::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
    "::808:808",
    "2001:0:4136:e378:8000:63bf:f7f7:f7f7",  # Teredo: server 65.54.227.120, client 8.8.8.8
]


@pytest.mark.parametrize(("address", "why"), [*REFUSED.items(), *((a, None) for a in ACCEPTED)])
def test_every_address_but_global_unicast_is_refused_once_the_ipv4_inside_is_unwrapped(
    address: str, why: str | None
) -> None:
    url = f"http://[{address}]:8080/hook" if ":" in address else f"http://{address}:8080/hook"
    reason = refusal(ip_address(address), [])
    if why is None:
        assert reason is None
        check_url(url, [])
    else:
        assert reason is not None and why in reason and "SENTIMENT_WEBHOOK_ALLOWED_NETWORKS" in reason
        with pytest.raises(ValueError, match=re.escape(why)):
            check_url(url, [])


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("0x7f000001", "0x7f000001 leads to 127.0.0.1, a loopback address"),
        ("2130706433", "2130706433 leads to 127.0.0.1, a loopback address"),
        ("0177.0.0.1", "0177.0.0.1 leads to 127.0.0.1"),
        ("127.1", "127.1 leads to 127.0.0.1"),
        ("0xa9fea9fe", "0xa9fea9fe leads to 169.254.169.254, a link-local address"),
        ("2852039166", "leads to 169.254.169.254"),
        ("0251.0376.0251.0376", "leads to 169.254.169.254"),
        ("10.1", "10.1 leads to 10.0.0.1, a private address"),
    ],
)
def test_numeric_host_forms_are_the_addresses_they_spell(host: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        check_url(f"http://{host}/hook", [])


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.com/hook", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("https://user:pass@example.com/hook", "no credentials"),
        ("https:///hook", "names a host"),
        ("https://example.com:99999/hook", "port is a number from 1 to 65535"),
        ("https://example.com:0/hook", "port is a number from 1 to 65535"),  # never connected to: 10 tries, then dead
        ("https://example.com/a hook", "no spaces or control characters"),
        ("https://bücher.example/hook", "ASCII"),
        ("http://example.com/café", "percent-encoded"),  # an HTTP request line is ASCII: it could never be sent
        ("http://example.com/hook?name=José", "percent-encoded"),
        ("http://a..example.com/", "no empty label"),  # IDNA (and so the resolver) refuses both
        (f"http://{'a' * 70}.example.com/", "none over 63 characters"),
        (f"http://{'a.' * 127}example/", "at most 253 characters"),  # DNS's most
    ],
)
def test_a_callback_url_is_refused_with_the_reason(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        check_url(url, [])


def test_names_pass_until_delivery() -> None:
    check_url("https://hooks.example.com/x?token=1", [])  # a name's addresses are checked at each delivery


def test_a_percent_encoded_path_and_a_fragment_that_is_not_ascii_are_delivered(settings: Settings) -> None:
    """What the refusal of a path that is not ASCII asks for is delivered as written; a fragment is never sent."""
    fake = fakeredis.FakeRedis()
    with receiving() as receiver:
        for path in ("/caf%C3%A9?name=Jos%C3%A9", "/hook#café"):
            check_url(receiver.url(path), LOOPBACK)
            canceled_job(fake, settings, receiver.url(path))
        Sender(settings, fake).tick()
    assert sorted(d.path for d in receiver.received) == ["/caf%C3%A9?name=Jos%C3%A9", "/hook"]


@pytest.mark.parametrize(
    ("allowed", "address", "passes"),
    [
        ("10.0.0.0/8", "10.1.2.3", True),
        ("10.0.0.0/8", "::ffff:10.1.2.3", True),  # the same host, as IPv6 spells it
        ("10.0.0.0/8", "64:ff9b::a01:203", True),  # through NAT64
        ("10.0.0.0/8", "2002:a01:203::", True),  # through 6to4
        ("10.0.0.0/8", "192.168.0.1", False),
        ("10.0.0.0/8", "::ffff:192.168.0.1", False),
        ("127.0.0.0/8", "127.9.9.9", True),
        ("127.0.0.0/8", "::1", False),
        ("fd00::/8", "fd00::1", True),
        ("fec0::/10", "fec0::1", True),  # an operator may open what is refused by default
        ("2000::/3", "2001:db8::1", True),
        ("2000::/3", "2002:a9fe:a9fe::", False),  # an IPv6 network never opens the IPv4 it carries
        ("2000::/3", "2001:0:a00:1::f7f7:f7f7", False),
        ("64:ff9b::/96", "64:ff9b::a9fe:a9fe", False),
    ],
)
def test_an_allowed_network_opens_the_hosts_in_it(allowed: str, address: str, passes: bool) -> None:
    assert (refusal(ip_address(address), [ip_network(allowed)]) is None) == passes


# Delivery, in process: fakeredis, and receivers on 127.0.0.0/8


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    peer: tuple[str, int]


class Receiver(ThreadingHTTPServer):
    """An HTTP(S) server that records each request (POST, or any other) and answers the statuses `plan` lists for its path,
    in turn, then 204; it keeps connections open for more requests (HTTP/1.1) unless told not to."""

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        super().__init__((host, 0), Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self.received: list[Delivery] = []
        self.plan: dict[str, list[int]] = {}
        self.during: Callable[[], object] = lambda: None  # run as each request arrives
        self.lock = threading.Lock()

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.server_address[0]}:{self.server_address[1]}{path}"

    def at(self, path: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.received if d.path == path]


class Handler(BaseHTTPRequestHandler):
    server: Receiver
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.during()
        with self.server.lock:
            self.server.received.append(Delivery(self.path, dict(self.headers), body, self.client_address))
            plan = self.server.plan.get(self.path, [])
            status = plan.pop(0) if plan else 204
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_PUT = do_POST  # recorded too: a probe of a URL is a request sent

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def receiving(host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    receiver = Receiver(host, tls)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        yield receiver
    finally:
        receiver.shutdown()
        receiver.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as receiver:
        yield receiver


@pytest.fixture
def settings() -> Settings:
    return Settings(
        key_prefix="hooks",
        webhook_secrets=SECRET,
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


def dead_letters(client: Redis, keys: Keys) -> list[dict[str, Any]]:
    return [json.loads(entry) for entry in client.lrange(keys.webhook_dead_letters, 0, -1)]


def resolving(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    """Every name resolves to `address` (as a rebinding DNS server would answer)."""

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def raised_by(call: Callable[[], object], guard_s: float = 30.0) -> BaseException | None:
    """What `call` raised (None when it returned), run on a thread; one still running after `guard_s`
    fails the test (a hang guard, not a timing)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(guard_s)
    assert outcome, f"still running after {guard_s} s\n{thread_stacks()}"
    return outcome[0]


def test_a_name_is_connected_to_at_the_address_it_was_checked_at(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fakeredis.FakeRedis()
    with receiving("127.0.0.5") as receiver:
        job_id = canceled_job(fake, settings, receiver.url("/hook?x=1", host="hooks.internal"))
        resolving(monkeypatch, "127.0.0.5")
        Sender(settings, fake).tick()
    [delivery] = receiver.received
    assert delivery.path == "/hook?x=1" and delivery.headers["Host"] == f"hooks.internal:{receiver.server_address[1]}"
    assert json.loads(delivery.body)["job_id"] == job_id
    assert fake.keys(f"*{job_id}*") == [f"rq:job:{job_id}".encode()]  # delivered: the webhook and its claim gone


def test_each_delivery_has_a_connection_of_its_own(settings: Settings, receiver: Receiver) -> None:
    fake = fakeredis.FakeRedis()
    for path in ("/one", "/two"):
        canceled_job(fake, settings, receiver.url(path))
    Sender(settings, fake).tick()
    one, two = receiver.at("/one"), receiver.at("/two")
    assert len(one) == len(two) == 1 and one[0].peer != two[0].peer  # the receiver would have kept it open


def tls_for(name: str) -> tuple[ssl.SSLContext, ssl.SSLContext, list[str | None]]:
    """A receiver's TLS with a certificate for `name` from a test CA, a sender's context trusting that CA,
    and the server names (SNI) the receiver is asked for, as they come."""
    ca = trustme.CA()
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(served)
    names: list[str | None] = []
    served.sni_callback = lambda _sock, name, _context: names.append(name)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    return served, trusting, names


def test_tls_is_checked_against_each_urls_own_host_on_its_own_connection(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two names on one address and port, a certificate for one of them: its webhook goes, with its
    name in SNI; the other's is refused by the certificate check, never carried on the first's connection."""
    served, trusting, names = tls_for("hooks.example.test")
    fake = fakeredis.FakeRedis()
    resolving(monkeypatch, "127.0.0.1")
    with receiving(tls=served) as receiver:
        canceled_job(fake, settings, receiver.url("/right", host="hooks.example.test"))
        wrong = canceled_job(fake, settings, receiver.url("/wrong", host="other.example.test"))
        Sender(settings, fake, tls=trusting).tick()
    [delivery] = receiver.received
    assert delivery.path == "/right" and names[0] == "hooks.example.test"
    error = fake.hget(Keys(settings.key_prefix).webhook(wrong), "error")
    assert error is not None and b"certificate verify failed: Hostname mismatch" in error, error  # to be retried


def test_an_https_callback_to_a_name_with_its_root_s_dot_is_delivered(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hooks.example.test.` is the fully qualified `hooks.example.test`: SNI and the certificate check
    take it without the dot (RFC 6066). With it, every try failed the check, then a dead letter."""
    served, trusting, names = tls_for("hooks.example.test")
    fake = fakeredis.FakeRedis()
    resolving(monkeypatch, "127.0.0.1")
    with receiving(tls=served) as receiver:
        job_id = canceled_job(fake, settings, receiver.url("/hook", host="hooks.example.test."))
        Sender(settings, fake, tls=trusting).tick()
    error = fake.hget(Keys(settings.key_prefix).webhook(job_id), "error")
    assert [d.path for d in receiver.received] == ["/hook"], error
    assert names == ["hooks.example.test"]
    assert json.loads(receiver.received[0].body)["job_id"] == job_id


def test_a_name_that_resolves_to_a_private_address_is_dead_lettered_without_a_connection(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fakeredis.FakeRedis()
    job_id = canceled_job(fake, settings, "https://rebinding.example/hook")  # a name: it passes POST
    resolving(monkeypatch, "10.0.0.7")
    Sender(settings, fake).tick()
    [letter] = dead_letters(fake, Keys(settings.key_prefix))
    assert letter["job_id"] == job_id and letter["host"] == "rebinding.example" and letter["attempts"] == 1
    assert letter["error"].startswith("rebinding.example leads to 10.0.0.7, a private address")


def test_a_host_name_the_resolver_cannot_take_is_dead_lettered_at_its_first_try(settings: Settings) -> None:
    fake = fakeredis.FakeRedis()
    job_id = canceled_job(fake, settings, "http://a..example.com/hook")  # (JobStore takes the URL as checked)
    Sender(settings, fake).tick()
    [letter] = dead_letters(fake, Keys(settings.key_prefix))
    assert (letter["job_id"], letter["host"], letter["attempts"]) == (job_id, "a..example.com", 1)
    assert "host name" in letter["error"], letter


def test_a_redirect_is_not_followed_and_counts_as_a_failed_try(settings: Settings, receiver: Receiver) -> None:
    fake = fakeredis.FakeRedis()
    receiver.plan["/moved"] = [302, 302]
    job_id = canceled_job(fake, settings, receiver.url("/moved"))
    sender = Sender(settings, fake)
    wait_for("the tries to run out", lambda: sender.tick() or dead_letters(fake, sender.keys))
    assert len(receiver.at("/moved")) == 2 and len(receiver.received) == 2  # webhook_attempts tries, nothing else
    assert dead_letters(fake, sender.keys)[0] | {"at": None} == {
        "job_id": job_id,
        "host": "127.0.0.1",
        "attempts": 2,
        "error": "HTTP 302",
        "at": None,
    }


def test_an_unexpected_failure_of_a_try_counts_as_one_and_ends_on_the_dead_letter_list(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A delivery that raises what nothing foresaw (here what IDNA raised for `a..example.com`) is a
    failed try like a 500: counted, one warning each, then dead-lettered."""

    def post(*args: Any, **kwargs: Any) -> None:
        raise UnicodeError("encoding with 'idna' codec failed (UnicodeError: label empty or too long)")

    monkeypatch.setattr("batcher.webhooks.post", post)
    fake = fakeredis.FakeRedis()
    job_id = canceled_job(fake, settings, "http://hooks.example/")
    sender = Sender(settings, fake)
    with caplog.at_level(logging.INFO, logger="batcher.webhooks"):
        for _ in range(settings.webhook_attempts):
            fake.zadd(sender.keys.webhooks, {job_id: 0}, xx=True)  # due now, whatever its backoff
            sender.tick()
    [letter] = dead_letters(fake, sender.keys)
    assert (letter["job_id"], letter["host"], letter["attempts"]) == (job_id, "hooks.example", 2)
    assert letter["error"].startswith("UnicodeError: encoding with 'idna' codec failed"), letter
    assert fake.keys(f"*{job_id}*") == [f"rq:job:{job_id}".encode()]  # the webhook and its claim gone
    sent = [r for r in caplog.records if r.name == "batcher.webhooks"]
    warnings = [r for r in sent if r.levelno == logging.WARNING]
    assert len(warnings) == settings.webhook_attempts == len(sent), caplog.text  # one line a try
    assert [bool(r.exc_info) for r in warnings] == [True, False]  # the traceback once, with the first


def test_a_record_the_sender_cannot_read_is_dead_lettered_at_once(settings: Settings) -> None:
    fake = fakeredis.FakeRedis()
    job_id = canceled_job(fake, settings, "http://hooks.example/")
    fake.hset(Keys(settings.key_prefix).webhook(job_id), "attempts", "mangled")
    Sender(settings, fake).tick()
    [letter] = dead_letters(fake, Keys(settings.key_prefix))
    assert (letter["job_id"], letter["attempts"], letter["error"]) == (job_id, 0, "its record is unreadable")
    assert fake.keys(f"*{job_id}*") == [f"rq:job:{job_id}".encode()]


def test_a_webhook_record_has_no_expiry_and_outlives_its_job_until_delivered(
    settings: Settings, receiver: Receiver
) -> None:
    # No memory policy evicts it (state until delivered or dead-lettered), and its job, once ended, is
    # cache: evicted or expired, the document made at its end still goes out.
    fake = fakeredis.FakeRedis()
    store = JobStore(fake, settings)
    job_id = store.create(["a text"], receiver.url("/later"))
    record = Keys(settings.key_prefix).webhook(job_id)
    receiver.plan["/later"] = [500]
    store.delete(job_id)  # canceled: it has ended, its webhook is due
    Sender(settings, fake).tick()
    assert fake.hget(record, "error") == b"HTTP 500" and fake.pttl(record) == -1
    fake.delete(f"rq:job:{job_id}")  # evicted
    fake.zadd(Keys(settings.key_prefix).webhooks, {job_id: 0}, xx=True)  # its second try due now
    Sender(settings, fake).tick()
    first, second = receiver.at("/later")
    assert second.body == first.body and json.loads(second.body)["status"] == "canceled"
    assert fake.keys(f"*{job_id}*") == [] and dead_letters(fake, Keys(settings.key_prefix)) == []


def test_a_job_gone_before_its_webhook_was_made_dead_letters_it_saying_so(
    settings: Settings, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    fake = fakeredis.FakeRedis()
    job_id = canceled_job(fake, settings, receiver.url("/never"))
    fake.delete(f"rq:job:{job_id}")  # evicted (an ended job is cache) before any sender looked
    Sender(settings, fake).tick()
    assert receiver.at("/never") == []
    [letter] = dead_letters(fake, Keys(settings.key_prefix))
    assert (letter["job_id"], letter["attempts"]) == (job_id, 0)
    assert letter["error"] == "its job was gone (expired or evicted) before it went out"
    assert "dead-lettered" in caplog.text and fake.keys(f"*{job_id}*") == []


def test_a_claim_that_lapsed_and_was_taken_by_another_sender_stays_theirs(
    settings: Settings, receiver: Receiver
) -> None:
    fake = fakeredis.FakeRedis()
    job_id = canceled_job(fake, settings, receiver.url("/slow"))
    claim = Keys(settings.key_prefix).webhook_claim(job_id)
    receiver.during = lambda: fake.set(claim, b"another-sender", ex=60)  # ours lapsed mid-delivery; taken
    Sender(settings, fake).tick()
    assert len(receiver.at("/slow")) == 1
    assert fake.get(claim) == b"another-sender"


def test_a_redis_outage_is_looked_through_with_backoff_not_a_warning_every_look(
    settings: Settings, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """Each look (four a second) met the outage and logged a warning: 14,400 lines an hour of it from
    every jobs worker, where the other loops back off (`core.redis_errors.Backoff`). The webhook
    goes out once Redis answers again."""
    server = fakeredis.FakeServer()
    fake = fakeredis.FakeRedis(server=server)
    job_id = canceled_job(fake, settings, receiver.url("/after"))
    now = [0.0]
    sender = Sender(settings, fake, clock=lambda: now[0])
    server.connected = False
    with caplog.at_level(logging.INFO, logger="batcher.webhooks"):
        for _ in range(40):  # ten seconds of looks
            sender.tick()
            now[0] += DUE_WEBHOOKS_EVERY_S
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert 1 <= len(warnings) <= 10, len(warnings)
    server.connected = True
    now[0] += Backoff.MOST_S
    sender.tick()
    assert [d.body for d in receiver.at("/after")] and not fake.exists(Keys(settings.key_prefix).webhook(job_id))


def test_a_job_that_ends_as_its_webhook_is_looked_at_keeps_its_webhook_due_at_once(
    settings: Settings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender finds the job running, and the job ends (its webhook made due at once) before the
    sender puts the next look a heartbeat TTL off: that look overwrote the end's, and the webhook
    went out a heartbeat TTL late."""
    fake = fakeredis.FakeRedis()
    store = JobStore(fake, settings)
    job_id = store.create(["a text"], receiver.url("/ended"))
    keys = Keys(settings.key_prefix)
    fake.zadd(keys.webhooks, {job_id: 0})  # its periodic look is due
    update = Sender._update

    def ended_meanwhile(sender: Sender, *args: Any, **kwargs: Any) -> bool:
        if kwargs.get("ended") is False:
            store.delete(job_id)  # canceled: its webhook is due at once
        return update(sender, *args, **kwargs)

    monkeypatch.setattr(Sender, "_update", ended_meanwhile)
    sender = Sender(settings, fake)
    sender.tick()
    assert receiver.at("/ended") == []
    sender.tick()
    assert len(receiver.at("/ended")) == 1, fake.zscore(keys.webhooks, job_id)


def test_deleting_a_job_drops_its_undelivered_webhook(settings: Settings, receiver: Receiver) -> None:
    fake = fakeredis.FakeRedis()
    job_id = canceled_job(fake, settings, receiver.url("/deleted"))
    JobStore(fake, settings).delete(job_id)  # the second DELETE deletes the job
    Sender(settings, fake).tick()
    assert receiver.received == [] and fake.keys(f"*{job_id}*") == []


@contextmanager
def dribbling() -> Iterator[str]:
    """The URL of a receiver on 127.0.0.1 that answers a byte every 0.2 s, for ever: a status line,
    then a header that never ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        try:
            connection, _ = listener.accept()
        except OSError:  # closed: nobody came
            return
        with connection:
            connection.recv(65536)
            answer = iter(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not stop.wait(0.2):
                try:
                    connection.sendall(bytes([next(answer, ord("a"))]))
                except OSError:  # the client hung up
                    return

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    finally:
        stop.set()
        listener.close()


def test_a_receiver_answering_a_byte_at_a_time_is_cut_at_the_deadline() -> None:
    with dribbling() as url:
        error = raised_by(lambda: post(url, b"{}", {}, LOOPBACK, ssl.create_default_context(), deadline_s=1.0))
    assert isinstance(error, TimeoutError) and str(error) == "no answer within 1 s"


def test_name_resolution_is_within_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def stuck(*args: Any, **kwargs: Any) -> list[Any]:  # a resolver that never answers (getaddrinfo has no timeout)
        release.wait(60)
        raise socket.gaierror("released")

    monkeypatch.setattr(socket, "getaddrinfo", stuck)
    try:
        error = raised_by(lambda: post("http://stuck.example/", b"{}", {}, [], ssl.create_default_context(), 0.5))
    finally:
        release.set()
    assert isinstance(error, TimeoutError) and str(error) == "stuck.example not resolved in time"


def test_a_callback_url_without_webhook_secrets_is_a_422_that_says_so() -> None:
    server = fakeredis.FakeServer()
    app = create_app(
        Settings(key_prefix="hooks"),
        redis=fakeredis.FakeAsyncRedis(server=server),
        jobs_redis=fakeredis.FakeRedis(server=server),
    )
    with TestClient(app) as client:
        response = client.post("/jobs", json={"text": ["x"], "callback_url": "https://example.com/hook"})
        assert response.status_code == 422
        assert "SENTIMENT_WEBHOOK_SECRETS" in response.json()["detail"][0]["msg"]
        assert client.post("/jobs", json={"text": ["x"]}).status_code == 202  # no webhook: as before


# End to end: real processes, real Redis, a receiver on 127.0.0.1


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
    service = Service(
        redis_url,
        tiny_model_dir,
        PREFIX,
        SENTIMENT_WEBHOOK_SECRETS=f"{SECRET},{OTHER_SECRET}",
        SENTIMENT_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
        SENTIMENT_WEBHOOK_ATTEMPTS="3",
        SENTIMENT_WEBHOOK_BACKOFF_S="0.05",
        SENTIMENT_HEARTBEAT_TTL_S="2",
    )
    with receiving() as receiver:
        service.start("api", "--port", str(service.port))
        service.start("worker")  # computes the jobs' texts
        jobs_worker = service.start("jobs-worker")
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


def test_a_finished_job_posts_its_status_document_which_the_reference_library_verifies(stack: Stack) -> None:
    job_id = stack.submit("/finished")
    wait_for("the webhook", lambda: stack.receiver.at("/finished"))
    [delivery] = stack.receiver.at("/finished")
    assert delivery.body == stack.client.get(f"/jobs/{job_id}").content  # GET's very bytes
    assert delivery.headers["Content-Type"] == "application/json"
    headers = delivery.headers
    assert re.fullmatch(r"[0-9a-f]{32}", headers["webhook-id"]) and headers["webhook-timestamp"].isdigit()
    assert [s[:3] for s in headers["webhook-signature"].split(" ")] == ["v1,", "v1,"]  # one per secret
    receive = docs_receive()
    for secret in (SECRET, OTHER_SECRET):  # a receiver that knows either one of the two secrets
        document = receive(secret, delivery.body, headers)
        assert document is not None and (document["job_id"], document["status"]) == (job_id, "finished")
    assert standardwebhooks.Webhook(OTHER_SECRET).verify(delivery.body, headers)["job_id"] == job_id
    assert receive(UNKNOWN_SECRET, delivery.body, headers) is None
    assert receive(SECRET, delivery.body.replace(b"finished", b"failed"), headers) is None
    assert receive(SECRET, delivery.body, headers | {"webhook-id": "f" * 32}) is None  # replayed as another delivery
    assert (
        receive(SECRET, delivery.body, headers | {"webhook-timestamp": str(int(headers["webhook-timestamp"]) + 1)})
        is None
    )
    wait_for("the webhook to be done with", lambda: stack.delivered(job_id))


def test_a_receiver_answering_500_gets_the_same_delivery_again_once(stack: Stack) -> None:
    stack.receiver.plan["/flaky"] = [500]
    job_id = stack.submit("/flaky")
    wait_for("the webhook to be delivered", lambda: stack.delivered(job_id) and len(stack.receiver.at("/flaky")) >= 2)
    first, second = stack.receiver.at("/flaky")  # a 500, then a 204: and no more
    assert first.body == second.body
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert docs_receive()(SECRET, second.body, second.headers) is not None
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
    document = docs_receive()(OTHER_SECRET, delivery.body, delivery.headers)
    assert document is not None and (document["job_id"], document["status"]) == (job_id, "canceled")
    assert document["progress"] == {"done": 0, "total": 2}
    wait_for("the webhook to be done with", lambda: stack.delivered(job_id))  # (the next tests count what is pending)


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest",
        *CLOUD_METADATA_IN_IPV6,
        "http://0xa9fea9fe/latest",
        "http://2852039166/latest",
        "http://[::1]:8000/hook",
    ],
)
def test_a_refused_callback_url_is_a_422_and_nothing_is_queued(stack: Stack, url: str) -> None:
    refused(stack, url, "address")


@pytest.mark.parametrize("url", ["http://a..example.com/", f"http://{'a' * 70}.example.com/"])
def test_a_callback_url_whose_host_name_the_resolver_cannot_take_is_a_422(stack: Stack, url: str) -> None:
    refused(stack, url, "host name")


def test_a_callback_url_with_credentials_is_refused_before_anything_is_sent_to_it(stack: Stack) -> None:
    """The URL names the receiver, an allowed address: a check that reached out to it (an SSRF probe)
    would be recorded there before the 422."""
    received = len(stack.receiver.received)
    refused(stack, stack.receiver.url("/hook").replace("://", "://u:p@"), "credentials")
    assert len(stack.receiver.received) == received


def refused(stack: Stack, url: str, why: str) -> None:
    """POST /jobs with `url` is a 422 naming the field and `why`, and leaves no job or webhook queued."""
    pending, queued = stack.redis.zcard(stack.keys.webhooks), stack.redis.llen(f"rq:queue:{PREFIX}-jobs")
    response = stack.client.post("/jobs", json={"text": ["x"], "callback_url": url})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "callback_url"] and error["input"] == url and why in error["msg"]
    assert stack.redis.zcard(stack.keys.webhooks) == pending and stack.redis.llen(f"rq:queue:{PREFIX}-jobs") == queued

"""One webhook POST, made so that a callback URL cannot reach what `core.webhooks.refusal` refuses.

The host is resolved here and every address it resolves to checked; the request then goes over a
new connection, opened to a checked address (the next one if it refuses), with the URL's host in
`Host` and in TLS's SNI and certificate check. The connection is closed after the answer's status
line and headers: never pooled, so a TLS connection verified for one host never carries another
host's webhook. No proxy, no redirect followed: either could lead elsewhere.

One deadline bounds the whole POST, name resolution included. getaddrinfo has no timeout, so it runs
on a thread of its own that the delivery stops waiting for (at most `RESOLVERS` such threads at
once: a resolver that hangs holds them, later deliveries time out). Past the connection a watchdog
shuts the socket down at the deadline, whatever it is blocked on: a receiver that answers a byte at
a time, each within any per-read timeout, is cut all the same.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from ipaddress import ip_address
from typing import Any
from urllib.parse import urlsplit

from core.webhooks import Network, name_refusal, refusal

DEADLINE_S = 10.0  # one delivery, DNS to the answer's headers; receivers are to answer at once and work later
RESOLVERS = 4  # names resolved at once: a hung resolver holds them all, later deliveries time out waiting

Target = tuple[socket.AddressFamily, Any]  # (family, socket address) from getaddrinfo
_resolvers = threading.BoundedSemaphore(RESOLVERS)


class AddressRefused(Exception):
    """The URL may not be called: its host resolves to a refused address, or it is not a URL to send
    to. Not retried."""


class Undelivered(Exception):
    """The receiver answered, but not 2xx: retried."""


def post(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    allowed: Sequence[Network],
    tls: ssl.SSLContext,
    deadline_s: float = DEADLINE_S,
) -> None:
    """POST `body` to `url` within `deadline_s`: AddressRefused, Undelivered (not 2xx), TimeoutError (the
    deadline), or another OSError or http.client.HTTPException (no connection, a broken answer)."""
    deadline = time.monotonic() + deadline_s
    parts = urlsplit(url)
    host, https = parts.hostname or "", parts.scheme == "https"
    try:
        port = parts.port or (443 if https else 80)
    except ValueError:
        raise AddressRefused("not a URL to send to (its port)") from None
    if parts.scheme not in ("http", "https") or not host or not host.isascii():
        raise AddressRefused("not an http(s) URL with an ASCII host")
    if why := name_refusal(host):
        raise AddressRefused(why)
    targets = _checked(host, resolve(host, port, deadline), allowed)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = {"Host": parts.netloc, "Connection": "close", **headers}
    with _connect(targets, deadline) as sock, Watchdog(sock, deadline) as watchdog:
        try:
            # SNI and the certificate check take a name without its root's dot (RFC 6066), as curl sends it.
            stream = tls.wrap_socket(sock, server_hostname=host.removesuffix(".")) if https else sock
            connection = http.client.HTTPConnection(host, port)
            connection.sock = stream  # (so it never connects, nor resolves, itself)
            try:
                connection.request("POST", path, body, request)
                status = connection.getresponse().status  # the status is all we read: never a body
            finally:
                connection.close()
        except (http.client.InvalidURL, UnicodeError) as exc:
            raise AddressRefused(f"not a URL to send to ({exc})") from None
        except (OSError, http.client.HTTPException):
            if not watchdog.fired:
                raise
    if watchdog.fired:  # (also when the cut looked like the end of the headers: no answer either way)
        raise TimeoutError(f"no answer within {deadline_s:g} s")
    if not 200 <= status < 300:
        raise Undelivered(f"HTTP {status}")


def resolve(host: str, port: int, deadline: float) -> list[Target]:
    """Every address `host` resolves to (a literal address is itself), by the deadline."""
    if not _resolvers.acquire(timeout=_left(deadline)):
        raise TimeoutError(f"{host} not resolved in time: the resolver is stuck")
    answer: Future[list[Target]] = Future()

    def run() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
            answer.set_result([(family, address) for family, _, _, _, address in infos])
        except BaseException as exc:  # handed to the delivery, if it still waits
            answer.set_exception(exc)
        finally:
            _resolvers.release()

    threading.Thread(target=run, name="webhook-resolve", daemon=True).start()
    try:
        return answer.result(timeout=_left(deadline))
    except TimeoutError:
        raise TimeoutError(f"{host} not resolved in time") from None


def _checked(host: str, targets: list[Target], allowed: Sequence[Network]) -> list[Target]:
    """`targets`, each address checked: a refused one refuses the delivery."""
    for _, address in targets:
        if why := refusal(ip_address(address[0]), allowed, host):
            raise AddressRefused(why)
    return list(dict.fromkeys(targets))


def _connect(targets: list[Target], deadline: float) -> socket.socket:
    """A new connection to the first target that takes one."""
    failure: OSError = ConnectionError("no address")
    for family, address in targets:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_left(deadline))  # every later read or write too: the watchdog bounds their sum
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            failure = exc
            if isinstance(exc, TimeoutError):
                break  # the deadline: no time for the next address
    raise failure


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the delivery's deadline passed")
    return left


class Watchdog:
    """Shuts a connection down at a deadline, whatever the thread using it is blocked on."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        # shutdown() acts on the connection, not the descriptor: this duplicate cuts `sock` and any
        # TLS wrapping of it (which takes `sock`'s descriptor over).
        self._handle = sock.dup()
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self.fired = False

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            self._handle.close()

    def _fire(self) -> None:
        with self._lock:
            if self._handle.fileno() == -1:  # the delivery ended first
                return
            self.fired = True
            with contextlib.suppress(OSError):  # the peer closed it already
                self._handle.shutdown(socket.SHUT_RDWR)

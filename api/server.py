"""Runs the API under uvicorn (`sentiment api`, and the API half of `sentiment serve`), and its gRPC
service on the same event loop (`api.inference_grpc`), so both share one `Predictor`."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from http import HTTPStatus

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.app import create_app
from api.errors import ErrorBody, ErrorType, counted
from api.inference_grpc import GrpcServer
from core import tracing
from core.settings import Settings

FULL_COLLECTION_AFTER = 100  # collections of the middle generation per full one (the collector's own default: 10)


def listen(host: str, port: int, flag: str = "--port") -> socket.socket:
    """The API's listening socket, bound before anything else starts: a taken port is one line, exit 1
    (naming `flag`, the option that chooses another)."""
    try:
        return socket.create_server(
            (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=2048
        )
    except OSError as exc:
        if (exc.errno or 0) < 0:  # getaddrinfo's (socket.EAI_*), which `create_server` re-raises as OSError
            why, remedy = "no such host", "choose an address of this machine with --host"
        elif exc.errno == errno.EADDRNOTAVAIL:
            why, remedy = os.strerror(exc.errno), "choose an address of this machine with --host"
        elif exc.errno == errno.EACCES:
            why, remedy = os.strerror(exc.errno), f"a port below 1024 needs privileges: choose another with {flag}"
        else:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            remedy = f"another process holds it? choose one with {flag}"
        raise SystemExit(f"sentiment: cannot listen on {host}:{port} ({why}): {remedy}") from None


def run(
    settings: Settings,
    host: str,
    port: int,
    listening: socket.socket | None = None,
    problem: Callable[[], str | None] | None = None,
    up: Callable[[str, str | None], None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM; uvicorn then stops accepting and drains in-flight requests, then
    the gRPC service (on `settings.grpc_port`, unless 0) its calls; Ctrl-C again cuts them
    (`_Server`). `problem`: what else /ready must report (`sentiment serve`'s supervisor). `up`:
    called once both serve, with the API's URL and gRPC's address (None without gRPC)."""
    listening = listening or listen(host, port)
    grpc = None
    if settings.grpc_port:
        listen(host, settings.grpc_port, "--grpc-port").close()  # a taken port: the same one line
        grpc = GrpcServer(settings, host, settings.grpc_port)
    tracing.setup("sentiment-api")
    # uvicorn re-raises the stop signal once drained: make that a clean exit (status 0, callers'
    # `finally` blocks run) instead of death by signal or a KeyboardInterrupt traceback.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(0))
    config = uvicorn.Config(
        create_app(settings, problem=problem, grpc=grpc),
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        access_log=settings.log_level.upper() in ("DEBUG", "INFO"),  # else uvicorn still builds each line
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
        log_config=None,
        http=BoundedHeadProtocol,
        ws="none",  # no WebSocket route: an upgrade to it is the plain request it also is (`BoundedHeadProtocol`)
        # X-Forwarded-For names the client (its rate-limit bucket, the access log) only from the proxies
        # FORWARDED_ALLOW_IPS names: uvicorn's default trusts loopback, where any local caller may
        # claim any address (docs/security.md, "Behind a proxy or ingress").
        proxy_headers="FORWARDED_ALLOW_IPS" in os.environ,
    )

    async def serve() -> None:
        if grpc is not None:  # in the loop that runs it (grpc.aio's rule), before anything starts
            grpc.bind()
        await _Server(config, serving, grpc).serve(sockets=[listening])

    def serving() -> None:
        if up is not None:
            url = "http://" + (f"[{host}]" if ":" in host else host) + f":{listening.getsockname()[1]}"
            up(url, grpc.bound if grpc is not None else None)

    # Everything alive now (modules, the app) out of the collector's reach, so that a full collection,
    # which stops the event loop, walks only what requests hold; and full collections a tenth as
    # often, since under load what they walk is requests in flight, which they never free
    # (docs/tuning.md, "Garbage collection"). Garbage first: the frozen is never collected.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*gc.get_threshold()[:2], FULL_COLLECTION_AFTER)
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:  # (what `uvicorn.Server.run` does)
        runner.run(serve())


# A request's line and headers, at most: keys, trace context and a proxy's headers fit many times over.
MAX_HEAD_BYTES = 64 * 1024
# How long the rest of a refused head is read and dropped: closed with unread data, a socket resets,
# and the client's kernel discards the 431 before the client reads it.
LINGER_S = 2.0


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools), with a request's head bounded in size and in time,
    and its body's silences.

    httptools keeps a header however long it grows, so one connection sending an endless header would
    hold as much memory as it sent: a head not all in past `MAX_HEAD_BYTES` (counted once each read is
    parsed, from the connection's first byte; for a later request on it, from the read after the one
    its head began in, so one read over at most; never the read it ends in, which holds its body too)
    is the 431 in the error shape, and the connection closed (lingering: `LINGER_S`). And uvicorn times
    a connection out only between requests, so one opened and left silent, or stopped midway through a
    head, would hold its socket for good: it has uvicorn's keep-alive timeout from its opening, or from
    a later head's first byte, to send the head, else it is closed (once any request in flight on it is
    answered). A head httptools cannot parse is uvicorn's 400 and close, in the error shape too. A head
    offering an upgrade not taken (`Upgrade: h2c`, as curl --http2 and Java's HttpClient send;
    `websocket`, the service having no such route) is parsed again without it, so that its request
    keeps its body: httptools would take the bytes after that head for the new protocol's.

    uvicorn waits for a body's bytes as long as they take: one declaring more than it sends, or a
    chunked one left open, held its request (/jobs has no deadline) and its connection for good; one
    answered unread, then trickling, too (each read stops the keep-alive timer, which nothing starts
    again). As nginx's `client_body_timeout`, a body from which no byte comes for the keep-alive
    timeout (between two reads: /jobs takes ~120 MB) is the 408 in the error shape, or, answered
    already, closed. Time the server holds it up (its buffer full, a `100-continue` not yet sent, the
    request queued behind another, its answer going out) is no silence of the client's. One timer per
    connection, armed only by a read that leaves a body unfinished, never cancelled: a request whose
    body comes with its head starts none.
    """

    head_bytes: int | None = 0  # of the head being read; None once its headers are in
    head_timer: asyncio.TimerHandle | None = None  # closes the connection if the head is not in by then
    refused = False  # the 431 or 408 sent: what else arrives is dropped until the close
    upgrade_ignored = False  # the head just parsed offers an upgrade not taken: its request is the parse again's
    upgrade_at = 0  # where in the read the bytes after that head begin
    body_open = False  # a request's head is in, its body not all
    body_read_at = 0.0  # (loop time) the last read of the open body, or the last time the server held it up
    body_timer: asyncio.TimerHandle | None = None  # checks the open body's silence

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # (as uvicorn's)
        super().connection_made(transport)
        self._time_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._untime_head()
        if self.body_timer is not None:
            self.body_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.head_bytes is not None:
            self.head_bytes += len(data)  # (moot if the head ends in it)
        super().data_received(data)
        while self.upgrade_ignored:  # (a head after it, in what is parsed again, may offer one too)
            data = self._parse_without_upgrade(data)
        if self.head_bytes is not None:  # a head not all in
            if self.head_bytes > MAX_HEAD_BYTES:
                message = f"the request's line and headers are larger than {MAX_HEAD_BYTES} bytes"
                self._refuse(ErrorType.HEADERS_TOO_LARGE, message)
                return
            if self.head_timer is None:  # (a later head, begun in this read)
                self._time_head()
        if self.body_open:
            self.body_read_at = self.loop.time()
            if self.body_timer is None:
                self.body_timer = self.loop.call_later(self.timeout_keep_alive, self._body_late)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.head_bytes is None:  # (a later request on the connection; the first's count began with it)
            self.head_bytes = 0

    def on_headers_complete(self) -> None:
        self.head_bytes = None
        self._untime_head()
        if self.parser.should_upgrade() and self._get_upgrade() is not None and not self._should_upgrade():
            self.upgrade_ignored = True  # (no request yet: `_parse_without_upgrade` makes it)
            return
        super().on_headers_complete()
        self.body_open = True

    def on_message_complete(self) -> None:
        if not self.upgrade_ignored:  # (httptools ends an upgrade's message at its head)
            self.body_open = False
            super().on_message_complete()

    def _unsupported_upgrade_warning(self) -> None:
        """uvicorn's, handling httptools' HttpParserUpgrade, which says where the head ended: an upgrade
        not taken is no warning (a curl --http2), but a CONNECT's is."""
        if not self.upgrade_ignored:
            super()._unsupported_upgrade_warning()
            return
        upgrade = sys.exception()
        self.upgrade_at = upgrade.args[0] if isinstance(upgrade, httptools.HttpParserUpgrade) else 0

    def _parse_without_upgrade(self, parsed: bytes) -> bytes:
        """The head just parsed, without its Upgrade header, then what followed it in `parsed` (its
        body, and what comes after it on the connection), by a fresh parser of uvicorn's, which goes
        on with the connection; what it parsed."""
        self.upgrade_ignored = False
        line = b"%s %s HTTP/%s\r\n" % (self.parser.get_method(), self.url, self.parser.get_http_version().encode())
        headers = b"".join(b"%s: %s\r\n" % (name, value) for name, value in self.headers if name != b"upgrade")
        again = line + headers + b"\r\n" + parsed[self.upgrade_at :]
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # (as uvicorn's)
        super().data_received(again)
        return again

    def _time_head(self) -> None:
        self.head_timer = self.loop.call_later(self.timeout_keep_alive, self._head_late)

    def _untime_head(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_late(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            self._time_head()  # (a pipelined head begun while a request is in flight: its answer first)
        else:
            self.head_timer = None
            self.transport.close()

    def _body_late(self) -> None:
        """The open body's check, a keep-alive timeout after the read that armed it, then after its
        last read (or hold-up); a body all in meanwhile has nothing to check."""
        self.body_timer = None
        if not self.body_open:
            return
        cycle, now = self.cycle, self.loop.time()
        answering = cycle.response_started and not cycle.response_complete
        if self.pipeline or self.flow.read_paused or cycle.waiting_for_100_continue or answering:
            self.body_read_at = now  # (held up by the server: its silence starts once it reads again)
        if (silent := now - self.body_read_at) < self.timeout_keep_alive:
            self.body_timer = self.loop.call_later(self.timeout_keep_alive - silent, self._body_late)
        elif cycle.response_complete:  # (answered without its body: nothing to say)
            self.transport.close()
        else:  # its request sees its client gone, so that nothing it answers follows the 408
            cycle.disconnected = True
            cycle.message_event.set()
            message = f"no byte of the request's body came for {self.timeout_keep_alive} s"
            self._refuse(ErrorType.UPLOAD_STALLED, message)

    def send_400_response(self, msg: str) -> None:
        """A request head httptools cannot parse (a NUL or a folded line in a header, a second
        Content-Length, a bad request line): uvicorn's 400 and close, in the error shape. uvicorn
        calls it only handling httptools' error, whose reason the message names (a failure of
        uvicorn's callbacks, httptools' "User callback error", by the error it handled)."""
        reason = sys.exception()
        if isinstance(reason, httptools.HttpParserCallbackError):  # (uvicorn's, reading the request target)
            reason = reason.__context__
        if isinstance(reason, httptools.HttpParserInvalidURLError):  # (its own words quote the target's bytes)
            why = " (the request target is not a path or a URL)"
        else:
            why = f" ({reason})" if isinstance(reason, httptools.HttpParserError) else ""
        self.transport.write(self._answer(ErrorType.BAD_REQUEST, f"the request is not valid HTTP/1.1{why}"))
        self.transport.close()
        self.head_bytes = None  # (answered: no 431 after it)

    def _refuse(self, error: ErrorType, message: str) -> None:
        """`error`'s answer, then a lingering close: the answer and our end of the stream now, the rest
        of its upload dropped for `LINGER_S`, then the close."""
        self.transport.write(self._answer(error, message))
        self.refused, self.head_bytes = True, None
        self._untime_head()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _answer(self, error: ErrorType, message: str) -> bytes:
        """An error refused before the app sees the request: its status and body as `ERRORS` says (a
        refusal counted), uvicorn's default headers (date, server), and the close it is followed by."""
        spec = counted(error)
        content = ErrorBody.of(error, message).model_dump_json().encode()
        status = HTTPStatus(spec.status)
        defaults = b"".join(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers)
        return (
            f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode()
            + defaults
            + f"content-type: application/json\r\ncontent-length: {len(content)}\r\nconnection: close\r\n\r\n".encode()
            + content
        )


class _Server(uvicorn.Server):
    """uvicorn's server, calling `up` once it serves: the app started (gRPC with it), the socket
    accepting (uvicorn says nothing of a socket it was given). A second Ctrl-C while it drains
    (uvicorn's force exit) stops it now (`_cut`)."""

    def __init__(self, config: uvicorn.Config, up: Callable[[], None], grpc: GrpcServer | None) -> None:
        super().__init__(config)
        self.up = up
        self.grpc = grpc

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.up()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self.force_exit:
            await self._cut()

    async def _cut(self) -> None:
        """Stop now: requests in flight cut (their connections reset, their tasks cancelled), gRPC's
        calls too, then the app closed as after a drain, unless it already was. uvicorn's force exit
        skips the app's close, and leaves the cancelling of what still runs to the exit, each logged as
        an error with its traceback."""
        for connection in list(self.server_state.connections):
            connection.transport.abort()
        cut = _CancelledQuietly()
        logging.getLogger("uvicorn.error").addFilter(cut)
        try:
            for task in self.server_state.tasks:
                task.cancel()
            await asyncio.gather(*self.server_state.tasks, return_exceptions=True)
        finally:
            logging.getLogger("uvicorn.error").removeFilter(cut)
        if not self.lifespan.shutdown_event.is_set():  # (set: the app closed before Ctrl-C came again)
            if self.grpc is not None:
                await self.grpc.stop(0)
            await self.lifespan.shutdown()


class _CancelledQuietly(logging.Filter):
    """Drops uvicorn's error for a request whose task was cancelled: one `_cut` cut on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))

"""HTTP load generators: closed loop (N connections, each sends its next request when the last
answers) and open loop (`open_loop`: requests at a constant rate, whatever the answers, as k6's
`constant-arrival-rate` sends them: a closed loop slows down with the service, and so hides overload).

Raw HTTP/1.1 with keep-alive, on an asyncio protocol and uvloop, rather than an HTTP client library:
on a 2-core box the client shares the CPU with what it measures, and this costs a fraction of httpx's
CPU a request, and a third less than asyncio's streams on asyncio's own loop (docs/performance.md,
"Load generator"). Its own CPU time is recorded (`client_cpu_share`) so a run shows whether the
client could have been the limit.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import orjson
import uvloop

T = TypeVar("T")


@dataclass(frozen=True)
class LoadResult:
    """One load point: what completed inside the measuring window (the warm-up is left out)."""

    concurrency: int
    duration_s: float
    requests: int
    texts: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    client_cpu_share: float  # client CPU seconds per wall second: near 1.0 means the client was the limit
    gave_up: int = 0  # requests whose client gave up waiting (`give_up_s`), neither answers nor errors

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.duration_s

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 3),
            "requests": self.requests,
            "texts": self.texts,
            "errors": self.errors,
            "requests_per_s": round(self.requests_per_s, 2),
            "texts_per_s": round(self.texts_per_s, 2),
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
            "client_cpu_share": round(self.client_cpu_share, 3),
        }


def percentile(sorted_ms: list[float], q: int) -> float | None:
    """The q-th percentile (1..99) of sorted latencies, None when there are none."""
    if not sorted_ms:
        return None
    if len(sorted_ms) == 1:
        return round(sorted_ms[0], 2)
    return round(statistics.quantiles(sorted_ms, n=100, method="inclusive")[q - 1], 2)


GAVE_UP = -1  # the status of a request its client gave up on
KEEP_ALIVE_S = 4.0  # longest an open-loop connection idles before its next request: uvicorn closes one idle 5 s


class _Response(asyncio.Protocol):
    """One TCP connection's side of `_Connection`: reads its HTTP/1.1 answers (uvicorn answers with
    Content-Length) and hands each status to the request that waits for it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[int] | None = None  # the status the request sent last waits for
        self.closes = False  # the last answer said `Connection: close`
        self._received = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's transports are not its subclasses)

    def data_received(self, data: bytes) -> None:
        self._received += data
        if (end := self._received.find(b"\r\n\r\n")) < 0:
            return
        status_line, *headers = bytes(self._received[:end]).split(b"\r\n")
        fields = dict(h.lower().split(b":", 1) for h in headers if b":" in h)
        try:
            size, status = end + 4 + int(fields.get(b"content-length", 0)), int(status_line.split()[1])
        except (ValueError, IndexError):  # not HTTP: the request fails as on a lost connection
            self._fail(ConnectionError(f"not an HTTP answer: {status_line[:60]!r}"))
            return
        if len(self._received) < size:
            return
        del self._received[:size]
        self.closes = fields.get(b"connection", b"").strip() == b"close"
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(ConnectionResetError("the server closed the connection"))

    def _fail(self, error: OSError) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(error)


class _Connection:
    """One keep-alive HTTP/1.1 connection sending JSON POSTs, opened again once the server closed it."""

    def __init__(self, host: str, port: int, headers: Mapping[str, str]) -> None:
        self.host, self.port = host, port
        self.headers = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self._open: _Response | None = None

    async def post(self, path: str, body: bytes) -> int:
        loop = asyncio.get_running_loop()
        if self._open is None or self._open.transport is None or self._open.transport.is_closing():
            _, self._open = await loop.create_connection(_Response, self.host, self.port)
        response = self._open
        assert response.transport is not None
        response.answer = loop.create_future()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n{self.headers}"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        response.transport.write(head.encode() + body)
        status = await response.answer
        if response.closes:
            self.close()
        return status

    def close(self) -> None:
        if self._open is not None and self._open.transport is not None:
            self._open.transport.close()
        self._open = None


def _run_loop(main: Coroutine[Any, Any, T]) -> T:
    """`main` run to its end on a new uvloop event loop (uvicorn's, and cheaper a request than asyncio's)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def _run(
    urls: list[str],
    texts_for: Callable[[int], list[str]],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    headers: Mapping[str, str],
    give_up_s: float | None = None,
) -> LoadResult:
    targets = [(p.hostname or "127.0.0.1", p.port or 80, p.path or "/") for p in map(urlsplit, urls)]
    # Latencies and windows by `time.perf_counter`: uvloop's `loop.time()` counts whole milliseconds,
    # read once a pass of its loop.
    measure_from = time.perf_counter() + warmup_s
    measure_to = measure_from + duration_s
    latencies: list[float] = []
    counted = {"requests": 0, "texts": 0, "errors": 0, "gave_up": 0}
    sequence = itertools.count()

    async def client(number: int) -> None:
        host, port, path = targets[number % len(targets)]
        conn = _Connection(host, port, headers)
        try:
            while (started := time.perf_counter()) < measure_to:
                texts = texts_for(next(sequence))
                body = orjson.dumps({"text": texts})
                try:
                    if give_up_s is None:
                        status = await conn.post(path, body)
                    else:
                        async with asyncio.timeout(give_up_s):
                            status = await conn.post(path, body)
                except TimeoutError:  # (before OSError, its base class)
                    conn.close()  # as an HTTP client's read timeout does: the server sees the disconnect
                    status = GAVE_UP
                except OSError:
                    conn.close()
                    status = 0
                ended = time.perf_counter()
                if measure_from <= ended <= measure_to:
                    if status == GAVE_UP:
                        counted["gave_up"] += 1
                    elif status == 200:
                        latencies.append((ended - started) * 1000)
                        counted["requests"] += 1
                        counted["texts"] += len(texts)
                    else:
                        counted["errors"] += 1
        finally:
            conn.close()

    cpu_before = time.process_time()
    await asyncio.gather(*(client(n) for n in range(concurrency)))
    cpu_share = (time.process_time() - cpu_before) / (warmup_s + duration_s)
    latencies.sort()
    return LoadResult(
        concurrency,
        duration_s,
        counted["requests"],
        counted["texts"],
        counted["errors"],
        percentile(latencies, 50),
        percentile(latencies, 95),
        percentile(latencies, 99),
        cpu_share,
        counted["gave_up"],
    )


def closed_loop(
    url: str | list[str],
    texts_for: Callable[[int], list[str]],
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    give_up_s: float | None = None,
) -> LoadResult:
    """POST `{"text": texts_for(i)}` to `url` from `concurrency` connections for warm-up + duration.

    Given several URLs (API replicas), the connections are spread over them round-robin.

    Requests that complete inside the window after the warm-up count (so throughput is not biased by
    slow requests straddling its edges); non-200 answers count as errors, not latencies. With
    `give_up_s`, a client stops waiting after that long, closes its connection and sends its next
    request on a new one (`gave_up`).
    """
    urls = [url] if isinstance(url, str) else url
    return _run_loop(_run(urls, texts_for, concurrency, warmup_s, duration_s, {}, give_up_s))


@dataclass(frozen=True)
class Load:
    """One client's closed loop in `together`: its connections, texts and headers (an API key)."""

    texts_for: Callable[[int], list[str]]
    concurrency: int
    headers: Mapping[str, str]


def together(url: str, loads: list[Load], duration_s: float, warmup_s: float = 1.0) -> list[LoadResult]:
    """Several clients' closed loops at once, over the same window, each measured on its own."""

    async def run() -> list[LoadResult]:
        return await asyncio.gather(
            *(_run([url], load.texts_for, load.concurrency, warmup_s, duration_s, load.headers) for load in loads)
        )

    return _run_loop(run())


@dataclass(frozen=True)
class OpenLoopResult:
    """One open-loop point: the requests sent inside the measuring window, by how each ended."""

    rate_per_s: float
    duration_s: float
    sent: int
    in_time: int  # answered 200 before the client's deadline
    refused: int  # 503 (the service said at once it could not answer in time, or a queue limit)
    late: int  # 504 (the service's own deadline)
    gave_up: int  # no answer by the client's deadline
    errors: int  # anything else
    p99_ms: float | None  # of the answers in time
    refusal_p99_ms: float | None  # of the refusals
    client_cpu_share: float

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "rate_per_s": round(self.rate_per_s, 2),
            "duration_s": round(self.duration_s, 3),
            "sent": self.sent,
            "in_time": self.in_time,
            "goodput_per_s": round(self.in_time / self.duration_s, 2),
            "refused": self.refused,
            "late": self.late,
            "gave_up": self.gave_up,
            "errors": self.errors,
            "p99_ms": self.p99_ms,
            "refusal_p99_ms": self.refusal_p99_ms,
            "client_cpu_share": round(self.client_cpu_share, 3),
        }


def open_loop(
    url: str | list[str],
    texts_for: Callable[[int], list[str]],
    rate_per_s: float,
    duration_s: float,
    warmup_s: float,
    give_up_s: float,
    headers: Mapping[str, str] | None = None,
) -> OpenLoopResult:
    """POST `{"text": texts_for(i)}` to `url` at `rate_per_s` requests a second for warm-up + duration,
    each sent when due whatever the earlier ones are doing (as many connections as that takes), each
    given up after `give_up_s`. Given several URLs (API replicas), the requests go to them in turn.
    The requests due after the warm-up count, by how they ended: by their schedule, not the moment they
    went out, so a generator that falls behind on a busy machine still counts the window's arrivals (it
    would count none where it falls behind by the whole window)."""
    targets = [urlsplit(u) for u in ([url] if isinstance(url, str) else url)]

    async def run() -> OpenLoopResult:
        loop = asyncio.get_running_loop()
        start = loop.time()
        measure_from, measure_to = start + warmup_s, start + warmup_s + duration_s
        # Per target, keep-alive connections free for the next request, since when.
        idle: list[list[tuple[_Connection, float]]] = [[] for _ in targets]
        answers: dict[int, list[float]] = {}  # by status, each request's milliseconds, of those due in the window

        async def send(number: int, due: float) -> None:
            target, free = targets[number % len(targets)], idle[number % len(targets)]
            if free and loop.time() - free[-1][1] >= KEEP_ALIVE_S:  # the latest idle past the keep-alive: all are
                for stale, _ in free:  # (the server may have closed them: never sent on)
                    stale.close()
                free.clear()
            conn = (
                free.pop()[0] if free else _Connection(target.hostname or "127.0.0.1", target.port or 80, headers or {})
            )
            sent_at = time.perf_counter()  # (the loop's clock is too coarse for latencies: `_run`)
            try:
                async with asyncio.timeout(give_up_s):
                    status = await conn.post(target.path or "/", orjson.dumps({"text": texts_for(number)}))
                free.append((conn, loop.time()))
            except TimeoutError:  # (before OSError, its base class)
                conn.close()
                status = GAVE_UP
            except OSError:
                conn.close()
                status = 0
            if measure_from <= due < measure_to:
                answers.setdefault(status, []).append((time.perf_counter() - sent_at) * 1000)

        cpu_before = time.process_time()
        sending: set[asyncio.Task[None]] = set()
        for number in itertools.count():
            if (due := start + number / rate_per_s) >= measure_to:
                break
            await asyncio.sleep(max(0.0, due - loop.time()))
            task = loop.create_task(send(number, due))
            sending.add(task)
            task.add_done_callback(sending.discard)
        await asyncio.gather(*sending)
        for conn, _ in itertools.chain.from_iterable(idle):
            conn.close()
        cpu_share = (time.process_time() - cpu_before) / (loop.time() - start)
        counted = {status: len(ms) for status, ms in answers.items()}
        known = (200, 503, 504, GAVE_UP)
        return OpenLoopResult(
            rate_per_s,
            duration_s,
            sum(counted.values()),
            counted.get(200, 0),
            counted.get(503, 0),
            counted.get(504, 0),
            counted.get(GAVE_UP, 0),
            sum(n for status, n in counted.items() if status not in known),
            percentile(sorted(answers.get(200, [])), 99),
            percentile(sorted(answers.get(503, [])), 99),
            cpu_share,
        )

    return _run_loop(run())

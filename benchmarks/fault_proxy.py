"""A TCP proxy that misbehaves as networks do, put between the service's processes and Redis by the
fault tests and the chaos run (`sentiment chaos`).

Faults that a killed process cannot stage, since its kernel resets its connections:

    silence()         every connection open now forwards nothing more and stays open (no FIN, no
                      RST): its peer vanished (a VM gone, a partition); new connections work
    blackhole(True)   every connection, open or new, forwards nothing while it lasts; what was sent
                      meanwhile flows once it ends (a partition that heals)
    delay(s)          every byte arrives `s` seconds late, both ways (pipelined: latency, not slowness)
    reset()           every open connection is reset (RST), as a restarted peer or a middlebox does

It runs its own event loop on a daemon thread; the methods above may be called from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's side and Redis' side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    silent: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    """Listens on 127.0.0.1:`port` (a free one unless given) and forwards to `upstream_host:upstream_port`."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._links: set[_Link] = set()
        self.swallowed: set[_Link] = set()  # silenced connections that were sent something since
        self._flowing = asyncio.Event()
        self._delay_s = 0.0
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"fault-proxy-{upstream_port}", daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._listen)
        return self

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def close(self) -> None:
        """Stop listening and reset every connection."""
        self._call(self._close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def silence(self) -> None:
        self._call(self._silence)

    def blackhole(self, on: bool) -> None:
        self._call(self._blackhole, on)

    def delay(self, seconds: float) -> None:
        self._call(self._set_delay, seconds)

    def reset(self) -> None:
        self._call(self._reset)

    @property
    def connections(self) -> int:
        return len(self._links)

    def _call(self, method: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        """Run a coroutine method on the proxy's loop and wait for it."""
        asyncio.run_coroutine_threadsafe(method(*args), self._loop).result(30)

    async def _listen(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _silence(self) -> None:
        for link in self._links:
            link.silent = True

    async def _blackhole(self, on: bool) -> None:
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    async def _set_delay(self, seconds: float) -> None:
        self._delay_s = seconds

    async def _reset(self) -> None:
        for link in list(self._links):
            for writer in (link.client, link.upstream):
                _abort(writer)
            for task in link.tasks:
                task.cancel()
        self._links.clear()

    async def _accept(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream = await asyncio.open_connection(*self.upstream)
        except OSError:  # Redis down: the client sees its connection reset, as it would
            _abort(client)
            return
        link = _Link(client, upstream)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pipe(link, client_reader, upstream)),
            asyncio.create_task(self._pipe(link, upstream_reader, client)),
        ]
        await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in link.tasks:  # one side closed: close the other (a silenced link forwards nothing)
            task.cancel()
        for writer in (client, upstream):
            writer.close()
        self._links.discard(link)

    async def _pipe(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward until EOF: each chunk `_delay_s` after it came, once the network flows, unless silenced."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                arrived, data = await chunks.get()
                if (wait_s := arrived + self._delay_s - loop.time()) > 0:
                    await asyncio.sleep(wait_s)
                await self._flowing.wait()
                if link.silent:
                    self.swallowed.add(link)
                else:
                    writer.write(data)
                    await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while data := await reader.read(65536):
                chunks.put_nowait((loop.time(), data))
        except OSError:
            pass
        finally:
            if not link.silent:
                with contextlib.suppress(asyncio.CancelledError):
                    while not chunks.empty() and not sender.done():  # what came before the EOF still goes
                        await asyncio.sleep(0.01)
            sender.cancel()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (RST), not a FIN: SO_LINGER with a zero timeout."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()

"""One Redis command for all the requests that send the same kind of command in one event-loop turn.

Under load, many requests reach the cache lookup or the queue in the same turn of the API's event
loop: a worker answers a whole batch at once, so its clients come back together. Each command
costs the API a command's worth of redis-py (pack, send, wake up, parse) and Redis one more command
to run. Coalesced, the turn's requests send one MGET of all their keys and one LPUSH of all their
work items. A lone request's command goes out in the turn it was made, so nobody waits for company
(auto-pipelining, as ioredis has it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class _Turn(Generic[In, Out]):
    """The calls made in one turn, and the task that runs them together."""

    def __init__(self) -> None:
        self.calls: list[tuple[In, asyncio.Future[Out]]] = []
        self.task: asyncio.Task[None] | None = None

    def abandoned(self) -> bool:
        return all(future.done() for _, future in self.calls)


class Coalescer(Generic[In, Out]):
    """`await coalescer(argument)`: `run` is called once per event-loop turn with the arguments of
    every caller of that turn, and returns their answers in order; each caller gets its own answer,
    or the exception `run` raised. A caller that gives up (its timeout) leaves the others waiting;
    when the last one gives up, `run` is cancelled too."""

    def __init__(self, run: Callable[[list[In]], Awaitable[list[Out]]]) -> None:
        self._run = run
        self._turn: _Turn[In, Out] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    async def __call__(self, argument: In) -> Out:
        loop = asyncio.get_running_loop()
        turn = self._turn
        if turn is None:
            turn = self._turn = _Turn()
            loop.call_soon(self._flush)  # after the callbacks already due in this turn
        future: asyncio.Future[Out] = loop.create_future()
        turn.calls.append((argument, future))
        try:
            return await future
        except asyncio.CancelledError:
            if turn.task is not None and turn.abandoned():
                turn.task.cancel()
            raise

    def _flush(self) -> None:
        turn, self._turn = self._turn, None
        assert turn is not None
        if turn.abandoned():
            return
        turn.task = asyncio.create_task(self._call(turn))
        self._tasks.add(turn.task)
        turn.task.add_done_callback(self._tasks.discard)

    async def _call(self, turn: _Turn[In, Out]) -> None:
        try:
            answers = await self._run([argument for argument, _ in turn.calls])
            if len(answers) != len(turn.calls):  # (a caller left without an answer would wait forever)
                raise ValueError(f"{len(answers)} answers to {len(turn.calls)} calls")
        except Exception as exc:
            for _, future in turn.calls:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), answer in zip(turn.calls, answers, strict=True):
            if not future.done():
                future.set_result(answer)

"""A function run every so often on a thread of its own, for as long as a block or a worker lasts.

The workers' periodic threads are all one kind: the /predict worker's heartbeat (`batcher.heartbeat`),
the jobs worker's per-job beat and its webhook sender (`batcher.jobs`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType

from batcher.thread_failure import ThreadFailure


class Periodic:
    """`tick()` every `period_s` seconds on a daemon thread named `name`, from `start` (or entering the
    `with` block) until `stop` (or leaving it); `stop` waits for a tick under way. `tick` deals with
    the errors it expects; one it does not stops the process (`failure`), or, without one, ends the
    thread with its traceback logged."""

    def __init__(
        self, name: str, period_s: float, tick: Callable[[], None], failure: ThreadFailure | None = None
    ) -> None:
        self.period_s = period_s
        self.tick = tick
        self._stop = threading.Event()
        run = failure.guard(name, self._run) if failure is not None else self._run
        self._thread = threading.Thread(target=run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # (started)
            self._thread.join()

    def __enter__(self) -> Periodic:
        self.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.tick()

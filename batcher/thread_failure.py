"""What a worker process does when one of its long-lived threads dies of an unexpected exception.

A thread that recovers from a failure by design (a Redis outage, a text the model rejects) does so
itself; anything else is a bug, and a process with a dead thread looks alive while its work waits
forever. So every long-lived thread runs under `ThreadFailure.guard`: the first exception is logged
with its traceback, the process is told to stop (it hands back its work), and it exits non-zero
with one line naming the thread and the cause (`ThreadFailed`), for `sentiment serve`'s supervisor
or Kubernetes to restart it. A stop that does not end within `grace_s` ends the process at once:
what it still held is reclaimed by the other workers.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

EXIT_STATUS = 70  # EX_SOFTWARE: an internal error


class ThreadFailed(Exception):
    """A long-lived thread died; the message is one line: which thread, and why."""


class ThreadFailure:
    """The first unexpected exception among a process's threads, and the stop it sets off."""

    def __init__(self, stop: Callable[[], None], grace_s: float) -> None:
        self._stop = stop
        self.grace_s = grace_s
        self.failed = threading.Event()
        self.cause: str | None = None
        self._lock = threading.Lock()
        self._deadline: threading.Timer | None = None

    def guard(self, name: str, target: Callable[[], None]) -> Callable[[], None]:
        """`target` as the body of the thread `name`: an exception out of it is `report`ed."""

        def run() -> None:
            try:
                target()
            except BaseException as exc:
                self.report(name, exc)

        return run

    def report(self, name: str, exc: BaseException) -> None:
        """`exc` ended thread `name`: log it, stop the process, and end it for good after `grace_s`."""
        with self._lock:
            if self.cause is not None:
                log.debug("thread %s failed too", name, exc_info=exc)
                return
            self.cause = f"the {name} thread failed ({type(exc).__name__}: {_message(exc)})"
        log.error("%s; stopping", self.cause, exc_info=exc)
        deadline = threading.Timer(self.grace_s, self._exit_now)
        deadline.daemon = True
        try:
            deadline.start()
            self._deadline = deadline
        except RuntimeError:  # no thread to be had (what failed may be just that): the stop goes on, unbounded
            log.warning("no thread for the %.0f s bound on the stop; stopping without it", self.grace_s)
        self.failed.set()
        self._stop()

    def raise_if_failed(self) -> None:
        """Once the stop is done: `ThreadFailed` if a thread failed (the exit never comes then)."""
        if self._deadline is not None:
            self._deadline.cancel()
        if self.cause is not None:
            raise ThreadFailed(self.cause)

    def _exit_now(self) -> None:
        log.critical("%s; still not stopped after %.0f s: exiting now", self.cause, self.grace_s)
        logging.shutdown()
        os._exit(EXIT_STATUS)


def stops(exc: BaseException) -> bool:
    """Whether `exc` is one of the interpreter's own stops (SystemExit, KeyboardInterrupt, GeneratorExit),
    which a thread that recovers from a failure by design must let through. Any other BaseException is
    a failure as an Exception is: pyo3 raises a native library's panic (tokenizers panics on some
    inputs) as `PanicException`, a BaseException."""
    return isinstance(exc, SystemExit | KeyboardInterrupt | GeneratorExit)


def _message(exc: BaseException) -> str:
    """`str(exc)`, or a stand-in where that fails (a `__str__` that raises, an argument whose repr does):
    describing a failure must never stop the stop it sets off."""
    try:
        return str(exc)
    except Exception:
        return "its message could not be read"

"""`sentiment serve`'s worker processes: started, watched, restarted with backoff, ended with serve.

A worker that exits while it starts (no model, a broken one) ends serve: `start` raises `StartFailed`
with the worker's own last line. One that dies later is restarted after 1, 2, 4 ... 30 s (back to 1 s
once it has stayed up a minute), and `problem` says so meanwhile, for /ready. Every child gets
Linux's parent-death signal, so SIGKILL of serve still ends it (SIGTERM: a worker finishes its batch
and hands back the rest), and its stderr passes through serve, which keeps the last line of each
and drains it even once serve's own stderr is gone. What the children write while they start is
held until all are up: a start-up failure then prints one line, serve's, with the failed child's
cause (what was held is logged at DEBUG).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

RESTART_MAX_S = 30.0
STEADY_S = 60.0  # up this long, a restarted child's next restart waits 1 s again
PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None  # bound before any fork


class StartFailed(Exception):
    """A child exited before it was up: the message is one line, the child's own cause."""


def die_with_parent(parent: int) -> Callable[[], None]:
    """A `preexec_fn` that has the child SIGTERMed when serve dies, however (Linux; elsewhere a child
    outlives a killed serve). The signal follows the thread that started the child: start children
    from threads that live as long as serve."""

    def arm() -> None:
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # serve died before the signal was armed
                os.kill(os.getpid(), signal.SIGTERM)

    return arm


@contextmanager
def sigint_kept_while_forking() -> Iterator[None]:
    """A Ctrl-C that lands while a child is forked is delivered once the fork is done: with a `preexec_fn`
    (`die_with_parent`) Python runs its at-fork hooks (logging's) in the parent, and a KeyboardInterrupt
    raised in one is printed and lost ("Exception ignored"). Python runs signal handlers in the main thread
    only: elsewhere this changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    heard: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _: heard.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if heard:
        signal.raise_signal(signal.SIGINT)


@dataclass
class Child:
    """One `sentiment <command>` process of serve's, and what serve knows of it."""

    name: str
    command: str
    env: dict[str, str]
    args: tuple[str, ...] = ()  # after the command: `api --port 8001`
    finishing: str = "its work"  # what it finishes once told to stop, for the log of a stop
    proc: subprocess.Popen[bytes] | None = None
    last_line: str = ""
    restarts: int = 0
    started_at: float = 0.0
    serving: bool = False  # `up` said so since it last started
    restart_at: float | None = None  # while it is down: when it starts again
    _echo: threading.Thread | None = field(default=None, repr=False)
    _held: list[bytes] = field(default_factory=list, repr=False)  # its stderr while it starts
    _output: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sentiment.cli", self.command, *self.args],
            env=self.env,
            stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches serve alone, which stops the children in order
            preexec_fn=die_with_parent(os.getpid()),
        )
        self.started_at, self.restart_at, self.serving, self.last_line = time.monotonic(), None, False, ""
        self._held = []
        self._echo = threading.Thread(
            target=self._pass_stderr, args=(self.proc,), name=f"{self.name}-stderr", daemon=True
        )
        self._echo.start()

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def cause(self) -> str:
        """Why it exited, in one line: the signal that killed it, or its exit status and its last line
        on stderr (where the CLI writes a failure's one-line cause)."""
        if self._echo is not None:
            self._echo.join(2)  # the rest of its stderr
        code = self.exit_code() or 0
        with self._output:
            if self._held:
                log.debug("%s wrote while starting:\n%s", self.name, b"".join(self._held).decode(errors="replace"))
                self._held = []
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit {code}: {self.last_line}" if code and self.last_line else f"exit {code}"

    def mark_up(self) -> None:
        """It serves: what it wrote while starting goes out now, and the rest as it comes."""
        with self._output:
            self.serving = True
            self._write(*self._held)
            self._held = []

    def _pass_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._output:
                if self.serving:
                    self._write(line)
                else:
                    self._held.append(line)
            if text := line.decode(errors="replace").strip():
                self.last_line = text

    @staticmethod
    def _write(*lines: bytes) -> None:
        """To serve's stderr; once that is gone (a closed terminal, a reader that ended: EPIPE), nowhere.
        The child's pipe is drained all the same, or the child would block on it once full."""
        try:
            for line in lines:
                sys.stderr.buffer.write(line)
            sys.stderr.flush()
        except (OSError, ValueError):  # (ValueError: serve's stderr closed)
            pass


class Supervisor:
    """Starts `children`, waits until `up` says each is serving, then keeps them running until `stop`."""

    def __init__(self, children: list[Child], up: Callable[[Child], bool]) -> None:
        self.children = children
        self.up = up
        self._stopping = threading.Event()
        self._watch = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> None:
        """Start every child and return once all are up; `StartFailed` (the others stopped) if one exits
        first. What the children wrote goes out once all are up: a start-up failure is one line, serve's,
        with its cause, however far the others got."""
        for child in self.children:
            child.start()
        up: set[str] = set()
        while len(up) < len(self.children):
            for child in self.children:
                if child.exit_code() is not None:
                    self.stop(quiet=True)
                    raise StartFailed(f"{child.name} exited while starting ({child.cause()})")
                if child.name not in up and self.up(child):
                    up.add(child.name)
            time.sleep(0.1)
        for child in self.children:
            child.mark_up()
        self._watch.start()

    def problem(self) -> str | None:
        """What is wrong now, for /ready: a child down and when it starts again, or one still starting.
        Never why it died: anyone may read /ready, and a cause may name hosts and paths (the log has it)."""
        for child in self.children:
            if child.restart_at is not None:
                wait_s = max(0.0, child.restart_at - time.monotonic())
                return f"{child.name} died; restart {child.restarts} in {wait_s:.0f} s"
            if not child.serving:
                return f"{child.name} starting again (restart {child.restarts})"
        return None

    def stop(self, timeout_s: float = 30.0, quiet: bool = False) -> None:
        """SIGTERM every child (workers finish their batch and hand back the rest); SIGKILL after `timeout_s`,
        or at once when told to stop again meanwhile (a second Ctrl-C: SystemExit or KeyboardInterrupt), so
        that no child outlives serve. What it waits for is logged at INFO, at DEBUG when `quiet`."""
        level = logging.DEBUG if quiet else logging.INFO
        self._stopping.set()
        if self._watch.is_alive():
            self._watch.join()
        running = [(c, c.proc) for c in self.children if c.proc is not None and c.proc.poll() is None]
        if running:
            waits = ", ".join(f"{child.name} to finish {child.finishing}" for child, _ in running)
            log.log(level, "stopping: waiting (at most %.0f s) for %s", timeout_s, waits)
        for _, proc in running:
            proc.send_signal(signal.SIGTERM)
        give_up = time.monotonic() + timeout_s
        try:
            for child, proc in running:
                try:
                    wait_s = max(0.0, give_up - time.monotonic())
                    log.log(level, "%s stopped (exit %s)", child.name, proc.wait(wait_s))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %.0f s: killed", child.name, timeout_s)
                    proc.kill()
                    proc.wait()
        except (SystemExit, KeyboardInterrupt):
            for child, proc in running:
                if proc.poll() is None:
                    log.warning("%s killed: told again to stop", child.name)
                    proc.kill()
                    proc.wait()
            raise

    def _run(self) -> None:
        """Look after every child each 0.2 s. Whatever fails while looking after one (a fork refused
        for lack of memory, a bug) is logged and tried again later: this thread outlives anything, or
        no child would be restarted again."""
        while not self._stopping.wait(0.2):
            for child in self.children:
                try:
                    self._look_after(child, time.monotonic())
                except Exception:
                    log.exception("looking after %s failed; trying again", child.name)
                    if child.restart_at is not None:  # its start failed: the next one after a backoff
                        self._restart_later(child, time.monotonic())

    def _look_after(self, child: Child, now: float) -> None:
        if child.exit_code() is None:
            if not child.serving and self.up(child):
                child.mark_up()
                log.info("%s up again (restart %d)", child.name, child.restarts)
            return
        child.serving = False
        if child.restart_at is None:
            log.warning(
                "%s died (%s); restarting in %.0f s", child.name, child.cause(), self._restart_later(child, now)
            )
        elif now >= child.restart_at:
            child.start()

    def _restart_later(self, child: Child, now: float) -> float:
        """Start `child` again 1, 2, 4 ... `RESTART_MAX_S` seconds from now (1 s again once it stayed
        up `STEADY_S`); returns the delay."""
        steady = now - child.started_at >= STEADY_S
        delay = 1.0 if steady else min(RESTART_MAX_S, 2.0 ** min(child.restarts, 16))  # (2.0**1024 overflows)
        child.restarts = 1 if steady else child.restarts + 1
        child.restart_at = now + delay
        return delay

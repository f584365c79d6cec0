"""The processes a benchmark measures: started in their own session, ready-checked, always stopped,
and SIGTERMed by Linux if the benchmark itself is killed (`die_with_parent`, as serve's children)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx

from sentiment.supervisor import die_with_parent, sigint_kept_while_forking

logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per readiness poll


class Processes:
    """Child processes (the service, the baselines) that all stop when the `running` block ends."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """`python <args>`; its stderr (warnings and errors) shows in the benchmark's output. Call it
        from the thread that outlives the child (the parent-death signal follows that thread)."""
        with sigint_kept_while_forking():
            proc = subprocess.Popen(
                [sys.executable, *args],
                env={**os.environ, **env},
                stdout=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent(os.getpid()),
            )
            self.procs.append(proc)
        return proc

    def wait_ok(self, url: str, timeout_s: float = 300) -> None:
        """Until GET `url` answers 200; fails fast when a child exits."""
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            if dead := [p.args for p in self.procs if p.poll() is not None]:
                raise RuntimeError(f"a benchmark process exited early: {dead}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url, timeout=5).status_code == 200:
                    return
            time.sleep(0.25)
        raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGTERM (graceful: workers finish their batch), then SIGKILL whatever is left after 30 s."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


@contextlib.contextmanager
def running() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop()


def uvicorn_args(app: str, port: int) -> list[str]:
    """A benchmark subject app under uvicorn with the API's server options (one process, no access log)."""
    return [
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]

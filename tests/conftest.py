"""Shared fixtures: fakeredis for logic, a real redis-server for end to end, tiny and real models."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import fakeredis
import httpx
import numpy as np
import pytest
from hypothesis import is_hypothesis_test
from hypothesis.stateful import RuleBasedStateMachine
from redis import Redis

from batcher.worker import Worker
from benchmarks.checkpoints import write_tiny_model
from core.settings import Settings
from model_store.classifier import Classifier
from sentiment.embedded import embedded_redis, free_port, start_redis_server

REPO = Path(__file__).resolve().parents[1]
# Development data lives beside the checkout (../shared); SENTIMENT_SHARED_DIR points elsewhere.
SHARED = Path(os.environ.get("SENTIMENT_SHARED_DIR", REPO.parent / "shared"))
# The services tests start open no gRPC port unless a test gives one: the default port would be taken
# by the first, and the next would fail to start.
os.environ["SENTIMENT_GRPC_PORT"] = "0"
# The model workers tests start keep their CPU priority unless a test gives one: the suite runs in parallel, and
# a worker at a lower priority than the other tests' processes on the same cores waits on them, past the hang
# guards (its default priority is for sharing cores with its own API, tests/test_serve.py checks it).
os.environ["SENTIMENT_WORKER_NICE"] = "0"
# `sentiment serve` keeps its Redis data in a directory of this session's, not the working directory's.
os.environ["SENTIMENT_DATA_DIR"] = tempfile.mkdtemp(prefix="sentiment-data-")
atexit.register(shutil.rmtree, os.environ["SENTIMENT_DATA_DIR"], ignore_errors=True)
# Every wait in the tests is a hang guard, never a timing claim: generous on a loaded 2-core box.
HANG_GUARD_S = 60.0
T = TypeVar("T")
# The fast tier (`--fast`) is every test of pure logic: it leaves out the tests marked `slow`, those that
# start a process, a real Redis or a browser, or load the real checkpoint. A test that takes one of these
# fixtures, or is marked `faults`, is marked for it; one that starts a process itself carries the marker,
# and an unmarked test that starts one fails saying so (`refuse_processes`): the tier stays what it says.
SLOW_FIXTURES = frozenset({"redis_url", "redis_server", "small_model_dir"})
FAST_EXAMPLES = 10  # the fewest examples a Hypothesis test runs in the fast tier (a tenth of its full count)
fast_tier = False  # set from `--fast` at configure, before any test module is imported


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fast",
        action="store_true",
        help="the fast tier: only tests not marked slow, Hypothesis tests at a tenth of their examples",
    )


def pytest_configure(config: pytest.Config) -> None:
    global fast_tier
    fast_tier = config.getoption("--fast")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("faults") or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # On parallel workers: the slow tests first, then the Hypothesis tests (each runs its examples on one core),
    # then the rest, and those that need the machine alone last; a stable sort, a module's tests stay in order.
    # The workers then start the long tests early and end on short ones; a test alone waits for short ones.
    if "PYTEST_XDIST_WORKER" in os.environ:
        items.sort(
            key=lambda item: (
                bool(item.get_closest_marker("alone")),
                not item.get_closest_marker("slow"),
                not is_hypothesis_test(getattr(item, "obj", None)),
            )
        )
    if fast_tier:
        slow = [item for item in items if item.get_closest_marker("slow")]
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config.hook.pytest_deselected(items=slow)


def examples(full: int) -> int:
    """A Hypothesis test's example count: `full` in the full suite, a tenth (at least `FAST_EXAMPLES`) in the
    fast tier, which runs the same rules and invariants on fewer sequences."""
    return min(full, max(FAST_EXAMPLES, full // 10)) if fast_tier else full


@pytest.fixture(autouse=True)
def machine_share(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """On parallel workers (pytest-xdist), a test marked `alone` has the machine to itself: it waits for the
    tests running on the other workers to end, and they wait for it. A readers-writer lock over two files in
    the run's shared temporary directory; the turnstile, held by a waiting test alone, lets no other start."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    shared = tmp_path_factory.getbasetemp().parent  # (each worker's own directory is in the run's)
    alone = request.node.get_closest_marker("alone") is not None
    with open(shared / "turnstile.lock", "a") as turnstile, open(shared / "machine.lock", "a") as machine:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if not alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        fcntl.flock(machine, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(machine, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def refuse_processes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test not marked `slow` starts no process: it fails at the start, naming the marker."""
    if request.node.get_closest_marker("slow"):
        return

    def refused(self: subprocess.Popen[Any], args: object, *_: object, **__: object) -> None:
        pytest.fail(f"{request.node.nodeid} starts a process ({args!r}): mark it `slow`, out of the fast tier")

    monkeypatch.setattr(subprocess.Popen, "__init__", refused)


class LoopMachine(RuleBasedStateMachine):
    """A Hypothesis state machine over asyncio code, on an event loop of its own: `settle` runs it until
    what the last step set going has gone as far as it can; at the end, what still runs is cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()

    def settle(self) -> None:
        for _ in range(10):
            self.loop.run_until_complete(asyncio.sleep(0))

    def teardown(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.settle()
        self.loop.close()


class Gate(Generic[T]):
    """Calls (of anything: a read, a GETDEL, a push) that each wait on a future of their own, which a
    state machine ends, or fails, when it says."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls: list[asyncio.Future[T]] = []

    async def __call__(self, *_: object) -> T:
        call: asyncio.Future[T] = self.loop.create_future()
        self.calls.append(call)
        return await call

    def on_its_way(self) -> list[asyncio.Future[T]]:
        return [call for call in self.calls if not call.done()]


# How far a service's score for a text may lie from the reference classifier's own forward of it: a
# row's arithmetic may depend on the batch it rode in (bf16 kernels are picked by shape on a CPU
# without AMX, and moved one of the tiny model's scores by 1.5e-5).
SCORE_ABS = 1e-4


def shared_path(relative: str) -> Path:
    """A file from ../shared; absent data fails in CI (where it must exist) and skips elsewhere."""
    path = SHARED / relative
    if not path.exists():
        message = f"{path} is missing (set SENTIMENT_SHARED_DIR to the shared data directory)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def classifier(tiny_model_dir: Path) -> Classifier:
    return Classifier(tiny_model_dir, device="cpu", threads=1)


@pytest.fixture(scope="session")
def small_model_dir() -> Path:
    return shared_path("models/distilbert-sst2-small")


@pytest.fixture
def fake_server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def redis(fake_server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fake_server)


@pytest.fixture
def settings(tiny_model_dir: Path) -> Settings:
    return Settings(key_prefix="test", model_dir=tiny_model_dir, max_wait_ms=20, request_timeout_s=10)


@pytest.fixture
def worker(settings: Settings, redis: fakeredis.FakeRedis, classifier: Classifier) -> Iterator[Worker]:
    """A worker on the fake Redis; `start_worker` runs it in a thread, and it stops after the test."""
    worker = Worker(settings, redis, classifier)
    yield worker
    worker.stop()


def start_worker(worker: Worker) -> threading.Thread:
    """Run `worker` in a thread, and return once it has announced its model and its heartbeat, as a
    readiness probe would wait: an API that looked the model up before that would miss the cache for
    a second."""
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()

    def announced() -> bool:
        assert thread.is_alive(), "the worker thread ended before announcing its model"
        return bool(worker.redis.get(worker.keys.model) and worker.redis.exists(worker.keys.heartbeat(worker.id)))

    wait_for("the worker to announce its model and heartbeat", announced)
    return thread


def wait_for(what: str, check: Callable[[], T], guard_s: float = HANG_GUARD_S) -> T:
    """`check()` once it is truthy; when the guard trips, the error says where every thread was."""
    give_up = time.monotonic() + guard_s
    while not (value := check()):
        if time.monotonic() > give_up:
            raise TimeoutError(f"gave up waiting for {what} after {guard_s} s\n{thread_stacks()}")
        time.sleep(0.01)
    return value


def runs(pid: int) -> bool:
    """Whether `pid` runs (a zombie, ended but not yet reaped by its new parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children_of(pid: int) -> dict[int, str]:
    """The processes `pid` started that run yet, by pid: their program's name (as /proc's stat has it)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            name, fields = stat.read_text().rsplit(")", 1)
            if int(fields.split()[1]) == pid:
                found[int(stat.parent.name)] = name.split("(", 1)[1]
    return found


def killed_with(parent: subprocess.Popen[Any], child: int, what: str) -> None:
    """SIGKILL `parent`, then wait for its `child` to end with it (killed here if it does not, so that
    a failure leaves nothing running)."""
    parent.kill()
    parent.wait()
    try:
        wait_for(f"{what} to end with its parent", lambda: not runs(child))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def interrupted_at(proc: subprocess.Popen[str], lines: Iterable[str], prefix: str) -> tuple[str, str]:
    """Ctrl-C (SIGINT) to `proc` once one of its output `lines` starts with `prefix`; its output after."""
    for line in lines:
        if line.startswith(prefix):
            break
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=HANG_GUARD_S)


def as_background_job(command: list[str], **popen: Any) -> subprocess.Popen[str]:
    """`command` started as a non-interactive shell's `command &` starts it, with SIGINT ignored (as nohup'd
    jobs and some CI runners start pytest too): a test of what Ctrl-C keeps then holds whatever signal
    disposition the test run itself inherited."""
    ignoring_sigint = ["/bin/sh", "-c", 'trap "" INT; exec "$@"', "sh"]
    return subprocess.Popen(
        [*ignoring_sigint, *command], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def thread_stacks() -> str:
    """Where every thread of this process is: what a hang guard reports when it trips."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(
        f"--- thread {names.get(ident, ident)}\n{''.join(traceback.format_stack(frame))}"
        for ident, frame in sys._current_frames().items()
    )


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server on a free port, for this test session only."""
    assert shutil.which("redis-server"), "redis-server is not installed (.ci/run installs it)"
    with embedded_redis() as url:
        yield url


class RedisServer:
    """A redis-server a test can stop and start again on the same port (outage tests): memory only,
    or with an append-only file in `data`, as k8s/base/redis.yaml runs it (started again, it holds
    what it held)."""

    def __init__(self, data: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.data = data
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = start_redis_server(self.port, self.data)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def evicting_cache(client: Redis, evictions: int = 2000) -> None:
    """Fill `client`'s Redis (a `maxmemory` set) with cache entries, as the workers write them (an
    expiry each), until it evicted `evictions` keys."""
    filler = itertools.count()

    def evicted_plenty() -> bool:
        with client.pipeline(transaction=False) as pipe:
            for _ in range(100):
                pipe.set(f"cache:{next(filler)}", b"x" * 10_000, ex=3600)
            pipe.execute()
        return client.info("stats")["evicted_keys"] >= evictions

    wait_for("Redis to evict cache entries", evicted_plenty, 60.0)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A test's own redis-server (empty, memory only), stopped after the test."""
    assert shutil.which("redis-server"), "redis-server is not installed (.ci/run installs it)"
    server = RedisServer()
    server.start()
    yield server
    server.stop()


class Service:
    """`sentiment api` and `sentiment worker` as separate processes against one Redis."""

    def __init__(self, redis_url: str, model_dir: Path, prefix: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "SENTIMENT_REDIS_URL": redis_url,
            "SENTIMENT_MODEL_DIR": str(model_dir),
            "SENTIMENT_KEY_PREFIX": prefix,
            "SENTIMENT_METRICS_PORT": "0",
            "SENTIMENT_JOBS_METRICS_PORT": "0",
            **env,
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *command: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "sentiment.cli", *command], env=self.env)
        self.procs.append(proc)
        return proc

    def wait_ready(self, timeout_s: float = 120) -> None:
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            assert all(p.poll() is None for p in self.procs), "a service process exited"
            if answers(f"{self.url}/ready"):
                return
            time.sleep(0.2)
        raise TimeoutError("service not ready")

    def stop(self) -> list[int]:
        for proc in self.procs:
            proc.terminate()
        return [proc.wait(30) for proc in self.procs]


def answers(url: str) -> bool:
    """Whether `url` answers 200 (a service up, or ready); False while nothing listens."""
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def start_service(redis_url: str, model_dir: Path, prefix: str, **env: str) -> Service:
    service = Service(redis_url, model_dir, prefix, **env)
    service.start("api", "--port", str(service.port))
    service.start("worker")
    service.wait_ready()
    return service


def hold_forwards(monkeypatch: pytest.MonkeyPatch, classifier: Classifier) -> tuple[threading.Event, threading.Event]:
    """Make `classifier`'s forwards wait, each, for `release` (`forwarding` is set as one starts), so
    what a worker takes meanwhile stays unstarted. Returns (forwarding, release)."""
    real_forward = classifier.engine.forward
    forwarding, release = threading.Event(), threading.Event()

    def held(batch: list[list[int]], packed: bool = False) -> np.ndarray:
        forwarding.set()
        release.wait(HANG_GUARD_S)
        return real_forward(batch, packed)

    monkeypatch.setattr(classifier.engine, "forward", held)
    return forwarding, release

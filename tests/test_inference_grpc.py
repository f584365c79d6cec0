"""The Open Inference Protocol over gRPC, through clients this project did not write.

End to end: `sentiment api` (with its gRPC port) and `sentiment worker` against a real redis-server,
called by tritonclient.grpc and kserve's InferenceGRPCClient, answering what /predict answers. Each
client runs in a process of its own: both register the protocol's messages in protobuf's one default
pool, as our generated modules do, and a pool takes each message once.
In process on fakeredis, through our own generated stub: the status code of every refusal, the
call's deadline as the request's, API keys, and the .proto held to the protocol's.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import grpc
import httpx
import pytest
from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError

from api.app import create_app
from api.errors import ERRORS, ErrorType
from api.grpc_v2 import grpc_predict_v2_pb2 as pb
from api.grpc_v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from api.inference_grpc import GrpcServer
from api.predictions import ModelInfoCache, Predictor
from api.rate_limit import RateLimit
from core.protocol import Keys, ModelInfo, WorkerStatus, WorkItem
from core.settings import Settings
from sentiment.embedded import free_port
from tests.conftest import HANG_GUARD_S, REPO, Service, start_service, wait_for
from tests.test_api import stall

KEY = "a-test-key-of-some-length"
TEXTS = ["a good movie", "bad", "", "a good movie", "ünïcödé ✓"]
README = (REPO / "README.md").read_text()
PROTO = REPO / "api" / "grpc_v2" / "grpc_predict_v2.proto"


@pytest.fixture(scope="module")
def service(redis_url: str, tiny_model_dir: Path) -> Iterator[Service]:
    service = start_service(
        redis_url,
        tiny_model_dir,
        "grpc",
        SENTIMENT_GRPC_PORT=str(free_port()),
        SENTIMENT_REQUEST_TIMEOUT_S="120",
        SENTIMENT_MAX_TEXTS="8",
    )
    yield service
    assert service.stop() == [0, 0]


@pytest.fixture(scope="module")
def grpc_address(service: Service) -> str:
    return f"127.0.0.1:{service.env['SENTIMENT_GRPC_PORT']}"


@pytest.fixture(scope="module")
def model(service: Service) -> dict:
    return httpx.get(f"{service.url}/model", timeout=30).json()


def run_client(script: str, **values: Any) -> Any:
    """Run `script` in a fresh Python, `values` bound as JSON; what it printed last, as JSON."""
    preamble = "".join(f"{name} = json.loads({json.dumps(json.dumps(value))})\n" for name, value in values.items())
    done = subprocess.run(
        [sys.executable, "-c", "import json\n" + preamble + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_tritonclient_grpc_probes_reads_metadata_and_classifies_as_predict(
    service: Service, grpc_address: str, model: dict
) -> None:
    answer = run_client(
        """
        import numpy as np, tritonclient.grpc as triton
        from tritonclient.utils import InferenceServerException
        client = triton.InferenceServerClient(address)
        metadata = client.get_model_metadata(name, as_json=True)
        text = triton.InferInput("text", [len(texts), 1], "BYTES")
        text.set_data_from_numpy(np.array(texts, dtype=object).reshape(-1, 1))
        result = client.infer(name, [text], request_id="r-1", client_timeout=60)
        only = client.infer(name, [text], outputs=[triton.InferRequestedOutput("scores")])
        refusals = {}
        for case, model_name, data in (
            ("unknown model", "no-such-model", ["x"]),
            ("too many texts", name, ["x"] * 9),  # SENTIMENT_MAX_TEXTS is 8
            ("too long", name, ["x" * 10_000]),
        ):
            bad = triton.InferInput("text", [len(data)], "BYTES")
            bad.set_data_from_numpy(np.array(data, dtype=object))
            try:
                client.infer(model_name, [bad])
            except InferenceServerException as exc:
                refusals[case] = exc.status()
        print(json.dumps({
            "live": client.is_server_live(),
            "ready": client.is_server_ready(),
            "model ready": client.is_model_ready(name),
            "other model ready": client.is_model_ready("no-such-model"),
            "server": client.get_server_metadata(as_json=True),
            "metadata": metadata,
            "response": result.get_response(as_json=True),
            "label": [label.decode() for label in result.as_numpy("label")],
            "scores": result.as_numpy("scores").tolist(),
            "only": [o.name for o in only.get_response().outputs],
            "refusals": refusals,
        }))
        """,
        address=grpc_address,
        name=model["name"],
        texts=TEXTS,
    )
    assert answer["live"] and answer["ready"] and answer["model ready"] and not answer["other model ready"]
    assert answer["server"]["name"] == "sentiment-batcher"
    metadata = answer["metadata"]
    assert (metadata["name"], metadata["versions"]) == (model["name"], [model["version"]])
    assert [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]] == [
        ("label", "BYTES", ["-1"]),
        ("scores", "FP32", ["-1", str(len(model["labels"]))]),
    ]
    response = answer["response"]
    assert (response["model_name"], response["model_version"], response["id"]) == (
        model["name"],
        model["version"],
        "r-1",
    )
    predicted = httpx.post(f"{service.url}/predict", json={"text": TEXTS}, timeout=60).json()["predictions"]
    assert answer["scores"] == [pytest.approx([s["score"] for s in p], abs=1e-6) for p in predicted]
    assert answer["label"] == [max(p, key=lambda s: s["score"])["label"] for p in predicted]
    assert answer["only"] == ["scores"]
    assert answer["refusals"] == {
        "unknown model": "StatusCode.NOT_FOUND",
        "too many texts": "StatusCode.INVALID_ARGUMENT",
        "too long": "StatusCode.INVALID_ARGUMENT",
    }


def test_kserves_grpc_client_classifies_as_predict(service: Service, grpc_address: str, model: dict) -> None:
    answer = run_client(
        """
        import asyncio, numpy as np
        from kserve import InferenceGRPCClient, InferInput, InferRequest

        async def main():
            client = InferenceGRPCClient(address, timeout=60)
            text = InferInput("text", [len(texts)], "BYTES")
            text.set_data_from_numpy(np.array(texts, dtype=object))
            result = await client.infer(InferRequest(model_name=name, infer_inputs=[text], request_id="k-1"))
            ready = await client.is_server_ready() and await client.is_model_ready(name)
            await client.close()
            return {
                "ready": ready,
                "id": result.id,
                "outputs": {o.name: o.as_numpy().tolist() for o in result.outputs},
            }

        print(json.dumps(asyncio.run(main()), default=lambda b: b.decode()))
        """,
        address=grpc_address,
        name=model["name"],
        texts=TEXTS,
    )
    predicted = httpx.post(f"{service.url}/predict", json={"text": TEXTS}, timeout=60).json()["predictions"]
    assert answer["ready"] and answer["id"] == "k-1"
    assert answer["outputs"]["scores"] == [pytest.approx([s["score"] for s in p], abs=1e-6) for p in predicted]
    assert answer["outputs"]["label"] == [max(p, key=lambda s: s["score"])["label"] for p in predicted]


def test_tritonclients_float_and_uint64_parameters_are_taken_as_over_rest(
    service: Service, grpc_address: str, model: dict
) -> None:
    """tritonclient.grpc sends `priority` as Triton's `uint64_param` and a float parameter as its
    `double_param`, choices KServe's message lacks: read as REST reads the same request's JSON."""
    answer = run_client(
        """
        import numpy as np, tritonclient.grpc as triton
        from tritonclient.utils import InferenceServerException
        text = triton.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array(["a good movie"], dtype=object))
        try:
            result = triton.InferenceServerClient(address).infer(
                name, [text], priority=2**64 - 1, parameters={"temperature": 0.5}, client_timeout=60
            )
            print(json.dumps([label.decode() for label in result.as_numpy("label")]))
        except InferenceServerException as exc:
            print(json.dumps([exc.status(), exc.message()]))
        """,
        address=grpc_address,
        name=model["name"],
    )
    predicted = httpx.post(f"{service.url}/predict", json={"text": ["a good movie"]}, timeout=60).json()
    assert answer == [max(predicted["predictions"][0], key=lambda s: s["score"])["label"]]


@pytest.mark.parametrize("client", ["over gRPC with Triton's client", "over gRPC with KServe's client"])
def test_the_readmes_grpc_snippets_classify_through_the_service(
    service: Service, grpc_address: str, model: dict, client: str
) -> None:
    snippet = README.split(client)[1].split("```python\n")[1].split("```")[0]
    snippet = snippet.replace("localhost:8000", service.url.removeprefix("http://")).replace(
        "localhost:8001", grpc_address
    )
    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    labels, scores = done.stdout.split("] [", 1)
    assert sum(labels.count(f"'{label}'") for label in model["labels"]) == 2  # one per text
    assert scores.count("[") == 2  # a row of scores per text


def test_a_taken_grpc_port_ends_the_api_with_one_line(redis_url: str, tiny_model_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        service = Service(redis_url, tiny_model_dir, "grpc-taken", SENTIMENT_GRPC_PORT=str(port))
        done = subprocess.run(
            [sys.executable, "-m", "sentiment.cli", "api", "--port", str(service.port)],
            env=service.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"sentiment: cannot listen on 127.0.0.1:{port} (Address already in use): another process holds it? "
        "choose one with --grpc-port"
    ]


# In process, on fakeredis, through our own stub.


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class InProcess:
    """The app's gRPC service through our stub, and its REST routes through `http`."""

    def __init__(
        self, stub: pb_grpc.GRPCInferenceServiceStub, http: httpx.AsyncClient, redis: fakeredis.FakeRedis, keys: Keys
    ) -> None:
        self.stub = stub
        self.http = http
        self.redis = redis
        self.keys = keys

    def announce(self) -> None:
        self.redis.set(self.keys.model, ModelInfo("tiny", "v1", ["NEGATIVE", "POSITIVE"], "cpu", "float32").encode())


async def in_process(settings: Settings, fake_server: fakeredis.FakeServer) -> AsyncIterator[InProcess]:
    server = GrpcServer(settings, "127.0.0.1", 0)
    app = create_app(
        settings, redis=fakeredis.FakeAsyncRedis(server=fake_server), jobs_redis=fakeredis.FakeRedis(), grpc=server
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        httpx.AsyncClient(transport=transport, base_url="http://api") as http,
    ):
        yield InProcess(
            pb_grpc.GRPCInferenceServiceStub(channel),
            http,
            fakeredis.FakeRedis(server=fake_server),
            Keys(settings.key_prefix),
        )


@pytest.fixture
async def local(
    settings: Settings, fake_server: fakeredis.FakeServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[InProcess]:
    monkeypatch.setattr("api.predictions.MODEL_INFO_MAX_AGE_S", 0)  # an announcement is seen at once
    async for running in in_process(settings.model_copy(update={"max_queue_depth": 1}), fake_server):
        yield running


def infer_request(texts: list[str], shape: list[int] | None = None, name: str = "tiny") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name="text", datatype="BYTES", shape=shape or [len(texts)])
    request.inputs[0].contents.bytes_contents.extend(t.encode() for t in texts)
    return request


async def status_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return refused.value.code()


@pytest.mark.anyio
async def test_every_refusal_has_its_status_code(local: InProcess) -> None:
    stub = local.stub
    assert await status_of(stub.ModelInfer(infer_request(["x"]), timeout=30)) == grpc.StatusCode.UNAVAILABLE
    assert await status_of(stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"))) == grpc.StatusCode.UNAVAILABLE
    local.announce()
    assert await status_of(stub.ModelInfer(infer_request(["x"], name="other"))) == grpc.StatusCode.NOT_FOUND
    two_inputs = infer_request(["x"])
    two_inputs.inputs.add(name="more", datatype="BYTES", shape=[1])
    wrong_type = infer_request(["x"])
    wrong_type.inputs[0].datatype = "FP32"
    not_utf8 = infer_request([])
    not_utf8.inputs[0].shape[:] = [1]
    not_utf8.inputs[0].contents.bytes_contents.append(b"\xff\xfe")
    unknown_output = infer_request(["x"])
    unknown_output.outputs.add(name="logits")
    no_data = infer_request([], shape=[1])
    for bad in (
        infer_request(["a", "b"], shape=[3]),
        infer_request(["a", "b"], shape=[2, 2]),
        infer_request(["x" * 2001]),  # over SENTIMENT_MAX_CHARS
        infer_request(["x"] * 65),  # over SENTIMENT_MAX_TEXTS
        two_inputs,
        wrong_type,
        not_utf8,
        unknown_output,
        no_data,
    ):
        assert await status_of(stub.ModelInfer(bad)) == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert local.redis.llen(local.keys.queue) == 0  # nothing was queued
    for n in range(2):  # another client's work fills the queue past twice its depth (1)
        local.redis.lpush(local.keys.queue, WorkItem(f"w{n}", ["y"], time.time(), time.time() + 60, "c").encode())
    assert await status_of(stub.ModelInfer(infer_request(["x"]))) == grpc.StatusCode.UNAVAILABLE  # overloaded
    assert local.redis.llen(local.keys.queue) == 2  # and its work taken back


@pytest.mark.anyio
async def test_a_refusal_says_when_to_retry_over_grpc_as_over_rest(local: InProcess) -> None:
    """Overloaded: REST's 503 has `Retry-After`, gRPC's UNAVAILABLE the same wait as its retry
    pushback (`grpc-retry-pushback-ms`, which a client's retry policy honours)."""
    local.announce()
    for n in range(2):  # another client's work fills the queue past twice its depth (1)
        local.redis.lpush(local.keys.queue, WorkItem(f"w{n}", ["y"], time.time(), time.time() + 60, "c").encode())
    rest = await local.http.post("/v2/models/tiny/infer", json={"inputs": [tensor()]})
    assert (rest.status_code, rest.json()["error_type"], rest.headers["retry-after"]) == (503, "overloaded", "1")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await local.stub.ModelInfer(infer_request(["x"]), timeout=HANG_GUARD_S)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ("grpc-retry-pushback-ms", "1000") in tuple(refused.value.trailing_metadata() or ())


def tensor(**fields: Any) -> dict[str, Any]:
    """A V2 input as REST's JSON has it: one text, but for `fields` (None: without that field)."""
    tensor = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"], **fields}
    return {key: value for key, value in tensor.items() if value is not None}


def binary_texts(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def set_parameter(parameter: pb.InferParameter, value: bool | int | float | str) -> None:
    kind = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[type(value)]
    setattr(parameter, kind, value)


def grpc_infer_request(body: dict[str, Any], binary: bytes | None) -> pb.ModelInferRequest:
    """REST's V2 request `body` (and its input's `binary` data) as the same request over gRPC."""
    request = pb.ModelInferRequest(model_name="tiny", id=body.get("id", ""))
    for key, value in body.get("parameters", {}).items():
        set_parameter(request.parameters[key], value)
    for fields in body["inputs"]:
        sent = request.inputs.add(name=fields["name"], datatype=fields["datatype"], shape=fields["shape"])
        sent.contents.bytes_contents.extend(text.encode() for text in fields.get("data", []))
        for key, value in fields.get("parameters", {}).items():
            set_parameter(sent.parameters[key], value)
    for output in body.get("outputs", []):
        asked = request.outputs.add(name=output["name"])
        for key, value in output.get("parameters", {}).items():
            set_parameter(asked.parameters[key], value)
    if binary is not None:
        request.raw_input_contents.append(binary)
    return request


async def rest_infer(http: httpx.AsyncClient, body: dict[str, Any], binary: bytes | None) -> httpx.Response:
    """`body` over REST; with `binary`, as the binary tensor extension sends the input's data."""
    if binary is None:
        return await http.post("/v2/models/tiny/infer", json=body)
    body["inputs"][0]["parameters"] = {"binary_data_size": len(binary)}
    header = json.dumps(body).encode()
    return await http.post(
        "/v2/models/tiny/infer",
        content=header + binary,
        headers={"Inference-Header-Content-Length": str(len(header)), "content-type": "application/json"},
    )


# Bad requests, each sent as REST's JSON and as gRPC's protobuf: (the request, its input's binary data).
BAD_REQUESTS: dict[str, tuple[dict[str, Any], bytes | None]] = {
    "shape and data disagree": ({"inputs": [tensor(shape=[3], data=["a", "b"])]}, None),
    "a shape of three dimensions": ({"inputs": [tensor(shape=[1, 1, 1])]}, None),
    "a shape of [2, 2]": ({"inputs": [tensor(shape=[2, 2], data=["a", "b", "c", "d"])]}, None),
    "a dimension of 0": ({"inputs": [tensor(shape=[0])]}, None),
    "more texts than SENTIMENT_MAX_TEXTS": ({"inputs": [tensor(shape=[65], data=["x"] * 65)]}, None),
    "a text over SENTIMENT_MAX_CHARS": ({"inputs": [tensor(data=["x" * 2001])]}, None),
    "not BYTES": ({"inputs": [tensor(datatype="FP32")]}, None),
    "two inputs": ({"inputs": [tensor(), tensor(name="more")]}, None),
    "no data": ({"inputs": [tensor(data=None)]}, None),
    "data and binary data": ({"inputs": [tensor()]}, binary_texts(b"x")),
    "binary data cut short": ({"inputs": [tensor(data=None)]}, binary_texts(b"ab")[:-1]),
    "binary data not UTF-8": ({"inputs": [tensor(data=None)]}, binary_texts(b"\xff\xfe")),
    "an unknown output": ({"inputs": [tensor()], "outputs": [{"name": "logits"}]}, None),
    "three outputs": (
        {"inputs": [tensor()], "outputs": [{"name": "label"}, {"name": "scores"}, {"name": "label"}]},
        None,
    ),
    "an output's parameter too long": (
        {"inputs": [tensor()], "outputs": [{"name": "label", "parameters": {"p": "v" * 65}}]},
        None,
    ),
    "nine parameters": ({"inputs": [tensor()], "parameters": {f"p{n}": n for n in range(9)}}, None),
    "an input's parameter too long": ({"inputs": [tensor(parameters={"p" * 65: 1})]}, None),
    "an id too long": ({"id": "i" * 257, "inputs": [tensor()]}, None),
    # tritonclient's `class_count`: Triton's classification extension, another answer than `scores`
    "an output as classes": (
        {"inputs": [tensor()], "outputs": [{"name": "scores", "parameters": {"classification": 1}}]},
        None,
    ),
    "an input's name too long": ({"inputs": [tensor(name="n" * 65)]}, None),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", BAD_REQUESTS)
async def test_a_bad_request_is_the_same_error_over_rest_and_grpc(local: InProcess, case: str) -> None:
    """One validation: the same bad request is INVALID_REQUEST over either transport, with the same
    message, its location on REST's wire in `body`; and nothing is queued."""
    local.announce()
    body, binary = BAD_REQUESTS[case]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await local.stub.ModelInfer(grpc_infer_request(body, binary), timeout=HANG_GUARD_S)
    rest = await rest_infer(local.http, json.loads(json.dumps(body)), binary)  # (a copy: it sets binary_data_size)
    assert (rest.status_code, rest.json()["error_type"]) == (422, ErrorType.INVALID_REQUEST), rest.text
    assert refused.value.code() == ERRORS[ErrorType.INVALID_REQUEST].grpc_status
    assert refused.value.details() == rest.json()["error"].removeprefix("body."), rest.text
    assert local.redis.llen(local.keys.queue) == 0


# A bad `data` (texts, or rows of one text): the one fault, in the form sent, as /predict words it
# ("texts over gRPC": its `bytes_contents`, always a flat list, say the same).
BAD_DATA: dict[str, tuple[Any, str, bool]] = {
    "65 texts": (["x"] * 65, ".texts: List should have at most 64 items after validation, not 65", True),
    "65 rows": ([["x"]] * 65, ".rows: List should have at most 64 items after validation, not 65", False),
    "a number among the texts": (["a", 5], ".texts.1: Input should be a valid string", False),
    "a text among the rows": ([["a"], "b"], ".rows.1: Input should be a valid array", False),
    "a row of two": ([["a"], ["b", "c"]], ".rows.1: List should have at most 1 item after validation, not 2", False),
    "a text over SENTIMENT_MAX_CHARS": (["x" * 2001], ".texts.0: String should have at most 2000 characters", True),
    "no texts": ([], ".texts: List should have at least 1 item after validation, not 0", False),
    "a string": ("abc", ": Input should be a list of texts, or of rows of one text", False),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", BAD_DATA)
async def test_bad_data_is_named_in_the_form_sent_over_rest_and_grpc(local: InProcess, case: str) -> None:
    """`data` is a list of texts or of rows of one: the 422 names what is wrong with the form sent, in
    one line, never the other form's type error ("Input should be a valid string (and 2 more)")."""
    local.announce()
    data, error, over_grpc = BAD_DATA[case]
    body = {"inputs": [tensor(shape=[max(len(data), 1)], data=data)]}
    rest = await local.http.post("/v2/models/tiny/infer", json=body)
    expected = f"inputs.0.data{error}"
    assert (rest.status_code, rest.json()["error"]) == (422, f"body.{expected}"), rest.text
    if over_grpc:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await local.stub.ModelInfer(grpc_infer_request(body, None), timeout=HANG_GUARD_S)
        assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, expected)


async def broken_predictor(*_: object, **__: object) -> None:
    raise RuntimeError("a bug")


async def redis_gone(*_: object, **__: object) -> None:
    raise RedisConnectionError("connection refused")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fault", "error_type"), [(redis_gone, ErrorType.UNAVAILABLE), (broken_predictor, ErrorType.INTERNAL)]
)
async def test_a_fault_is_the_same_error_over_rest_and_grpc(
    local: InProcess, monkeypatch: pytest.MonkeyPatch, fault: Any, error_type: ErrorType
) -> None:
    local.announce()
    monkeypatch.setattr(Predictor, "predict", fault)
    body = {"inputs": [tensor()]}
    rest = await local.http.post("/v2/models/tiny/infer", json=body)
    assert (rest.status_code, rest.json()["error_type"]) == (ERRORS[error_type].status, error_type)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await local.stub.ModelInfer(grpc_infer_request(body, None), timeout=HANG_GUARD_S)
    assert (ended.value.code(), ended.value.details()) == (ERRORS[error_type].grpc_status, rest.json()["error"])


@pytest.mark.anyio
async def test_text_limits_past_grpcs_largest_message_still_serve(
    settings: Settings, fake_server: fakeredis.FakeServer
) -> None:
    """Limits each valid alone (SENTIMENT_MAX_TEXTS=1000, SENTIMENT_MAX_CHARS=1000000) made a receive
    limit past gRPC's int: `sentiment api` ended at start in an OverflowError's traceback. gRPC takes
    no message past its own most, so that is the limit then."""
    wide = settings.model_copy(update={"max_texts": 1000, "max_chars": 1_000_000})
    async for running in in_process(wide, fake_server):
        assert (await running.stub.ServerLive(pb.ServerLiveRequest())).live


@pytest.mark.anyio
@pytest.mark.parametrize("situation", ["ready", "another model", "no live worker", "redis fails the model lookup"])
async def test_readiness_is_one_answer_over_rest_and_grpc(
    local: InProcess, monkeypatch: pytest.MonkeyPatch, situation: str
) -> None:
    """Ready: /ready's readiness, and the announced model is the one named. REST answers 200, or the
    error (404 for another model, else 503 not ready); gRPC the same as a bool."""
    local.announce()
    if situation != "no live worker":
        worker = WorkerStatus(id="w", host="h", pid=1, model_version="v1", started_at=0.0)
        local.redis.sadd(local.keys.workers, worker.id)
        local.redis.set(local.keys.heartbeat(worker.id), worker.encode())
    if situation == "redis fails the model lookup":
        monkeypatch.setattr(ModelInfoCache, "current", redis_gone)
    name = "other" if situation == "another model" else "tiny"
    expected = {
        "ready": (200, None),
        "another model": (404, ErrorType.NOT_FOUND),
        "no live worker": (503, ErrorType.NOT_READY),
        "redis fails the model lookup": (503, ErrorType.NOT_READY),
    }[situation]
    rest = await local.http.get(f"/v2/models/{name}/ready")
    assert (rest.status_code, rest.json().get("error_type")) == expected, rest.text
    assert (await local.stub.ModelReady(pb.ModelReadyRequest(name=name))).ready is (expected[0] == 200)
    server_ready = (await local.http.get("/v2/health/ready")).status_code == 200
    assert (await local.stub.ServerReady(pb.ServerReadyRequest())).ready is server_ready
    assert server_ready is (situation != "no live worker")


@pytest.mark.anyio
async def test_a_model_version_not_served_is_not_found(local: InProcess) -> None:
    """gRPC's requests may name a version (tritonclient's `model_version`): another than the served
    model's is NOT_FOUND (and not ready), never the served version's answer; the served one is taken."""
    local.announce()
    stub, other = local.stub, "7"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny", version=other), timeout=HANG_GUARD_S)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert refused.value.details() == "no version '7' of 'tiny': this server serves its version 'v1'"
    request = infer_request(["x"])
    request.model_version = other
    assert await status_of(stub.ModelInfer(request, timeout=HANG_GUARD_S)) == grpc.StatusCode.NOT_FOUND
    assert local.redis.llen(local.keys.queue) == 0  # nothing was queued
    worker = WorkerStatus(id="w", host="h", pid=1, model_version="v1", started_at=0.0)
    local.redis.sadd(local.keys.workers, worker.id)
    local.redis.set(local.keys.heartbeat(worker.id), worker.encode())
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name="tiny", version=other))).ready
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="tiny", version="v1"))).ready
    served = await stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny", version="v1"), timeout=HANG_GUARD_S)
    assert list(served.versions) == ["v1"]


@pytest.mark.anyio
async def test_the_calls_deadline_is_its_requests_deadline(local: InProcess) -> None:
    """No worker answers: the call ends DEADLINE_EXCEEDED at its own deadline, well before the
    configured 10 s, and the queued work carries that deadline, so a worker would skip it."""
    local.announce()
    started = time.time()
    assert (
        await status_of(local.stub.ModelInfer(infer_request(["x"]), timeout=0.5)) == grpc.StatusCode.DEADLINE_EXCEEDED
    )
    [raw] = local.redis.lrange(local.keys.queue, 0, -1)
    item = WorkItem.decode(raw)
    assert started < item.deadline <= started + 1.0  # the call's 0.5 s, not SENTIMENT_REQUEST_TIMEOUT_S


@pytest.mark.anyio
@pytest.mark.parametrize("stage", ["rate limit", "model lookup"])
async def test_a_redis_stall_before_the_prediction_ends_the_call_at_its_deadline(
    settings: Settings, fake_server: fakeredis.FakeServer, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """The call's deadline (here the service's 0.5 s, sooner than the call's own) runs from its arrival:
    Redis never answering the rate limit's script, or the read of the announced model, ends it with
    DEADLINE_EXCEEDED naming the stage, well before the client's own deadline."""
    if stage == "rate limit":
        monkeypatch.setattr(RateLimit, "take", stall)
    else:
        monkeypatch.setattr(fakeredis.FakeAsyncRedis, "get", stall)
    hurried = settings.model_copy(update={"request_timeout_s": 0.5, "rate_limit_per_s": 1.0})
    async for running in in_process(hurried, fake_server):
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await running.stub.ModelInfer(infer_request(["x"]), timeout=HANG_GUARD_S)
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (
        ended.value.details()
        == f"no result within 0.5 s: the deadline was reached at the {stage} stage, waiting on Redis"
    )


@pytest.mark.anyio
async def test_a_call_its_client_cancels_abandons_its_work_as_disconnected(local: InProcess) -> None:
    """No worker answers: the client cancels the call while its work is queued, long before its
    deadline. The work is marked abandoned, counted as its client gone, not as the deadline."""
    local.announce()

    def abandoned(reason: str) -> float:
        return REGISTRY.get_sample_value("sentiment_requests_abandoned_total", {"reason": reason}) or 0.0

    before = {reason: abandoned(reason) for reason in ("disconnected", "deadline")}
    call = local.stub.ModelInfer(infer_request(["x"]), timeout=HANG_GUARD_S)
    await asyncio.to_thread(wait_for, "the work item", lambda: local.redis.llen(local.keys.queue))
    call.cancel()
    item = WorkItem.decode(local.redis.lindex(local.keys.queue, 0))
    await asyncio.to_thread(wait_for, "the abandoned marker", lambda: local.redis.exists(local.keys.abandoned(item.id)))
    assert {reason: abandoned(reason) - count for reason, count in before.items()} == {
        "disconnected": 1,
        "deadline": 0,
    }


@pytest.mark.anyio
async def test_api_keys_guard_every_call_but_the_server_probes(
    settings: Settings, fake_server: fakeredis.FakeServer
) -> None:
    keyed = settings.model_copy(update={"api_keys": Settings(api_keys=KEY).api_keys})
    async for local in in_process(keyed, fake_server):
        stub = local.stub
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready  # (no worker)
        metadata = pb.ServerMetadataRequest()
        assert await status_of(stub.ServerMetadata(metadata)) == grpc.StatusCode.UNAUTHENTICATED
        assert await status_of(stub.ModelInfer(infer_request(["x"]))) == grpc.StatusCode.UNAUTHENTICATED
        wrong = (("authorization", "Bearer not-the-key"),)
        assert (
            await status_of(stub.ModelInfer(infer_request(["x"]), metadata=wrong)) == grpc.StatusCode.PERMISSION_DENIED
        )
        for good in ((("authorization", f"Bearer {KEY}"),), (("x-api-key", KEY),)):
            assert (await stub.ServerMetadata(metadata, metadata=good)).name == "sentiment-batcher"


@pytest.mark.slow
def test_the_proto_is_the_protocols_as_kserve_ships_it() -> None:
    """Every message and RPC of ours has the kserve package's names, field numbers and types: the wire
    format tritonclient and kserve speak. (kserve's descriptor is read in a process of its own.)"""
    theirs = run_client(
        """
        from google.protobuf import descriptor_pb2, json_format
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
        proto = descriptor_pb2.FileDescriptorProto()
        pb.DESCRIPTOR.CopyToProto(proto)
        print(json.dumps(json_format.MessageToDict(proto)))
        """
    )
    from google.protobuf import descriptor_pb2, json_format

    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    ours = json_format.MessageToDict(proto)
    assert ours["package"] == theirs["package"] == "inference"
    their_messages = {m["name"]: m for m in theirs["messageType"]}
    for message in ours["messageType"]:
        assert message == their_messages[message["name"]]
    [service], [their_service] = ours["service"], theirs["service"]
    their_methods = {m["name"]: m for m in their_service["method"]}
    assert service["name"] == their_service["name"] == "GRPCInferenceService"
    for method in service["method"]:
        assert {**method, "options": None} == {**their_methods[method["name"]], "options": None}


def test_the_generated_modules_are_the_protos(tmp_path: Path) -> None:
    """The committed modules are what grpcio-tools makes of the .proto now: they cannot drift from it."""
    from grpc_tools import protoc

    relative = PROTO.relative_to(REPO)
    (tmp_path / relative.parent).mkdir(parents=True)
    (tmp_path / relative).write_bytes(PROTO.read_bytes())
    args = ["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}"]
    assert protoc.main([*args, f"--grpc_python_out={tmp_path}", str(tmp_path / relative)]) == 0
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
        generated = relative.with_name(relative.stem + suffix)
        assert (tmp_path / generated).read_text() == (REPO / generated).read_text(), generated


# API keys in metadata as odd as HTTP's headers may be: the same answer over both.


@pytest.mark.anyio
@pytest.mark.parametrize("order", ["wrong key first", "right key first"])
async def test_a_key_sent_twice_is_read_over_grpc_as_over_rest(
    settings: Settings, fake_server: fakeredis.FakeServer, order: str
) -> None:
    """Two `x-api-key` entries (a proxy adding its own): gRPC reads the one HTTP reads, the first."""
    keyed = settings.model_copy(update={"api_keys": Settings(api_keys=KEY).api_keys})
    sent = [("x-api-key", "not-the-key"), ("x-api-key", KEY)]
    if order == "right key first":
        sent.reverse()
    async for local in in_process(keyed, fake_server):
        rest = (await local.http.get("/v2", headers=sent)).status_code
        try:
            await local.stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=tuple(sent), timeout=HANG_GUARD_S)
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as refused:
            code = refused.code()
    assert (rest, code) == (
        (200, grpc.StatusCode.OK) if order == "right key first" else (403, grpc.StatusCode.PERMISSION_DENIED)
    )


@pytest.mark.anyio
@pytest.mark.parametrize("header", ["x-api-key", "authorization"])
@pytest.mark.parametrize("sent", [f"{KEY} ", f" {KEY}"])  # (gRPC refuses a tab in metadata)
async def test_a_key_is_read_without_the_whitespace_around_it_in_either_header(
    settings: Settings, fake_server: fakeredis.FakeServer, header: str, sent: str
) -> None:
    """`X-API-Key: KEY ` (as requests and urllib send a value with a trailing space, uvicorn passing it
    on whole; gRPC keeps it too) was a 403 while `Authorization: Bearer KEY ` was read as KEY."""
    keyed = settings.model_copy(update={"api_keys": Settings(api_keys=KEY).api_keys})
    value = sent if header == "x-api-key" else f"Bearer {sent}"
    async for local in in_process(keyed, fake_server):
        rest = (await local.http.get("/v2", headers={header: value})).status_code
        metadata = ((header, value),)
        served = await local.stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=metadata, timeout=HANG_GUARD_S)
    assert (rest, served.name) == (200, "sentiment-batcher")

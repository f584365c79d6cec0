"""The Open Inference Protocol (KServe V2) REST routes, through a client this project did not write.

End to end: `sentiment api` and `sentiment worker` against a real redis-server, called by
tritonclient's HTTP client (JSON and binary tensors), answering what /predict and the model answer.
In process on fakeredis: the probes open with keys on, the body limit, 404/503 before any work.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import fakeredis
import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from pydantic import SecretStr
from tritonclient.utils import InferenceServerException

from api.app import create_app
from api.inference import infer_body_limit
from batcher.worker import Worker
from core.protocol import Keys, ModelInfo, WorkerStatus, prediction
from core.settings import Settings
from model_store.classifier import Classifier
from sentiment.embedded import free_port
from tests.conftest import HANG_GUARD_S, REPO, Service, start_service, start_worker
from tests.test_docs_page import serving
from tests.test_inference_grpc import run_client

KEY = "a-test-key-of-some-length"
TEXTS = ["a good movie", "bad", "", "a good movie", "ünïcödé ✓"]


README = (REPO / "README.md").read_text()


@pytest.fixture(scope="module")
def service(redis_url: str, tiny_model_dir: Path) -> Iterator[Service]:
    service = start_service(
        redis_url,
        tiny_model_dir,
        "v2",
        SENTIMENT_GRPC_PORT=str(free_port()),
        SENTIMENT_REQUEST_TIMEOUT_S="120",
        SENTIMENT_MAX_TEXTS="8",
    )
    yield service
    assert service.stop() == [0, 0]


@pytest.fixture(scope="module")
def http(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{service.port}", network_timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def model(http: httpx.Client) -> dict:
    return http.get("/model").json()


def text_input(texts: list[str], shape: list[int], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("text", shape, "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=np.object_).reshape(shape), binary_data=binary)
    return tensor


def test_probes_and_metadata(client: triton.InferenceServerClient, http: httpx.Client, model: dict) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(model["name"])
    server = client.get_server_metadata()
    assert server["name"] == "sentiment-batcher" and "binary_tensor_data" in server["extensions"]
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    metadata = client.get_model_metadata(model["name"])
    assert metadata["name"] == model["name"] and metadata["versions"] == [model["version"]]
    assert metadata["labels"] == model["labels"]
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]] == [
        ("label", "BYTES", [-1]),
        ("scores", "FP32", [-1, len(model["labels"])]),
    ]


@pytest.mark.parametrize(("shape", "binary"), [([5], False), ([5, 1], False), ([5], True), ([5, 1], True)])
def test_labels_and_scores_are_predicts_and_the_models(
    client: triton.InferenceServerClient,
    http: httpx.Client,
    model: dict,
    classifier: Classifier,
    shape: list[int],
    binary: bool,
) -> None:
    outputs = [triton.InferRequestedOutput("label"), triton.InferRequestedOutput("scores")]
    result = client.infer(model["name"], [text_input(TEXTS, shape, binary)], outputs=outputs, request_id="r-1")
    answer = result.get_response()
    assert (answer["model_name"], answer["model_version"], answer["id"]) == (model["name"], model["version"], "r-1")
    labels = [label.decode() for label in result.as_numpy("label")]  # binary outputs: tritonclient's default
    scores = result.as_numpy("scores")
    assert scores.dtype == np.float32 and scores.shape == (len(TEXTS), len(model["labels"]))

    predicted = http.post("/predict", json={"text": TEXTS}).json()["predictions"]
    assert [[s["label"] for s in p] for p in predicted] == [model["labels"]] * len(TEXTS)
    assert scores.ravel().tolist() == pytest.approx([s["score"] for p in predicted for s in p], abs=1e-6)
    assert labels == [max(p, key=lambda s: s["score"])["label"] for p in predicted]
    own = [prediction(classifier.labels, p) for p in classifier.forward(classifier.tokenize(TEXTS))]
    assert scores.ravel().tolist() == pytest.approx([s["score"] for p in own for s in p], abs=1e-5)
    assert labels == [classifier.labels[int(np.argmax([s["score"] for s in p]))] for p in own]


SNIPPET = README.split("over REST with Triton's client")[1].split("```python\n")[1].split("```")[0]


def check_snippet_output(out: str, labels: list[str]) -> None:
    """What the snippet prints: a label per text, then a row of scores per text."""
    printed_labels, scores = out.split("] [", 1)
    assert sum(printed_labels.count(f"'{label}'") for label in labels) == 2
    assert scores.count("[") == 2


def test_the_readmes_client_snippet_classifies_through_the_service(
    service: Service, model: dict, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("API_KEY", raising=False)
    exec(SNIPPET.replace("localhost:8000", f"127.0.0.1:{service.port}"), {})
    check_snippet_output(capsys.readouterr().out, model["labels"])


def test_the_readmes_client_snippet_sends_its_key_when_keys_are_on(
    settings: Settings,
    fake_server: fakeredis.FakeServer,
    worker: Worker,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keyed = settings.model_copy(update={"api_keys": [SecretStr(KEY)]})
    app = create_app(keyed, fakeredis.FakeAsyncRedis(server=fake_server), fakeredis.FakeRedis(server=fake_server))
    start_worker(worker)
    with serving(app) as url:
        monkeypatch.setenv("API_KEY", KEY)
        exec(SNIPPET.replace("localhost:8000", url.removeprefix("http://")), {})
        check_snippet_output(capsys.readouterr().out, worker.classifier.labels)
        monkeypatch.delenv("API_KEY")
        with pytest.raises(KeyError, match="name"):  # without it: the 401's body has no model name
            exec(SNIPPET.replace("localhost:8000", url.removeprefix("http://")), {})


def test_outputs_requested_by_name_and_all_by_default(
    client: triton.InferenceServerClient, http: httpx.Client, model: dict
) -> None:
    only = client.infer(
        model["name"], [text_input(["fine"], [1], False)], outputs=[triton.InferRequestedOutput("scores")]
    )
    assert [o["name"] for o in only.get_response()["outputs"]] == ["scores"]
    body = {"inputs": [{"name": "input-0", "shape": [2], "datatype": "BYTES", "data": ["fine", "awful"]}]}
    answer = http.post(f"/v2/models/{model['name']}/infer", json=body)
    assert answer.status_code == 200
    assert [(o["name"], o["shape"]) for o in answer.json()["outputs"]] == [("label", [2]), ("scores", [2, 2])]
    assert answer.json()["id"]  # one is made up when the request names none


def test_outputs_asked_as_binary_data_are_answered_so_as_over_grpc(
    client: triton.InferenceServerClient, service: Service, http: httpx.Client, model: dict
) -> None:
    """tritonclient asks for binary outputs by default (`binary_data_output`, or each output's
    `binary_data`): answered as binary data after the JSON header, as Triton and KServe answer, so
    the same client code gets the labels as bytes over REST and over gRPC; JSON where asked."""
    grpc = run_client(
        """
        import numpy as np, tritonclient.grpc as triton
        text = triton.InferInput("text", [len(texts)], "BYTES")
        text.set_data_from_numpy(np.array(texts, dtype=object))
        result = triton.InferenceServerClient(url).infer(name, [text])
        print(json.dumps(repr(result.as_numpy("label").tolist())))
        """,
        url=f"127.0.0.1:{service.env['SENTIMENT_GRPC_PORT']}",
        name=model["name"],
        texts=TEXTS,
    )
    by_default = client.infer(model["name"], [text_input(TEXTS, [5], True)])
    assert repr(by_default.as_numpy("label").tolist()) == grpc
    assert "data" not in by_default.get_output("label") and by_default.as_numpy("scores").shape == (5, 2)
    mixed = client.infer(
        model["name"],
        [text_input(TEXTS, [5], False)],
        outputs=[triton.InferRequestedOutput("label", binary_data=False), triton.InferRequestedOutput("scores")],
    )
    assert mixed.as_numpy("label").tolist() == [label.decode() for label in by_default.as_numpy("label")]
    assert mixed.get_output("scores")["parameters"] == {"binary_data_size": 5 * 2 * 4}
    assert mixed.as_numpy("scores").tolist() == by_default.as_numpy("scores").tolist()
    body = {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["x"]}], "parameters": {}}
    for flag in ("true", 1):
        body["parameters"] = {"binary_data_output": flag}
        refused = http.post(f"/v2/models/{model['name']}/infer", json=body)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"].startswith("body.parameters.binary_data_output: a boolean")


def test_an_unknown_model_is_404(client: triton.InferenceServerClient, http: httpx.Client) -> None:
    assert not client.is_model_ready("no-such-model")
    with pytest.raises(InferenceServerException) as metadata:
        client.get_model_metadata("no-such-model")
    assert metadata.value.status() == "404"
    with pytest.raises(InferenceServerException) as infer:
        client.infer("no-such-model", [text_input(["x"], [1], False)])
    assert infer.value.status() == "404" and "no model named 'no-such-model'" in infer.value.message()
    assert http.get("/v2/models/no-such-model").json()["error_type"] == "not_found"


def test_the_served_version_is_answered_at_its_path_and_another_is_404(
    client: triton.InferenceServerClient, model: dict
) -> None:
    """tritonclient's `model_version` asks at `/v2/models/{name}/versions/{version}[/ready|/infer]`:
    the served version answers as the unversioned path does; another is a 404 naming the served one,
    as over gRPC, within the same body limit."""
    name, version = model["name"], model["version"]
    assert client.is_model_ready(name, model_version=version)
    assert not client.is_model_ready(name, model_version="1")
    assert client.get_model_metadata(name, model_version=version) == client.get_model_metadata(name)
    long = "a fine film " * 150  # a body of more than the 1 KiB of a route that takes none
    result = client.infer(name, [text_input(["fine", long], [2], True)], model_version=version)
    assert result.get_response()["model_version"] == version and result.as_numpy("scores").shape == (2, 2)
    for call in (
        lambda: client.get_model_metadata(name, model_version="1"),
        lambda: client.infer(name, [text_input(["fine"], [1], True)], model_version="1"),
    ):
        with pytest.raises(InferenceServerException) as other:
            call()
        assert other.value.status() == "404"
        assert f"no version '1' of {name!r}: this server serves its version {version!r}" in other.value.message()


def test_bad_input_is_a_4xx(client: triton.InferenceServerClient, http: httpx.Client, model: dict) -> None:
    wrong_type = triton.InferInput("text", [1], "FP32")
    wrong_type.set_data_from_numpy(np.array([1.0], dtype=np.float32), binary_data=False)
    too_many = text_input(["x"] * 9, [9], False)  # SENTIMENT_MAX_TEXTS is 8
    for inputs in ([wrong_type], [too_many], [text_input(["x"] * 2, [2], False)] * 2):
        with pytest.raises(InferenceServerException) as refused:
            client.infer(model["name"], inputs)
        assert refused.value.status() == "422"
    url = f"/v2/models/{model['name']}/infer"
    for tensor in (
        {"shape": [3], "data": ["a", "b"]},  # shape and data disagree
        {"shape": [2, 2], "data": ["a", "b", "c", "d"]},
        {"shape": [1], "data": ["x" * 10_000]},  # over SENTIMENT_MAX_CHARS
        {"shape": [1], "data": [7]},
        {"shape": [1]},  # no data, no binary
        *({"shape": [count], "data": ["a"]} for count in ("1", True, 1.5)),  # an int64 count is a JSON integer
    ):
        response = http.post(url, json={"inputs": [{"name": "text", "datatype": "BYTES", **tensor}]})
        assert response.status_code == 422, (tensor, response.text)
    header = b'{"inputs":[{"name":"t","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":6}}]}'
    for binary in (struct.pack("<I", 5) + b"ab", struct.pack("<I", 2) + b"\xff\xfe"):  # cut short; not UTF-8
        sent = header.replace(b":6", b":%d" % len(binary)) + binary
        response = http.post(
            url, content=sent, headers={"Inference-Header-Content-Length": str(len(sent) - len(binary))}
        )
        assert response.status_code == 422, response.text
    assert http.post(url, content=b"text", headers={"content-type": "text/plain"}).status_code == 415


def test_kserves_rest_client_classifies_as_predict(service: Service, http: httpx.Client, model: dict) -> None:
    """KServe's InferenceRESTClient repeats the model's name in the body (`model_name`): taken, and
    the answer is /predict's; a body naming another model than the path is a 422."""
    answer = run_client(
        """
        import asyncio, numpy as np
        from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

        async def main():
            client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
            text = InferInput("text", [len(texts)], "BYTES")
            text.set_data_from_numpy(np.array(texts, dtype=object), binary_data=False)
            result = await client.infer(url, InferRequest(model_name=name, infer_inputs=[text]), model_name=name)
            await client.close()
            return {o.name: o.as_numpy().tolist() for o in result.outputs}

        print(json.dumps(asyncio.run(main())))
        """,
        url=service.url,
        name=model["name"],
        texts=TEXTS,
    )
    predicted = http.post("/predict", json={"text": TEXTS}).json()["predictions"]
    assert answer["scores"] == [pytest.approx([s["score"] for s in p], abs=1e-6) for p in predicted]
    assert answer["label"] == [max(p, key=lambda s: s["score"])["label"] for p in predicted]
    body = {"model_name": "other", "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    other = http.post(f"/v2/models/{model['name']}/infer", json=body)
    assert (other.status_code, other.json()["error"]) == (
        422,
        f"body.model_name: the path names the model {model['name']!r}",
    )


def test_client_options_the_service_does_not_serve_are_refused_saying_so(
    client: triton.InferenceServerClient, model: dict
) -> None:
    """tritonclient's `class_count` (Triton's classification extension: an output as its top classes)
    is a 422, not the plain scores; its `request_compression_algorithm` a 415, not a JSON decode error."""
    text = text_input(["fine"], [1], True)
    with pytest.raises(InferenceServerException) as classes:
        client.infer(model["name"], [text], outputs=[triton.InferRequestedOutput("scores", class_count=1)])
    assert classes.value.status() == "422"
    assert "the classification extension is not supported" in classes.value.message()
    for algorithm in ("gzip", "deflate"):
        with pytest.raises(InferenceServerException) as compressed:
            client.infer(model["name"], [text], request_compression_algorithm=algorithm)
        assert compressed.value.status() == "415", algorithm
        assert compressed.value.message().startswith("the body must not be compressed"), algorithm
    assert client.infer(model["name"], [text], response_compression_algorithm="gzip").as_numpy("label").shape == (1,)


# In process, on fakeredis.


@pytest.fixture
async def keyed(
    settings: Settings, fake_server: fakeredis.FakeServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.setattr("api.predictions.MODEL_INFO_MAX_AGE_S", 0)  # an announcement is seen at once
    keyed = settings.model_copy(update={"api_keys": Settings(api_keys=KEY).api_keys})
    app = create_app(keyed, redis=fakeredis.FakeAsyncRedis(server=fake_server), jobs_redis=fakeredis.FakeRedis())
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            yield client


@pytest.mark.anyio
async def test_probes_are_open_and_the_rest_keyed_404_and_503_before_work(
    keyed: httpx.AsyncClient, settings: Settings, redis: fakeredis.FakeRedis
) -> None:
    assert (await keyed.get("/v2/health/live")).status_code == 200
    assert (await keyed.get("/v2/health/ready")).json()["reason"] == "no live worker"
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
    assert (await keyed.post("/v2/models/tiny/infer", json=body)).status_code == 401
    assert (await keyed.get("/v2")).status_code == 401
    auth = {"X-API-Key": KEY}
    assert (await keyed.get("/v2", headers=auth)).json()["extensions"] == ["binary_tensor_data"]
    unannounced = await keyed.post("/v2/models/tiny/infer", json=body, headers=auth)
    assert (unannounced.status_code, unannounced.json()["error_type"]) == (503, "unavailable")
    redis.set(Keys(settings.key_prefix).model, ModelInfo("tiny", "v1", ["NEGATIVE", "POSITIVE"], "cpu", "f32").encode())
    other = await keyed.post("/v2/models/other/infer", json=body, headers=auth)
    assert (other.status_code, other.json()["error_type"]) == (404, "not_found")
    assert redis.llen(Keys(settings.key_prefix).queue) == 0  # nothing was queued
    limit = infer_body_limit(settings.max_texts, settings.max_chars)
    over = await keyed.post("/v2/models/tiny/infer", content=b" " * (limit + 1), headers=auth)
    assert (over.status_code, over.json()["error_type"]) == (413, "too_large")


@pytest.mark.anyio
async def test_an_answer_in_another_models_labels_is_a_503_never_a_tensor_against_the_metadata(
    keyed: httpx.AsyncClient, settings: Settings, redis: fakeredis.FakeRedis, worker: Worker
) -> None:
    # A rolling upgrade to a model of three labels: it is announced (its worker live, busy), and a
    # worker of the old two-label model takes the work. Its scores are no tensor of the metadata's
    # shape and order: they were answered as `scores` [1, 2] under metadata of 3 labels (and, beside
    # a cached new-model text, [2, 3] holding 5 values).
    keys = Keys(settings.key_prefix)
    start_worker(worker)
    new = WorkerStatus(id="new", host="h", pid=1, model_version="new", started_at=0.0)
    redis.sadd(keys.workers, new.id)
    redis.set(keys.heartbeat(new.id), new.encode(), px=int(HANG_GUARD_S * 1000))
    redis.set(keys.model, ModelInfo("tiny", "new", ["NEGATIVE", "NEUTRAL", "POSITIVE"], "cpu", "f32").encode())
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
    answer = await keyed.post("/v2/models/tiny/infer", json=body, headers={"X-API-Key": KEY})
    assert (answer.status_code, answer.json()["error_type"]) == (503, "unavailable"), answer.text
    assert answer.headers["retry-after"] == "1"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_header_length_not_in_ascii_digits_is_a_422(
    keyed: httpx.AsyncClient, settings: Settings, redis: fakeredis.FakeRedis
) -> None:
    redis.set(Keys(settings.key_prefix).model, ModelInfo("tiny", "v1", ["NEGATIVE", "POSITIVE"], "cpu", "f32").encode())
    sent = b'{"inputs":[{"name":"t","shape":[1],"datatype":"BYTES","data":["hi"]}]}'
    # "²" (latin-1 \xb2) passes str.isdigit and int() refuses it, as it refuses 5,000 ASCII digits
    for length in (b"\xb2", b"9" * 5000, b"-1", b" 7", str(len(sent) + 1).encode()):
        response = await keyed.post(
            "/v2/models/tiny/infer",
            content=sent,
            headers={"X-API-Key": KEY, "Inference-Header-Content-Length": length},
        )
        assert (response.status_code, response.json()["error_type"]) == (422, "invalid_request"), length
        assert "inference-header-content-length must be the size of the JSON header" in response.text


@pytest.mark.slow
def test_kserves_rest_client_calls_a_model_of_a_long_directory_name(
    settings: Settings,
    fake_server: fakeredis.FakeServer,
    redis: fakeredis.FakeRedis,
    classifier: Classifier,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The model's name is its directory's (up to 255 bytes): KServe's REST client repeats it in the
    body's `model_name`, which takes as long a name as the path does."""
    monkeypatch.setattr(classifier, "name", "distilbert-base-uncased-finetuned-sst-2-english-int8-dynamic-2024-06")
    worker = Worker(settings, redis, classifier)
    app = create_app(settings, fakeredis.FakeAsyncRedis(server=fake_server), fakeredis.FakeRedis(server=fake_server))
    start_worker(worker)
    try:
        with serving(app) as url:
            answer = run_client(
                """
                import asyncio, numpy as np
                from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

                async def main():
                    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
                    text = InferInput("text", [1], "BYTES")
                    text.set_data_from_numpy(np.array(["fine"], dtype=object), binary_data=False)
                    request = InferRequest(model_name=name, infer_inputs=[text])
                    result = await client.infer(url, request, model_name=name)
                    await client.close()
                    return result.model_name, [o.name for o in result.outputs]

                print(json.dumps(asyncio.run(main())))
                """,
                url=url,
                name=classifier.name,
            )
    finally:
        worker.stop()
    assert answer == [classifier.name, ["label", "scores"]]

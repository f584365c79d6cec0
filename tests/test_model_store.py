"""Loading checkpoints from disk and running them: labels, fingerprint, tokenizer, engines (torch,
ONNX Runtime, null), lanes, padding, packing, truncation, and the real checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
)

from benchmarks.checkpoints import LABELS, TOKENIZER_FILES
from core.settings import Settings
from model_store import engine as engine_module
from model_store import int8, layout, onnx_engine
from model_store.checkpoint import Checkpoint, fingerprint
from model_store.checkpoint_files import missing_checkpoint
from model_store.classifier import Classifier
from model_store.engine import EngineName, load_engine, pick_device, resolve_engine, resolve_precision
from model_store.null_engine import NullEngine
from model_store.onnx_engine import OnnxEngine
from model_store.torch_engine import TorchEngine, load_module
from tests.conftest import HANG_GUARD_S, shared_path


def sst2_dev_texts() -> list[str]:
    return [line.split("\t")[0] for line in shared_path("data/sst2-dev.tsv").read_text().splitlines()[1:]]


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def tiny(tiny_model_dir: Path, request: pytest.FixtureRequest) -> Classifier:
    """Both engines (fp32: `auto` is bf16 on some CPUs, which only torch runs)."""
    return Classifier(tiny_model_dir, device="cpu", threads=1, precision="fp32", engine=request.param)


def test_tiny_checkpoint_loads_through_the_real_loader(tiny: Classifier, tiny_model_dir: Path) -> None:
    assert tiny.labels == ["NEGATIVE", "POSITIVE"]
    assert tiny.version == fingerprint(tiny_model_dir)
    assert tiny.device == "cpu"
    assert tiny.max_length == 128


def test_probabilities_cover_every_label_and_sum_to_one(tiny: Classifier) -> None:
    for probs in tiny.forward(tiny.tokenize(["a good movie", "", "bad"])):
        assert len(probs) == 2
        assert sum(probs) == pytest.approx(1.0, abs=1e-6)


def test_padding_to_a_longer_neighbour_does_not_change_scores(tiny: Classifier) -> None:
    short, long = tiny.tokenize(["fun", "this movie was not very good at all, it was awful and boring"])
    alone = tiny.forward([short])[0]
    padded = tiny.forward([short, long])[0]
    assert padded == pytest.approx(alone, abs=1e-5)


def test_long_text_is_truncated_to_the_model_maximum(tiny: Classifier) -> None:
    [ids] = tiny.tokenize(["word " * 1000])
    assert len(ids) == tiny.max_length
    assert len(tiny.forward([ids])[0]) == 2


def test_each_forward_lane_computes_on_its_share_of_the_threads_and_the_main_thread_keeps_them_all(
    tiny_model_dir: Path,
) -> None:
    """Two lanes over two threads: a thread that called `start_lane` runs its forwards on one thread,
    the same scores as a forward on both; the calling (main) thread keeps its two."""
    two = Classifier(tiny_model_dir, device="cpu", threads=2, precision="fp32", engine="torch")
    engine = two.engine
    assert isinstance(engine, TorchEngine) and (engine.lanes, engine.threads) == (2, 2)
    seen: list[tuple[int, int]] = []  # (thread, its torch threads) in every forward
    run = engine._run

    def recording(**inputs: torch.Tensor) -> torch.Tensor:
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return run(**inputs)

    engine._run = recording  # type: ignore[method-assign]
    ids = two.tokenize(["a good movie", "bad"])
    whole = two.forward(ids)
    on_lanes: list[tuple[int, list[list[float]]]] = []
    both_started = threading.Barrier(2, timeout=HANG_GUARD_S)  # side by side, not one after the other

    def lane() -> None:
        engine.start_lane()
        both_started.wait()
        on_lanes.append((torch.get_num_threads(), two.forward(ids)))

    lanes = [threading.Thread(target=lane) for _ in range(2)]
    for thread in lanes:
        thread.start()
    for thread in lanes:
        thread.join(HANG_GUARD_S)
    assert [threads for threads, _ in on_lanes] == [1, 1]
    assert torch.get_num_threads() == 2
    assert sorted(n for _, n in seen) == [1, 1, 2] and len({ident for ident, _ in seen}) == 3
    for _, got in on_lanes:
        assert torch.tensor(got) == pytest.approx(torch.tensor(whole), abs=1e-6)


def test_forward_lanes_need_the_cpu_and_a_thread_each(tiny_model_dir: Path) -> None:
    assert Classifier(tiny_model_dir, device="cpu", threads=1, precision="fp32", engine="torch").lanes == 1
    assert Classifier(tiny_model_dir, device="cpu", threads=2, precision="fp32", engine="onnxruntime").lanes == 1
    asked = Classifier(tiny_model_dir, device="cpu", threads=2, precision="fp32", engine="onnxruntime", lanes=2)
    assert (asked.engine.name, asked.lanes) == ("onnxruntime", 2)
    with pytest.raises(ValueError, match="not on this engine"):
        Classifier(tiny_model_dir, engine="null", lanes=2)
    cpu_engines: tuple[EngineName, ...] = ("torch", "onnxruntime")
    for engine in cpu_engines:
        with pytest.raises(ValueError, match="need a thread each"):
            Classifier(tiny_model_dir, device="cpu", threads=2, precision="fp32", engine=engine, lanes=3)


def test_fingerprint_changes_with_any_checkpoint_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    assert fingerprint(copy) == fingerprint(tiny_model_dir)
    config = json.loads((copy / "config.json").read_text())
    config["id2label"] = {"0": "NEG", "1": "POS"}
    (copy / "config.json").write_text(json.dumps(config))
    assert fingerprint(copy) != fingerprint(tiny_model_dir)


def test_missing_checkpoint_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="SENTIMENT_MODEL_DIR"):
        Classifier(tmp_path)


def test_auto_device_is_cuda_only_when_present() -> None:
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu").type == "cpu"


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_on_a_cpu_that_has_it(
    native: bool, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "native_bf16", lambda: native)
    auto = Classifier(tiny_model_dir, device="cpu", threads=1)
    assert (auto.engine.precision, auto.dtype_name) == (("bf16", "bfloat16") if native else ("fp32", "float32"))
    # A reduced precision's scores are cached apart from fp32's.
    assert auto.version == fingerprint(tiny_model_dir) + ("-bf16" if native else "")
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("int8", torch.device("cpu")) == "int8"
    assert resolve_precision("auto", torch.device("cpu"), int8=True) == "int8"  # a passing artifact (test_int8.py)


def test_auto_engine_is_onnxruntime_for_fp32_and_int8_on_the_cpu_only(tiny_model_dir: Path) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [resolve_engine("auto", cpu, p) for p in ("fp32", "int8")] == ["onnxruntime", "onnxruntime"]
    assert resolve_engine("auto", cpu, "bf16") == "torch"
    assert resolve_engine("auto", cuda, "fp16") == "torch"
    assert resolve_engine("torch", cpu, "fp32") == "torch"
    with pytest.raises(ValueError, match="onnxruntime engine runs fp32"):
        Classifier(tiny_model_dir, device="cpu", threads=1, precision="bf16", engine="onnxruntime")
    onnx = Classifier(tiny_model_dir, device="cpu", threads=1, precision="fp32")
    assert isinstance(onnx.engine, OnnxEngine) and onnx.engine.name == "onnxruntime"
    # torch's copy of the weights is let go
    assert not any(isinstance(value, torch.nn.Module) for value in vars(onnx.engine).values())
    plain = Classifier(tiny_model_dir, device="cpu", threads=1, precision="fp32", engine="torch")
    # The engine changes no score beyond float noise, so fp32 keeps one cache version for both.
    assert onnx.version == plain.version
    # ONNX Runtime's smaller per-call cost makes cutting a batch into more forwards pay sooner.
    assert onnx.cost.overhead_tokens < plain.cost.overhead_tokens


@pytest.mark.parametrize("failure", ["exporter refuses", "no temporary directory", "onnxruntime refuses"])
def test_a_failed_export_is_served_by_torch_unless_onnxruntime_was_asked_for(
    failure: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unsupported operator")

    checkpoint = Checkpoint(tiny_model_dir)
    if failure == "exporter refuses":
        monkeypatch.setattr(onnx_engine, "export", refuse)
    elif failure == "onnxruntime refuses":  # after torch's copy of the weights is gone: loaded again
        monkeypatch.setattr(onnx_engine.onnxruntime, "InferenceSession", refuse)
    else:  # a read-only file system without a writable TMPDIR
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    fallback = load_engine(checkpoint, "auto", "cpu", "fp32", threads=1)
    assert isinstance(fallback, TorchEngine)
    assert fallback.forward(checkpoint.tokenize(["a good movie"])).shape == (1, 2)
    assert "ONNX Runtime cannot serve" in caplog.text
    with pytest.raises((RuntimeError, FileNotFoundError)):
        load_engine(checkpoint, "onnxruntime", "cpu", "fp32", threads=1)


def test_every_precision_but_fp32_has_its_own_cache_version(tiny_model_dir: Path) -> None:
    # CUDA's float16 too: an fp16 GPU worker and an fp32 CPU worker must not share cache entries.
    plain = fingerprint(tiny_model_dir)
    checkpoint = Checkpoint(tiny_model_dir)
    versions = {p: checkpoint.version(p) for p in ("fp32", "fp16", "bf16", "int8")}
    assert versions == {"fp32": plain, "fp16": f"{plain}-fp16", "bf16": f"{plain}-bf16", "int8": f"{plain}-int8"}
    assert Classifier(tiny_model_dir, device="cpu", threads=1, precision="bf16").version == versions["bf16"]


def test_real_checkpoint_scores_equal_a_plain_transformers_forward(small_model_dir: Path) -> None:
    texts = ["I love you.", "I hate you.", "a gorgeous, witty, seductive movie.", ""]
    classifier = Classifier(small_model_dir, device="cpu", precision="fp32")
    ours = classifier.forward(classifier.tokenize(texts))

    tokenizer = AutoTokenizer.from_pretrained(small_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(small_model_dir).eval()
    with torch.inference_mode():
        reference = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1).tolist()
    for got, want in zip(ours, reference, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    love, hate = ours[0], ours[1]
    assert love[1] > 0.9  # POSITIVE
    assert hate[0] > 0.5  # NEGATIVE


def test_every_engine_and_layout_scores_equal_eager_torch_on_sst2_dev_in_any_batch_shape(small_model_dir: Path) -> None:
    """Both engines run graphs traced on one padded example (ONNX export, TorchScript), and a
    packed row shares its graph: batches of one (no padding), of mixed lengths, and texts cut at
    the model's maximum must score as the eager transformers model scores them padded."""
    texts = [*sst2_dev_texts(), "", "word " * 1000]
    onnx = Classifier(small_model_dir, device="cpu", threads=1, precision="fp32", engine="onnxruntime")
    torched = Classifier(small_model_dir, device="cpu", threads=1, precision="fp32", engine="torch")
    assert onnx.cost.packs and torched.cost.packs  # DistilBERT
    assert isinstance(torched.engine, TorchEngine) and torched.engine.traced
    eager = AutoModelForSequenceClassification.from_pretrained(small_model_dir).eval()
    ids = onnx.tokenize(texts)
    order = list(range(len(ids)))
    random.Random(0).shuffle(order)
    order = [len(ids) - 1, len(ids) - 2, *order]  # the two edge cases go first, alone (batch size 1)
    for size, first, count in ((1, 0, 48), (7, 2, 112), (32, 2, 256)):
        for start in range(first, first + count, size):
            batch = [ids[i] for i in order[start : start + size]]
            padded = layout.inputs(batch, onnx.checkpoint.pad_id, segments=False, packed=False)
            with torch.inference_mode():
                want = eager(**padded).logits.softmax(-1)
            for engine, packed in ((onnx, False), (onnx, True), (torched, False), (torched, True)):
                assert torch.tensor(engine.forward(batch, packed)) == pytest.approx(want, abs=1e-5)


def test_a_packed_row_padded_to_a_granule_scores_as_the_row_unpadded(tiny_model_dir: Path) -> None:
    """The positions a granule adds (OpenVINO's engine asks for one) are a segment of their own: no
    text attends to them, so no score moves."""
    checkpoint = Checkpoint(tiny_model_dir)
    module = load_module(checkpoint, torch.device("cpu"), "fp32")
    ids = checkpoint.tokenize(["a good movie", "fun", "not at all what I had hoped for"])
    rows = {g: layout.inputs(ids, checkpoint.pad_id, segments=True, packed=True, granule=g) for g in (1, 64)}
    assert rows[1]["input_ids"].shape[1] == sum(map(len, ids)) < 64 == rows[64]["input_ids"].shape[1]
    with torch.inference_mode():
        assert module(**rows[64]) == pytest.approx(module(**rows[1]), abs=1e-6)


def test_a_model_other_than_distilbert_runs_padded_forwards_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Packing reads each text's first position through DistilBERT's own head; another
    architecture keeps its stock padded forward, and the worker's cost model never packs for it."""
    for name in TOKENIZER_FILES:
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, tmp_path / name)
    config = BertConfig(
        vocab_size=AutoConfig.from_pretrained(tiny_model_dir).vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    bert = Classifier(tmp_path, device="cpu", threads=1, precision="fp32", engine="torch")
    assert not bert.cost.packs
    ids = bert.tokenize(["a good movie", "fun"])
    assert len(bert.forward(ids)) == 2
    with pytest.raises(ValueError, match="padded forwards only"):
        bert.forward(ids, packed=True)


def test_a_model_that_cannot_be_traced_runs_eagerly(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    traced = Classifier(tiny_model_dir, device="cpu", threads=1, precision="fp32", engine="torch")

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("untraceable control flow")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    eager = Classifier(tiny_model_dir, device="cpu", threads=1, precision="fp32", engine="torch")
    assert (traced.engine.traced, eager.engine.traced) == (True, False)
    assert "cannot trace" in caplog.text
    ids = eager.tokenize(["a good movie", "fun"])
    assert torch.tensor(eager.forward(ids, packed=True)) == pytest.approx(torch.tensor(traced.forward(ids)), abs=1e-6)


def test_the_null_engine_answers_constant_probabilities_under_a_cache_version_of_its_own(tiny_model_dir: Path) -> None:
    """Every text, in any batch, gets the same probabilities over the model's labels; they are not the
    model's, so they are cached apart from its scores."""
    null = Classifier(tiny_model_dir, engine="null")
    assert (null.engine.name, null.device, null.lanes) == ("null", "cpu", 1)
    assert null.version == f"{fingerprint(tiny_model_dir)}-null" != Checkpoint(tiny_model_dir).version("fp32")
    rows = []
    for texts in (["a good movie"], ["", "bad", "word " * 1000], ["fun"] * 40):
        got = null.forward(null.tokenize(texts), packed=len(texts) > 1)
        assert np.array(got).shape == (len(texts), len(null.labels))
        rows += got
    assert all(row == rows[0] for row in rows)
    assert sum(rows[0]) == pytest.approx(1.0, abs=1e-6)
    three = NullEngine(3).forward([[1, 2], [3]])  # logits: the classifier's function makes them scores
    assert three.shape == (2, 3) and three.tolist() == [[0.0, 1.0, 2.0]] * 2


def test_the_tokenizer_gives_exactly_transformers_token_ids_on_sst2_dev(small_model_dir: Path) -> None:
    """The Rust tokenizer, called directly, must give the ids transformers' tokenizer gives (special
    tokens, lower-casing, truncation at the model's maximum): the model was trained on those."""
    texts = [*sst2_dev_texts(), "", "word " * 1000, "Ünïcode naïve café — “quotes”"]
    checkpoint = Checkpoint(small_model_dir)
    assert checkpoint.max_length == 512
    want = AutoTokenizer.from_pretrained(small_model_dir)(texts, truncation=True, max_length=checkpoint.max_length)
    got = checkpoint.tokenize(texts)
    assert got == want["input_ids"]
    assert len(got[-2]) == checkpoint.max_length  # cut at the maximum, [SEP] kept


def test_from_settings_builds_the_model_the_settings_describe(tiny_model_dir: Path) -> None:
    null = Classifier.from_settings(Settings(engine="null", model_dir=tiny_model_dir))
    assert (null.engine.name, null.version) == ("null", f"{fingerprint(tiny_model_dir)}-null")
    assert (null.name, null.labels) == (tiny_model_dir.resolve().name, ["NEGATIVE", "POSITIVE"])
    torched = Classifier.from_settings(
        Settings(engine="torch", device="cpu", precision="fp32", torch_threads=1, model_dir=tiny_model_dir)
    )
    assert isinstance(torched.engine, TorchEngine)
    assert (torched.device, torched.dtype_name, torched.engine.threads, torched.lanes) == ("cpu", "float32", 1, 1)
    assert torched.version == fingerprint(tiny_model_dir)


# ---------------------------------------------------------------- `sentiment model pull`, no internet


class FakeHub(ThreadingHTTPServer):
    """The three hub endpoints `sentiment model pull` uses (model info, file tree, file download),
    serving `files` as one repository at one commit: a mirror that `HF_ENDPOINT` can point at."""

    repo_id, commit = "org/tiny", "c0ffee" * 6 + "c0ff"

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        super().__init__(("127.0.0.1", 0), _FakeHubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _FakeHubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def _answer(self, with_body: bool) -> None:
        hub, path = self.server, urlsplit(self.path).path
        api, resolve = f"/api/models/{hub.repo_id}", f"/{hub.repo_id}/resolve/{hub.commit}/"
        headers = {"Content-Type": "application/json"}
        if path == api or path.startswith(f"{api}/revision/"):
            body = json.dumps({"id": hub.repo_id, "sha": hub.commit, "siblings": [{"rfilename": n} for n in hub.files]})
        elif path.startswith(f"{api}/tree/{hub.commit}"):
            body = json.dumps(
                [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in hub.files.items()
                ]
            )
        elif path.startswith(resolve) and (name := path.removeprefix(resolve)) in hub.files:
            body = hub.files[name]
            headers = {"X-Repo-Commit": hub.commit, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}
        else:
            self.send_error(404)
            return
        data = body.encode() if isinstance(body, str) else body
        self.send_response(200)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if with_body:
            self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        """Quiet: pytest shows the pull's own output on failure."""


@contextlib.contextmanager
def serving(files: dict[str, bytes]) -> Iterator[FakeHub]:
    """`files` as a hub repository, served on a thread until the block ends."""
    hub = FakeHub(files)
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.shutdown()
        hub.server_close()


@pytest.fixture
def fake_hub(tiny_model_dir: Path) -> Iterator[FakeHub]:
    """The tiny checkpoint as a hub repository that also holds a pickle copy of the weights and a README."""
    files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}
    with serving({**files, "pytorch_model.bin": b"pickle", "README.md": b"# tiny"}) as hub:
        yield hub


def model_pull(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`sentiment model pull` as a user runs it, with only `env` of the hub client's settings."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    return subprocess.run(
        [sys.executable, "-m", "sentiment.cli", "model", "pull", *args],
        env={**inherited, "HF_HUB_DISABLE_PROGRESS_BARS": "1", **env},
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        check=False,
    )


def closed_port_url() -> str:
    """A loopback address nothing listens on: connections are refused at once, as from a closed firewall."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.slow
def test_pull_from_an_unreachable_hub_fails_in_one_line_that_names_the_ways_out(tmp_path: Path) -> None:
    done = model_pull("--dest", str(tmp_path / "model"), HF_ENDPOINT=closed_port_url(), HF_HOME=str(tmp_path / "hf"))
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1, done.stderr  # no retry warnings, no traceback
    assert "cannot reach the Hugging Face hub" in done.stderr and "Connection refused" in done.stderr
    assert all(way in done.stderr for way in ("SENTIMENT_MODEL_DIR=", "HF_ENDPOINT=", "HF_HUB_OFFLINE=1"))
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
@pytest.mark.parametrize("repo_id", ["owner/name/more", "no spaces!", ""])
def test_pull_of_a_name_no_hub_repository_has_is_refused_as_a_bad_argument(tmp_path: Path, repo_id: str) -> None:
    done = model_pull(repo_id, "--dest", str(tmp_path / "model"), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    assert done.returncode == 2, done.stderr  # (the hub client's HFValidationError was a traceback, exit 1)
    assert done.stderr.splitlines()[-1] == (
        "sentiment model pull: error: argument repo_id: expected a hub repository (owner/name or name, of "
        f"letters, digits, '-', '_' and '.'), got {repo_id!r}"
    )
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_pull_shows_the_traceback_with_verbose(tmp_path: Path) -> None:
    done = model_pull(
        "--dest", str(tmp_path / "model"), "--verbose", HF_ENDPOINT=closed_port_url(), HF_HOME=str(tmp_path / "hf")
    )
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ConnectError" in done.stderr and "PullError" in done.stderr


@pytest.mark.slow
def test_pull_fetches_config_tokenizer_and_safetensors_from_a_mirror(
    fake_hub: FakeHub, tiny_model_dir: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "model"
    done = model_pull(fake_hub.repo_id, "--dest", str(dest), HF_ENDPOINT=fake_hub.url, HF_HOME=str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{fake_hub.repo_id} -> {dest}\n"
    pulled = {p.name for p in dest.iterdir() if p.is_file()}
    assert pulled == {p.name for p in tiny_model_dir.iterdir()}, "no pickle weights beside safetensors, no README"
    assert Classifier(dest, device="cpu", threads=1, precision="fp32").version == fingerprint(tiny_model_dir)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("left_out", "lacks"),
    [(".safetensors", "weights (*.safetensors or pytorch_model*.bin)"), ("config.json", "config.json")],
    ids=["no-weights", "no-config"],
)
def test_pull_of_a_repository_the_service_cannot_load_is_refused_before_it_writes(
    tiny_model_dir: Path, tmp_path: Path, left_out: str, lacks: str
) -> None:
    # (a tokenizer-only or GGUF repository was pulled with exit 0, and serve then found no checkpoint)
    files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file() and not p.name.endswith(left_out)}
    dest = tmp_path / "model"
    with serving(files) as hub:
        done = model_pull(hub.repo_id, "--dest", str(dest), HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"))
    assert done.returncode == 1 and done.stdout == "", done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"sentiment model pull: {hub.repo_id}@main is no checkpoint the service can load: it has no {lacks}"
    )
    assert not dest.exists()


@pytest.mark.slow
def test_pull_to_a_dest_it_cannot_write_is_refused_in_one_line(fake_hub: FakeHub, tmp_path: Path) -> None:
    # (a NotADirectoryError traceback from the hub client's own folder before)
    (tmp_path / "a-file").write_text("")
    dest = tmp_path / "a-file" / "model"
    done = model_pull(fake_hub.repo_id, "--dest", str(dest), HF_ENDPOINT=fake_hub.url, HF_HOME=str(tmp_path / "hf"))
    assert (done.returncode, done.stdout, "Traceback" in done.stderr) == (1, "", False), done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"sentiment model pull: cannot write the checkpoint in {dest} (Not a directory): name another with --dest"
    )


@pytest.mark.slow
def test_pull_copies_from_the_hub_cache_when_offline(fake_hub: FakeHub, tiny_model_dir: Path, tmp_path: Path) -> None:
    hf_home = str(tmp_path / "hf")
    empty = model_pull(fake_hub.repo_id, "--dest", str(tmp_path / "none"), HF_HUB_OFFLINE="1", HF_HOME=hf_home)
    assert empty.returncode == 1 and len(empty.stderr.splitlines()) == 1, empty.stderr
    assert "HF_HUB_OFFLINE is set" in empty.stderr and "SENTIMENT_MODEL_DIR=" in empty.stderr

    from huggingface_hub import snapshot_download  # fill the cache as an earlier online download would

    snapshot_download(fake_hub.repo_id, cache_dir=f"{hf_home}/hub", endpoint=fake_hub.url)
    dest = tmp_path / "model"
    done = model_pull(fake_hub.repo_id, "--dest", str(dest), HF_HUB_OFFLINE="1", HF_HOME=hf_home)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in dest.iterdir()} == {p.name for p in tiny_model_dir.iterdir()}
    assert fingerprint(dest) == fingerprint(tiny_model_dir)


# ---------------------------------------------------------------- a checkpoint directory's edges
# What a person can point SENTIMENT_MODEL_DIR at: each ends in one clear line, or a correct answer.


def edited_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def test_a_checkpoint_without_its_tokenizer_vocabulary_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = edited_checkpoint(tiny_model_dir, tmp_path)
    (model_dir / "tokenizer.json").unlink()  # transformers then builds a tokenizer of 5 special tokens
    with pytest.raises(ValueError, match=r"no tokenizer vocabulary .*tokenizer\.json"):
        Checkpoint(model_dir)


@pytest.mark.parametrize("broken", ["tokenizer.json", "model.safetensors"])
def test_a_corrupt_tokenizer_or_weights_file_is_named_in_the_error(
    broken: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    model_dir = edited_checkpoint(tiny_model_dir, tmp_path)
    (model_dir / broken).write_bytes((model_dir / broken).read_bytes()[:100])  # truncated
    what = "tokenizer" if broken == "tokenizer.json" else "weights"
    with pytest.raises(ValueError, match=f"cannot load the {what} in {model_dir}"):
        load_module(Checkpoint(model_dir), torch.device("cpu"), "fp32")


def test_an_id2label_that_skips_an_id_names_the_ids(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = edited_checkpoint(tiny_model_dir, tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config["id2label"] = {"0": "NEGATIVE", "2": "POSITIVE"}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"id2label has ids 0, 2: .* 0 to 1"):
        Checkpoint(model_dir)


def test_weights_missing_from_the_file_are_refused_not_initialized_at_random(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model_dir = edited_checkpoint(tiny_model_dir, tmp_path)
    weights = load_file(model_dir / "model.safetensors")
    headless = {name: tensor for name, tensor in weights.items() if not name.startswith("classifier.")}
    save_file(headless, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lack 2 of the model's tensors \(classifier\.bias, classifier\.weight\)"):
        load_module(Checkpoint(model_dir), torch.device("cpu"), "fp32")


def test_a_model_directory_that_loops_or_cannot_be_read_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert f"no Hugging Face checkpoint (config.json + weights) in {loop}" in str(missing_checkpoint(loop))

    def denied(self: Path) -> bool:  # what a directory this user may not enter answers (root may enter any)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_file", denied)
    assert missing_checkpoint(tmp_path) == (
        f"cannot read {tmp_path / 'config.json'}: Permission denied; "
        "set SENTIMENT_MODEL_DIR to a checkpoint this user may read"
    )


def test_a_text_of_no_tokens_fails_rather_than_take_another_texts_scores() -> None:
    # A tokenizer with no special-token template turns "" into no ids at all.
    for segments, packed in ((True, True), (True, False), (False, False)):
        with pytest.raises(ValueError, match="a text of no tokens"):
            layout.inputs([[2, 50, 3], []], 0, segments=segments, packed=packed)


def test_an_int8_report_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    (tmp_path / int8.REPORT_FILE).write_text("null")
    with pytest.raises(int8.Refused, match="report cannot be read"):
        int8.Artifact.find(tmp_path, "fingerprint")

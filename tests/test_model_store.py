"""Loading checkpoints from disk: labels, fingerprint, padding, packing, truncation, and the real checkpoint."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification,
)

from model_store import classifier as classifier_module
from model_store import layout, onnx_engine
from model_store.classifier import (
    Classifier, cache_version, fingerprint, pick_device, resolve_engine, resolve_precision,
)
from model_store.factory import LABELS, TOKENIZER_FILES
from tests.conftest import shared_path


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def tiny(tiny_model_dir: Path, request: pytest.FixtureRequest) -> Classifier:
    """Both engines (fp32: `auto` is bf16 on some CPUs, which only torch runs)."""
    return Classifier(tiny_model_dir, device="cpu", threads=1, precision="fp32", engine=request.param)


def test_tiny_checkpoint_loads_through_the_real_loader(tiny: Classifier, tiny_model_dir: Path) -> None:
    assert tiny.labels == ["NEGATIVE", "POSITIVE"]
    assert tiny.version == fingerprint(tiny_model_dir)
    assert tiny.device == torch.device("cpu")
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


def test_every_forward_runs_on_one_thread_whichever_thread_calls(tiny: Classifier) -> None:
    """One thread team, not one per calling thread (the worker calls from its model thread)."""
    ran_on: set[int] = set()
    run = tiny._run

    def recording(**inputs: torch.Tensor) -> torch.Tensor:
        ran_on.add(threading.get_ident())
        return run(**inputs)

    tiny._run = recording
    try:
        [ids] = tiny.tokenize(["a good movie"])
        callers = [threading.Thread(target=tiny.forward, args=([ids],)) for _ in range(3)]
        for caller in callers:
            caller.start()
            caller.join()
        tiny.forward([ids])
    finally:
        tiny._run = run
    assert len(ran_on) == 1
    assert ran_on.isdisjoint({threading.get_ident(), *(c.ident for c in callers)})


def test_forward_lanes_run_side_by_side_on_a_share_of_the_threads_each(tiny_model_dir: Path) -> None:
    """Two lanes of one thread each, on threads of their own, and all the threads without a lane."""
    two = Classifier(tiny_model_dir, device="cpu", threads=2, precision="fp32", engine="torch")
    assert two.lanes == 2
    seen: list[tuple[int, int]] = []
    run = two._run

    def recording(**inputs: torch.Tensor) -> torch.Tensor:
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return run(**inputs)

    two._run = recording
    ids = two.tokenize(["a good movie", "bad"])
    whole = two.forward(ids)
    on_lanes = two.on_each_lane(lambda: (two.lane, two.forward(ids)))
    assert sorted(lane for lane, _ in on_lanes) == [0, 1] and two.lane is None
    assert [n for _, n in seen] == [2, 1, 1]
    assert len({ident for ident, _ in seen}) == 3
    for _, got in on_lanes:
        assert torch.tensor(got) == pytest.approx(torch.tensor(whole), abs=1e-6)


def test_forward_lanes_need_torch_on_the_cpu_and_a_thread_each(tiny_model_dir: Path) -> None:
    assert Classifier(tiny_model_dir, device="cpu", threads=1, precision="fp32", engine="torch").lanes == 1
    assert Classifier(tiny_model_dir, device="cpu", threads=2, precision="fp32", engine="onnxruntime").lanes == 1
    with pytest.raises(ValueError, match="torch's engine"):
        Classifier(tiny_model_dir, device="cpu", threads=2, precision="fp32", engine="onnxruntime", lanes=2)
    with pytest.raises(ValueError, match="need a thread each"):
        Classifier(tiny_model_dir, device="cpu", threads=2, precision="fp32", engine="torch", lanes=3)


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
    monkeypatch.setattr(classifier_module, "native_bf16", lambda: native)
    auto = Classifier(tiny_model_dir, device="cpu", threads=1)
    assert (auto.precision, auto.dtype_name) == (("bf16", "bfloat16") if native else ("fp32", "float32"))
    # A reduced precision's scores are cached apart from fp32's.
    assert auto.version == fingerprint(tiny_model_dir) + ("-bf16" if native else "")
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("int8", torch.device("cpu")) == "int8"


def test_auto_engine_is_onnxruntime_for_fp32_on_the_cpu_only(tiny_model_dir: Path) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_engine("auto", cpu, "fp32") == "onnxruntime"
    assert [resolve_engine("auto", cpu, p) for p in ("bf16", "int8")] == ["torch", "torch"]
    assert resolve_engine("auto", cuda, "fp16") == "torch"
    assert resolve_engine("torch", cpu, "fp32") == "torch"
    with pytest.raises(ValueError, match="onnxruntime engine runs fp32"):
        Classifier(tiny_model_dir, device="cpu", threads=1, precision="bf16", engine="onnxruntime")
    onnx = Classifier(tiny_model_dir, device="cpu", threads=1, precision="fp32")
    assert (onnx.engine, onnx.model) == ("onnxruntime", None)  # torch's copy of the weights is let go
    plain = Classifier(tiny_model_dir, device="cpu", threads=1, precision="fp32", engine="torch")
    # The engine changes no score beyond float noise, so fp32 keeps one cache version for both.
    assert onnx.version == plain.version
    # ONNX Runtime's smaller per-call cost makes cutting a batch into more forwards pay sooner.
    assert onnx.cost.overhead_tokens < plain.cost.overhead_tokens


@pytest.mark.parametrize("failure", ["exporter refuses", "no temporary directory", "onnxruntime refuses"])
def test_a_failed_export_is_served_by_torch_unless_onnxruntime_was_asked_for(
    failure: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def refuse(*args: object) -> None:
        raise RuntimeError("unsupported operator")

    if failure == "exporter refuses":
        monkeypatch.setattr(onnx_engine, "export", refuse)
    elif failure == "onnxruntime refuses":  # after torch's copy of the weights is gone: loaded again
        monkeypatch.setattr(onnx_engine, "OnnxEngine", refuse)
    else:  # a read-only file system without a writable TMPDIR
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    fallback = Classifier(tiny_model_dir, device="cpu", threads=1, precision="fp32")
    assert fallback.engine == "torch"
    assert len(fallback.forward(fallback.tokenize(["a good movie"]))[0]) == 2
    assert "ONNX Runtime cannot serve" in caplog.text
    with pytest.raises((RuntimeError, FileNotFoundError)):
        Classifier(tiny_model_dir, device="cpu", threads=1, precision="fp32", engine="onnxruntime")


def test_every_precision_but_fp32_has_its_own_cache_version(tiny_model_dir: Path) -> None:
    # CUDA's float16 too: an fp16 GPU worker and an fp32 CPU worker must not share cache entries.
    plain = fingerprint(tiny_model_dir)
    versions = {p: cache_version(tiny_model_dir, p) for p in ("fp32", "fp16", "bf16", "int8")}
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
    texts = [line.split("\t")[0] for line in shared_path("data/sst2-dev.tsv").read_text().splitlines()[1:]]
    texts += ["", "word " * 1000]
    onnx = Classifier(small_model_dir, device="cpu", threads=1, precision="fp32", engine="onnxruntime")
    torch_engine = Classifier(small_model_dir, device="cpu", threads=1, precision="fp32", engine="torch")
    assert onnx.cost.packs and torch_engine.cost.packs  # DistilBERT
    assert torch_engine.traced
    eager = AutoModelForSequenceClassification.from_pretrained(small_model_dir).eval()
    ids = onnx.tokenize(texts)
    order = list(range(len(ids)))
    random.Random(0).shuffle(order)
    order = [len(ids) - 1, len(ids) - 2, *order]  # the two edge cases go first, alone (batch size 1)
    for size, first, count in ((1, 0, 48), (7, 2, 112), (32, 2, 256)):
        for start in range(first, first + count, size):
            batch = [ids[i] for i in order[start : start + size]]
            padded = layout.inputs(batch, onnx.pad_id, segments=False, packed=False)
            with torch.inference_mode():
                want = eager(**padded).logits.softmax(-1)
            for engine, packed in ((onnx, False), (onnx, True), (torch_engine, False), (torch_engine, True)):
                assert torch.tensor(engine.forward(batch, packed)) == pytest.approx(want, abs=1e-5)


def test_a_model_other_than_distilbert_runs_padded_forwards_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Packing reads each text's first position through DistilBERT's own head; another
    architecture keeps its stock padded forward, and the worker's cost model never packs for it."""
    for name in TOKENIZER_FILES:
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, tmp_path / name)
    config = BertConfig(
        vocab_size=AutoConfig.from_pretrained(tiny_model_dir).vocab_size, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
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
    assert (traced.traced, eager.traced) == (True, False)
    assert "cannot trace" in caplog.text
    ids = eager.tokenize(["a good movie", "fun"])
    assert torch.tensor(eager.forward(ids, packed=True)) == pytest.approx(torch.tensor(traced.forward(ids)), abs=1e-6)

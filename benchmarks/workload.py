"""What the benchmarks feed the model: unique texts, and the checkpoint to run them through."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from core.settings import Settings

CHECKOUT = Path(__file__).resolve().parents[1]


def default_shared_dir() -> Path:
    """`SENTIMENT_SHARED_DIR`, else `shared/` beside the checkout (the development layout, as in tests)."""
    return Path(os.environ.get("SENTIMENT_SHARED_DIR", CHECKOUT.parent / "shared"))


def load_texts(path: Path, at_least: int = 1) -> list[str]:
    """Unique texts in file order: the first column of a TSV with a `text` header, else one per line.
    A file that cannot be read, or holds fewer than `at_least`, ends the command in one line: it is
    the `--data` a person named (a traceback before, chaos's only once its processes had started)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SystemExit(f"--data: cannot read {path} ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise SystemExit(f"--data: cannot read {path} (not UTF-8 text: {exc.reason} at byte {exc.start})") from None
    if lines and lines[0].split("\t")[0] == "text":
        lines = [line.split("\t")[0] for line in lines[1:]]
    texts = list(dict.fromkeys(t.strip() for t in lines if t.strip()))
    if len(texts) < at_least:
        raise SystemExit(f"--data: {path} holds too few distinct texts ({len(texts)}; the run needs {at_least})")
    return texts


def blank(round_: int) -> str:
    """Whitespace naming `round_` (none for 0): its binary digits as spaces and tabs, so a small pool
    used thousands of times over still makes short texts (pool texts end in no whitespace)."""
    return "" if round_ == 0 else bin(round_)[2:].replace("0", " ").replace("1", "\t")


class UniqueTexts:
    """An endless supply of never-repeated texts: the pool once, then again each round with trailing
    whitespace that spells the round (`blank`). The tokenizer drops it, so a text of any round costs
    the model what the limit's copy of it costs, while its cache key is new (a visible tag such as
    " (1)" made the texts 3 tokens longer, and the service slower than the limit it is compared
    with, once a run had used the pool's 67,350 SST-2 sentences)."""

    def __init__(self, pool: list[str]) -> None:
        if not pool:
            raise ValueError("the text pool is empty")
        self.pool = pool
        self.used = 0

    def take(self, count: int = 1) -> list[str]:
        out = []
        for _ in range(count):
            round_, index = divmod(self.used, len(self.pool))
            out.append(self.pool[index] + blank(round_))
            self.used += 1
        return out


@contextlib.contextmanager
def model_dir(kind: str, settings: Settings, config_dir: Path) -> Iterator[Path]:
    """The checkpoint to measure: `full` builds DistilBERT-base with random weights in a temporary
    directory (deleted afterwards: weights are never left in the checkout), with its int8 artifact
    where the settings serve int8 from one (`int8_for_speed`); `small` is `--model-dir`, whose
    artifact `sentiment model quantize` made."""
    if kind == "small":
        yield settings.model_dir
        return
    from benchmarks.checkpoints import write_full_size_model

    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        model = write_full_size_model(config_dir, Path(tmp))
        if settings.precision == "int8" and settings.engine != "torch":
            int8_for_speed(model, default_shared_dir())
        yield model


def int8_for_speed(model: Path, shared: Path, recipe: str | None = None) -> str:
    """The int8 artifact of a random-weight checkpoint, for its speed alone, and its recipe: by
    default the one `sentiment model quantize` keeps for the shared checkpoint on this CPU, made on the
    SST-2 train sentences it calibrates on, once the outlier channels a trained model has are planted
    (`factory.plant_outliers`: their float path costs time). Its report fails the accuracy rule (the
    predictions mean nothing): served with SENTIMENT_INT8_ALLOW_FAILING."""
    from benchmarks.checkpoints import plant_outliers
    from model_store.checkpoint import Checkpoint
    from model_store.quantize import quantize, read_labelled, read_sentences

    train = shared / "data" / "sst2-train.tsv"
    calibration = (train, read_sentences(train)[:512])
    dev, labels = read_labelled(shared / "data" / "sst2-dev.tsv", classes=2)
    if recipe is None:
        with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
            small = Checkpoint(shared / "models" / "distilbert-sst2-small")
            recipe = quantize(small, Path(tmp) / "int8", calibration, (Path("sst2-dev.tsv"), dev, labels)).recipe
    plant_outliers(model)
    few = (Path("sst2-dev.tsv"), dev[:64], labels[:64])  # its figures mean nothing: few sentences will do
    quantize(Checkpoint(model), model / "int8", calibration, few, recipes=[recipe])
    return recipe

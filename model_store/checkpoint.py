"""A Hugging Face sequence-classification checkpoint on local disk: validated, fingerprinted, tokenized.

Everything about a model that does not run it: its files, its version (part of every cache key), its
labels, the function that turns its logits into scores (`model_store.scoring`) and its tokenizer. What runs the forward is an engine (`model_store.engine`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokenizers import Tokenizer
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from core.protocol import ScoreFunction
from model_store.checkpoint_files import missing_checkpoint
from model_store.long_texts import LongTexts, Splitter
from model_store.scoring import SCORES_GENERATION, default_function


def fingerprint(model_dir: Path) -> str:
    """A version that changes whenever any checkpoint file (config, tokenizer, weights) changes, or
    what its scores mean (`SCORES_GENERATION`): a cache entry of either's past is never read."""
    digest = hashlib.sha256(f"scores {SCORES_GENERATION}\0".encode())
    for path in sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def labels(config: PretrainedConfig) -> list[str]:
    """The head's labels by output: config.json's id2label must hold each id from 0 up, or the error
    says so (indexing it would fail with a bare `KeyError: 1`)."""
    id2label = {int(i): str(label) for i, label in (config.id2label or {}).items()}
    ids = sorted(id2label)
    if ids != list(range(len(ids))):
        raise ValueError(
            f"config.json's id2label has ids {', '.join(map(str, ids))}: it needs one label for each of 0 to "
            f"{len(ids) - 1}, the outputs of the model's head"
        )
    return [id2label[i] for i in ids]


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, refused in one line that names the directory when its files are
    unreadable or absent: without them transformers builds one of its special tokens alone, which
    would read every word as unknown and serve the same scores for every text."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise ValueError(f"cannot load the tokenizer in {model_dir} ({type(exc).__name__}: {exc})") from exc
    files = list(tokenizer.vocab_files_names.values())
    if not any((model_dir / name).is_file() for name in files):
        raise ValueError(
            f"no tokenizer vocabulary in {model_dir} (none of {', '.join(files)}): copy the checkpoint's "
            "tokenizer files beside config.json, or fetch them with `sentiment model pull`"
        )
    return tokenizer


class Checkpoint:
    """Config, labels, score function, fingerprint and tokenizer of the checkpoint in `model_dir`."""

    def __init__(self, model_dir: Path) -> None:
        model_dir = Path(model_dir)
        if missing := missing_checkpoint(model_dir):
            raise FileNotFoundError(missing)
        hf_logging.disable_progress_bar()
        self.dir = model_dir
        self.name = model_dir.resolve().name
        self.fingerprint = fingerprint(model_dir)
        self.config: PretrainedConfig = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        self.labels = labels(self.config)
        self.function: ScoreFunction = default_function(self.config)
        tokenizer = load_tokenizer(model_dir)
        if not tokenizer.is_fast:
            raise ValueError(f"{model_dir} has no fast (tokenizers) tokenizer")
        self.pad_id: int = tokenizer.pad_token_id or 0
        self.max_length: int = min(tokenizer.model_max_length, self.config.max_position_embeddings)
        # The Rust tokenizer itself, called once a batch: transformers' wrapper costs more per text
        # in Python than the tokenizing does (docs/performance.md, "The ceiling").
        self._tokenizer = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.max_length)

    def version(self, precision: str) -> str:
        """The model's version, part of every cache key: the fingerprint, suffixed by any precision but
        fp32 (`-fp16`, `-bf16`, `-int8`, `-null`), whose different scores are cached apart."""
        return self.fingerprint + ("" if precision == "fp32" else f"-{precision}")

    def splitter(self, handling: LongTexts) -> Splitter:
        """The tokenizer as `handling` treats texts longer than the model's length."""
        return Splitter(self._tokenizer, self.max_length, handling)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, special tokens added, truncated to the model's maximum length, unpadded."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch_fast(texts)]

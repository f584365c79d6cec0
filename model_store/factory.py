"""Random-weight DistilBERT checkpoints in the Hugging Face on-disk format.

Tests load a tiny one through the real loading code; benchmarks build the full-size shape from a
config directory (compute cost equals the real model's; its predictions mean nothing).
"""

from __future__ import annotations

import shutil
import string
from pathlib import Path

import torch
from transformers import AutoConfig, BertTokenizer, DistilBertConfig, DistilBertForSequenceClassification

LABELS = {0: "NEGATIVE", 1: "POSITIVE"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
_WORDS = [
    "i",
    "you",
    "it",
    "this",
    "that",
    "the",
    "a",
    "movie",
    "film",
    "is",
    "was",
    "not",
    "very",
    "good",
    "great",
    "bad",
    "awful",
    "love",
    "hate",
    "fun",
    "boring",
]


def write_tiny_model(dest: Path, seed: int = 0, max_length: int = 128) -> Path:
    """A 2-layer, 32-wide DistilBERT with a small word-piece vocabulary that spells any ASCII text."""
    dest.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *string.punctuation]
    vocab += [f"##{c}" for c in chars] + _WORDS
    config = DistilBertConfig(
        vocab_size=len(vocab),
        dim=32,
        hidden_dim=64,
        n_layers=2,
        n_heads=2,
        max_position_embeddings=max_length,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=max_length).save_pretrained(dest)
    return _write_weights(config, dest, seed)


def write_full_size_model(config_dir: Path, dest: Path, seed: int = 0) -> Path:
    """The architecture and tokenizer of `config_dir` with random weights (for cost measurements)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (config_dir / name).is_file():
            shutil.copy(config_dir / name, dest / name)
    return _write_weights(AutoConfig.from_pretrained(config_dir), dest, seed)


def _write_weights(config: DistilBertConfig, dest: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    DistilBertForSequenceClassification(config).save_pretrained(dest)
    return dest

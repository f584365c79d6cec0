"""Random-weight DistilBERT (and BERT) checkpoints in the Hugging Face on-disk format.

Tests load a tiny one through the real loading code, of any head (single-label, multi-label,
regression); benchmarks build the full-size shape from a config directory (compute cost equals the
real model's; its predictions mean nothing). `plant_outliers` gives either the outlier channels of a
trained transformer's activations, which int8 recipes must meet (`model_store.quantize`).
"""

from __future__ import annotations

import shutil
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertTokenizer,
    DistilBertConfig,
    PretrainedConfig,
)

LABELS = {0: "NEGATIVE", 1: "POSITIVE"}
Architecture = Literal["distilbert", "bert"]
ProblemType = Literal["single_label_classification", "multi_label_classification", "regression"]
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


def write_tiny_model(
    dest: Path,
    seed: int = 0,
    max_length: int = 128,
    architecture: Architecture = "distilbert",
    labels: Sequence[str] = tuple(LABELS.values()),
    problem_type: ProblemType | None = None,
) -> Path:
    """A 2-layer, 32-wide DistilBERT (or BERT) with a small word-piece vocabulary that spells any
    ASCII text, and a head of `labels` for `problem_type` (None: as transformers infers it)."""
    dest.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *string.punctuation]
    vocab += [f"##{c}" for c in chars] + _WORDS
    id2label = dict(enumerate(labels))
    label2id = {label: i for i, label in enumerate(labels)}
    shared: dict[str, Any] = {
        "vocab_size": len(vocab),
        "max_position_embeddings": max_length,
        "id2label": id2label,
        "label2id": label2id,
        "problem_type": problem_type,
    }
    config: PretrainedConfig
    if architecture == "bert":  # (the same shape under each family's own names)
        config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, **shared)
    else:
        config = DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=2, **shared)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=max_length).save_pretrained(dest)
    return _write_weights(config, dest, seed)


def write_full_size_model(config_dir: Path, dest: Path, seed: int = 0) -> Path:
    """The architecture and tokenizer of `config_dir` with random weights (for cost measurements)."""
    config = full_size_config(config_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (config_dir / name).is_file():
            shutil.copy(config_dir / name, dest / name)
    return _write_weights(config, dest, seed)


def full_size_config(config_dir: Path) -> PretrainedConfig:
    """The model config in `config_dir` (`--config-dir`). One that is missing or no model config ends
    the command in one line, naming the file: transformers' traceback before, and a path that is not
    there read as a hub repository's name."""
    config = config_dir / "config.json"
    if not config.is_file():
        raise SystemExit(f"--config-dir: no config.json in {config_dir}")
    try:
        return AutoConfig.from_pretrained(config_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--config-dir: {config} is no model config ({str(exc).splitlines()[0]})") from None


# Products whose input activation only one other product writes, so planting changes nothing else:
# the FFN's output (its hidden layer's GELU) and attention's output (the values' weighted sum).
_PLANTED = {
    "lin1": "lin2",
    "v_lin": "out_lin",
    "intermediate.dense": "output.dense",
    "self.value": "attention.output.dense",
}


def plant_outliers(model_dir: Path, channels: Sequence[int] = (5,), scale: float = 50.0) -> Path:
    """Give the FFN's and attention's output products an input with `channels` `scale` times the others'
    range, as a trained model's activations have a few (the shared checkpoint: 89 channels over 3
    times the median in 19 of its 24) and random weights none: the writing product's output channels
    are scaled up and the reading product's weights for them down, so nothing else changes much."""
    weights = load_file(model_dir / "model.safetensors")
    picked = list(channels)
    for name, tensor in weights.items():
        stem = name.removesuffix(".weight").removesuffix(".bias")
        if stem.endswith(tuple(_PLANTED)):
            tensor[picked] *= scale  # a Linear's weight is (outputs, inputs): its output channels
        elif name.endswith(".weight") and stem.endswith(tuple(_PLANTED.values())):
            tensor[:, picked] /= scale
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir


def _write_weights(config: PretrainedConfig, dest: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(dest)
    return dest

"""A sequence-classification checkpoint loaded from a local directory, ready to score token ids."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def fingerprint(model_dir: Path) -> str:
    """A version that changes whenever any checkpoint file (config, tokenizer, weights) changes.

    It is part of every cache key, so a new model never serves an old model's results.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def pick_device(device: str) -> torch.device:
    """`auto` means CUDA when this machine has it, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


class Classifier:
    """Tokenizer plus model. `forward` pads each batch only to its own longest text."""

    def __init__(self, model_dir: Path, device: str = "auto", threads: int | None = None) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file() or not any(
            p.suffix in WEIGHT_SUFFIXES for p in model_dir.iterdir()
        ):
            raise FileNotFoundError(
                f"no Hugging Face checkpoint (config.json + weights) in {model_dir.resolve()}; "
                "set SENTIMENT_MODEL_DIR or fetch one with `sentiment model pull`"
            )
        hf_logging.disable_progress_bar()
        self.device = pick_device(device)
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        if not self.tokenizer.is_fast:
            raise ValueError(f"{model_dir} has no fast (tokenizers) tokenizer")
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True, dtype=self.dtype)
        self.model = model.to(self.device).eval()

        config = self.model.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self.max_length = min(self.tokenizer.model_max_length, config.max_position_embeddings)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.name = model_dir.resolve().name
        self.version = fingerprint(model_dir)
        self.forward([self.tokenize(["warm up"])[0]])  # first call pays allocator and kernel set-up
        log.info(
            "model %s version %s on %s (%s, %d torch threads), labels %s",
            self.name, self.version, self.device, str(self.dtype).removeprefix("torch."),
            torch.get_num_threads(), self.labels,
        )

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated to the model's maximum length, unpadded."""
        return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    def forward(self, batch: list[list[int]]) -> list[list[float]]:
        """Label probabilities per text for one batch of token ids (padded here to its longest)."""
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        with torch.inference_mode():
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            ).logits
            return logits.float().softmax(dim=-1).cpu().tolist()

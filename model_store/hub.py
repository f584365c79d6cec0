"""`sentiment model pull`: fetch a checkpoint from the Hugging Face hub for image builds.

The service itself never downloads: it loads `SENTIMENT_MODEL_DIR` from disk.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_REPO = "winegarj/distilbert-base-uncased-finetuned-sst2"


def pull(repo_id: str, dest: Path, revision: str | None = None) -> Path:
    """Download config, tokenizer and weights (safetensors when the repo has them) into `dest`."""
    from huggingface_hub import HfApi, snapshot_download

    files = HfApi().list_repo_files(repo_id, revision=revision)
    weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "pytorch_model*.bin"
    snapshot_download(
        repo_id,
        revision=revision,
        local_dir=dest,
        allow_patterns=["config.json", "tokenizer*", "vocab.txt", "special_tokens_map.json", weights],
    )
    return dest

"""The files a Hugging Face checkpoint is made of, checked without loading anything.

No torch, no transformers: `sentiment serve` checks a model directory before it starts a process
(a missing model then costs nothing and reads the same every time), `Checkpoint` before it loads one.
"""

from __future__ import annotations

import os
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def missing_checkpoint(model_dir: Path) -> str | None:
    """Why `model_dir` holds no checkpoint, in one line a person can act on; None when it holds one.
    Never raises: a directory this user may not read, or a symlink loop, is such a line too."""
    try:
        if (model_dir / "config.json").is_file() and any(p.suffix in WEIGHT_SUFFIXES for p in model_dir.iterdir()):
            return None
    except OSError as exc:
        return f"cannot read {exc.filename}: {exc.strerror}; set SENTIMENT_MODEL_DIR to a checkpoint this user may read"
    return (
        f"no Hugging Face checkpoint (config.json + weights) in {os.path.realpath(model_dir)}; "
        "set SENTIMENT_MODEL_DIR or fetch one with `sentiment model pull`"
    )

"""`sentiment model pull`: fetch a checkpoint from the Hugging Face hub for image builds.

The service itself never downloads: it loads `SENTIMENT_MODEL_DIR` from disk.
"""

from __future__ import annotations

import shutil
from fnmatch import fnmatch
from pathlib import Path

DEFAULT_REPO = "winegarj/distilbert-base-uncased-finetuned-sst2"
CHECKPOINT_FILES = ["config.json", "tokenizer*", "vocab.txt", "special_tokens_map.json"]
SAFETENSORS, PICKLE = "*.safetensors", "pytorch_model*.bin"
# What to do when the hub is out of reach: the service itself never needs it.
WAYS_OUT = (
    "use a checkpoint already on disk (SENTIMENT_MODEL_DIR=DIR, no pull needed), a hub mirror (HF_ENDPOINT=URL), "
    "or a hub cache an earlier download filled (HF_HUB_OFFLINE=1)"
)


class PullError(Exception):
    """A pull that failed for a reason outside this program: the CLI prints it as one line, no traceback."""


def pull(repo_id: str, dest: Path, revision: str | None = None) -> Path:
    """Config, tokenizer and weights (safetensors when the repo has them) into `dest`: from the hub
    (or the mirror at `HF_ENDPOINT`), or from the local hub cache when `HF_HUB_OFFLINE=1`.

    Raises `PullError` when the hub cannot be reached or answers no, the cache lacks the repo, the
    repo holds no checkpoint, or `dest` cannot be written.
    """
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    where = f"{repo_id}@{revision or constants.DEFAULT_REVISION}"
    try:
        if constants.is_offline_mode():
            _copy_from_cache(repo_id, dest, revision)
        else:
            _download(repo_id, dest, revision)
    except LocalEntryNotFoundError as exc:  # offline, and the cache has no (complete) snapshot
        raise PullError(
            f"HF_HUB_OFFLINE is set and the hub cache {constants.HF_HUB_CACHE} has no complete {where}; "
            "unset it to download, or use a checkpoint already on disk (SENTIMENT_MODEL_DIR=DIR)"
        ) from exc
    except HfHubHTTPError as exc:  # not found, gated, unauthorized: the first line is the hub's answer
        answer = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        raise PullError(f"the hub at {constants.ENDPOINT} cannot serve {where} ({answer})") from exc
    except httpx2.TransportError as exc:  # refused, unresolvable, timed out, cut off mid-download
        raise PullError(
            f"cannot reach the Hugging Face hub at {constants.ENDPOINT} ({type(exc).__name__}: {exc}); {WAYS_OUT}"
        ) from exc
    except OSError as exc:  # --dest under a regular file, not this user's to write, a full disk
        raise PullError(f"cannot write the checkpoint in {dest} ({exc.strerror}): name another with --dest") from exc
    return dest


def _download(repo_id: str, dest: Path, revision: str | None) -> None:
    """One metadata request, bounded by `HF_HUB_ETAG_TIMEOUT` and never retried, decides reachability:
    `list_repo_files` would retry an unreachable hub for ~24 s. Pinning its commit skips
    `snapshot_download`'s own (unbounded) look-up."""
    from huggingface_hub import HfApi, constants, snapshot_download

    info = HfApi().model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    files = [sibling.rfilename for sibling in info.siblings or []]
    _require_checkpoint(f"{repo_id}@{revision or constants.DEFAULT_REVISION}", files)
    snapshot_download(
        repo_id,
        revision=info.sha,
        local_dir=dest,
        allow_patterns=[*CHECKPOINT_FILES, _weights(files)],
        etag_timeout=constants.HF_HUB_ETAG_TIMEOUT,
    )


def _copy_from_cache(repo_id: str, dest: Path, revision: str | None) -> None:
    """Offline: the hub cache keeps snapshots in its own layout (symlinks into blobs), and
    `snapshot_download(local_dir=...)` does not copy from it, so copy the chosen files here."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    cached = snapshot_download(repo_id, revision=revision, allow_patterns=[*CHECKPOINT_FILES, SAFETENSORS, PICKLE])
    snapshot = Path(cached)
    files = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()]
    _require_checkpoint(f"the cached {repo_id}@{revision or 'main'}", files)
    for name in filter_repo_objects(files, allow_patterns=[*CHECKPOINT_FILES, _weights(files)]):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(snapshot / name, dest / name)  # follows the cache's symlinks


def _require_checkpoint(where: str, files: list[str]) -> None:
    """Refuse, before a byte is written, a repository the service could not load (`missing_checkpoint`:
    config.json and weights beside it): a tokenizer-only, GGUF or dataset repository."""
    top = [f for f in files if "/" not in f]
    lacks = [
        what
        for what, present in (
            ("config.json", "config.json" in top),
            (
                "weights (*.safetensors or pytorch_model*.bin)",
                any(fnmatch(f, p) for f in top for p in (SAFETENSORS, PICKLE)),
            ),
        )
        if not present
    ]
    if lacks:
        raise PullError(f"{where} is no checkpoint the service can load: it has no {' and no '.join(lacks)}")


def _weights(files: list[str]) -> str:
    """Safetensors when the repo has them: loading them runs no pickled code."""
    return SAFETENSORS if any(f.endswith(".safetensors") for f in files) else PICKLE

"""Where a benchmark ran: results are only comparable on the same machine, commit and settings."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what the platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit(checkout: Path | None = None) -> str | None:
    """The commit of `checkout` (None: this one), with `-dirty` when there are uncommitted changes."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            check=True,
            cwd=checkout,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def describe(device: str) -> dict[str, object]:
    """The machine and software of a run (torch imported here: a command refused before it runs
    never pays for that import)."""
    import torch

    from model_store.engine import native_bf16

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        # The same CPU name comes with and without bfloat16 in hardware, and it triples the CPU's rate.
        "bf16_native": native_bf16(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }

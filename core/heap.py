"""The garbage collector's view of a long-running process: its start-up heap frozen out of reach."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Freeze what is alive once the process has started (modules, the app), so that a full collection
    walks only what it made since: the API's start-up heap made each one a pause of about 0.1 s, every
    second or so under load (docs/tuning.md, "Garbage collection"). Garbage is collected first: what
    is frozen is never collected."""
    gc.collect()
    gc.freeze()

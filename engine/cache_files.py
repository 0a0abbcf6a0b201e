"""The engine's per-machine cache: measured hardware profiles, GEMM plans and CUPTI calibrations, each a JSON file
under one root, written so that a reader never sees half a file and a read-only home costs only the caching."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$KVLAB_CACHE_DIR, else $XDG_CACHE_HOME/kvlab (~/.cache/kvlab)."""
    root = os.environ.get("KVLAB_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "kvlab")
    return Path(root).expanduser()


def write_cache_file(path: Path, text: str) -> Path | None:
    """Write `text` to `path` atomically (a temporary beside it, then a rename) -> `path`, or None when the cache
    cannot be written (the caller keeps what it measured for this process)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError:
        return None
    return path

"""On-disk caches shared by trials, runs and concurrent workers on one machine.

Keys are hashes of everything a cached value depends on, so a stale entry can never be read by mistake;
values are written to a temporary name and renamed into place, so a reader never sees a torn file even when
two workers race to fill the same entry (the second rename simply replaces an identical value).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

CACHE_ENV = "AUTOTUNE_CACHE_DIR"


def cache_root() -> Path:
    """`$AUTOTUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/autotune`, else `~/.cache/autotune`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "autotune"


def key_of(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any | None:
    """The cached value, or None when absent or unreadable (a bad entry is recomputed, never trusted)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def publish_dir(staging: Path, final: Path) -> Path:
    """Move a fully written directory into place; if another writer got there first, keep theirs."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return final

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
from typing import Any, Callable

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
    """Write JSON to a temporary name beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, valid: Callable[[Any], bool] = lambda entry: True) -> Any | None:
    """The cached value, or None when absent, unreadable or not `valid` (a bad entry is recomputed, never trusted)."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return entry if valid(entry) else None


def cached_json(path: Path, compute: Callable[[], Any], valid: Callable[[Any], bool] = lambda entry: True) -> tuple[Any, bool]:
    """(value, cache hit): a step's JSON result cached at `path`, else `compute()` written there atomically."""
    entry = read_json(path, valid)
    if entry is not None:
        return entry, True
    entry = compute()
    write_json_atomic(path, entry)
    return entry, False


def cached_dir(final: Path, marker: str, build: Callable[[Path], None]) -> bool:
    """Whether the directory `final` was already there (its `marker` file written last); else `build(staging)`
    fills a fresh staging directory beside it, which is then published in one rename. A step that fails leaves
    no half-written entry."""
    if (final / marker).exists():
        return True
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_dir(staging, final)
    return False


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

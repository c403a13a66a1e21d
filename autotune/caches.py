"""On-disk caches shared by trials, runs and concurrent workers on one machine, and the temporary files beside them.

Keys are hashes of everything a cached value depends on, so a stale entry can never be read by mistake;
values are written under a temporary name and renamed into place, so a reader never sees a torn file even when
two workers race to fill the same entry (the second rename simply replaces an identical value).

What atomic writes do not cover is what happens to caches in the field: a disk that fills, a copy that stops
halfway, a file truncated by a crash of the machine, a cache carried from another version. So every entry
carries its own manifest, written with it in the same rename: a file entry starts with a one-line header
(`autotune-cache <format> <size> <sha256>`), a directory entry holds `MANIFEST.json` (the format, and the size
and sha256 of every file, written last). An entry that fails its manifest, or fails to load, or was written in
another `CACHE_FORMAT`, is a cache miss (`load_or_discard`): logged once as a warning naming it, moved aside and
deleted, then recomputed; never a traceback, never a candidate that fails on every later run.

A write that finds its disk full is one `DiskFullError` (the path, the space it needed), which the CLI turns into
exit status 2; half-written entries are removed, never read back. Temporary names carry their owner's host and
pid (`.tmp-<host>-<pid>-...`), so the next run can remove those of processes that were killed
(`remove_dead_owners`) without touching a live one's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

CACHE_ENV = "AUTOTUNE_CACHE_DIR"
#: The layout of every entry. 1: the entries written before this number existed (no manifest); 2: a manifest
#: (format, sizes, sha256) written with each entry. An entry of another format is recomputed, never read.
CACHE_FORMAT = 2
MANIFEST = "MANIFEST.json"
HEADER_TAG = "autotune-cache"
#: How the temporary names of this module's writers begin (then `<host>-<pid>-`).
STAGING = ".tmp-"
#: A library that wraps an OSError in its own exception keeps one of these in its message.
DISK_FULL_WORDS = ("no space left on device", "disk quota exceeded", "storagefull", "database or disk is full")
#: A failed write on a disk with less free space than this is taken for a full disk, whatever the exception said.
NEARLY_FULL_BYTES = 1 << 20
MB = 1024 * 1024


class CorruptEntry(Exception):
    """Why a cache entry cannot be used: a manifest that does not match, another format, a loader's error."""


class DiskFullError(Exception):
    """A write into the cache or the run directory that found its disk full (ENOSPC, EDQUOT): one sentence, exit 2.
    Finished trials are in the study's storage, so the same command with --resume continues once space is freed."""

    def __init__(self, path: Path, needed: str) -> None:
        self.path = Path(path)
        super().__init__(f"no space left on the disk holding {self.path} ({free_space(self.path)} free): {needed}; "
                         "free some space, then run the same command with --resume (finished trials are kept)")


# -- where, and what an entry's key is ------------------------------------------------------------------------------

def cache_root() -> Path:
    """`$AUTOTUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/autotune`, else `~/.cache/autotune`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "autotune"


def key_of(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def source_identity(*modules: ModuleType) -> str:
    """A digest of these modules' source files, for the key of an entry autotune's own code builds: a changed
    rewrite rebuilds its entries, where a version number would not move within a development checkout."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__ or "").read_bytes())
    return digest.hexdigest()[:16]


# -- temporary names that say whose they are --------------------------------------------------------------------

def host_tag() -> str:
    """This machine's name, letters and digits only, so that it can be read back out of a temporary name."""
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"


def owner_tag() -> str:
    """`<host>-<pid>-`: the part of a temporary name that says which process may still be writing it."""
    return f"{host_tag()}-{os.getpid()}-"


def owned_tempdir(prefix: str, parent: Path | None = None) -> Path:
    """A fresh directory named `<prefix><host>-<pid>-XXXX` (in `parent`, else the system's temp root)."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix + owner_tag(), dir=parent))


@contextlib.contextmanager
def owned_temporary_directory(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """`tempfile.TemporaryDirectory` with an owned name: removed at the end, and by a later run if this process is
    killed first."""
    path = owned_tempdir(prefix, parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def is_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (one of another user counts; a zombie, killed but not yet reaped by
    its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):  # Linux: the state follows the command's closing parenthesis
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    return True


def remove_dead_owners(root: Path, prefix: str = STAGING) -> list[Path]:
    """Remove what killed processes of this host left in `root` under `prefix` (their pid is in the name); a live
    process's, another host's and anything else are left alone. Returns what was removed."""
    pattern = re.compile(rf"^{re.escape(prefix)}{re.escape(host_tag())}-(\d+)-")
    try:
        names = os.listdir(root)
    except OSError:
        return []
    removed = []
    for name in names:
        match = pattern.match(name)
        if match is None or int(match.group(1)) == os.getpid() or is_alive(int(match.group(1))):
            continue
        path = root / name
        remove(path)
        removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) of killed processes in %s", len(removed), root)
    return removed


def sweep_litter(*roots: Path) -> list[Path]:
    """The temporaries of killed processes: gate directories in the system's temp root, and staging names in each
    of `roots` and the directories directly under them (a cache's kinds, a run's artifacts)."""
    removed = remove_dead_owners(Path(tempfile.gettempdir()), "autotune-gate-")
    for root in roots:
        removed += remove_dead_owners(root)
        with contextlib.suppress(OSError):
            for child in root.iterdir():
                if child.is_dir() and not child.name.startswith("."):
                    removed += remove_dead_owners(child)
    return removed


# -- a full disk ---------------------------------------------------------------------------------------------------

def human_bytes(count: int) -> str:
    """A byte count as messages show it: bytes, KB or MB."""
    if count < 1024:
        return f"{count} bytes"
    return f"{count / 1024:.1f} KB" if count < MB else f"{count / MB:.1f} MB"


def free_space(path: Path) -> str:
    """The free space of the disk holding `path` (or its nearest existing parent), for messages."""
    for where in (path, *path.parents):
        with contextlib.suppress(OSError):
            return human_bytes(shutil.disk_usage(where).free)
    return "unknown space"


def is_disk_full(exc: BaseException, where: Path | None = None) -> bool:
    """Whether `exc` (or what caused it) is a full disk: ENOSPC/EDQUOT, a library's message saying so, or any
    failure while the disk holding `where` has almost no free space left."""
    seen: BaseException | None = exc
    chain: set[int] = set()
    while seen is not None and id(seen) not in chain:
        chain.add(id(seen))
        if isinstance(seen, DiskFullError):
            return True
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(seen).lower() for words in DISK_FULL_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    if where is not None:
        for path in (where, *where.parents):
            with contextlib.suppress(OSError):
                return shutil.disk_usage(path).free < NEARLY_FULL_BYTES
    return False


def bytes_under(path: Path) -> int:
    """Bytes of the files under `path` (a file's own size): what a failed write had written."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def as_disk_full(exc: BaseException, fallback: Path | None = None) -> DiskFullError | None:
    """`exc` as a DiskFullError naming the file it failed to write (else `fallback`, else the working directory),
    or None when it is not about a full disk."""
    if isinstance(exc, DiskFullError):
        return exc
    if not is_disk_full(exc):
        return None
    return DiskFullError(Path(getattr(exc, "filename", None) or fallback or Path.cwd()),
                         "a write there failed for want of space")


@contextlib.contextmanager
def disk_full_is_an_error(fallback: Path | None = None) -> Iterator[None]:
    """Turn a full disk met anywhere inside into one DiskFullError (see `as_disk_full`); also a decorator."""
    try:
        yield
    except Exception as exc:
        full = as_disk_full(exc, fallback)
        if full is None or full is exc:
            raise
        raise full from exc


# -- file entries: a header line, then the value's bytes -------------------------------------------------------

def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_entry(path: Path, payload: bytes) -> None:
    """Write a file entry (header + payload) under an owned temporary name beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"{HEADER_TAG} {CACHE_FORMAT} {len(payload)} {sha256_of(payload)}\n".encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{STAGING}{owner_tag()}", suffix=f"-{path.name}")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(header + payload)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, Exception) and is_disk_full(exc, path.parent):
            raise DiskFullError(path, f"writing it needed {human_bytes(len(header) + len(payload))}") from exc
        raise


def read_entry(path: Path) -> bytes:
    """A file entry's payload once its header matches it; CorruptEntry otherwise (FileNotFoundError if absent)."""
    raw = path.read_bytes()
    line, newline, payload = raw.partition(b"\n")
    fields = line.decode("ascii", errors="replace").split(" ")
    if not newline or len(fields) != 4 or fields[0] != HEADER_TAG:
        raise CorruptEntry(f"{path.name} has no cache header (written before cache format {CACHE_FORMAT}, or garbage)")
    if fields[1] != str(CACHE_FORMAT):
        raise CorruptEntry(f"{path.name} is in cache format {fields[1]}, this version reads {CACHE_FORMAT}")
    if fields[2] != str(len(payload)) or fields[3] != sha256_of(payload):
        raise CorruptEntry(f"{path.name} holds {len(payload)} bytes that do not match its header "
                           f"({fields[2]} bytes and their sha256): truncated or overwritten")
    return payload


def json_bytes(value: Any) -> bytes:
    """A JSON value as a file entry's payload."""
    return json.dumps(value, indent=2).encode("utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write a JSON value as a file entry (see `write_entry`)."""
    write_entry(path, json_bytes(data))


def read_json(path: Path, valid: Callable[[Any], bool] = lambda entry: True) -> Any | None:
    """The cached value, or None when absent, corrupt (discarded, see `load_or_discard`) or not `valid` (left for
    the next write to replace: a stale value is not a broken one)."""
    entry = load_or_discard(path, lambda p: json.loads(read_entry(p)))
    return entry if entry is not None and valid(entry) else None


def cached_file(path: Path, compute: Callable[[], T], dump: Callable[[T], bytes], parse: Callable[[bytes], T],
                valid: Callable[[T], bool] = lambda entry: True) -> tuple[T, bool]:
    """(value, cache hit): the value of the file entry at `path`, else `compute()` written there atomically."""
    entry = load_or_discard(path, lambda p: parse(read_entry(p)))
    if entry is not None and valid(entry):
        return entry, True
    entry = compute()
    write_entry(path, dump(entry))
    return entry, False


def cached_json(path: Path, compute: Callable[[], Any], valid: Callable[[Any], bool] = lambda entry: True) -> tuple[Any, bool]:
    """(value, cache hit): a step's JSON result cached at `path`, else `compute()` written there atomically."""
    return cached_file(path, compute, json_bytes, json.loads, valid)


# -- directory entries: the files, then MANIFEST.json ------------------------------------------------------------

#: Directory entries whose every file was hashed in this process, by (path, sizes and mtimes): a student read for
#: each bit width is hashed once, and a file changed since is hashed again.
_verified: set[tuple[Any, ...]] = set()


def file_hash(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks (large weights never sit in memory whole)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record the format and every file's size and sha256 in `directory`/MANIFEST.json: the entry's last file."""
    files = sorted(f for f in directory.rglob("*") if f.is_file() and f.name != MANIFEST)
    manifest = {"format": CACHE_FORMAT, "files": {
        f.relative_to(directory).as_posix(): {"size": f.stat().st_size, "sha256": file_hash(f)} for f in files}}
    # A new file, renamed over the old: a manifest hard-linked from another entry (a copied export) stays intact.
    staged = directory / f"{STAGING}{owner_tag()}{MANIFEST}"
    staged.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(staged, directory / MANIFEST)


def verify_dir(directory: Path) -> None:
    """CorruptEntry unless `directory` holds a manifest of this format whose every file is there, whole and unchanged."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        listed = dict(manifest["files"])
        found = manifest["format"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptEntry(f"{directory / MANIFEST} is missing or unreadable ({type(exc).__name__}): written before "
                           f"cache format {CACHE_FORMAT}, or cut short") from None
    if found != CACHE_FORMAT:
        raise CorruptEntry(f"{directory.name} is in cache format {found}, this version reads {CACHE_FORMAT}")
    stamps = []
    for name, expected in listed.items():
        path = directory / name
        stat = path.stat() if path.is_file() else None
        if stat is None or stat.st_size != expected["size"]:
            size = "missing" if stat is None else f"{stat.st_size} bytes"
            raise CorruptEntry(f"{path} is {size}, its manifest says {expected['size']} bytes")
        stamps.append((name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    key = (str(directory.resolve()), tuple(stamps))
    if key in _verified:
        return
    for name, expected in listed.items():
        if file_hash(directory / name) != expected["sha256"]:
            raise CorruptEntry(f"{directory / name} does not match the sha256 in its manifest")
    _verified.add(key)


def build_dir(final: Path, build: Callable[[Path], T], size_hint: Callable[[], int] | None = None) -> T:
    """`build(staging)` in a fresh owned directory beside `final`, its manifest written, then published in one rename
    (a concurrent writer's entry, if first, is kept). A failed build leaves nothing behind; a full disk is a
    DiskFullError saying how much the entry needed: `size_hint()` (e.g. a model's parameter bytes) or, failing
    that, more than what had been written."""
    staging = owned_tempdir(STAGING, final.parent)
    try:
        value = build(staging)
        write_manifest(staging)
    except BaseException as exc:
        full = isinstance(exc, Exception) and is_disk_full(exc, final.parent)
        written = bytes_under(staging) if full else 0
        shutil.rmtree(staging, ignore_errors=True)
        if not full:
            raise
        hinted = size_hint() if size_hint is not None else 0
        needed = (f"writing it needed about {human_bytes(hinted)}" if hinted > written else
                  f"writing it needed more than the {human_bytes(written)} it had written")
        raise DiskFullError(final, needed) from exc
    publish_dir(staging, final)
    return value


def cached_dir_value(final: Path, build: Callable[[Path], T], load: Callable[[Path], T],
                     size_hint: Callable[[], int] | None = None) -> tuple[T, bool]:
    """(value, cache hit): `load(final)` of a verified directory entry, else `build(staging)`'s value, its directory
    published at `final` (see `build_dir`). `load` must not return None."""
    value = load_verified_dir(final, load)
    if value is not None:
        return value, True
    return build_dir(final, build, size_hint), False


def load_verified_dir(entry: Path, load: Callable[[Path], T]) -> T | None:
    """`load(entry)` of a directory entry whose manifest checks out, else None (a bad entry discarded, see
    `load_or_discard`)."""
    def verified(path: Path) -> T:
        verify_dir(path)
        return load(path)

    return load_or_discard(entry, verified)


def cached_dir(final: Path, marker: str, build: Callable[[Path], None]) -> bool:
    """Whether the directory `final` was already there, verified and holding `marker`; else `build(staging)` fills a
    fresh staging directory beside it, which is then published in one rename. A step that fails leaves no
    half-written entry."""
    def load(path: Path) -> Path:
        if not (path / marker).is_file():
            raise CorruptEntry(f"{path} has no {marker}")
        return path

    return cached_dir_value(final, build, load)[1]


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


# -- the one way an entry is read -----------------------------------------------------------------------------------

def load_or_discard(entry: Path, load: Callable[[Path], T]) -> T | None:
    """`load(entry)`, or None when the entry is absent or cannot be used: whatever `load` raises (a manifest that
    does not match, another format, a library's load error) is logged once as a warning naming the entry, and
    the entry is discarded so that it is recomputed. A bad entry is a cache miss, never a traceback."""
    if not (entry.exists() or entry.is_symlink()):
        return None
    try:
        return load(entry)
    except Exception as exc:  # noqa: BLE001 - any failure to load means the entry is unusable
        if isinstance(exc, FileNotFoundError) and not entry.exists():
            return None  # another process discarded it meanwhile: a plain miss
        reason = str(exc) if isinstance(exc, CorruptEntry) else f"{type(exc).__name__}: {exc}"
        log.warning("cache entry %s is unusable and will be recomputed: %s", entry, " ".join(reason.split())[:300])
        discard(entry)
        return None


def discard(entry: Path) -> None:
    """Move an entry aside (one rename, so a reader sees it whole or not at all, and two discarding workers do not
    collide), then delete it."""
    aside = entry.with_name(f"{STAGING}{owner_tag()}discarded-{os.urandom(4).hex()}-{entry.name}")
    try:
        os.replace(entry, aside)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("could not move %s aside (%s); leaving it", entry, exc.strerror)
        return
    remove(aside)


def remove(path: Path) -> None:
    """Delete a file or a directory tree, whichever `path` is; what is already gone is no error."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

"""The cache mechanism on its own (autotune/caches.py): an entry that fails its manifest, fails to load or was written
in another cache format is a miss, warned about once and recomputed; a full disk is one DiskFullError; what killed
processes left behind is removed, what live ones are writing is not. Fast: no model, no study.
(End-to-end runs over corrupted caches: tests/test_caches_heal_runs.py.)"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import pytest

from autotune import caches
from autotune.caches import (
    CACHE_FORMAT, MANIFEST, DiskFullError, cached_dir, cached_dir_value, cached_json, host_tag, owned_tempdir,
    read_json, remove_dead_owners, sweep_litter, write_json_atomic,
)

CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)]),
    "zero bytes": lambda f: f.write_bytes(b""),
    "garbage": lambda f: f.write_bytes(os.urandom(max(16, f.stat().st_size))),
    "same-size garbage": lambda f: f.write_bytes(bytes(b ^ 0xFF for b in f.read_bytes())),
}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def warnings_about(records: list[logging.LogRecord], name: str) -> list[str]:
    return [r.getMessage() for r in records if r.levelno == logging.WARNING and name in r.getMessage()]


class Counter:
    """A compute function that counts its calls."""

    def __init__(self, value: object) -> None:
        self.value, self.calls = value, 0

    def __call__(self) -> object:
        self.calls += 1
        return self.value


# -- file entries ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_file_entry_is_warned_about_once_discarded_and_recomputed(
    tmp_path: Path, corrupt: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gate" / "entry.json"
    compute = Counter({"latency": 1.5})
    assert cached_json(path, compute) == ({"latency": 1.5}, False)
    assert cached_json(path, compute) == ({"latency": 1.5}, True) and compute.calls == 1
    corrupt(path)
    with caplog.at_level(logging.WARNING):
        assert cached_json(path, compute) == ({"latency": 1.5}, False)
        assert cached_json(path, compute) == ({"latency": 1.5}, True)
    assert compute.calls == 2
    assert len(warnings_about(caplog.records, str(path))) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["entry.json"]  # nothing moved aside is left over


@pytest.mark.parametrize("version", [1, CACHE_FORMAT + 1])
def test_a_file_entry_of_another_format_version_is_recomputed(tmp_path: Path, version: int,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "entry.json"
    payload = json.dumps({"latency": 9.0}).encode()
    if version == 1:  # what the unversioned cache wrote: the bare value
        path.write_bytes(payload)
    else:
        import hashlib
        path.write_bytes(f"autotune-cache {version} {len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode() + payload)
    with caplog.at_level(logging.WARNING):
        assert read_json(path) is None
    assert not path.exists() and warnings_about(caplog.records, str(path))
    assert cached_json(path, lambda: {"latency": 1.0}) == ({"latency": 1.0}, False)


def test_a_stale_value_is_not_a_corrupt_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "entry.json"
    write_json_atomic(path, {"reference_ms": 10.0})
    with caplog.at_level(logging.WARNING):
        assert read_json(path, lambda entry: entry["reference_ms"] == 20.0) is None
    assert path.exists() and not caplog.records  # not valid here and now, but whole: replaced by the next write


# -- directory entries -----------------------------------------------------------------------------------------

def build_model_dir(staging: Path) -> str:
    (staging / "config.json").write_text('{"layers": 2}')
    (staging / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    return "trained"


def load_model_dir(path: Path) -> str:
    json.loads((path / "config.json").read_text())
    return "loaded"


@pytest.mark.parametrize("victim", ["model.safetensors", "config.json", MANIFEST])
@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_directory_entry_is_warned_about_once_discarded_and_rebuilt(
    tmp_path: Path, victim: str, corrupt: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    final = tmp_path / "students" / "key"
    assert cached_dir_value(final, build_model_dir, load_model_dir) == ("trained", False)
    assert cached_dir_value(final, build_model_dir, load_model_dir) == ("loaded", True)
    corrupt(final / victim)
    with caplog.at_level(logging.WARNING):
        assert cached_dir_value(final, build_model_dir, load_model_dir) == ("trained", False)
        assert cached_dir_value(final, build_model_dir, load_model_dir) == ("loaded", True)
    assert len(warnings_about(caplog.records, str(final))) == 1
    assert sorted(p.name for p in final.parent.iterdir()) == ["key"]


def test_an_entry_that_fails_to_load_is_a_miss_not_a_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    final = tmp_path / "key"
    cached_dir_value(final, build_model_dir, load_model_dir)

    def broken_loader(path: Path) -> str:
        raise RuntimeError("invalid header length")  # what safetensors says of a file its manifest cannot see

    with caplog.at_level(logging.WARNING):
        assert cached_dir_value(final, build_model_dir, broken_loader) == ("trained", False)
    assert any("invalid header length" in m for m in warnings_about(caplog.records, str(final)))


@pytest.mark.parametrize("version", [1, CACHE_FORMAT + 1])
def test_a_directory_entry_of_another_format_version_is_rebuilt(tmp_path: Path, version: int) -> None:
    final = tmp_path / "key"
    built: list[str] = []
    cached_dir(final, "config.json", lambda staging: built.append(build_model_dir(staging)))
    manifest = final / MANIFEST
    if version == 1:  # the unversioned cache wrote no manifest: its marker file alone said "complete"
        manifest.unlink()
    else:
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": version}))
    assert cached_dir(final, "config.json", lambda staging: built.append(build_model_dir(staging))) is False
    assert len(built) == 2 and json.loads(manifest.read_text())["format"] == CACHE_FORMAT
    assert cached_dir(final, "config.json", lambda staging: built.append(build_model_dir(staging))) is True


# -- a full disk -----------------------------------------------------------------------------------------------

def test_a_full_disk_while_building_is_one_error_naming_the_entry_and_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "students" / "key"

    def build(staging: Path) -> None:
        (staging / "part").write_bytes(b"x" * 3 * caches.MB)
        raise OSError(errno.ENOSPC, "No space left on device", str(staging / "model.safetensors"))

    with pytest.raises(DiskFullError) as raised:
        cached_dir(final, "config.json", build)
    message = str(raised.value)
    assert str(final) in message and "3.0 MB" in message and "--resume" in message
    assert not final.exists() and list(final.parent.iterdir()) == []


def test_a_full_disk_while_writing_a_file_entry_names_it_and_the_bytes_it_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gate" / "entry.json"
    real_replace = os.replace

    def full(src: str, dst: str) -> None:
        if str(dst) == str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(DiskFullError, match=r"entry\.json .*needed \d+ bytes"):
        cached_json(path, lambda: {"latency": 1.0})
    assert list(path.parent.iterdir()) == []  # the temporary file is gone too


def test_a_wrapped_full_disk_is_recognised_by_its_cause_or_message() -> None:
    cause = OSError(errno.EDQUOT, "Disk quota exceeded")
    wrapped = RuntimeError("PytorchStreamWriter failed writing file")
    wrapped.__cause__ = cause
    assert caches.is_disk_full(wrapped)
    assert caches.is_disk_full(RuntimeError("IoError(Os { code: 28, kind: StorageFull })"))
    assert not caches.is_disk_full(RuntimeError("invalid header length"))


# -- what killed processes leave behind ------------------------------------------------------------------------

def test_temporaries_of_dead_owners_are_removed_and_a_live_ones_kept(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    dead, host = dead_pid(), host_tag()
    gate_dead = tmp_path / "tmp" / f"autotune-gate-{host}-{dead}-abcd"
    gate_mine = owned_tempdir("autotune-gate-")
    other_host = tmp_path / "tmp" / f"autotune-gate-elsewhere-{dead}-abcd"
    unrelated = tmp_path / "tmp" / "autotune-gate-notours"
    for path in (gate_dead, other_host, unrelated):
        path.mkdir()
    cache = tmp_path / "cache"
    staging_dead = cache / "students" / f".tmp-{host}-{dead}-wxyz"
    staging_dead.mkdir(parents=True)
    file_dead = cache / "gate" / f".tmp-{host}-{dead}-x1-entry.json"
    file_dead.parent.mkdir()
    file_dead.write_text("half")
    staging_mine = owned_tempdir(".tmp-", cache / "students")

    removed = sweep_litter(cache)
    assert sorted(removed) == sorted([gate_dead, staging_dead, file_dead])
    assert gate_mine.is_dir() and staging_mine.is_dir() and other_host.is_dir() and unrelated.is_dir()
    assert gate_mine.name.startswith(f"autotune-gate-{host}-{os.getpid()}-")
    assert remove_dead_owners(cache / "students") == []


def test_the_gate_names_its_scratch_directory_for_its_owner() -> None:
    from autotune.trial import GATE_TMP_PREFIX

    with caches.owned_temporary_directory(GATE_TMP_PREFIX) as scratch:
        assert scratch.parent == Path(tempfile.gettempdir())
        assert scratch.name.startswith(f"autotune-gate-{host_tag()}-{os.getpid()}-")
        assert scratch.is_dir()
    assert not scratch.exists()


def test_a_copy_by_hard_links_gets_its_own_manifest_and_leaves_the_source_entry_valid(tmp_path: Path) -> None:
    """A causal LM's teacher artifact is its cached export hard-linked into the run: writing the copy's manifest must
    not rewrite the source's (a shared inode written in place did, and the export was rebuilt on every run)."""
    from autotune.caches import MANIFEST, load_verified_dir, write_manifest

    source, copy = tmp_path / "export", tmp_path / "copy"
    source.mkdir()
    (source / "model.onnx").write_bytes(b"weights")
    write_manifest(source)
    copy.mkdir()
    for name in ("model.onnx", MANIFEST):
        os.link(source / name, copy / name)
    (copy / "artifact.json").write_text("{}")
    write_manifest(copy)
    assert load_verified_dir(source, lambda path: path) == source
    assert load_verified_dir(copy, lambda path: path) == copy


def test_an_entry_built_by_autotune_s_own_code_is_keyed_by_that_code(tmp_path: Path) -> None:
    """A rewrite changed within one version (a development checkout) must not reuse what its old source built."""
    import importlib.util

    def module(name: str, source: str):
        path = tmp_path / f"{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(name, path)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return loaded

    rewrite, other = module("rewrite", "SCALE = 1\n"), module("other", "X = 0\n")
    before = caches.source_identity(rewrite, other)
    assert caches.source_identity(rewrite, other) == before
    (tmp_path / "rewrite.py").write_text("SCALE = 2\n")
    assert caches.source_identity(rewrite, other) != before

"""Runs over broken caches, as caches break in the field: after one good run (4 trials, the tiny headless BERT of
test_tune, so the teacher is fine-tuned and cached too), one entry of every cache kind is truncated, emptied,
overwritten with garbage or put back in the unversioned format; the next run exits 0, warns once per broken entry,
recomputes only those, and reaches the same answer. A broken artifact of a finished run is rebuilt on --resume.
A full disk is exit 2 naming the entry and its size, and --resume finishes the study once space is back.

Every case starts from a copy of the good run's cache; the machine profile is measured once for the module.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from autotune.caches import CACHE_ENV, MANIFEST, read_entry
from autotune.cli import main
from autotune.study import INTERRUPTED_ATTR
from conftest import save_headless_bert, synthetic_rows, write_csv

pytestmark = pytest.mark.usefixtures("machine_profiles")  # every run reads this machine's profile

GENEROUS_MS = 50.0
SEQ_LEN = 32


@dataclass(frozen=True)
class GoodRun:
    spec: Path
    cache: Path
    result: dict[str, Any]


def tune(cache: Path, *args: Any) -> int:
    """`autotune tune ...` in this process with `cache` as $AUTOTUNE_CACHE_DIR; the exit status."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(cache))
        return main(["tune", *map(str, args)])


def result_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "result.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> GoodRun:
    root = tmp_path_factory.mktemp("good")
    spec = {
        "name": "tiny",
        "model": {"path": str(save_headless_bert(root / "teacher"))},
        "data": {"path": str(write_csv(root / "reviews.csv", synthetic_rows(200))), "max_length": SEQ_LEN},
        "target": {"latency_ms": GENEROUS_MS, "seq_len": SEQ_LEN, "threads": 1},
        "space": {"preset": "bert-default"},
        "search": {"trials": 4, "seed": 0},
        "training": {"epochs": 1, "batch_size": 16, "teacher_epochs": 5, "teacher_lr": 3e-3},
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    assert tune(root / "cache", path, "--out", root / "run") == 0
    result = result_of(root / "run")
    assert result["recommended"] is not None and result["counters"]["students_trained"] >= 1
    return GoodRun(path, root / "cache", result)


def same_answer(result: dict[str, Any], reference: dict[str, Any]) -> None:
    """The same trials measured to the same accuracies, and a recommendation as accurate (which of several equally
    accurate candidates wins is a latency tie-break, and latencies move between runs)."""
    def trials(data: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [(t["number"], t["candidate"], t["stage"], t["accuracy"]) for t in data["trials"]]

    assert trials(result) == trials(reference)
    assert [r["accuracy"] for r in result["refined"]] == [r["accuracy"] for r in reference["refined"]]
    assert result["recommended"]["accuracy"] == reference["recommended"]["accuracy"]


# -- breaking entries ------------------------------------------------------------------------------------------

def payload_file(entry: Path) -> Path:
    """The file of an entry that holds its value: the entry itself, or a directory's weights or model."""
    if entry.is_file():
        return entry
    return next(entry / name for name in ("model.safetensors", "model.onnx") if (entry / name).exists())


def back_to_version_1(entry: Path) -> None:
    """The entry as the unversioned cache wrote it: a bare value, or a directory without a manifest."""
    if entry.is_file():
        entry.write_bytes(read_entry(entry))
    else:
        (entry / MANIFEST).unlink()


BREAKS: dict[str, Callable[[Path], None]] = {
    "truncated": lambda e: payload_file(e).write_bytes(payload_file(e).read_bytes()[: payload_file(e).stat().st_size // 2]),
    "zero bytes": lambda e: payload_file(e).write_bytes(b""),
    "garbage": lambda e: payload_file(e).write_bytes(os.urandom(payload_file(e).stat().st_size)),
    "format version 1": back_to_version_1,
}


def one_entry_of_each_kind(cache: Path) -> dict[str, Path]:
    """A gate result, the teacher's logits, the fine-tuned teacher and a trained student."""
    def first(kind: str, pattern: str = "*") -> Path:
        return sorted(p for p in (cache / kind).glob(pattern) if not p.name.startswith("."))[0]

    return {"gate": first("gate", "*.json"), "logits": first("logits", "*.npy"), "teacher": first("teachers"),
            "student": first("students")}


def warnings_naming(caplog: pytest.LogCaptureFixture, entry: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.getMessage().startswith(f"cache entry {entry} ")]


#: One run breaks every kind of entry, each another way (so every way is met end to end), while
#: tests/test_caches_heal.py breaks every way on file and directory entries alike. The suite's 10 minutes do not
#: fit a run per kind and way.
BREAK_WAYS = ("truncated", "zero bytes", "garbage", "format version 1")  # gate, logits, teacher, student


@pytest.mark.slow
def test_a_broken_entry_of_every_kind_is_recomputed_with_one_warning_and_the_same_answer(
    good_run: GoodRun, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = Path(shutil.copytree(good_run.cache, tmp_path / "cache"))
    broken = one_entry_of_each_kind(cache)
    for entry, how in zip(broken.values(), BREAK_WAYS):
        BREAKS[how](entry)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert tune(cache, good_run.spec, "--out", out) == 0
    for kind, entry in broken.items():
        assert len(warnings_naming(caplog, entry)) == 1, (kind, [r.getMessage() for r in caplog.records])
    result = result_of(out)
    same_answer(result, good_run.result)
    counters = result["counters"]
    assert counters["students_trained"] + counters["students_refined"] == 1  # the broken student, and only it

    # A finished run resumed over a broken artifact of one of its trials: rebuilt from the cached student.
    artifact = Path(next(t["artifact"] for t in result["trials"] if t["stage"] == "evaluated"))
    BREAKS[BREAK_WAYS[0]](artifact)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert tune(cache, good_run.spec, "--out", out, "--resume") == 0
    assert len(warnings_naming(caplog, artifact)) == 1
    same_answer(result_of(out), good_run.result)


# -- a full disk -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_full_disk_is_exit_2_naming_the_entry_and_resume_finishes_the_study(
    good_run: GoodRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import PreTrainedModel

    cache = Path(shutil.copytree(good_run.cache, tmp_path / "cache"))
    shutil.rmtree(cache / "students")  # the search must write students again
    save = PreTrainedModel.save_pretrained

    def disk_full_for_students(self: PreTrainedModel, directory: Any, *args: Any, **kwargs: Any) -> Any:
        if "students" in Path(directory).parts:
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(directory) / "model.safetensors"))
        return save(self, directory, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full_for_students)
    out = tmp_path / "run"
    capsys.readouterr()
    assert tune(cache, good_run.spec, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no space left on the disk holding" in err and str(cache / "students") in err
    assert re.search(r"needed about \d+(\.\d)? (bytes|KB|MB)", err) and "--resume" in err
    assert not [p for p in (cache / "students").iterdir()]  # nothing half-written to be read back

    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}").get_trials()
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stopped) == 1 and stopped[0].user_attrs[INTERRUPTED_ATTR]
    assert [t.state for t in trials if t.number > stopped[0].number] == [TrialState.WAITING]  # its retry
    assert all(t.state == TrialState.COMPLETE for t in trials if t.number < stopped[0].number)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save)  # space freed
    assert tune(cache, good_run.spec, "--out", out, "--resume") == 0
    result = result_of(out)
    assert [t["state"] for t in result["trials"]] == ["COMPLETE"] * 4
    assert result["recommended"]["accuracy"] == good_run.result["recommended"]["accuracy"]

"""Scale-out and crash safety with real processes: workers sharing one study on PostgreSQL and on a journal
file, a worker killed with SIGKILL mid-trial, `tune` interrupted by SIGINT and killed by SIGKILL and resumed.

Every worker is a real `python -m autotune` subprocess on the tiny BERT of conftest (it has a classification
head, so nothing is fine-tuned) with a 1 s heartbeat (a silent trial is stale after 3 s). The PostgreSQL tests
read the server's URL from AUTOTUNE_TEST_POSTGRES_URL (`.ci/run` starts one); without it they skip, except
under CI=true, where a missing server is a failure.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import optuna
import pytest
import yaml
from optuna.trial import FrozenTrial, TrialState

from autotune.caches import publish_dir, read_json, write_json_atomic
from autotune.cli import main
from autotune.study import INTERRUPTED_ATTR, REPEAT_ATTR, SURPLUS_ATTR, WORKER_ATTR, budget_use, ran_nothing

pytestmark = pytest.mark.usefixtures("machine_profiles")  # every run reads this machine's profile

POSTGRES_ENV = "AUTOTUNE_TEST_POSTGRES_URL"
REPO = Path(__file__).resolve().parents[1]
GENEROUS_MS = 50.0
IMPOSSIBLE_MS = 0.001
SMALL_SPACE = {"layers": [1, 2], "hidden": [32], "heads": [4], "ffn": [64], "sparsity": [0.0, 0.3], "bits": [32, 8]}


@pytest.fixture
def postgres_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{POSTGRES_ENV} is not set: under CI the PostgreSQL tests must run (.ci/run starts a server)")
        pytest.skip(f"no PostgreSQL: set {POSTGRES_ENV} (e.g. `source .ci/postgres.sh && postgres_start`)")
    return url


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The workers' environment: this checkout first on the path, a cache of the test's own."""
    return {**os.environ, "AUTOTUNE_CACHE_DIR": str(tmp_path / "cache"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def write_spec(path: Path, model: Path, data: Path, *, latency_ms: float, trials: int) -> Path:
    spec = {
        "name": "tiny",
        "model": {"path": str(model)},
        "data": {"path": str(data), "max_length": 32},
        "target": {"latency_ms": latency_ms, "seq_len": 32, "threads": 1},
        "space": {"preset": "bert-default", "knobs": SMALL_SPACE},
        "search": {"trials": trials, "seed": 0, "heartbeat_s": 1},
        # No refinement after the search: these tests are about sharing and resuming a study, not multi-fidelity.
        "training": {"epochs": 1, "batch_size": 16, "refine_epochs": 0},
    }
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


class Process:
    """A `python -m autotune ...` subprocess whose output goes to a file (no pipe to fill up)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.handle = log.open("w")
        # SIGINT back to its default: a suite started in the background passes it on ignored, and Python only
        # turns Ctrl-C into KeyboardInterrupt in a process that starts with the default handler.
        self.popen = subprocess.Popen([sys.executable, "-m", "autotune", *args], env=env, stdout=self.handle,
                                      stderr=subprocess.STDOUT, cwd=log.parent,
                                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.popen.wait(timeout)
        finally:
            self.handle.close()

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def trials_of(storage: str, name: str) -> list[FrozenTrial]:
    from sqlalchemy.exc import OperationalError

    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except (KeyError, OperationalError):  # the study (or the run directory holding its database) is not there yet
        return []


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 240, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def running_trial_of(storage: str, name: str, pid: int | None = None) -> FrozenTrial | None:
    """A trial past its sampling (it has a candidate), still RUNNING, optionally in process `pid`."""
    for trial in trials_of(storage, name):
        worker = str(trial.user_attrs.get(WORKER_ATTR, ""))
        if trial.state == TrialState.RUNNING and "candidate" in trial.user_attrs \
                and (pid is None or worker.endswith(f":{pid}")):
            return trial
    return None


def retries_of(trials: list[FrozenTrial], number: int) -> list[FrozenTrial]:
    return [t for t in trials if number in t.system_attrs.get("retry_history", ())]


def outline(trials: list[FrozenTrial]) -> list[tuple[Any, ...]]:
    """What a failure message needs to tell a race from a bug: number, state, retry history, surplus and repeat
    marks."""
    return [(t.number, t.state.name, t.system_attrs.get("retry_history"), t.user_attrs.get(SURPLUS_ATTR),
             t.user_attrs.get(REPEAT_ATTR)) for t in trials]


def assert_study_complete(trials: list[FrozenTrial], budget: int) -> None:
    """Exactly `budget` trials used the budget, all COMPLETE; none left running; no trial ran twice."""
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    assert budget_use(trials).finished == budget
    complete = [t for t in trials if t.state == TrialState.COMPLETE and not ran_nothing(t)]
    assert len(complete) == budget
    assert len({t.number for t in trials}) == len(trials)
    assert all(t.user_attrs.get(WORKER_ATTR) for t in complete)


@pytest.mark.slow
def test_three_postgres_workers_finish_the_budget_and_a_killed_workers_trial_is_retried(
    postgres_url: str, env: dict[str, str], tiny_bert_dir: Path, synthetic_csv: Path, tmp_path: Path,
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    budget, name = 6, f"workers-{uuid.uuid4().hex[:8]}"
    spec = write_spec(tmp_path / "spec.yaml", tiny_bert_dir, synthetic_csv, latency_ms=GENEROUS_MS, trials=budget)
    args = ["worker", str(spec), "--storage", postgres_url, "--study-name", name, "--out", str(tmp_path / "run")]
    workers = [Process(args, env, tmp_path / f"worker{i}.log") for i in range(3)]
    victim = workers[0]
    killed = wait_for("a trial running in the first worker", lambda: running_trial_of(postgres_url, name, victim.popen.pid))
    victim.popen.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    for worker in workers[1:]:
        assert worker.wait() == 0, worker.output()[-3000:]

    trials = trials_of(postgres_url, name)
    assert_study_complete(trials, budget)
    lost = next(t for t in trials if t.number == killed.number)
    assert lost.state == TrialState.FAIL  # failed by a surviving worker once its heartbeat stopped
    retry = [t for t in retries_of(trials, lost.number) if t.state == TrialState.COMPLETE]
    assert len(retry) == 1 and retry[0].params == lost.params, outline(trials)
    assert len({t.user_attrs[WORKER_ATTR] for t in trials if t.state == TrialState.COMPLETE}) == 2

    # The result is written by `tune --resume` on the same storage; no password anywhere a user reads. It runs in this
    # process, so it gets the workers' cache too: without it, it read and wrote the user's own ~/.cache/autotune, and
    # whatever another run or version had left there decided whether this test passed.
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", env["AUTOTUNE_CACHE_DIR"])
    password = optuna_password(postgres_url)
    out = tmp_path / "result"
    capfd.readouterr()
    code = main(["tune", str(spec), "--storage", postgres_url, "--study-name", name, "--out", str(out), "--resume"])
    stderr = capfd.readouterr().err
    assert code == 0, stderr[-3000:]
    data = json.loads((out / "result.json").read_text())
    assert len(data["trials"]) == budget and data["recommended"] is not None
    for text in (stderr, (out / "result.json").read_text(), (out / "report.html").read_text(),
                 (out / "report.md").read_text(), *(w.output() for w in workers)):
        assert password not in text
    assert "***" in data["study"]["storage"]


def optuna_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    password = make_url(url).password
    assert password, "the test database URL should carry a password, to check it is never shown"
    return str(password)


@pytest.mark.slow
def test_three_processes_share_a_journal_file(env: dict[str, str], tiny_bert_dir: Path, synthetic_csv: Path,
                                              tmp_path: Path) -> None:
    budget = 6
    # An impossible target: every trial ends at the latency gate, so the test is about sharing, not training.
    spec = write_spec(tmp_path / "spec.yaml", tiny_bert_dir, synthetic_csv, latency_ms=IMPOSSIBLE_MS, trials=budget)
    storage = f"journal:{tmp_path / 'study.log'}"
    args = ["worker", str(spec), "--storage", storage, "--out", str(tmp_path / "run")]
    workers = [Process(args, env, tmp_path / f"worker{i}.log") for i in range(3)]
    for worker in workers:
        assert worker.wait() == 0, worker.output()[-3000:]
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.log")))
    trials = optuna.load_study(study_name="tiny", storage=journal).get_trials(deepcopy=False)
    assert_study_complete(trials, budget)
    assert all(t.user_attrs["stage"] == "gate" for t in trials if t.state == TrialState.COMPLETE)
    assert len({t.user_attrs[WORKER_ATTR] for t in trials}) >= 2
    # A journal has no heartbeat: a worker leaves the last trials to the workers running them, and says so.
    assert all(f" of {budget} trials finished" in " ".join(w.output().split()) for w in workers)


@pytest.mark.slow
def test_tune_resumes_after_sigint_and_after_sigkill(env: dict[str, str], tiny_bert_dir: Path, synthetic_csv: Path,
                                                     tmp_path: Path) -> None:
    budget = 3
    spec = write_spec(tmp_path / "spec.yaml", tiny_bert_dir, synthetic_csv, latency_ms=GENEROUS_MS, trials=budget)
    out = tmp_path / "run"
    storage = f"sqlite:///{out / 'study.db'}"
    tune = ["tune", str(spec), "--out", str(out)]

    # Ctrl-C: exit 130, how to resume, the trial in progress FAIL and re-enqueued; nothing else finished.
    first = Process(tune, env, tmp_path / "first.log")
    interrupted = wait_for("a running trial", lambda: running_trial_of(storage, "tiny", first.popen.pid))
    first.popen.send_signal(signal.SIGINT)
    assert first.wait() == 130, first.output()[-3000:]
    assert "--resume" in first.output() and "Traceback" not in first.output()
    trials = trials_of(storage, "tiny")
    stopped = next(t for t in trials if t.number == interrupted.number)
    assert stopped.state == TrialState.FAIL and stopped.user_attrs[INTERRUPTED_ATTR]
    assert [t.state for t in retries_of(trials, stopped.number)] == [TrialState.WAITING]

    # kill -9 mid-trial: the trial stays RUNNING until its heartbeat is found stale by the next run.
    second = Process([*tune, "--resume"], env, tmp_path / "second.log")
    lost = wait_for("a running trial", lambda: running_trial_of(storage, "tiny", second.popen.pid))
    second.popen.send_signal(signal.SIGKILL)
    assert second.wait() == -signal.SIGKILL

    third = Process([*tune, "--resume"], env, tmp_path / "third.log")
    assert third.wait() == 0, third.output()[-3000:]
    trials = trials_of(storage, "tiny")
    assert_study_complete(trials, budget)
    for number in (stopped.number, lost.number):
        assert next(t for t in trials if t.number == number).state == TrialState.FAIL
        assert any(t.state == TrialState.COMPLETE for t in retries_of(trials, number))
    data = json.loads((out / "result.json").read_text())
    assert len(data["trials"]) == budget and all(t["state"] == "COMPLETE" for t in data["trials"])
    assert data["recommended"] is not None  # the same kind of answer as an uninterrupted run


def journal_trials(path: Path, name: str) -> list[FrozenTrial]:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not path.exists():
        return []
    try:
        return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path)))).get_trials(deepcopy=False)
    except KeyError:  # the study is not there yet
        return []


@pytest.mark.slow
def test_a_killed_journal_workers_trial_is_failed_and_retried_and_its_litter_removed_by_the_next_worker(
    env: dict[str, str], tiny_bert_dir: Path, synthetic_csv: Path, tmp_path: Path
) -> None:
    budget, journal, scratch = 2, tmp_path / "study.log", tmp_path / "tmp"
    scratch.mkdir()
    env = {**env, "TMPDIR": str(scratch)}  # where the gate's scratch directories go
    # An impossible target: each trial is its latency gate alone, a few seconds long.
    spec = write_spec(tmp_path / "spec.yaml", tiny_bert_dir, synthetic_csv, latency_ms=IMPOSSIBLE_MS, trials=budget)
    args = ["worker", str(spec), "--storage", f"journal:{journal}", "--out", str(tmp_path / "run")]
    first = Process(args, env, tmp_path / "first.log")

    def running_in_first() -> FrozenTrial | None:
        return next((t for t in journal_trials(journal, "tiny") if t.state == TrialState.RUNNING and "candidate" in t.user_attrs
                     and str(t.user_attrs.get(WORKER_ATTR, "")).endswith(f":{first.popen.pid}")), None)

    lost = wait_for("a trial running in the first worker", running_in_first)
    first.popen.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    litter = list(scratch.glob(f"autotune-gate-*-{first.popen.pid}-*"))
    assert litter, "precondition: killed mid-gate, the worker leaves its scratch directory"

    # A journal has no heartbeat: the next worker sees that the trial's owner is dead, fails it and retries it.
    second = Process(args, env, tmp_path / "second.log")
    assert second.wait() == 0, second.output()[-3000:]
    trials = journal_trials(journal, "tiny")
    assert_study_complete(trials, budget)
    assert next(t for t in trials if t.number == lost.number).state == TrialState.FAIL
    retry = [t for t in retries_of(trials, lost.number) if t.state == TrialState.COMPLETE]
    assert len(retry) == 1 and retry[0].params == lost.params, outline(trials)
    assert f"trial {lost.number} lost its worker" in second.output()
    assert not [path for path in litter if path.exists()]


# -- caches under concurrent writers: never a torn file --------------------------------------------------

def _hammer_json(path: str, seed: int) -> None:
    for i in range(150):
        write_json_atomic(Path(path), {"writer": seed, "i": i, "payload": "x" * (1000 * (seed + 1))})


def _hammer_dir(root: str, seed: int) -> None:
    for i in range(20):
        staging = Path(root) / f".staging-{seed}-{i}"
        staging.mkdir()
        (staging / "model.bin").write_bytes(bytes([seed]) * 50_000)
        (staging / "artifact.json").write_text(json.dumps({"writer": seed}))
        publish_dir(staging, Path(root) / "entry")


@pytest.mark.slow
def test_concurrent_cache_writers_leave_whole_entries(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    entry = tmp_path / "gate.json"
    writers = [context.Process(target=_hammer_json, args=(str(entry), seed)) for seed in range(3)]
    writers += [context.Process(target=_hammer_dir, args=(str(tmp_path), seed)) for seed in range(3)]
    for writer in writers:
        writer.start()
    seen = 0
    while any(w.is_alive() for w in writers):
        value = read_json(entry)
        if value is not None:
            assert len(value["payload"]) == 1000 * (value["writer"] + 1)
            seen += 1
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert seen and read_json(entry) is not None
    published = tmp_path / "entry"
    writer_id = json.loads((published / "artifact.json").read_text())["writer"]
    assert (published / "model.bin").read_bytes() == bytes([writer_id]) * 50_000
    assert not list(tmp_path.glob(".staging-*")) and not list(tmp_path.glob(".gate.json.*"))

"""The Optuna study: objectives, the latency constraint, samplers, storage and resume. Never touches a tensor.

The study only sees `evaluate(candidate) -> TrialOutcome`. Each outcome becomes objective values (validation
accuracy up, latency at the target percentile down, optionally size down) and a constraint value
(latency - target, through `Trial.set_constraint`) that the samplers read, so NSGA-II/TPE/GP learn where the feasible
region ends. A gate-rejected trial ends COMPLETE with its measured latency and its violation: Optuna records
constraints only for COMPLETE and PRUNED trials, and NSGA-II builds its population from COMPLETE ones, so a
PRUNED rejection would teach the sampler nothing. Its accuracy value is a placeholder (0), flagged in the
trial's user attributes and never reported as measured.

A trial that raises is recorded FAIL with its error in the user attributes; the study goes on.

Scale-out rests on Optuna's storages alone. Workers share one study in an RDB (SQLite, PostgreSQL, MySQL) or
a journal file; an RDB gets Optuna's heartbeat, so a worker killed mid-trial leaves a trial that the next
worker to look marks FAIL and re-enqueues (RetryHeartbeatStaleTrialCallback). A journal has no heartbeat (and
Optuna never finds stale an RDB trial killed before its first heartbeat), so each trial records its owner (host,
pid, trial number) first thing, and a worker fails and re-enqueues, with the same callback, the RUNNING trials
whose owner is a dead process of its own host, or that no process claimed within UNCLAIMED_GRACE_S. The budget
counts trials, not attempts: a trial lost to a crash or a Ctrl-C and retried does not use it, a trial whose
candidate failed does, and a repeat (a candidate already measured on this hardware, `repeated_trial`) does not. A
full disk stops the run (DiskFullError), its trial re-enqueued for the run that resumes once space is freed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import optuna
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from autotune.caches import DiskFullError, as_disk_full, is_alive
from autotune.config import SAMPLERS
from autotune.records import Stage, TrialRecord
from search_spaces import Candidate, Space
from search_spaces.knobs import Categorical, FloatRange, IntRange

log = logging.getLogger(__name__)

PLACEHOLDER_ACCURACY = 0.0
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
JOURNAL_PREFIX = "journal:"
HARDWARE_ATTR = "hardware_fingerprint"
#: Trial user attributes: which process ran it; that Ctrl-C stopped it; that it ran nothing (started beyond the
#: budget, or a second retry of one attempt); the error its candidate raised (a failure of its own, never retried).
WORKER_ATTR = "worker"
INTERRUPTED_ATTR = "interrupted"
SURPLUS_ATTR = "surplus"
ERROR_ATTR = "error"
#: Trial user attribute: the number of the earlier trial whose candidate this one repeats (see `repeated_trial`).
REPEAT_ATTR = "repeat_of"
#: Trial user attribute "<host>:<pid>/<trial number>": the process that claimed this very trial. A retry copies its
#: attributes, so the number tells a claim of the retry from its failed attempt's.
OWNER_ATTR = "owner"
#: A trial RUNNING this long without its owner's claim lost its worker between Optuna's creating it and the
#: objective's first line (a claim takes milliseconds).
UNCLAIMED_GRACE_S = 60.0
#: How often a crashed trial is retried before it counts as failed (a candidate that kills its worker).
MAX_RETRY = 3


class StorageError(ValueError):
    """A storage URL that is malformed, or a database that cannot be reached; the message has no password."""


class HardwareMismatchError(ValueError):
    """A worker on other hardware than the study's first worker: its latencies would not be comparable."""


@dataclass(frozen=True)
class Heartbeat:
    """Optuna's heartbeat for RDB storages: a RUNNING trial silent for `grace_s` is stale, failed, retried."""

    interval_s: int
    grace_s: int


def redact(url: str) -> str:
    """A storage URL with its password replaced by ***, for logs, errors, result.json and reports."""
    if url.startswith(JOURNAL_PREFIX) or "://" not in url:
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<a storage URL that could not be parsed>"


@contextlib.contextmanager
def optuna_experimental() -> Iterator[None]:
    """Optuna 5 marks its heartbeat, stale-trial retry and metric names "experimental"; they are used as
    documented, so the warning is silenced here, in one place."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


def worker_id() -> str:
    """This process as host:pid, stored on every trial it runs, so a worker can find its own interrupted trials and the
    result can say who ran what."""
    return f"{socket.gethostname()}:{os.getpid()}"


def open_storage(url: str, heartbeat: Heartbeat) -> BaseStorage:
    """The Optuna storage behind `--storage`: `journal:PATH` (a journal file, for several processes on one
    machine; Optuna gives it no heartbeat) or an RDB URL with the heartbeat and retry of stale trials.

    A malformed URL, a missing driver or an unreachable database is one StorageError sentence naming the
    host, with the password redacted.
    """
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX):]).expanduser()
        if not path.name or not path.parent.is_dir():
            raise StorageError(f"journal storage {url!r} needs a file in an existing directory, e.g. journal:runs/study.log")
        return JournalStorage(JournalFileBackend(str(path)))
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    shown = redact(url)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise StorageError(f"storage {url if '@' not in url else shown!r} is not a database URL such as "
                           "sqlite:///study.db or postgresql+psycopg://user@host/db, nor journal:PATH") from None
    where = f"host {parsed.host}" + (f":{parsed.port}" if parsed.port else "") if parsed.host else f"file {parsed.database}"
    try:
        return rdb_storage(url, heartbeat)
    except (SQLAlchemyError, ImportError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        if parsed.password:
            reason = reason.replace(str(parsed.password), "***")
        raise StorageError(f"cannot open storage {shown} ({where}): {reason}") from None


#: Attempts at opening an RDB storage whose schema other workers are creating at the same moment.
SCHEMA_RACE_ATTEMPTS = 5


def rdb_storage(url: str, heartbeat: Heartbeat) -> RDBStorage:
    """Optuna's RDBStorage with the heartbeat, opened again when it loses the race to create the schema.

    Workers started together on a fresh PostgreSQL database all run Optuna's CREATE TABLEs at once, and all but
    one can fail with a unique violation (pg_type_typname_nsp_index) or "type ... already exists". Measured here:
    3 processes opening one fresh database at once, 19 of 30 openings failed (10 rounds); 3 `autotune worker`s
    started together, one or more exited 2 in 7 of 8 rounds. By the next attempt the tables are there."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(SCHEMA_RACE_ATTEMPTS):
        try:
            with optuna_experimental():
                return RDBStorage(url, heartbeat_interval=heartbeat.interval_s, grace_period=heartbeat.grace_s,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
        except (IntegrityError, ProgrammingError):
            if attempt == SCHEMA_RACE_ATTEMPTS - 1:
                raise
            log.info("storage schema created by another worker at the same time; opening it again")
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def has_heartbeat(storage: BaseStorage) -> bool:
    """Whether this storage has Optuna's heartbeat (RDB storages only); without it, a dead worker is told from a slow
    one by its pid alone, so only on its own host (`fail_orphaned_trials`)."""
    return isinstance(storage, RDBStorage)


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """The seeded Optuna sampler a spec names, with a small population and few random startup trials, since a study runs
    tens of trials, not thousands."""
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=5)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {name!r}")


#: The objectives as Optuna stores their names, so optuna-dashboard labels its plots with them.
OBJECTIVE_NAMES = ("accuracy", "latency_ms", "size_mb")


def directions(minimize_size: bool) -> list[str]:
    """The objectives' directions: accuracy up, latency down, and size down when `minimize_size`."""
    return ["maximize", "minimize"] + (["minimize"] if minimize_size else [])


def open_study(
    name: str, storage: BaseStorage, sampler: str, seed: int, minimize_size: bool, resume: bool
) -> tuple[optuna.Study, bool]:
    """(study, created here): create the study, or load it when `resume`; an existing study that holds trials
    is refused without `resume`. Workers starting together race safely: the storage lets one create the study
    (create_study's load_if_exists semantics), the others load it.
    """
    make = functools.partial(optuna.create_study, study_name=name, storage=storage,
                             sampler=make_sampler(sampler, seed), directions=directions(minimize_size))
    try:
        study = make()
    except DuplicatedStudyError:
        pass
    else:
        with optuna_experimental():  # Optuna marks set_metric_names experimental; it is used as documented
            study.set_metric_names(OBJECTIVE_NAMES[:len(study.directions)])  # named in optuna-dashboard
        return study, True
    study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(sampler, seed))
    held = len(study.get_trials(deepcopy=False))
    if held and not resume:
        raise FileExistsError(f"storage already holds study {name!r} with {held} trials; "
                              "pass --resume to continue it, or --out/--storage for a new run")
    return study, False


def claim_hardware(study: optuna.Study, fingerprint: str, allow_mixed: bool) -> None:
    """The study's latencies belong to the hardware of its first worker, whose fingerprint it stores; another
    fingerprint is refused unless `allow_mixed` (its trials then carry their own fingerprint)."""
    stored = study.user_attrs.get(HARDWARE_ATTR)
    if stored is None:
        study.set_user_attr(HARDWARE_ATTR, fingerprint)
    elif stored != fingerprint and not allow_mixed:
        raise HardwareMismatchError(
            f"study {study.study_name!r} measures latency on hardware {stored}, but this machine is {fingerprint}; "
            "join from a machine of the same kind, or pass --allow-mixed-hardware to keep its trials apart")


def suggest(trial: optuna.Trial, space: Space) -> Candidate:
    """Sample every knob of the space (each is a product dimension; see search_spaces.space)."""
    params: dict[str, Any] = {}
    for knob in space.knobs:
        if isinstance(knob, Categorical):
            params[knob.name] = trial.suggest_categorical(knob.name, list(knob.choices))
        elif isinstance(knob, IntRange):
            params[knob.name] = trial.suggest_int(knob.name, knob.low, knob.high, step=knob.step, log=knob.log)
        elif isinstance(knob, FloatRange):
            params[knob.name] = trial.suggest_float(knob.name, knob.low, knob.high, step=knob.step, log=knob.log)
    return space.candidate(params)


#: Anchors take at most this share of the trial budget: the rest is the sampler's, and a trial retried after
#: a crash or Ctrl-C waits behind every anchor still queued, so anchors must leave it room within the budget.
ANCHOR_BUDGET_SHARE = 1 / 2


def anchors(proposed: Sequence[Candidate], space: Space, budget: int) -> list[Candidate]:
    """The first trials of a new study: of the task family's `proposed` anchors (most telling first), those the
    space holds, at most ANCHOR_BUDGET_SHARE of `budget` (at least one)."""
    inside = []
    for candidate in proposed:
        if space.contains(candidate):
            inside.append(candidate)
        else:
            log.info("anchor not enqueued (outside the space): %s", candidate.describe())
    return inside[:max(1, int(budget * ANCHOR_BUDGET_SHARE))]


def enqueue_anchors(study: optuna.Study, space: Space, chosen: Sequence[Candidate]) -> None:
    """Enqueue the given candidates of the space (`anchors` chooses them) as the first trials, once per study."""
    if study.trials:
        return
    for anchor in chosen:
        study.enqueue_trial(space.params_of(anchor), skip_if_exists=True)


@dataclass(frozen=True)
class BudgetUse:
    """How a study's trials stand against its budget: finished ones, and ones that will finish (running, or
    waiting such as anchors and retries). Retried attempts and surplus trials use none of it."""

    finished: int
    running: int
    waiting: int

    @property
    def claimed(self) -> int:
        """Trials that hold or will hold a slot in the budget: no worker starts one beyond it."""
        return self.finished + self.running + self.waiting


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of the attempts a later trial retries (Optuna's retry history, kept in its system attrs)."""
    return {number for t in trials for number in t.system_attrs.get("retry_history", ())}


def ran_nothing(trial: FrozenTrial) -> bool:
    """Whether a trial ran nothing of its own: a surplus trial, or a repeat returning an earlier trial's figures."""
    return bool(trial.user_attrs.get(SURPLUS_ATTR)) or trial.user_attrs.get(REPEAT_ATTR) is not None


def uses_budget(trial: FrozenTrial, retried: set[int]) -> bool:
    """Whether a trial counts against the budget: not one that ran nothing (`ran_nothing`), nor a failed attempt
    Optuna retried (its retry counts instead)."""
    return not ran_nothing(trial) and not (trial.state == TrialState.FAIL and trial.number in retried)


def budget_use(trials: Sequence[FrozenTrial]) -> BudgetUse:
    """How a study's trials stand against its budget, counting only those that use it."""
    retried = retried_numbers(trials)
    counted = [t for t in trials if uses_budget(t, retried)]
    return BudgetUse(finished=sum(t.state in FINISHED for t in counted),
                     running=sum(t.state == TrialState.RUNNING for t in counted),
                     waiting=sum(t.state == TrialState.WAITING for t in counted))


def finished_count(study: optuna.Study) -> int:
    """Finished trials that use the budget (a crashed-and-retried attempt does not)."""
    return budget_use(study.get_trials(deepcopy=False)).finished


def retried_attempt(trial: FrozenTrial) -> int | None:
    """The number of the failed attempt this trial retries, or None for a first attempt."""
    history = trial.system_attrs.get("retry_history")
    return history[-1] if history else None


def surplus_reason(study: optuna.Study, number: int, budget: int) -> str | None:
    """Why trial `number` must run nothing, or None. Two workers can both see room for one more trial and both start
    one, and two can both recover one lost retry (`retry_lost_retries`); trial numbers order them, so exactly the
    later one stops."""
    trials = study.get_trials(deepcopy=False)
    earlier = [t for t in trials if t.number < number]
    this = next(t for t in trials if t.number == number)
    attempt = retried_attempt(this)
    if attempt is not None and any(retried_attempt(t) == attempt and not t.user_attrs.get(SURPLUS_ATTR) for t in earlier):
        return f"trial {number} retries trial {attempt}, which an earlier trial already retries; nothing run"
    if budget_use(earlier).claimed >= budget:
        return f"trial {number} started beyond the budget of {budget}; nothing run"
    return None


def repeated_trial(trials: Sequence[FrozenTrial], candidate: dict[str, Any], fingerprint: str,
                   budget: int) -> FrozenTrial | None:
    """The earlier COMPLETE trial that measured `candidate` on the hardware `fingerprint`, which a new trial of it
    repeats, or None. Optuna does not deduplicate: NSGA-II's first generation samples at random, and in a small
    space it proposes a measured candidate again (a fifth of the quick LLM demo's 5 trials). A repeat returns the
    earlier figures, so the sampler still learns the point, and uses no budget; but only `budget` repeats per
    study, since a converged sampler, or a space it has exhausted, proposes nothing else and the study must end."""
    if sum(t.user_attrs.get(REPEAT_ATTR) is not None for t in trials) >= budget:
        return None
    return next((t for t in trials if t.state == TrialState.COMPLETE and not ran_nothing(t)
                 and t.user_attrs.get("candidate") == candidate and t.user_attrs.get(HARDWARE_ATTR) == fingerprint),
                None)


def repeat(trial: optuna.Trial, earlier: FrozenTrial) -> list[float]:
    """Record `trial` as a repeat of `earlier`: its constraints and figures (so the study, in optuna-dashboard say,
    shows what the repeat stands for), and its objective values to return."""
    for name, value in earlier.constraints.items():
        trial.set_constraint(name, value)
    for name, value in earlier.user_attrs.items():
        if name not in (OWNER_ATTR, WORKER_ATTR):  # the repeat's own process
            trial.set_user_attr(name, value)
    trial.set_user_attr(REPEAT_ATTR, earlier.number)
    log.info("trial %d repeats trial %d's candidate: its figures again, no budget used", trial.number, earlier.number)
    return list(earlier.values)


def kept_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials for results and reports: without surplus trials, repeats, retried attempts, waiting
    trials."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    return [t for t in trials if uses_budget(t, retried) and t.state != TrialState.WAITING]


def record_of(trial: FrozenTrial) -> TrialRecord:
    """A finished trial as the result keeps it; a gate rejection's placeholder accuracy is not a measurement."""
    attrs = trial.user_attrs
    stage = attrs.get("stage", Stage.FAILED if trial.state == TrialState.FAIL else None)
    figures = {name: attrs.get(name) for name in (
        "feasible", "macro_f1", "latency_ms", "latency", "size_mb", "achieved_sparsity", "seconds", "gate_cache_hit",
        "student_cache_hit", "artifact", ERROR_ATTR)} | {"extras": attrs.get("extras") or {}}
    return TrialRecord(
        number=trial.number, state=trial.state.name, candidate=attrs.get("candidate"),
        stage=None if stage is None else Stage(stage),
        accuracy=None if attrs.get("accuracy_is_placeholder", True) else attrs.get("accuracy"),
        hardware_fingerprint=attrs.get(HARDWARE_ATTR), worker=attrs.get(WORKER_ATTR),
        **figures | {"feasible": bool(figures["feasible"])},
    )


def objective_values(outcome: Any, minimize_size: bool) -> list[float]:
    """The values Optuna optimises for an outcome; a gate rejection gets the placeholder accuracy, which `record` flags
    so no report shows it as measured."""
    accuracy = outcome.accuracy if outcome.accuracy is not None else PLACEHOLDER_ACCURACY
    values = [accuracy, outcome.latency_ms]
    return values + [outcome.size_mb] if minimize_size else values


#: An outcome's constraint values by name (<= 0: met): the latency's, and one per limit of the target.
Constraints = Callable[[Any], dict[str, float]]


def record(trial: optuna.Trial, outcome: Any, constraints: Constraints) -> None:
    """Store the outcome on the trial: the constraints, and every measured figure for the result and report.

    Each constraint goes through `Trial.set_constraint` (Optuna 5), which every constraint-aware sampler and
    `study.best_trials` read: all <= 0 means every target is met.
    """
    for name, value in constraints(outcome).items():
        trial.set_constraint(name, value)
    trial.set_user_attr("accuracy_is_placeholder", outcome.accuracy is None)
    trial.set_user_attr("candidate", outcome.candidate.to_dict())
    for name, value in outcome.figures().items():
        trial.set_user_attr(name, value)


def make_objective(
    space: Space, evaluate: Callable[[Candidate], Any], constraints: Constraints, fingerprint: str, minimize_size: bool,
    budget: int, on_start: Callable[[int, Candidate], None] = lambda number, candidate: None,
) -> Callable[[optuna.Trial], list[float]]:
    """The Optuna objective of a run: suggest a candidate, evaluate it, record the outcome. A trial started beyond the
    budget is pruned before it runs anything, since several workers can start the last trial at once; a trial of a
    candidate already measured returns its figures (`repeated_trial`)."""
    def objective(trial: optuna.Trial) -> list[float]:
        trial.set_user_attr(OWNER_ATTR, f"{worker_id()}/{trial.number}")
        trial.set_user_attr(WORKER_ATTR, worker_id())
        surplus = surplus_reason(trial.study, trial.number, budget)
        if surplus is not None:
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise optuna.TrialPruned(surplus)
        trial.set_user_attr(HARDWARE_ATTR, fingerprint)
        candidate = suggest(trial, space)
        stored = candidate.to_dict()
        trial.set_user_attr("candidate", stored)
        earlier = repeated_trial(trial.study.get_trials(deepcopy=False), stored, fingerprint, budget)
        if earlier is not None:
            return repeat(trial, earlier)
        on_start(trial.number, candidate)
        try:
            outcome = evaluate(candidate)
        except KeyboardInterrupt:
            trial.set_user_attr(INTERRUPTED_ATTR, True)
            raise
        except Exception as exc:
            trial.set_user_attr(ERROR_ATTR, f"{type(exc).__name__}: {exc}")
            log.warning("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
            raise
        record(trial, outcome, constraints)
        return objective_values(outcome, minimize_size)

    return objective


def fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's own check: RUNNING trials whose heartbeat stopped become FAIL and are re-enqueued."""
    with optuna_experimental():
        optuna.storages.fail_stale_trials(study)


def seconds_running(trial: FrozenTrial) -> float:
    """How long ago a trial started (storages keep naive local or aware UTC times)."""
    start = trial.datetime_start
    if start is None:
        return 0.0
    now = datetime.now(timezone.utc) if start.tzinfo is not None else datetime.now()
    return (now - start).total_seconds()


def owner_of(trial: FrozenTrial) -> tuple[str, int] | None:
    """(host, pid) of the process that claimed this very trial, or None while none has (see OWNER_ATTR)."""
    worker, _, number = str(trial.user_attrs.get(OWNER_ATTR, "")).rpartition("/")
    host, _, pid = worker.rpartition(":")
    if number != str(trial.number) or not host or not pid.isdigit():
        return None
    return host, int(pid)


def judged_here(trial: FrozenTrial) -> bool:
    """Whether this worker can tell if a RUNNING trial's worker is alive: its owner runs on this host, or none has
    claimed it yet (then UNCLAIMED_GRACE_S decides). Another host's processes cannot be seen from here."""
    owner = owner_of(trial)
    return owner is None or owner[0] == socket.gethostname()


def orphaned(trial: FrozenTrial) -> bool:
    """Whether a RUNNING trial lost its worker: its owner is a dead process of this host, or nobody claimed it within
    UNCLAIMED_GRACE_S of its start."""
    owner = owner_of(trial)
    if owner is None:
        return seconds_running(trial) > UNCLAIMED_GRACE_S
    return owner[0] == socket.gethostname() and owner[1] != os.getpid() and not is_alive(owner[1])


def fail_orphaned_trials(study: optuna.Study) -> list[int]:
    """The journal's stand-in for a heartbeat (and an RDB's for a trial killed before its first one): fail the
    orphaned RUNNING trials (see `orphaned`) and re-enqueue them as Optuna retries a stale one. Workers racing over
    one trial are safe: the storage lets one FAIL it, and only that one enqueues its retry. Returns the numbers of
    the trials failed here."""
    with optuna_experimental():
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not orphaned(trial):
            continue
        try:
            frozen = study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, UpdateFinishedTrialError):
            continue  # finished meanwhile, or failed by another worker first
        log.warning("trial %d lost its worker (%s): failed and retried", trial.number,
                    trial.user_attrs.get(WORKER_ATTR, "never claimed"))
        retry(study, frozen)
        failed.append(trial.number)
    return failed


def lost_retry(trial: FrozenTrial, retried: set[int]) -> bool:
    """Whether a failed trial should have a retry and has none: it did not fail on its own (no error recorded; lost
    to a crash, a kill or Ctrl-C) and no trial retries it."""
    return trial.state == TrialState.FAIL and ERROR_ATTR not in trial.user_attrs and trial.number not in retried


def retry_lost_retries(study: optuna.Study) -> list[int]:
    """Re-enqueue the failed attempts whose retry was lost. Failing a lost trial and enqueuing its retry are two
    writes (in Optuna's heartbeat check as in `fail_orphaned_trials`), and a worker killed between them leaves a
    FAIL trial nothing retries, counted against the budget for good: measured, once in 111 kills of a 10-minute
    storm. Two workers may recover one attempt at once; `surplus_reason` lets only the first retry run. The callback
    gives up after MAX_RETRY attempts, as for any retry. Returns the numbers of the attempts re-enqueued."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    with optuna_experimental():
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    lost = [t for t in trials if lost_retry(t, retried) and len(t.system_attrs.get("retry_history", ())) < MAX_RETRY]
    for trial in lost:
        log.warning("trial %d failed without a retry (its worker was killed in between): retried", trial.number)
        retry(study, trial)
    return [t.number for t in lost]


def fail_lost_trials(study: optuna.Study) -> None:
    """RUNNING trials whose worker is gone become FAIL and are re-enqueued: by Optuna's heartbeat for an RDB, and by
    their owners' pids on every storage. An RDB needs both: Optuna never finds a trial stale that has no heartbeat
    yet, so a worker killed between creating a trial and its first heartbeat would leave it RUNNING for good.
    Failed attempts whose retry a kill lost are enqueued again (`retry_lost_retries`)."""
    if has_heartbeat(study._storage):  # the storage, as optuna.storages.fail_stale_trials reads it
        fail_stale_trials(study)
    fail_orphaned_trials(study)
    retry_lost_retries(study)


def retry_interrupted(study: optuna.Study) -> None:
    """Re-enqueue the trials Ctrl-C (or a full disk) stopped in this process, as Optuna retries a crashed one."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    with optuna_experimental():
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    for trial in trials:
        if trial.state == TrialState.FAIL and trial.user_attrs.get(INTERRUPTED_ATTR) \
                and trial.user_attrs.get(WORKER_ATTR) == worker_id() and trial.number not in retried:
            retry(study, trial)


def stopping_on_full_disk(objective: Callable[[optuna.Trial], list[float]],
                          stopped: list[DiskFullError]) -> Callable[[optuna.Trial], list[float]]:
    """The objective, except that a full disk marks its trial interrupted and is kept in `stopped`: Optuna records
    the trial FAIL as for any error, and `run` then stops, since every later trial would fail the same way."""
    def guarded(trial: optuna.Trial) -> list[float]:
        try:
            return objective(trial)
        except Exception as exc:
            full = as_disk_full(exc)
            if full is not None:
                trial.set_user_attr(INTERRUPTED_ATTR, True)
                stopped.append(full)
            raise

    return guarded


def keeps_waiting(study: optuna.Study, trials: Sequence[FrozenTrial]) -> bool:
    """Whether a worker with nothing left to start should wait for the running trials: with a heartbeat any of them
    may go stale; on a journal only those whose worker this host can see may turn out orphaned."""
    running = [t for t in trials if t.state == TrialState.RUNNING]
    return bool(running) and (has_heartbeat(study._storage) or any(judged_here(t) for t in running))


def run(
    study: optuna.Study, objective: Callable[[optuna.Trial], list[float]], budget: int, deadline: float | None,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (), poll_s: float | None = None,
) -> None:
    """Run trials, one at a time, until the study holds `budget` finished trials; several workers may run this
    on one study at once, and a resumed study only runs the rest. No trial starts after `deadline` (a
    `time.perf_counter()` value), except a study's first: a run past its time still ends with a result.

    When the rest of the budget is running in other workers, `poll_s` says how often to look again: a worker
    that died mid-trial leaves a trial that is failed and re-enqueued (`fail_lost_trials`), and its retry is
    taken here. Trials whose worker cannot be judged from here (another host's, on a journal) are left to it.
    On Ctrl-C or a full disk the trial in progress is recorded FAIL, re-enqueued for a later run, and the
    interrupt (or DiskFullError) goes on.
    """
    stopped: list[DiskFullError] = []
    guarded = stopping_on_full_disk(objective, stopped)
    while True:
        fail_lost_trials(study)
        trials = study.get_trials(deepcopy=False)
        use = budget_use(trials)
        if use.finished >= budget:
            return
        if deadline is not None and time.perf_counter() >= deadline and use.finished:
            log.info("timeout_min reached: no new trial starts (%d of %d finished)", use.finished, budget)
            return
        if use.claimed >= budget and not use.waiting:
            if poll_s is None or not keeps_waiting(study, trials):
                log.info("the study's last %d trials run in other workers", budget - use.finished)
                return
            time.sleep(poll_s)
            continue
        try:
            study.optimize(guarded, n_trials=1, catch=(Exception,), callbacks=list(callbacks), gc_after_trial=True)
        except KeyboardInterrupt:
            retry_interrupted(study)
            raise
        if stopped:
            retry_interrupted(study)
            raise stopped[0]


def view_of(study: optuna.Study, trials: Sequence[FrozenTrial]) -> optuna.Study:
    """An in-memory study of the same directions holding only `trials`, for Optuna's analyses of a subset."""
    view = optuna.create_study(directions=study.directions)
    view.add_trials(trials)
    return view


def pareto_numbers(study: optuna.Study, trials: Sequence[FrozenTrial]) -> list[int]:
    """The feasible Pareto front among `trials` with a measured accuracy (constraints as Optuna reads them)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return []
    front = [complete[t.number] for t in view_of(study, complete).best_trials]  # the view numbers its copies 0..n-1
    return sorted(t.number for t in front if not t.user_attrs.get("accuracy_is_placeholder", True))


def importances(study: optuna.Study, trials: Sequence[FrozenTrial]) -> dict[str, dict[str, float]]:
    """Optuna's parameter importances per objective (PED-ANOVA, Optuna's default evaluator).

    Judged over `trials` (those measured on one machine). Accuracy over evaluated trials only (a gate
    rejection's accuracy is a placeholder); latency over every COMPLETE trial, gate rejections included, since
    their latency was measured. Too few trials, or a space with nothing varying, gives no figures, not an error.
    """
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    evaluated = [t for t in complete if not t.user_attrs.get("accuracy_is_placeholder", True)]
    out: dict[str, dict[str, float]] = {}
    # PED-ANOVA ranks what it takes to reach *low* values, so accuracy is negated.
    for name, subset, value in (("accuracy", evaluated, lambda t: -t.values[0]), ("latency_ms", complete, lambda t: t.values[1])):
        if len(subset) < 3:
            continue
        try:
            with warnings.catch_warnings():  # PED-ANOVA's reminder that it ranks low values: handled by the sign
                warnings.simplefilter("ignore", UserWarning)
                scores = optuna.importance.get_param_importances(view_of(study, subset), target=value)
        except (ValueError, RuntimeError) as exc:
            log.info("no %s importances: %s", name, exc)
            continue
        out[name] = {param: round(float(score), 4) for param, score in scores.items()}
    return out

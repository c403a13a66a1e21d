"""The public face: `tune(spec, ...) -> TuneResult`, `work(spec, storage=...)` and `load_result(path)`. The CLI
calls the same functions.

A run: `session.start_session` (study, machine, data, teacher, baseline, target: one frozen Session), the
study's trials (`study.run`, each one `TrialPipeline.run`), then `selection` (refine the finalists, re-measure,
choose), the test split scored for the baseline and the recommendation only, `model/`, `result.json` and the
report.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from autotune.caches import MANIFEST, STAGING, disk_full_is_an_error, owned_temporary_directory
from autotune.config import TuneSpec, load_spec
from autotune.progress import SilentProgress
from autotune.result import TuneResult, load_result, recommended_entry, result_document
from autotune.runtime import load_artifact
from autotune.runtime.export import write_artifact_json
from autotune.selection import Choice, choose_recommendation, refine_finalists
from autotune.session import Session, start_session
from autotune.tasks import Score
from autotune.study import (
    HARDWARE_ATTR, WORKER_ATTR, finished_count, importances, kept_trials, pareto_numbers, record_of, redact,
    run as run_study, worker_id,
)

__all__ = ["tune", "work", "load_result", "TuneSpec", "TuneResult", "WorkerSummary"]

SEARCH_OVERRIDES = ("trials", "timeout_min", "storage", "sampler", "seed")


def prepare_run_dir(run_dir: Path) -> Path:
    """The run directory, created; an unwritable one is one PermissionError sentence."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"output directory {run_dir} cannot be created ({exc.strerror})") from None
    if not os.access(run_dir, os.W_OK):
        raise PermissionError(f"output directory {run_dir} is not writable")
    return run_dir


def search_spec(spec: Any, overrides: Mapping[str, Any]) -> TuneSpec:
    """The spec with search settings (trials, timeout_min, storage, sampler, seed) given as keyword overrides."""
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(SEARCH_OVERRIDES))
    if unknown:
        raise TypeError(f"got unknown override(s) {unknown}; accepted: {', '.join(SEARCH_OVERRIDES)}")
    return load_spec(spec, {"search": given} if given else None)


def run_session(session: Session, progress: SilentProgress, started: float) -> None:
    """Run the study's trials here until its budget is reached, or `search.timeout_min` after `started` (the command's
    `time.perf_counter()` at its start): a slow setup leaves less search rather than overrunning the user's time."""
    search = session.spec.search
    deadline = started + search.timeout_min * 60 if search.timeout_min else None
    progress.start(search.trials, finished_count(session.study), session.target.latency_ms)
    try:
        run_study(session.study, session.objective, search.trials, deadline, callbacks=[progress.trial_finished],
                  poll_s=session.poll_s)
    finally:
        progress.stop()


@dataclass(frozen=True)
class WorkerSummary:
    """What one `autotune worker` did: the study's standing at its end, and its own share."""

    study_name: str
    storage: str  # password redacted
    budget: int
    finished: int
    ran_here: int


@disk_full_is_an_error()
def work(
    spec: TuneSpec | str | os.PathLike[str] | Mapping[str, Any],
    *,
    storage: str,
    study_name: str | None = None,
    out: str | os.PathLike[str] | None = None,
    allow_mixed_hardware: bool = False,
    progress: SilentProgress | None = None,
    profile: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> WorkerSummary:
    """Join (or create) the study on `storage` and run its trials until the study's budget is reached.

    Several workers, on one machine or many, share the study through the storage; each keeps its students and
    artifacts under `out` (default runs/<name>/, safe to share between workers of one machine). `tune` with
    `--resume` on the same storage writes the result once the budget is reached. A full disk is a DiskFullError
    (finished trials are kept; the trial in progress is retried by the next worker). `profile` as for `tune`.
    """
    started = time.perf_counter()
    spec = search_spec(spec, {**overrides, "storage": storage})
    progress = progress or SilentProgress()
    run_dir = prepare_run_dir(Path(out) if out is not None else Path("runs") / spec.name)
    with owned_temporary_directory(STAGING, run_dir) as scratch:  # its baseline; removed by a later run if killed
        session = start_session(spec, run_dir, resume=True, join=True, study_name=study_name,
                                allow_mixed_hardware=allow_mixed_hardware, progress=progress, metric=None,
                                baseline_dir=scratch, profile=profile)
        run_session(session, progress, started)
    study = session.study
    mine = [t for t in kept_trials(study) if t.user_attrs.get(WORKER_ATTR) == worker_id()]
    return WorkerSummary(study_name=study.study_name, storage=redact(session.storage), budget=spec.search.trials,
                         finished=finished_count(study), ran_here=len(mine))


@disk_full_is_an_error()
def tune(
    spec: TuneSpec | str | os.PathLike[str] | Mapping[str, Any],
    *,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: SilentProgress | None = None,
    command: str | None = None,
    metric: Any = None,
    study_name: str | None = None,
    allow_mixed_hardware: bool = False,
    profile: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> TuneResult:
    """Run a tuning study and return its result (also written to `<out>/result.json`).

    `overrides` are search settings applied over the spec: trials, timeout_min, storage, sampler, seed.
    `command` is how the run was started (the CLI passes its command line), recorded for the report.
    `metric(labels, logits) -> float` (higher is better) replaces accuracy as the objective when given.
    The result compares only trials measured on this machine's hardware; trials that workers on other
    hardware ran (`allow_mixed_hardware`) are listed apart, under `other_hardware_trials`.
    `profile` (else `$AUTOTUNE_PROFILE`): a file of `autotune profile -o`, or a folder of them, holding this machine's
    profile at the target's threads, reused instead of measuring the machine again; another machine's is refused.
    """
    started = time.perf_counter()
    spec = search_spec(spec, overrides)
    progress = progress or SilentProgress()
    run_dir = prepare_run_dir(Path(out) if out is not None else Path("runs") / spec.name)
    session = start_session(spec, run_dir, resume=resume, join=False, study_name=study_name,
                            allow_mixed_hardware=allow_mixed_hardware, progress=progress, metric=metric,
                            baseline_dir=run_dir, profile=profile)
    run_session(session, progress, started)
    trials = kept_trials(session.study)
    here_fingerprint = session.profile.fingerprint
    here = [t for t in trials if t.user_attrs.get(HARDWARE_ATTR, here_fingerprint) == here_fingerprint]
    records = [record_of(t) for t in here]
    refined = refine_finalists(session.pipeline, session.baseline.artifact, records, session.margin, progress)
    choice = choose_recommendation(session.pipeline, session.baseline.artifact, records + refined, session.margin,
                                   progress.note)
    here_numbers = {t.number for t in here}
    result = TuneResult(result_document(
        session, records, command=command, refined=refined, reason=choice.reason, passed_over=list(choice.passed_over),
        other_hardware_trials=[record_of(t) for t in trials if t.number not in here_numbers],
        pareto=pareto_numbers(session.study, here), importances=importances(session.study, here),
        baseline_test=score_on_test(session, session.baseline.artifact.dir),
        recommended=(recommended := None if choice.recommended is None else deploy_recommendation(session, choice)),
        samples=side_by_side(session, recommended),
        seconds=time.perf_counter() - started))  # keyword arguments are evaluated in order: this one last
    result.save(run_dir)
    from autotune.report import write_report  # here: matplotlib costs a worker's start 1.4 s, and workers write none

    write_report(result.data, run_dir)
    return result


def score_on_test(session: Session, artifact_dir: Path) -> Score | None:
    """The artifact's score on the test split (None when the split is empty): read only for the final answer."""
    if session.task.split_size("test") == 0:
        return None
    return session.task.score(load_artifact(artifact_dir), "test", session.target.timing)


def side_by_side(session: Session, recommended: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the task family shows of the teacher's and the recommendation's outputs side by side (a causal LM's
    greedy generations of one test prompt); None without a recommendation or where a family shows nothing."""
    if recommended is None:
        return None
    return session.task.sample_outputs({"teacher": session.baseline.artifact,
                                        "recommended": load_artifact(Path(recommended["artifact"]))})


def deploy_recommendation(session: Session, choice: Choice) -> dict[str, Any]:
    """Copy the recommended artifact to `model/` and describe it, with its test score, for result.json."""
    model_dir = session.run_dir / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(choice.recommended.artifact, model_dir, ignore=shutil.ignore_patterns(MANIFEST))  # a cache's, not the model's
    t = session.target
    write_artifact_json(replace(load_artifact(model_dir), measured={
        "percentile": t.percentile, "latency_ms": choice.recommended.latency_ms, "measure": t.measure,
        "figures": choice.confirmation.figures, "batch_size": t.batch_size, "seq_len": t.seq_len,
        "prompt_len": t.prompt_len, "threads": t.threads, "device": t.device,
        "max_length": session.spec.data.max_length, "hardware_fingerprint": session.profile.fingerprint,
        "recipe": session.pipeline.ctx.recipe.to_dict()}))
    return recommended_entry(session, choice, model_dir, score_on_test(session, model_dir))

"""The public face: `tune(spec, ...) -> TuneResult` and `load_result(path)`. The CLI calls the same functions.

A run, in order: validate the spec, open (or refuse to reuse) the study, read and split the data, load the
teacher and check the space's knobs against it, so every user mistake surfaces before any slow step; then
profile the machine at the target's threads; fine-tune the teacher when its classification head is new
(cached); cache the teacher's logits on the training split; export and measure the baseline (the teacher,
fused fp32, in the target runtime); resolve a relative target (`speedup`) against that baseline; restrict the
search space to this machine; run the study; then re-measure the best feasible candidate (again when it sits
within the noise of the target), score it and the baseline on the test split, copy its artifact to `model/`,
and write `result.json`.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median
from typing import Any, Callable, Mapping

import optuna
import torch

from autotune.builtin import resolve_data, resolve_model
from autotune.caches import cache_root
from autotune.compress import finetune_teacher, teacher_logits, tokenize
from autotune.compress.distillation import TokenizedData
from autotune.config import TuneSpec, load_spec
from autotune.models import load_classifier, shape_of, state_fingerprint
from autotune.planning import LatencyScreen
from autotune.progress import SilentProgress
from autotune.result import RESULT_SCHEMA_VERSION, TuneResult, load_result
from autotune.runtime import Artifact, derive_artifact, export_artifact, load_artifact
from autotune.report import write_report
from autotune.report.plan import closest_measured
from autotune.study import (
    HARDWARE_ATTR, WORKER_ATTR, Heartbeat, enqueue_anchors, finished_count, has_heartbeat, importances, kept_trials, claim_hardware, make_objective,
    open_storage, open_study, pareto_numbers, redact, run as run_study, worker_id,
)
from autotune.tasks import LabeledTexts, Splits, load_labeled_texts, split, subsample
from autotune.trial import MB, Metric, Target, TrialContext, TrialOutcome, TrialPipeline, noise_margin
from profilers.hardware import HardwareProfile, collect_profile, default_threads, with_throughput
from profilers.cpu import probe_cpu
from profilers.latency import LatencyStats
from profilers.predictor import Workload
from search_spaces import Candidate, Removal, Space, TeacherShape, preset, restrict_to_hardware, with_overrides

log = logging.getLogger(__name__)

__all__ = ["tune", "work", "load_result", "TuneSpec", "TuneResult", "WorkerSummary"]

REMEASURE_ROUNDS = 3
SEARCH_OVERRIDES = ("trials", "timeout_min", "storage", "sampler", "seed")


def default_storage(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'study.db').resolve()}"


def prepare_run_dir(run_dir: Path) -> Path:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"output directory {run_dir} cannot be created ({exc.strerror})") from None
    if not os.access(run_dir, os.W_OK):
        raise PermissionError(f"output directory {run_dir} is not writable")
    return run_dir


def resolved_threads(spec: TuneSpec) -> int:
    return default_threads(probe_cpu()) if spec.target.threads == "auto" else int(spec.target.threads)


def export_baseline(teacher: Any, tokenizer: Any, run_dir: Path) -> Artifact:
    """The uncompressed teacher in the best setting the tool knows (ORT, graph fusions, fp32)."""
    plain = export_artifact(teacher, tokenizer, run_dir / ".baseline-fp32")
    baseline_dir = run_dir / "baseline"
    shutil.rmtree(baseline_dir, ignore_errors=True)
    artifact = derive_artifact(plain, baseline_dir, bits=32)
    shutil.rmtree(plain.dir, ignore_errors=True)
    return artifact


def latency_summary(stats: LatencyStats) -> dict[str, float]:
    return {"p50": stats.p50_ms, "p90": stats.p90_ms, "p95": stats.p95_ms, "p99": stats.p99_ms, "mean": stats.mean_ms,
            "stdev": stats.stdev_ms, "runs": stats.runs, "converged": stats.converged}


def trial_record(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    placeholder = attrs.get("accuracy_is_placeholder", True)
    return {
        "number": trial.number,
        "state": trial.state.name,
        "candidate": attrs.get("candidate"),
        "stage": attrs.get("stage", "failed" if trial.state.name == "FAIL" else None),
        "feasible": attrs.get("feasible", False),
        "accuracy": None if placeholder else attrs.get("accuracy"),
        "macro_f1": attrs.get("macro_f1"),
        "latency_ms": attrs.get("latency_ms"),
        "latency": attrs.get("latency"),
        "size_mb": attrs.get("size_mb"),
        "achieved_sparsity": attrs.get("achieved_sparsity"),
        "seconds": attrs.get("seconds"),
        "gate_cache_hit": attrs.get("gate_cache_hit"),
        "student_cache_hit": attrs.get("student_cache_hit"),
        "artifact": attrs.get("artifact"),
        "hardware_fingerprint": attrs.get(HARDWARE_ATTR),
        "worker": attrs.get(WORKER_ATTR),
        "error": attrs.get("error"),
    }


def confirmed_latency(pipeline: TrialPipeline, record: dict[str, Any]) -> float:
    """Latency at the target percentile, re-measured; rounds are added while it sits within the noise."""
    from autotune.runtime import load_artifact

    artifact = load_artifact(record["artifact"])
    target = pipeline.ctx.target
    samples = [pipeline.measure(artifact)]
    while len(samples) < REMEASURE_ROUNDS:
        values = sorted(s.percentile_ms(target.percentile) for s in samples)
        if abs(median(values) - target.latency_ms) > noise_margin(samples[-1]) * target.latency_ms:
            break
        samples.append(pipeline.measure(artifact))
    return float(median(s.percentile_ms(target.percentile) for s in samples))


#: Anchors take at most this share of the trial budget: the rest is the sampler's, and a trial retried after
#: a crash or Ctrl-C waits behind every anchor still queued, so anchors must leave it room within the budget.
ANCHOR_BUDGET_SHARE = 1 / 2


def anchors(teacher: TeacherShape, space: Space, budget: int) -> list[Candidate]:
    """The first trials of a new study, those the space holds, at most ANCHOR_BUDGET_SHARE of `budget` (at least
    one): the teacher and its int8 twin, then the teacher cut to each shallower depth, full width, int8, deepest
    first.

    Dropping layers while keeping every width is the strongest simple student: it keeps the teacher's attention
    heads and FFN whole (in the demo's runs on all-MiniLM-L6-v2, 2-layer students 384 wide reached 0.84
    validation accuracy, 288 wide 0.82, 192 wide 0.80-0.81). A sampler drawing the other knobs at random rarely
    proposes it; a slice too slow for the target costs one gate (seconds), a fitting one is the baseline the
    search has to beat.
    """
    depths = sorted((d for d in space.knob("layers").values() if d < teacher.layers), reverse=True)
    inside = []
    for candidate in (teacher.as_candidate(32), teacher.as_candidate(8), *(teacher.cut_to(d, bits=8) for d in depths)):
        if space.contains(candidate):
            inside.append(candidate)
        else:
            log.info("anchor not enqueued (outside the space): %s", candidate.describe())
    return inside[:max(1, int(budget * ANCHOR_BUDGET_SHARE))]


def stable_baseline(pipeline: TrialPipeline, artifact: Artifact) -> LatencyStats:
    """The baseline's latency: of `REMEASURE_ROUNDS` measurements, the one with the median target percentile.

    A relative target is this figure divided by the speedup, so one unlucky measurement on a shared machine
    would move every feasibility decision of the run; the median round keeps a consistent set of percentiles.
    """
    percentile = pipeline.ctx.target.percentile
    rounds = sorted((pipeline.measure(artifact) for _ in range(REMEASURE_ROUNDS)), key=lambda s: s.percentile_ms(percentile))
    return rounds[len(rounds) // 2]


def with_accuracy(records: list[dict[str, Any]], stages: tuple[str, ...]) -> list[dict[str, Any]]:
    """Records of these stages that measured an accuracy, most accurate first (ties: the faster first)."""
    return sorted((r for r in records if r["stage"] in stages and r["accuracy"] is not None),
                  key=lambda r: (-r["accuracy"], r["latency_ms"]))


def finalists(pipeline: TrialPipeline, records: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The `count` most accurate evaluated trials that meet the target, or sit within its noise, one per
    trained student (a refined student serves every bit width, so two of one student would train it twice)."""
    target_ms = pipeline.ctx.target.latency_ms
    chosen: dict[str, dict[str, Any]] = {}
    for record in with_accuracy(records, ("evaluated",)):
        candidate = Candidate.from_dict(record["candidate"])
        if pipeline.is_teacher(candidate) or candidate.student_key in chosen:
            continue
        if record["latency_ms"] <= target_ms * (1 + noise_margin(LatencyStats(**record["latency"]))):
            chosen[candidate.student_key] = record
        if len(chosen) == count:
            break
    return list(chosen.values())


def refine_finalists(pipeline: TrialPipeline, records: list[dict[str, Any]], progress: SilentProgress) -> list[dict[str, Any]]:
    """Each finalist's student distilled `training.refine_epochs` more epochs, deployed and evaluated again.

    A refined record keeps its source trial's number and says how many epochs it was trained in all.
    """
    training = pipeline.ctx.training
    if training.refine_epochs == 0:
        return []
    refined = []
    for source in finalists(pipeline, records, training.finalists):
        candidate = Candidate.from_dict(source["candidate"])
        epochs = training.epochs + training.refine_epochs
        progress.note(f"refining trial {source['number']} ({candidate.describe()}): {training.refine_epochs} more "
                      f"epoch(s), {epochs} in all")
        start = time.perf_counter()
        model, hit = pipeline.refine(candidate, training.refine_epochs,
                                     functools.partial(progress.training, f"refining trial {source['number']}"))
        outcome = pipeline.evaluate(candidate, model, "refined", {"train": time.perf_counter() - start},
                                    artifact_name=f"{candidate.key}-epochs{epochs}", student_cache_hit=hit)
        refined.append({"number": source["number"], "state": "COMPLETE", "candidate": candidate.to_dict(),
                        **outcome.figures(), "epochs": epochs, "hardware_fingerprint": pipeline.ctx.fingerprint,
                        "error": None})
        progress.note(f"trial {source['number']} refined: {pipeline_metric(pipeline)} {source['accuracy']:.4f} -> "
                      f"{outcome.accuracy:.4f} (validation)")
    return refined


def pipeline_metric(pipeline: TrialPipeline) -> str:
    return getattr(pipeline.ctx.metric, "__name__", "custom metric") if pipeline.ctx.metric is not None else "accuracy"


def choose_recommendation(pipeline: TrialPipeline, records: list[dict[str, Any]],
                          note: Callable[[str], None] = log.info) -> tuple[dict[str, Any] | None, str | None]:
    """The most accurate evaluated or refined candidate whose re-measured latency meets the target; `note` hears
    why a more accurate one was passed over (a user who saw it trained should see why it was not chosen)."""
    target_ms = pipeline.ctx.target.latency_ms
    seen: set[str] = set()
    for record in with_accuracy(records, ("evaluated", "refined")):
        key = record["artifact"]  # a candidate evaluated in two trials is one artifact
        if key in seen or record["latency_ms"] > target_ms * (1 + 0.25):
            continue
        if not Path(record["artifact"]).exists():  # written by a worker on another machine: cannot re-measure here
            log.info("trial %d's artifact %s is not on this machine", record["number"], record["artifact"])
            continue
        seen.add(key)
        latency = confirmed_latency(pipeline, record)
        if latency <= target_ms:
            return {**record, "latency_ms": latency}, None
        note(f"trial {record['number']} ({record['stage']}, {pipeline_metric(pipeline)} {record['accuracy']:.4f}) "
             f"re-measured at {latency:.2f} ms, over the {target_ms:.2f} ms target: not recommended")
    misses = closest_measured(records)
    if not misses:
        return None, "no trial finished"
    closest = ", ".join(f"trial {r['number']} at {r['latency_ms']:.2f} ms (+{r['latency_ms'] / target_ms - 1:.0%})" for r in misses)
    return None, f"no candidate met the {target_ms:.2f} ms target; closest: {closest}"


def load_teacher(spec: TuneSpec) -> tuple[Any, Any, bool]:
    """(model, tokenizer, new_head) for the spec's model, builtin names resolved.

    A new classification head is initialised from the search seed, not from whatever state torch's global
    generator is in: the same spec and seed then start from the same weights, so runs are reproducible and
    the fine-tuned teacher's cache (keyed by the starting weights) hits on the next run instead of never.
    """
    model_spec = spec.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.search.seed)
        loaded = load_classifier(resolve_model(model_spec.path), model_spec.num_labels,
                                 trust_remote_code=model_spec.trust_remote_code, allow_pickle=model_spec.allow_pickle)
    return loaded.model, loaded.tokenizer, loaded.new_head


def load_splits(spec: TuneSpec) -> Splits:
    data_spec = spec.data
    data = load_labeled_texts(resolve_data(data_spec.path), text_column=data_spec.text_column,
                              label_column=data_spec.label_column, num_labels=spec.model.num_labels)
    if data_spec.limit is not None:
        data = subsample(data, data_spec.limit, seed=data_spec.split.seed)
    return split(data, validation=data_spec.split.validation, test=data_spec.split.test, seed=data_spec.split.seed)


TARGET_ATTR = "target_latency_ms"


def resolved_target_ms(study: optuna.Study, spec: TuneSpec, baseline_ms: float, progress: SilentProgress) -> float:
    """The target in ms: absolute from the spec, or the baseline / speedup, resolved once per study.

    A resumed study keeps the target its first run resolved: its finished trials' constraints were computed
    against it, and a baseline re-measured on a shared machine can differ by tens of percent.
    """
    t = spec.target
    if t.latency_ms is not None:
        return t.latency_ms
    stored = study.user_attrs.get(TARGET_ATTR)
    if stored is not None:
        progress.note(f"resumed study: keeping its target of {stored:.2f} ms (this run's baseline / {t.speedup:g} "
                      f"would be {baseline_ms / t.speedup:.2f} ms)")
        return float(stored)
    target_ms = baseline_ms / t.speedup
    study.set_user_attr(TARGET_ATTR, target_ms)
    return target_ms


def build_context(spec: TuneSpec, teacher: Any, tokenizer: Any, train: TokenizedData, validation: LabeledTexts,
                  threads: int, fingerprint: str, run_dir: Path, cache: Path) -> TrialContext:
    """What every trial of a run shares, for a teacher that is ready (fine-tuned when its head was new).

    The teacher's logits on the training split are computed here (cached by its weights). A relative target
    (`speedup`) has no latency until the baseline is measured, so the context's target is provisional then
    (1 ms) and the caller replaces it; an absolute target is final.
    """
    teacher_key = state_fingerprint(teacher)
    logits = teacher_logits(teacher, train, cache_dir=cache / "logits", teacher_fingerprint=teacher_key)
    t = spec.target
    target = Target(latency_ms=t.latency_ms or 1.0, percentile=t.percentile, batch_size=t.batch_size,
                    seq_len=t.seq_len, threads=threads, runtime=t.runtime, device=t.device)
    return TrialContext(
        teacher=teacher, tokenizer=tokenizer, teacher_shape=shape_of(teacher),
        teacher_key=teacher_key, train=train, teacher_logits=logits, validation=validation,
        max_length=spec.data.max_length, target=target, fingerprint=fingerprint, training=spec.training,
        seed=spec.search.seed, cache_dir=cache, artifacts_dir=run_dir / "artifacts",
    )


@dataclass
class Session:
    """A study opened on its storage and a trial pipeline ready to run it: what tune() and work() share."""

    spec: TuneSpec
    run_dir: Path
    storage: str
    study: optuna.Study
    profile: HardwareProfile
    pipeline: TrialPipeline
    splits: Splits
    baseline: Artifact
    baseline_stats: LatencyStats
    baseline_val: float
    new_head: bool
    space: Space
    removals: list[Removal]
    objective: Callable[[optuna.Trial], list[float]]
    poll_s: float | None

    @property
    def target_ms(self) -> float:
        return self.pipeline.ctx.target.latency_ms


def search_spec(spec: Any, overrides: Mapping[str, Any]) -> TuneSpec:
    """The spec with search settings (trials, timeout_min, storage, sampler, seed) given as keyword overrides."""
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(SEARCH_OVERRIDES))
    if unknown:
        raise TypeError(f"got unknown override(s) {unknown}; accepted: {', '.join(SEARCH_OVERRIDES)}")
    return load_spec(spec, {"search": given} if given else None)


def start_session(spec: TuneSpec, run_dir: Path, *, resume: bool, join: bool, study_name: str | None,
                  allow_mixed_hardware: bool, progress: SilentProgress, metric: Metric | None,
                  baseline_dir: Path) -> Session:
    """Open the study and get everything a trial needs ready; every user mistake surfaces before a slow step.

    `join` (a worker): load the study whatever it holds, and leave the anchors to the worker that created it,
    so workers starting together enqueue them once. The baseline is exported under `baseline_dir`.
    """
    storage = spec.search.storage or default_storage(run_dir)
    threads = resolved_threads(spec)
    heartbeat = Heartbeat(interval_s=spec.search.heartbeat_s, grace_s=3 * spec.search.heartbeat_s)
    # Everything a user can get wrong (the storage, an existing study without --resume, other hardware, the
    # data, the model, the knobs) is checked before the seconds of profiling and the minutes of fine-tuning.
    backend = open_storage(storage, heartbeat)
    study, created = open_study(study_name or spec.name, backend, spec.search.sampler, spec.search.seed,
                                spec.search.minimize_size, resume or join)
    probed = collect_profile(threads, microbench=False)  # the fingerprint now; throughput after the cheap checks
    claim_hardware(study, probed.fingerprint, allow_mixed_hardware)
    splits = load_splits(spec)
    teacher, tokenizer, new_head = load_teacher(spec)
    space = with_overrides(preset(spec.space.preset, shape_of(teacher)), spec.space.knobs)
    train = tokenize(tokenizer, splits.train.texts, splits.train.labels, max_length=spec.data.max_length)

    progress.note(f"profiling this machine at {threads} threads")
    profile = with_throughput(probed, quick=True)
    cache = cache_root()
    if new_head:
        progress.note(f"fine-tuning the teacher's new classification head ({spec.training.teacher_epochs} epochs; cached)")
        teacher = finetune_teacher(teacher, train, epochs=spec.training.teacher_epochs, lr=spec.training.teacher_lr,
                                   seed=spec.search.seed, batch_size=spec.training.batch_size, cache_dir=cache / "teachers",
                                   progress=functools.partial(progress.training, "fine-tuning the teacher"))
    ctx = build_context(spec, teacher, tokenizer, train, splits.validation, threads, profile.fingerprint, run_dir, cache)
    ctx.metric = metric
    t = spec.target
    pipeline = TrialPipeline(ctx)
    progress.note("measuring the baseline (teacher, fused fp32)")
    baseline = export_baseline(teacher, tokenizer, baseline_dir)
    baseline_stats = stable_baseline(pipeline, baseline)
    baseline_val = pipeline.score(baseline, splits.validation)[0]
    ctx.reference_ms = baseline_stats.percentile_ms(t.percentile)
    target_ms = resolved_target_ms(study, spec, ctx.reference_ms, progress)
    ctx.target = replace(ctx.target, latency_ms=target_ms)

    if spec.search.skip_predicted_over is not None and t.device == "cpu":
        pipeline.screen = LatencyScreen(profile, Workload(t.batch_size, t.seq_len), t.percentile, spec.search.skip_predicted_over)
        pipeline.screen.observe(ctx.teacher_shape.as_candidate(32), baseline_stats)

    space, removals = restrict_to_hardware(space, profile, t.runtime, t.device)
    for removal in removals:
        progress.note(f"search space: {removal.knob}={removal.value} removed: {removal.reason}")
    if created or not join:
        enqueue_anchors(study, space, anchors(ctx.teacher_shape, space, spec.search.trials))
    memo: dict[str, TrialOutcome] = {}

    def evaluate_candidate(candidate: Candidate) -> TrialOutcome:
        if candidate.key not in memo:  # a sampler may propose a candidate twice: measure it once per run
            memo[candidate.key] = pipeline.run(candidate, on_stage=progress.stage,
                                               on_step=functools.partial(progress.training, "distilling"))
        return memo[candidate.key]

    objective = make_objective(space, evaluate_candidate, target_ms, profile.fingerprint, spec.search.minimize_size,
                               spec.search.trials, on_start=progress.trial_started)
    progress.note(f"target: p{t.percentile:g} <= {target_ms:.2f} ms at batch {t.batch_size}, seq {t.seq_len}, "
                  f"{threads} threads ({t.runtime}, {t.device}); baseline p{t.percentile:g} "
                  f"{baseline_stats.percentile_ms(t.percentile):.2f} ms")
    return Session(spec=spec, run_dir=run_dir, storage=storage, study=study, profile=profile, pipeline=pipeline,
                   splits=splits, baseline=baseline, baseline_stats=baseline_stats, baseline_val=baseline_val,
                   new_head=new_head, space=space, removals=removals, objective=objective,
                   poll_s=heartbeat.interval_s if has_heartbeat(backend) else None)


def run_session(session: Session, progress: SilentProgress) -> None:
    """Run the study's trials in this process until its budget is reached (or the timeout)."""
    search = session.spec.search
    progress.start(search.trials, finished_count(session.study), session.target_ms)
    try:
        run_study(session.study, session.objective, search.trials, search.timeout_min * 60 if search.timeout_min else None,
                  callbacks=[progress.trial_finished], poll_s=session.poll_s)
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


def work(
    spec: TuneSpec | str | os.PathLike[str] | Mapping[str, Any],
    *,
    storage: str,
    study_name: str | None = None,
    out: str | os.PathLike[str] | None = None,
    allow_mixed_hardware: bool = False,
    progress: SilentProgress | None = None,
    **overrides: Any,
) -> WorkerSummary:
    """Join (or create) the study on `storage` and run its trials until the study's budget is reached.

    Several workers, on one machine or many, share the study through the storage; each keeps its students and
    artifacts under `out` (default runs/<name>/, safe to share between workers of one machine). `tune` with
    `--resume` on the same storage writes the result once the budget is reached.
    """
    spec = search_spec(spec, {**overrides, "storage": storage})
    progress = progress or SilentProgress()
    run_dir = prepare_run_dir(Path(out) if out is not None else Path("runs") / spec.name)
    with tempfile.TemporaryDirectory(prefix=".worker-baseline-", dir=run_dir) as scratch:
        session = start_session(spec, run_dir, resume=True, join=True, study_name=study_name,
                                allow_mixed_hardware=allow_mixed_hardware, progress=progress, metric=None,
                                baseline_dir=Path(scratch))
        run_session(session, progress)
    study = session.study
    mine = [t for t in kept_trials(study) if t.user_attrs.get(WORKER_ATTR) == worker_id()]
    return WorkerSummary(study_name=study.study_name, storage=redact(session.storage), budget=spec.search.trials,
                         finished=finished_count(study), ran_here=len(mine))


def tune(
    spec: TuneSpec | str | os.PathLike[str] | Mapping[str, Any],
    *,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: SilentProgress | None = None,
    command: str | None = None,
    metric: Metric | None = None,
    study_name: str | None = None,
    allow_mixed_hardware: bool = False,
    **overrides: Any,
) -> TuneResult:
    """Run a tuning study and return its result (also written to `<out>/result.json`).

    `overrides` are search settings applied over the spec: trials, timeout_min, storage, sampler, seed.
    `command` is how the run was started (the CLI passes its command line), recorded for the report.
    `metric(labels, logits) -> float` (higher is better) replaces accuracy as the objective when given.
    The result compares only trials measured on this machine's hardware; trials that workers on other
    hardware ran (`allow_mixed_hardware`) are listed apart, under `other_hardware_trials`.
    """
    started = time.perf_counter()
    spec = search_spec(spec, overrides)
    progress = progress or SilentProgress()
    run_dir = prepare_run_dir(Path(out) if out is not None else Path("runs") / spec.name)
    session = start_session(spec, run_dir, resume=resume, join=False, study_name=study_name,
                            allow_mixed_hardware=allow_mixed_hardware, progress=progress, metric=metric,
                            baseline_dir=run_dir)
    run_session(session, progress)
    study, pipeline, splits, profile, baseline = session.study, session.pipeline, session.splits, session.profile, session.baseline
    t = spec.target
    storage = session.storage

    trials = kept_trials(study)
    here = [trial for trial in trials if trial.user_attrs.get(HARDWARE_ATTR, profile.fingerprint) == profile.fingerprint]
    elsewhere = [trial for trial in trials if trial.user_attrs.get(HARDWARE_ATTR, profile.fingerprint) != profile.fingerprint]
    records = [trial_record(trial) for trial in here]
    refined = refine_finalists(pipeline, records, progress)
    recommended, reason = choose_recommendation(pipeline, records + refined, progress.note)
    baseline_test = pipeline.score(baseline, splits.test)[0] if len(splits.test) else None
    baseline_latency = session.baseline_stats.percentile_ms(t.percentile)
    recommended_out = None
    if recommended is not None:
        model_dir = run_dir / "model"
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.copytree(recommended["artifact"], model_dir)
        recommended_out = {
            "number": recommended["number"],
            "candidate": recommended["candidate"],
            "description": Candidate.from_dict(recommended["candidate"]).describe(),
            "accuracy": {"validation": recommended["accuracy"],
                         "test": pipeline.score(load_artifact(model_dir), splits.test)[0] if len(splits.test) else None},
            "latency_ms": recommended["latency_ms"],
            "size_mb": recommended["size_mb"],
            "speedup": baseline_latency / recommended["latency_ms"],
            "epochs": recommended.get("epochs", spec.training.epochs),
            "refined": recommended["stage"] == "refined",
            "artifact": str(model_dir),
        }
    result = TuneResult({
        "schema_version": RESULT_SCHEMA_VERSION,
        "name": spec.name,
        "run_dir": str(run_dir),
        "command": command,
        "spec": spec.model_dump(mode="json") | {"search": spec.search.model_dump(mode="json") | {"storage": redact(storage)}},
        "target": session.pipeline.ctx.target.to_dict() | {"speedup": t.speedup},
        "hardware": profile.to_dict(),
        "space": {"preset": spec.space.preset, "knobs": session.space.describe(),
                  "removed": [{"knob": r.knob, "value": r.value, "reason": r.reason} for r in session.removals]},
        "baseline": {
            "accuracy": {"validation": session.baseline_val, "test": baseline_test},
            "latency_ms": latency_summary(session.baseline_stats),
            "size_mb": baseline.size_bytes / MB,
            "artifact": str(baseline.dir),
            "teacher_fine_tuned": session.new_head,
        },
        "study": {"name": study.study_name, "storage": redact(storage), "sampler": spec.search.sampler},
        "trials": records,
        "other_hardware_trials": [trial_record(trial) for trial in elsewhere],
        "refined": refined,
        "pareto": pareto_numbers(study, here),
        "recommended": recommended_out,
        "reason": reason,
        "metric": pipeline_metric(pipeline),
        "importances": importances(study, here),
        "counters": pipeline.counters,
        "seconds": time.perf_counter() - started,
    })
    result.save(run_dir)
    write_report(result.data, run_dir)
    return result

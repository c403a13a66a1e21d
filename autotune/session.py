"""Bootstrap of a run: spec + machine + data + teacher -> one frozen `Session`, ready for the study's trials.

In order, so that every user mistake surfaces before a slow step: open the study on its storage (refusing to
reuse one without `--resume`, or to mix hardware), read the data and the teacher and build the search space
(the task family's `load`); then profile the machine at the target's threads; make the teacher ready and its
targets cached (the family's `prepare`); export and measure the baseline (the teacher, fused fp32, in the
target runtime); resolve a relative target against it; restrict the space to this machine; enqueue the
anchors. `tune` and `work` (a worker) share all of it.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna

from autotune.caches import STAGING, cache_root, owned_temporary_directory, sweep_litter
from autotune.config import TuneSpec
from autotune.progress import SilentProgress
from autotune.records import TrialOutcome
from autotune.runtime import Artifact, load_artifact
from autotune.screening import DecodeScreen, LatencyScreen, Screen
from autotune.study import (
    Heartbeat, anchors, claim_hardware, enqueue_anchors, make_objective, open_storage, open_study,
)
from autotune.tasks import CausalLM, Score, TaskFamily, Timed, Timing, family_for
from autotune.trial import REMEASURE_ROUNDS, Limit, Target, TrialContext, TrialPipeline, time_artifact
from profilers.cpu import probe_cpu
from profilers.hardware import PROFILE_ENV, HardwareProfile, collect_profile, default_threads, profile_for, with_throughput
from profilers.latency import LatencyStats
from profilers.predictor import Workload
from profilers.recipes import engines_text
from search_spaces import Candidate, Removal, Space, restrict_to_hardware

#: The default safety margin is the measured noise, at most this.
MAX_DEFAULT_MARGIN = 0.15
#: The study attributes that keep a relative target once resolved, and the baseline median it was resolved against
#: (see `resolved_target`).
TARGET_ATTR = "target_latency_ms"
TARGET_BASELINE_P50_ATTR = "target_baseline_p50_ms"


@dataclass(frozen=True)
class Baseline:
    """The uncompressed teacher in its fastest fp32 deployment, measured in this run: `latency` is the searched one
    of `timed`'s latencies."""

    artifact: Artifact
    latency: LatencyStats
    timed: Timed
    #: Its score on the validation split (the objective and the figures beside it, such as its perplexity).
    validation: Score
    #: This machine's noise from one measurement to the next (`measurement_noise`), the default safety margin of a
    #: recommendation.
    noise: float
    #: The p50 (ms) of each fp32 deployment the baseline was chosen from, timed together (empty: only one).
    fp32_p50_ms: dict[str, float]


@dataclass(frozen=True)
class Session:
    """A study opened on its storage and a trial pipeline ready to run it: what tune() and work() share."""

    spec: TuneSpec
    run_dir: Path
    storage: str
    study: optuna.Study
    profile: HardwareProfile
    pipeline: TrialPipeline
    baseline: Baseline
    space: Space
    removals: tuple[Removal, ...]
    objective: Callable[[optuna.Trial], list[float]]
    poll_s: float | None

    @property
    def task(self) -> TaskFamily:
        """The run's task family, reached through the pipeline that holds it, so there is one copy."""
        return self.pipeline.ctx.task

    @property
    def target(self) -> Target:
        """The resolved target (a relative one already in ms) and how it is measured."""
        return self.pipeline.ctx.target

    @property
    def margin(self) -> float:
        """The headroom a recommendation keeps under the target: the spec's, else this machine's measured noise
        (capped at MAX_DEFAULT_MARGIN, so that a burst of load while measuring does not rule everything out)."""
        given = self.spec.target.margin
        return given if given is not None else min(MAX_DEFAULT_MARGIN, self.baseline.noise)


def default_storage(run_dir: Path) -> str:
    """A run's own SQLite study, beside its result."""
    return f"sqlite:///{(run_dir / 'study.db').resolve()}"


def resolved_threads(spec: TuneSpec) -> int:
    """The target's threads: the spec's number, or all physical cores for "auto"."""
    return default_threads(probe_cpu()) if spec.target.threads == "auto" else int(spec.target.threads)


def fastest_fp32(task: TaskFamily, timing: Timing, measure: str, out_dir: Path) -> tuple[Artifact, dict[str, float]]:
    """The teacher's fastest fp32 deployment, moved to `out_dir`, and every one's p50 of the searched latency (ms)
    from one interleaved measurement; a family with one deployment is not timed here."""
    with owned_temporary_directory(STAGING, out_dir.parent) as tmp:
        deployments = task.fp32_deployments(tmp)
        p50_ms: dict[str, float] = {}
        if len(deployments) > 1:
            timed = task.time_together(list(deployments.values()), timing)
            p50_ms = {name: t.latencies[measure].p50_ms for name, t in zip(deployments, timed)}
        fastest = min(deployments, key=lambda name: p50_ms.get(name, 0.0))
        shutil.move(deployments[fastest].dir, out_dir)
    return load_artifact(out_dir), p50_ms


def measurement_noise(rounds: list[LatencyStats], percentile: float, paced: bool) -> float:
    """The relative spread (max / min - 1) of the target percentile over measurements of one model; for a target
    judged at the host's pace (`Target.latency_ms_beside`, which divides the pace out by the median), the spread of
    the percentile over the median, the part of the noise the pace leaves."""
    values = [r.percentile_ms(percentile) / (r.p50_ms if paced else 1.0) for r in rounds]
    return max(values) / min(values) - 1


def measure_baseline(task: TaskFamily, timing: Timing, percentile: float, measure: str, out_dir: Path,
                     paced: bool = False) -> Baseline:
    """The teacher's fastest fp32 deployment (`fastest_fp32`) under `out_dir`/baseline, measured: of
    `REMEASURE_ROUNDS` measurements, the one with the median target percentile of the searched latency (`measure`).

    The reference is the fastest fp32 configuration measured, so no slow reference inflates a speedup. A relative
    target is its figure divided by the speedup, so one unlucky measurement on a shared machine would move every
    feasibility decision of the run; the median round keeps a consistent set of percentiles.
    """
    shutil.rmtree(out_dir / "baseline", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifact, fp32_p50_ms = fastest_fp32(task, timing, measure, out_dir / "baseline")
    rounds = sorted((time_artifact(task, timing, artifact) for _ in range(REMEASURE_ROUNDS)),
                    key=lambda timed: timed.latencies[measure].percentile_ms(percentile))
    noise = measurement_noise([r.latencies[measure] for r in rounds], percentile, paced)
    middle = rounds[len(rounds) // 2]
    return Baseline(artifact, middle.latencies[measure], middle, task.score(artifact, "validation", timing), noise,
                    fp32_p50_ms)


def searched_latency(spec: TuneSpec) -> str:
    """The latency the search minimises and bounds: an encoder's forward pass; a causal LM's decode, unless only
    its TTFT has a target."""
    t = spec.target
    if spec.model.task != "causal-lm":
        return "latency"
    return "ttft" if t.decode_ms is None and t.speedup is None else "decode"


def limits_of(spec: TuneSpec, measure: str) -> tuple[Limit, ...]:
    """The targets beside the searched latency: a causal LM's TTFT (when decode is searched) and peak memory."""
    t = spec.target
    limits = [Limit("ttft_ms", t.ttft_ms)] if t.ttft_ms is not None and measure != "ttft" else []
    return tuple(limits + ([Limit("peak_mb", t.peak_mb)] if t.peak_mb is not None else []))


def target_timing(spec: TuneSpec, threads: int) -> Timing:
    """How the target is timed: an encoder at `seq_len`; a causal LM's decode at `context_len`, TTFT on
    `prompt_len`."""
    t = spec.target
    if spec.model.task == "causal-lm":
        return Timing(t.batch_size, t.context_len, threads, t.device, t.prompt_len)
    return Timing(t.batch_size, t.seq_len, threads, t.device)


def resolved_target(study: optuna.Study, spec: TuneSpec, baseline: LatencyStats,
                    progress: SilentProgress) -> tuple[float, float | None]:
    """(the target in ms, the baseline median a relative target was resolved against, else None): absolute from
    the spec, or the baseline's percentile / speedup, resolved once per study.

    A resumed study keeps the target its first run resolved, and the median it was resolved against (the pace the
    selection scales it from, `Target.latency_ms_beside`): its finished trials' constraints were computed against
    it, and a baseline re-measured on a shared machine can differ by tens of percent.
    """
    t = spec.target
    absolute = t.latency_ms or t.decode_ms or (t.ttft_ms if t.speedup is None else None)
    if absolute is not None:
        return absolute, None
    baseline_ms = baseline.percentile_ms(t.percentile)
    stored = study.user_attrs.get(TARGET_ATTR)
    if stored is not None:
        progress.note(f"resumed study: keeping its target of {stored:.2f} ms (this run's baseline / {t.speedup:g} "
                      f"would be {baseline_ms / t.speedup:.2f} ms)")
        return float(stored), float(study.user_attrs.get(TARGET_BASELINE_P50_ATTR, baseline.p50_ms))
    target_ms = baseline_ms / t.speedup
    study.set_user_attr(TARGET_ATTR, target_ms)
    study.set_user_attr(TARGET_BASELINE_P50_ATTR, baseline.p50_ms)
    return target_ms, baseline.p50_ms


def latency_screen(spec: TuneSpec, profile: HardwareProfile, task: TaskFamily, baseline: Baseline) -> Screen | None:
    """The predictor that skips hopeless gates (CPU targets, unless the spec turns it off), seeded with the
    baseline's latency: an encoder's forward pass, or a causal LM's searched decode or TTFT."""
    t = spec.target
    if spec.search.skip_predicted_over is None or t.device != "cpu":
        return None
    measure = searched_latency(spec)
    screen: Screen
    if isinstance(task, CausalLM):
        screen = DecodeScreen(profile, measure, t.percentile, functools.partial(task.decoder_config, prompt_len=t.prompt_len),
                              spec.search.skip_predicted_over)
    else:
        screen = LatencyScreen(profile, Workload(t.batch_size, t.seq_len), t.percentile, task.teacher.config.vocab_size,
                               spec.search.skip_predicted_over)
    screen.observe(task.teacher_shape.as_candidate(32), baseline.latency)
    return screen


@dataclass(frozen=True)
class OpenedStudy:
    """The study on its storage, and the machine's fingerprint it was claimed for."""

    storage: str
    study: optuna.Study
    created: bool
    poll_s: float  # how often a worker with nothing left to start looks again for trials whose worker was lost
    probed: HardwareProfile  # this machine's facts, throughput not yet measured


def open_search(spec: TuneSpec, run_dir: Path, threads: int, *, resume: bool, join: bool, study_name: str | None,
                allow_mixed_hardware: bool) -> OpenedStudy:
    """Open (or join) the study, refusing a reused study without `resume` and other hardware unless allowed."""
    storage = spec.search.storage or default_storage(run_dir)
    heartbeat = Heartbeat(interval_s=spec.search.heartbeat_s, grace_s=3 * spec.search.heartbeat_s)
    backend = open_storage(storage, heartbeat)
    study, created = open_study(study_name or spec.name, backend, spec.search.sampler, spec.search.seed,
                                spec.search.minimize_size, resume or join)
    probed = collect_profile(threads, microbench=False)  # the fingerprint now; throughput after the cheap checks
    claim_hardware(study, probed.fingerprint, allow_mixed_hardware)
    return OpenedStudy(storage, study, created, heartbeat.interval_s, probed)


def start_session(spec: TuneSpec, run_dir: Path, *, resume: bool, join: bool, study_name: str | None,
                  allow_mixed_hardware: bool, progress: SilentProgress, metric: object, baseline_dir: Path,
                  profile: str | os.PathLike[str] | None = None) -> Session:
    """Open the study and get everything a trial needs ready (the module docstring gives the order).

    `join` (a worker): load the study whatever it holds, and leave the anchors to the worker that created it,
    so workers starting together enqueue them once. The baseline is exported under `baseline_dir`. First, the
    temporary files of killed processes are removed (autotune.caches.sweep_litter), never a live one's.
    `profile` (else `$AUTOTUNE_PROFILE`): a profile file, or a folder of them, holding this machine's at the run's
    threads, used instead of measuring the machine again (`profilers.hardware.profile_for`).
    """
    threads = resolved_threads(spec)
    sweep_litter(cache_root(), run_dir)  # what killed runs and workers of this machine left behind
    opened = open_search(spec, run_dir, threads, resume=resume, join=join, study_name=study_name,
                         allow_mixed_hardware=allow_mixed_hardware)
    source = profile or os.environ.get(PROFILE_ENV)
    given = profile_for(source, opened.probed) if source else None  # a wrong one refused before anything slow
    family = family_for(spec.model.task)
    loaded = family.load(spec)
    if given is None:
        progress.note(f"profiling this machine at {threads} threads")
    else:
        progress.note(f"this machine's profile at {threads} threads from {source} (measured {given.created_at})")
    profile = given or with_throughput(opened.probed, quick=True)
    cache = cache_root()
    task = family.prepare(loaded, spec, cache, progress, metric)
    t = spec.target
    timing, measure = target_timing(spec, threads), searched_latency(spec)
    progress.note("measuring the baseline (teacher, fp32)")
    baseline = measure_baseline(task, timing, t.percentile, measure, baseline_dir, paced=t.speedup is not None)
    baseline_ms = baseline.latency.percentile_ms(t.percentile)
    target_ms, resolved_p50_ms = resolved_target(opened.study, spec, baseline.latency, progress)
    target = Target(target_ms, t.percentile, t.batch_size, timing.seq_len, threads, t.runtime, t.device, measure,
                    limits_of(spec, measure), timing.prompt_len, resolved_p50_ms)
    ctx = TrialContext(task=task, target=target, fingerprint=profile.fingerprint, training=spec.training,
                       seed=spec.search.seed, cache_dir=cache, artifacts_dir=run_dir / "artifacts", reference_ms=baseline_ms,
                       recipe=profile.recipe)
    pipeline = TrialPipeline(ctx, screen=latency_screen(spec, profile, task, baseline))
    space, removals = restrict_to_hardware(task.space, profile, t.runtime, t.device)
    for removal in removals:
        progress.note(f"search space: {removal.knob}={removal.value} removed: {removal.reason}")
    if opened.created or not join:
        enqueue_anchors(opened.study, space, anchors(task.anchor_candidates(space), space, spec.search.trials))
    objective = make_objective(space, run_once_per_candidate(pipeline, progress),
                               lambda outcome: target.constraints(outcome.latency_ms, outcome.extras), profile.fingerprint,
                               spec.search.minimize_size, spec.search.trials, on_start=progress.trial_started)
    engines = engines_text(t.runtime, baseline.artifact.engine, profile.recipe.int8_engine if timing.prompt_len is None else None)
    progress.note(f"target: {describe_target(target, engines)}; baseline p{t.percentile:g} {baseline_ms:.2f} ms")
    return Session(spec=spec, run_dir=run_dir, storage=opened.storage, study=opened.study, profile=profile,
                   pipeline=pipeline, baseline=baseline, space=space, removals=removals, objective=objective,
                   poll_s=opened.poll_s)


def describe_target(target: Target, engines: str) -> str:
    """The target in words, e.g. 'p95 decode <= 7.40 ms, ttft_ms <= 450 at batch 1, context 256, prompt 128,
    2 threads (onnxruntime, cpu)', naming the `engines` the run's figures come from."""
    name = "" if target.measure == "latency" else f"{target.measure} "
    limits = "".join(f", {limit.figure} <= {limit.value:g}" for limit in target.limits)
    shape = (f"seq {target.seq_len}" if target.prompt_len is None
             else f"context {target.seq_len}, prompt {target.prompt_len}")
    return (f"p{target.percentile:g} {name}<= {target.latency_ms:.2f} ms{limits} at batch {target.batch_size}, {shape}, "
            f"{target.threads} threads ({engines}, {target.device})")


def run_once_per_candidate(pipeline: TrialPipeline, progress: SilentProgress) -> Callable[[Candidate], TrialOutcome]:
    """The pipeline's run with its progress callbacks; a sampler may propose a candidate twice, and it is
    measured once per run."""
    @functools.cache
    def run_trial(candidate: Candidate) -> TrialOutcome:
        return pipeline.run(candidate, on_step_name=progress.step,
                            on_step=functools.partial(progress.training, "distilling"))

    return run_trial

"""The life of one trial: candidate -> latency gate -> student -> deployable artifact -> measured outcome.

`TrialPipeline.run(candidate)` is called once per Optuna trial (by study.py, which never sees a tensor). Each
step is one call on the run's task family (autotune/tasks), in the style of `mtq.quantize(model, config,
forward_loop)`: a model or an artifact goes in, a model or an artifact comes out.

1. **Screen** (optional). With enough latencies measured on this machine, a candidate whose predicted interval
   lies far above the target ends as `Stage.PREDICTED_SKIP` without being built (autotune/screening.py).
2. **Gate.** `task.stand_in` builds the candidate's shape with random weights; it is exported, quantized to its
   bit width and timed in a child process where nothing else spins. Latency depends on shape and bits, not on
   trained weights, so this costs seconds. Clearly over the target (beyond the measurement noise), the trial
   ends as `Stage.GATE`: no training is spent.
3. **Student.** `task.make_student` initialises it from the teacher; `task.distil` trains it on the teacher's
   cached targets, along the candidate's pruning schedule. The teacher's own dense shape is the teacher.
4. **Deploy.** `task.build`: the deployable artifact at the candidate's precision.
5. **Evaluate.** `task.score` on the validation split, in the target runtime, and the artifact's latencies (the
   deployable file, not the gate's stand-in), its size on disk. The test split is never touched here.

The target is one latency the study minimises (`Target.measure`: an encoder's forward pass, a causal LM's decode)
bounded by `latency_ms`, and optional `limits` on other figures (a causal LM's TTFT, peak memory); a candidate is
feasible when it meets all of them.

Caching wraps a step rather than living inside it (autotune/caches.py): the gate by (shape, bits, runtime,
target shape, threads, hardware fingerprint), valid while the machine runs the baseline at the speed it had;
students by (teacher, data, architecture, sparsity, training settings): bits are applied after training, so one
student serves every bit width ("train once, quantize many"); artifacts by candidate, under the run directory.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from autotune.caches import (
    cached_dir_value, cached_json, key_of, load_verified_dir, owned_temporary_directory, read_json,
)
from autotune.compress import PruningSchedule
from autotune.config import TrainingSpec
from autotune.models import load_saved
from autotune.records import LATENCY_CONSTRAINT, Stage, TrialOutcome, TrialRecord
from autotune.runtime import Artifact, load_artifact
from autotune.screening import Screen
from autotune.tasks import TaskFamily, Timed, Timing
from profilers.latency import LatencyStats, MeasureSettings
from profilers.recipes import PORTABLE, Recipe
from search_spaces import Candidate

#: The gate only has to tell "clearly over the target" from "maybe not": a shorter measurement than the
#: evaluation's, whose wider interval the noise margin absorbs.
GATE_SETTINGS = MeasureSettings(warmup=3, min_runs=20, max_runs=200, max_seconds=1.0, rel_ci=0.03)
EVALUATE_SETTINGS = MeasureSettings(warmup=5, min_runs=40, max_runs=400, max_seconds=3.0)
#: Measurements taken of a latency that decides something (the baseline, a recommendation near its target).
REMEASURE_ROUNDS = 3
#: A cached gate latency is trusted only while the machine runs the baseline within this fraction of the speed
#: it had when the entry was measured: shared machines drift by tens of percent between runs.
GATE_CACHE_DRIFT = 0.10
MIN_NOISE_MARGIN = 0.05
MB = 1024 * 1024
#: The gate's scratch directories in the system's temp root: `<prefix><host>-<pid>-...`, so that the next run
#: removes those of a killed worker (autotune.caches.sweep_litter).
GATE_TMP_PREFIX = "autotune-gate-"
#: The counters a cached model moves: (cache hits, models trained), by kind.
MODEL_COUNTERS = {"student": ("student_cache_hits", "students_trained"), "refined": ("refined_cache_hits", "students_refined")}

#: Callbacks: the step a trial is in ("gate", "training", "evaluating"); training (step, total, loss).
StepName = Callable[[str], None]
Steps = Callable[[int, int, float], None]


@dataclass(frozen=True)
class Limit:
    """A bound on a measured figure other than the searched latency, by its name in `Timed.figures`: a causal LM's
    `ttft_ms` beside a decode target, or `peak_mb`."""

    figure: str
    value: float

    def over(self, figures: dict[str, float], allowance: float = 0.0) -> bool:
        """Whether the figure exceeds the bound by more than `allowance` (a fraction)."""
        return figures[self.figure] > self.value * (1.0 + allowance)

    def describe(self, figures: dict[str, float]) -> str:
        """e.g. 'ttft_ms 512.3 over its 450 limit'."""
        return f"{self.figure} {figures[self.figure]:.1f} over its {self.value:g} limit"


@dataclass(frozen=True)
class Target:
    """The latency constraint and exactly how it is measured: the latency named `measure` (of `Timed.latencies`)
    at `percentile` within `latency_ms`, and every limit met. A relative target (a speedup over the baseline) keeps
    the baseline's median it was resolved against, `baseline_p50_ms`, so that it can move with the host's pace."""

    latency_ms: float
    percentile: float
    batch_size: int
    seq_len: int
    threads: int
    runtime: str
    device: str
    measure: str = "latency"
    limits: tuple[Limit, ...] = ()
    prompt_len: int | None = None
    baseline_p50_ms: float | None = None  # None: an absolute target

    def to_dict(self) -> dict[str, Any]:
        """The JSON form result.json keeps."""
        return asdict(self)

    @property
    def timing(self) -> Timing:
        """How a task family times an artifact for this target."""
        return Timing(self.batch_size, self.seq_len, self.threads, self.device, self.prompt_len)

    def latency(self, timed: Timed) -> LatencyStats:
        """The searched latency of a measurement."""
        return timed.latencies[self.measure]

    def latency_ms_beside(self, baseline: LatencyStats) -> float:
        """The target in the minutes `baseline` was measured in: a relative target scaled by the baseline's median
        then over its median when the target was resolved (a shared host's pace moves by tens of percent between
        minutes, and the user asked for a speedup, not for a figure of one minute); an absolute target is fixed."""
        if self.baseline_p50_ms is None:
            return self.latency_ms
        return self.latency_ms * baseline.p50_ms / self.baseline_p50_ms

    def limits_over(self, figures: dict[str, float]) -> list[str]:
        """Each limit the figures (of `Timed.figures` at the target percentile) exceed, in words (empty: all met)."""
        return [limit.describe(figures) for limit in self.limits if limit.over(figures)]

    def constraints(self, latency_ms: float, figures: dict[str, float]) -> dict[str, float]:
        """Optuna's constraint values (<= 0: met): the latency over its target in ms, each limit's figure over its
        bound as a fraction of it."""
        return {LATENCY_CONSTRAINT: latency_ms - self.latency_ms} | {
            f"{limit.figure}_over_limit": figures[limit.figure] / limit.value - 1.0 if limit.figure in figures else 0.0
            for limit in self.limits}


def pruning_schedule(candidate: Candidate) -> PruningSchedule | None:
    """How a candidate's sparsity is reached during distillation: gradually from dense, then held."""
    if candidate.sparsity == 0:
        return None
    amount = None if candidate.sparsity_pattern == "2:4" else candidate.sparsity
    return PruningSchedule(final_amount=amount, pattern=candidate.sparsity_pattern)


def noise_margin(stats: LatencyStats) -> float:
    """Relative margin within which a latency is indistinguishable from the target: twice the measured
    half-width of the median's confidence interval, and never under 5% (shared machines drift between runs)."""
    return max(MIN_NOISE_MARGIN, 2.0 * stats.median_ci_rel_halfwidth)


def latency_clearly_over(stats: LatencyStats, percentile: float, bound_ms: float) -> bool:
    """Over `bound_ms` beyond the noise: only then may the gate reject without training. The percentile's own
    lower confidence bound must clear the bound by the drift allowance (MIN_NOISE_MARGIN): a short gate
    measurement's p95 is near its sample maximum, so one slow run alone never rejects. Measurements stored
    without bounds fall back to the median's interval."""
    bounds = stats.bounds_ms(percentile)
    if bounds is None:
        return stats.percentile_ms(percentile) > bound_ms * (1.0 + noise_margin(stats))
    return bounds[0] > bound_ms * (1.0 + MIN_NOISE_MARGIN)


def clearly_over(timed: Timed, target: Target) -> bool:
    """The searched latency clearly over the target, or a limit: a latency limit clearly over (as above), a memory
    limit over by more than MIN_NOISE_MARGIN (a stand-in's peak memory is the deployed model's)."""
    if latency_clearly_over(target.latency(timed), target.percentile, target.latency_ms):
        return True
    for limit in target.limits:
        name = limit.figure.removesuffix("_ms")
        if limit.figure.endswith("_ms") and name in timed.latencies:
            if latency_clearly_over(timed.latencies[name], target.percentile, limit.value):
                return True
        elif limit.over(timed.figures(target.percentile), MIN_NOISE_MARGIN):
            return True
    return False


def time_artifact(task: TaskFamily, timing: Timing, artifact: Artifact,
                  settings: MeasureSettings = EVALUATE_SETTINGS) -> Timed:
    """Latencies of an artifact at the target's shape and threads, timed in a fresh child process."""
    return task.time(artifact, timing, settings)


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a run shares: the task family, the target, and where caches and artifacts live."""

    task: TaskFamily
    target: Target
    fingerprint: str
    training: TrainingSpec
    seed: int
    cache_dir: Path
    artifacts_dir: Path
    #: The baseline's latency at the target percentile, measured in this run (gate cache entries carry theirs).
    reference_ms: float
    #: How int8 and int4 are built on this CPU (the profile's recipe).
    recipe: Recipe = PORTABLE
    measure_settings: MeasureSettings = EVALUATE_SETTINGS


@dataclass(frozen=True)
class GateResult:
    """The gate's measurement of a candidate's shape: latencies, and the size its artifact will have."""

    timed: Timed
    size_mb: float


@dataclass
class TrialPipeline:
    """Runs candidates through the steps above; counts cache hits and work done for the result."""

    ctx: TrialContext
    #: Optional latency predictor: skips gates of candidates predicted far over the target, learns from each gate.
    screen: Screen | None = None
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys((
        "gate_cache_hits", "student_cache_hits", "students_trained", "gates_measured", "students_refined",
        "refined_cache_hits", "gates_skipped_by_prediction"), 0))

    def run(self, candidate: Candidate, on_step_name: StepName = lambda name: None,
            on_step: Steps | None = None) -> TrialOutcome:
        """One trial, start to end (the module docstring tells each step)."""
        target = self.ctx.target
        skip = self.screened_out(candidate)
        if skip is not None:
            return skip
        on_step_name("gate")
        start = time.perf_counter()
        gate, gate_hit = self.gate(candidate)
        seconds = {"gate": time.perf_counter() - start}
        latency = target.latency(gate.timed)
        if self.screen is not None:
            self.screen.observe(candidate, latency)
        if clearly_over(gate.timed, target):
            return TrialOutcome(candidate=candidate, stage=Stage.GATE, feasible=False, latency=latency.to_dict(),
                                latency_ms=latency.percentile_ms(target.percentile), size_mb=gate.size_mb,
                                seconds=seconds, gate_cache_hit=gate_hit, extras=gate.timed.figures(target.percentile))
        on_step_name("training")
        start = time.perf_counter()
        model, student_hit = self.student(candidate, on_step)
        seconds["train"] = time.perf_counter() - start
        on_step_name("evaluating")
        return self.deploy_and_measure(candidate, model, Stage.EVALUATED, seconds, gate_cache_hit=gate_hit,
                                       student_cache_hit=student_hit)

    # -- the steps ------------------------------------------------------------------------------------------

    def screened_out(self, candidate: Candidate) -> TrialOutcome | None:
        """The trial's end before its gate when the predictor says it is far over the target; a measured
        latency (even a cached one) always beats a prediction, so only unmeasured shapes are screened."""
        if self.screen is None or read_json(self.gate_path(candidate), self.same_machine_speed) is not None:
            return None
        prediction = self.screen.skip(candidate, self.ctx.target.latency_ms)
        if prediction is None:
            return None
        self.counters["gates_skipped_by_prediction"] += 1
        return TrialOutcome(candidate=candidate, stage=Stage.PREDICTED_SKIP, feasible=False,
                            latency=prediction.to_dict(), latency_ms=prediction.latency_ms,
                            size_mb=self.screen.size_mb(candidate))

    def gate(self, candidate: Candidate) -> tuple[GateResult, bool]:
        """(latency and size of the candidate's stand-in, cache hit)."""
        def measure_stand_in() -> dict[str, Any]:
            task = self.ctx.task
            with owned_temporary_directory(GATE_TMP_PREFIX) as tmp:
                variant = task.build(task.stand_in(candidate), candidate, Path(tmp) / "variant", self.ctx.recipe)
                timed = self.measure(variant, GATE_SETTINGS)
                size_mb = task.deployed_size_bytes(variant) / MB
            self.counters["gates_measured"] += 1
            return {"timed": timed.to_dict(), "size_mb": size_mb, "candidate": candidate.to_dict(),
                    "reference_ms": self.ctx.reference_ms}

        entry, hit = cached_json(self.gate_path(candidate), measure_stand_in, self.same_machine_speed)
        self.counters["gate_cache_hits"] += hit
        return GateResult(Timed.from_dict(entry["timed"]), entry["size_mb"]), hit

    def student(self, candidate: Candidate, on_step: Steps | None = None) -> tuple[nn.Module, bool]:
        """(the candidate's student, made from the teacher and distilled along its pruning schedule, cache hit);
        the teacher's own dense shape is the teacher itself."""
        task, training = self.ctx.task, self.ctx.training
        if task.is_teacher(candidate):
            return task.teacher, True
        return self.cached_model(self.student_key(candidate), "student", lambda: task.distil(
            task.make_student(candidate), candidate, epochs=training.epochs, lr=training.lr, seed=self.ctx.seed,
            pruning=pruning_schedule(candidate), on_step=on_step))

    def refine(self, candidate: Candidate, epochs: int, on_step: Steps | None = None) -> tuple[nn.Module, bool]:
        """(the candidate's student distilled from the start for the search's epochs plus `epochs`, cache hit):
        multi-fidelity.

        The search ranks students after `training.epochs`, which is enough to tell shapes apart but leaves
        accuracy on the table; only the few finalists get the longer schedule, from the teacher's slice with the
        search's seed and learning rate. Continuing a trained student at half the rate instead lowered validation
        accuracy in two demo runs (0.8467 to 0.8430, 0.8448 to 0.8439), where 4 epochs from the start took that
        4x384 student from 0.8448 to 0.8515 (test 0.8411 to 0.8571).
        """
        task, training = self.ctx.task, self.ctx.training
        if task.is_teacher(candidate):
            raise ValueError("the teacher's own dense shape has no student to refine")
        key = key_of("refined", self.student_key(candidate), epochs, "from the start")
        return self.cached_model(key, "refined", lambda: task.distil(
            task.make_student(candidate), candidate, epochs=training.epochs + epochs, lr=training.lr,
            seed=self.ctx.seed, pruning=pruning_schedule(candidate), on_step=on_step))

    def deploy(self, candidate: Candidate, model: nn.Module, name: str | None = None) -> Artifact:
        """The bits-wide artifact of a trained model, under artifacts/<name or candidate key>/ (reused if there)."""
        task = self.ctx.task

        def build(staging: Path) -> Artifact:
            task.build(model, candidate, staging, self.ctx.recipe)
            return load_artifact(staging)

        final = self.ctx.artifacts_dir / (name or candidate.key)
        artifact, hit = cached_dir_value(final, build, load_artifact)
        return artifact if hit else load_artifact(final)

    def recorded_artifact(self, record: TrialRecord) -> str:
        """The artifact a finished trial recorded, once its manifest checks out; a broken one (a resumed run's, after
        a crash or a full disk) is discarded and deployed again from its cached student, under this run."""
        if load_verified_dir(Path(record.artifact), load_artifact) is not None:
            return record.artifact
        candidate = Candidate.from_dict(record.candidate)
        if record.stage == Stage.REFINED:
            model = self.refine(candidate, record.epochs - self.ctx.training.epochs)[0]
        else:
            model = self.student(candidate)[0]
        return str(self.deploy(candidate, model, Path(record.artifact).name).dir)

    def deploy_and_measure(self, candidate: Candidate, model: nn.Module, stage: Stage, seconds: dict[str, float],
                           artifact_name: str | None = None, **cache_hits: bool) -> TrialOutcome:
        """Deploy `model`, then score the artifact on the validation split and time it at the target."""
        target = self.ctx.target
        start = time.perf_counter()
        artifact = self.deploy(candidate, model, artifact_name)
        score = self.ctx.task.score(artifact, "validation", target.timing)
        timed = self.measure(artifact)
        stats = target.latency(timed)
        latency_ms = stats.percentile_ms(target.percentile)
        extras = {name: value for name, value in score.extras.items() if name != "macro_f1"}
        return TrialOutcome(
            candidate=candidate, stage=stage, feasible=latency_ms <= target.latency_ms and not target.limits_over(timed.figures(target.percentile)),
            latency=stats.to_dict(), latency_ms=latency_ms, size_mb=artifact.size_bytes / MB, accuracy=score.objective,
            macro_f1=score.extras.get("macro_f1"), achieved_sparsity=self.ctx.task.achieved_sparsity(model),
            seconds=seconds | {"evaluate": time.perf_counter() - start}, artifact=str(artifact.dir),
            extras=timed.figures(target.percentile) | extras, **cache_hits,
        )

    # -- measurement and caches -----------------------------------------------------------------------------

    def measure(self, artifact: Artifact, settings: MeasureSettings | None = None) -> Timed:
        """Latencies of an artifact at the target, timed in a fresh child process."""
        return time_artifact(self.ctx.task, self.ctx.target.timing, artifact, settings or self.ctx.measure_settings)

    def measure_together(self, artifacts: list[Artifact]) -> list[Timed]:
        """Latencies of several artifacts at the target in the same minutes (the task family alternates them where it
        can): figures whose ratios mean something on a shared host."""
        return self.ctx.task.time_together(artifacts, self.ctx.target.timing)

    def gate_path(self, candidate: Candidate) -> Path:
        """Where the gate's measurement of a shape is cached: keyed by everything its latency depends on (shape, bits,
        stand-in, quantization recipe, runtime, target shape, threads, hardware) and by nothing trained."""
        t, task = self.ctx.target, self.ctx.task
        key = key_of("gate", candidate.shape_key, type(task.teacher).__name__, *task.stand_in_identity,
                     self.ctx.recipe.to_dict(), t.runtime, t.device, t.batch_size, t.seq_len, t.prompt_len, t.threads,
                     self.ctx.fingerprint)
        return self.ctx.cache_dir / "gate" / f"{key}.json"

    def same_machine_speed(self, entry: dict[str, Any]) -> bool:
        """Whether a cached gate entry was measured while the baseline ran as fast as it does now (and holds every
        latency by name: an entry of one latency only, written before causal LMs, is measured again)."""
        cached = entry.get("reference_ms")
        return cached is not None and "timed" in entry and abs(cached / self.ctx.reference_ms - 1.0) <= GATE_CACHE_DRIFT

    def student_key(self, candidate: Candidate) -> str:
        """The cache key of a candidate's trained student: everything its weights depend on (teacher, data,
        architecture, sparsity, training settings, seed) but not bits, so one student serves every bit width."""
        # How finalists are refined afterwards does not change the searched student: left out of its key; so is a
        # state transfer that is off, so students trained before it existed keep their keys.
        training = self.ctx.training
        unchanged = {"finalists", "refine_epochs"} | ({"state_weight"} if training.state_weight == 0 else set())
        return key_of("student", *self.ctx.task.cache_identity, candidate.student_key,
                      training.model_dump(exclude=unchanged), self.ctx.seed)

    def cached_model(self, key: str, kind: str, train: Callable[[], nn.Module]) -> tuple[nn.Module, bool]:
        """(model, cache hit): the safetensors directory cached under `key`, else `train()` saved there. An entry that
        fails its manifest or fails to load is a miss (autotune.caches), so a broken student is trained again."""
        final = self.ctx.cache_dir / "students" / key

        trained: list[nn.Module] = []

        def build(staging: Path) -> nn.Module:
            trained.append(train())
            trained[0].save_pretrained(staging, safe_serialization=True)
            return trained[0]

        def load(path: Path) -> nn.Module:
            return load_saved(type(self.ctx.task.teacher), path)

        def size_hint() -> int:  # what a full disk's message says the student needed
            return sum(t.numel() * t.element_size() for m in trained for t in m.state_dict().values())

        model, hit = cached_dir_value(final, build, load, size_hint)
        self.counters[MODEL_COUNTERS[kind][0 if hit else 1]] += 1
        return model, hit

"""The life of one trial: candidate -> latency gate -> student -> deployable artifact -> measured outcome.

`TrialPipeline.run(candidate)` is called once per Optuna trial (by study.py, which never sees a tensor):

1. **Gate** (`gate`). The candidate's *shape* is built with random weights, exported, quantized to its bit
   width and timed in the target runtime, in a child process where nothing else spins. Latency depends on
   shape and bits, not on trained weights, so this costs seconds. Beyond the target by more than the
   measurement noise, the trial ends here: no training is spent. Gate results are cached by (shape, bits,
   runtime, device, batch, seq_len, threads, hardware fingerprint).
2. **Student** (`student`). Initialised from the teacher (layer selection + importance slicing) and
   distilled on the cached teacher logits; sparsity is applied gradually during distillation and held.
   Trained students are cached by (teacher, data, architecture, sparsity, training settings): bits are
   applied after training, so one student serves every bit width. The teacher's own shape, dense, is the
   teacher itself: nothing to train.
3. **Deploy** (`deploy`). fp32 export once per student, then the fused bits-wide variant per candidate.
4. **Evaluate**. Validation accuracy of the artifact in the target runtime, and its latency re-measured
   (the deployable file, not the gate's stand-in), its size on disk. The test split is never touched here.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx.numpy_helper
from torch import nn

from autotune.caches import key_of, publish_dir, read_json, write_json_atomic
from autotune.compress import PruningSchedule, distill, make_student, measured_sparsity, shaped_like
from autotune.config import TrainingSpec
from autotune.runtime import Artifact, OrtRuntime, derive_artifact, export_artifact, load_artifact
from autotune.tasks import LabeledTexts, evaluate, predict_logits
from autotune.compress.distillation import TokenizedData
from autotune.planning import PREDICTED_SKIP, LatencyScreen, predicted_size_mb
from profilers.predictor import Prediction
from profilers.isolated import OnnxRequest, measure_onnx_isolated
from profilers.latency import LatencyStats, MeasureSettings
from profilers.ort import CPU_PROVIDER, CUDA_PROVIDER
from search_spaces import Candidate, TeacherShape

log = logging.getLogger(__name__)

Metric = Callable[[np.ndarray, np.ndarray], float]
#: The gate only has to tell "clearly over the target" from "maybe not": a shorter measurement than the
#: evaluation's, whose wider interval the noise margin absorbs.
GATE_SETTINGS = MeasureSettings(warmup=3, min_runs=10, max_runs=200, max_seconds=1.0, rel_ci=0.03)
#: A cached gate latency is trusted only while the machine runs the baseline within this fraction of the speed
#: it had when the entry was measured: shared machines drift by tens of percent between runs.
GATE_CACHE_DRIFT = 0.10
#: The gate's stand-in keeps at most this many token embeddings (see `shaped_like`): same latency, and on
#: all-MiniLM-L6-v2 a 2.7-5.7x cheaper export + fusion + quantization than with the full 30,522-row table.
#: A prime, so that no other weight of the stand-in has it as a dimension (see `full_table_size_bytes`).
GATE_VOCAB = 1021
MIN_NOISE_MARGIN = 0.05
#: Refinement continues a trained student at this fraction of the search's learning rate.
REFINE_LR_SCALE = 0.5
MB = 1024 * 1024


@dataclass(frozen=True)
class Target:
    """The latency constraint and exactly how it is measured."""

    latency_ms: float
    percentile: float
    batch_size: int
    seq_len: int
    threads: int
    runtime: str
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def full_table_size_bytes(onnx_path: Path, size_bytes: int, rows: int, full_rows: int) -> int:
    """The size on disk the model at `onnx_path` would have with `full_rows` token embeddings instead of `rows`.

    The rows' bytes are read off the file itself (every initializer with `rows` as its first dimension: the
    table, and its quantized twin after int8), so whatever precision the variant stores them in is counted.
    """
    if full_rows == rows:
        return size_bytes
    model = onnx.load(str(onnx_path), load_external_data=False)
    table_bytes = sum(onnx.numpy_helper.to_array(init).nbytes for init in model.graph.initializer
                      if init.dims and init.dims[0] == rows)
    if table_bytes == 0:
        raise ValueError(f"{onnx_path} has no initializer with {rows} rows; cannot scale its token table")
    return size_bytes + table_bytes * (full_rows - rows) // rows


def pruning_schedule(candidate: Candidate, held: bool = False) -> PruningSchedule | None:
    """How a candidate's sparsity is reached during distillation: gradually from dense, or, for a student
    that already has it (`held`), all at once at the first step, then held (its zeros are the smallest
    weights, so the masks are the ones it was trained with)."""
    if candidate.sparsity == 0:
        return None
    amount = None if candidate.sparsity_pattern == "2:4" else candidate.sparsity
    if held:
        return PruningSchedule(final_amount=amount, pattern=candidate.sparsity_pattern, steps=1, end=0.0)
    return PruningSchedule(final_amount=amount, pattern=candidate.sparsity_pattern)


def noise_margin(stats: LatencyStats) -> float:
    """Relative margin within which a latency is indistinguishable from the target: twice the measured
    half-width of the median's confidence interval, and never under 5% (shared machines drift between runs)."""
    return max(MIN_NOISE_MARGIN, 2.0 * stats.median_ci_rel_halfwidth)


def clearly_over(stats: LatencyStats, target: Target) -> bool:
    """Over the target beyond the noise: only then may the gate reject without training."""
    return stats.percentile_ms(target.percentile) > target.latency_ms * (1.0 + noise_margin(stats))


@dataclass(frozen=True)
class TrialOutcome:
    """Everything one trial measured. `accuracy` is None when the trial never reached evaluation."""

    candidate: Candidate
    stage: str
    feasible: bool
    latency: dict[str, Any]
    latency_ms: float
    size_mb: float
    accuracy: float | None = None
    macro_f1: float | None = None
    achieved_sparsity: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    gate_cache_hit: bool = False
    student_cache_hit: bool | None = None
    artifact: str | None = None

    def figures(self) -> dict[str, Any]:
        """What the result records of an outcome (the candidate goes in as its dict)."""
        return {name: getattr(self, name) for name in (
            "stage", "feasible", "latency", "latency_ms", "size_mb", "accuracy", "macro_f1", "achieved_sparsity",
            "seconds", "gate_cache_hit", "student_cache_hit", "artifact")}


@dataclass
class TrialContext:
    """What every trial of a run shares: the teacher, the data, the target and where caches live."""

    teacher: nn.Module
    tokenizer: Any
    teacher_shape: TeacherShape
    teacher_key: str
    train: TokenizedData
    teacher_logits: np.ndarray
    validation: LabeledTexts
    max_length: int
    target: Target
    fingerprint: str
    training: TrainingSpec
    seed: int
    cache_dir: Path
    artifacts_dir: Path
    measure_settings: MeasureSettings = MeasureSettings(warmup=5, min_runs=20, max_runs=400, max_seconds=3.0)
    metric: Metric | None = None
    reference_ms: float | None = None  # the baseline's latency at the target percentile, measured in this run


Stage = Callable[[str], None]
Steps = Callable[[int, int, float], None]


def _no_stage(name: str) -> None:
    return None


class TrialPipeline:
    """Runs candidates through the stages above; holds the in-process caches of one run."""

    def __init__(self, ctx: TrialContext) -> None:
        self.ctx = ctx
        self.counters = {"gate_cache_hits": 0, "student_cache_hits": 0, "students_trained": 0, "gates_measured": 0,
                         "students_refined": 0, "refined_cache_hits": 0, "gates_skipped_by_prediction": 0}
        #: Optional latency predictor hook (autotune.planning): skips gates of candidates predicted far over the
        #: target and learns from every gate measured. None: every candidate is measured.
        self.screen: LatencyScreen | None = None

    # -- measurement -------------------------------------------------------------------------------------

    def providers(self) -> tuple[str, ...]:
        return (CUDA_PROVIDER, CPU_PROVIDER) if self.ctx.target.device == "cuda" else (CPU_PROVIDER,)

    def measure(self, artifact: Artifact, settings: MeasureSettings | None = None) -> LatencyStats:
        """Latency of an artifact at the target shape and threads, timed in a fresh child process."""
        t = self.ctx.target
        request = OnnxRequest(
            onnx_path=str(artifact.onnx_path), input_names=artifact.input_names, batch_size=t.batch_size,
            seq_len=t.seq_len, vocab_size=artifact.vocab_size, threads=t.threads, providers=self.providers(),
        )
        return measure_onnx_isolated(request, settings or self.ctx.measure_settings)

    # -- 1. gate -----------------------------------------------------------------------------------------

    def gate_key(self, candidate: Candidate) -> str:
        t = self.ctx.target
        return key_of("gate", candidate.shape_key, type(self.ctx.teacher).__name__, self.gate_vocab(),
                      t.runtime, t.device, t.batch_size, t.seq_len, t.threads, self.ctx.fingerprint)

    def gate_vocab(self) -> int:
        return min(int(self.ctx.teacher.config.vocab_size), GATE_VOCAB)

    def gate_path(self, candidate: Candidate) -> Path:
        return self.ctx.cache_dir / "gate" / f"{self.gate_key(candidate)}.json"

    def cached_gate(self, candidate: Candidate) -> tuple[LatencyStats, float] | None:
        """(latency, size in MB) of a gate measured before at this machine's current speed, else None."""
        cached = read_json(self.gate_path(candidate))
        if cached is None or not self.same_machine_speed(cached.get("reference_ms")):
            return None
        return LatencyStats(**cached["latency"]), cached["size_mb"]

    def gate(self, candidate: Candidate) -> tuple[LatencyStats, float, bool]:
        """(latency, size in MB, cache hit) of the candidate's shape with random weights and a small token table;
        the size is scaled back to the full table."""
        cached = self.cached_gate(candidate)
        if cached is not None:
            self.counters["gate_cache_hits"] += 1
            return *cached, True
        path = self.gate_path(candidate)
        model = shaped_like(self.ctx.teacher, candidate.layers, candidate.hidden, candidate.heads, candidate.ffn,
                            vocab_size=self.gate_vocab())
        with tempfile.TemporaryDirectory(prefix="autotune-gate-") as tmp:
            plain = export_artifact(model, self.ctx.tokenizer, Path(tmp) / "fp32")
            variant = derive_artifact(plain, Path(tmp) / "variant", bits=candidate.bits)
            stats = self.measure(variant, GATE_SETTINGS)
            size_mb = full_table_size_bytes(variant.onnx_path, variant.size_bytes, self.gate_vocab(),
                                            int(self.ctx.teacher.config.vocab_size)) / MB
        self.counters["gates_measured"] += 1
        write_json_atomic(path, {"latency": stats.to_dict(), "size_mb": size_mb, "candidate": candidate.to_dict(),
                                 "reference_ms": self.ctx.reference_ms})
        return stats, size_mb, False

    def same_machine_speed(self, cached_reference_ms: float | None) -> bool:
        """Whether a cached gate entry was measured while the baseline ran as fast as it does now."""
        now = self.ctx.reference_ms
        if now is None or cached_reference_ms is None:
            return now is None and cached_reference_ms is None
        return abs(cached_reference_ms / now - 1.0) <= GATE_CACHE_DRIFT

    # -- 2. student --------------------------------------------------------------------------------------

    def is_teacher(self, candidate: Candidate) -> bool:
        s = self.ctx.teacher_shape
        return (candidate.layers, candidate.hidden, candidate.heads, candidate.ffn) == (s.layers, s.hidden, s.heads, s.ffn) \
            and candidate.sparsity == 0.0

    def student_key(self, candidate: Candidate) -> str:
        # How finalists are refined afterwards does not change the searched student: left out of its key.
        return key_of("student", self.ctx.teacher_key, self.ctx.train.fingerprint(), candidate.student_key,
                      self.ctx.training.model_dump(exclude={"finalists", "refine_epochs"}), self.ctx.seed)

    def student(self, candidate: Candidate, on_progress: Steps | None = None) -> tuple[nn.Module, bool]:
        """(trained student, cache hit)."""
        if self.is_teacher(candidate):
            return self.ctx.teacher, True

        def train() -> nn.Module:
            student = make_student(self.ctx.teacher, candidate.layers, candidate.hidden, candidate.heads, candidate.ffn)
            return self.distill(student, self.ctx.training.epochs, self.ctx.training.lr, self.ctx.seed,
                                pruning_schedule(candidate), on_progress)

        return self.cached_model(self.student_key(candidate), train, "student_cache_hits", "students_trained")

    def refine(self, candidate: Candidate, epochs: int, on_progress: Steps | None = None) -> tuple[nn.Module, bool]:
        """(the candidate's student distilled `epochs` more epochs, cache hit): multi-fidelity.

        The search ranks students after `training.epochs`, which is enough to tell shapes apart but leaves
        accuracy on the table; only the few finalists get more. Training continues from the trained student at
        `REFINE_LR_SCALE` of the learning rate (a second, gentler decay), and a sparse student keeps its
        zeros: its masks are taken again at step 0 at its sparsity and held.
        """
        if self.is_teacher(candidate):
            raise ValueError("the teacher's own dense shape has no student to refine")

        def train() -> nn.Module:
            base, _ = self.student(candidate)
            return self.distill(base, epochs, self.ctx.training.lr * REFINE_LR_SCALE, self.ctx.seed + 1,
                                pruning_schedule(candidate, held=True), on_progress)

        return self.cached_model(key_of("refined", self.student_key(candidate), epochs, REFINE_LR_SCALE), train,
                                 "refined_cache_hits", "students_refined")

    def distill(self, student: nn.Module, epochs: int, lr: float, seed: int, schedule: PruningSchedule | None,
                on_progress: Steps | None) -> nn.Module:
        """`student` distilled on the cached teacher logits with the run's training settings."""
        training = self.ctx.training
        return distill(
            student, None, self.ctx.train, epochs=epochs, lr=lr, temperature=training.temperature, alpha=training.alpha,
            batch_size=training.batch_size, seed=seed, teacher_logits=self.ctx.teacher_logits,
            pruning_schedule=schedule, progress=on_progress,
        ).model.eval()

    def cached_model(self, key: str, train: Callable[[], nn.Module], hit_counter: str, miss_counter: str) -> tuple[nn.Module, bool]:
        """(model, cache hit): the safetensors directory cached under `key`, else `train()` saved there."""
        final = self.ctx.cache_dir / "students" / key
        if (final / "config.json").exists():
            self.counters[hit_counter] += 1
            return type(self.ctx.teacher).from_pretrained(final, use_safetensors=True).eval(), True
        model = train()
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".student-", dir=final.parent))
        model.save_pretrained(staging, safe_serialization=True)
        publish_dir(staging, final)
        self.counters[miss_counter] += 1
        return model, False

    # -- 3. deploy ---------------------------------------------------------------------------------------

    def deploy(self, candidate: Candidate, model: nn.Module, name: str | None = None) -> Artifact:
        """The fused bits-wide artifact of a trained model, under artifacts/<name or candidate key>/ (reused if there)."""
        final = self.ctx.artifacts_dir / (name or candidate.key)
        if (final / "artifact.json").exists():
            return load_artifact(final)
        self.ctx.artifacts_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".deploy-", dir=self.ctx.artifacts_dir) as tmp:
            plain = export_artifact(model, self.ctx.tokenizer, Path(tmp) / "fp32")
            derive_artifact(plain, Path(tmp) / "variant", bits=candidate.bits)
            publish_dir(Path(tmp) / "variant", final)
        return load_artifact(final)

    def score(self, artifact: Artifact, data: LabeledTexts) -> tuple[float, float | None]:
        """(objective, macro-F1) of the artifact in the target runtime: accuracy, or the user's metric
        (labels, logits) -> float when one was given (macro-F1 is then not computed)."""
        runtime = OrtRuntime(artifact.onnx_path, threads=self.ctx.target.threads, vocab_size=artifact.vocab_size,
                             device=self.ctx.target.device)
        if self.ctx.metric is None:
            result = evaluate(runtime.run, self.ctx.tokenizer, data, max_length=self.ctx.max_length)
            return result.accuracy, result.macro_f1
        logits = predict_logits(runtime.run, self.ctx.tokenizer, data.texts, max_length=self.ctx.max_length)
        return float(self.ctx.metric(np.asarray(data.labels), logits)), None

    def predicted_skip(self, candidate: Candidate, prediction: Prediction) -> TrialOutcome:
        """A trial ended before its gate: predicted (not measured) far over the target. Latency and size are
        predictions, flagged in `latency` (predicted: True) and by the stage."""
        self.counters["gates_skipped_by_prediction"] += 1
        return TrialOutcome(
            candidate=candidate, stage=PREDICTED_SKIP, feasible=False, latency=prediction.to_dict(),
            latency_ms=prediction.latency_ms, size_mb=predicted_size_mb(candidate, self.ctx.teacher.config.vocab_size),
        )

    # -- the whole trial ---------------------------------------------------------------------------------

    def run(self, candidate: Candidate, on_stage: Stage = _no_stage, on_step: Steps | None = None) -> TrialOutcome:
        target = self.ctx.target
        seconds: dict[str, float] = {}
        # A measured latency (even a cached one) always beats a prediction: only unmeasured shapes can be skipped.
        predictable = self.screen is not None and self.cached_gate(candidate) is None
        skip = self.screen.skip(candidate, target.latency_ms) if predictable else None
        if skip is not None:
            return self.predicted_skip(candidate, skip)
        on_stage("gate")
        start = time.perf_counter()
        gate_stats, gate_size, gate_hit = self.gate(candidate)
        seconds["gate"] = time.perf_counter() - start
        if self.screen is not None:
            self.screen.observe(candidate, gate_stats)
        if clearly_over(gate_stats, target):
            return TrialOutcome(
                candidate=candidate, stage="gate", feasible=False, latency=gate_stats.to_dict(),
                latency_ms=gate_stats.percentile_ms(target.percentile), size_mb=gate_size, seconds=seconds,
                gate_cache_hit=gate_hit,
            )
        on_stage("training")
        start = time.perf_counter()
        model, student_hit = self.student(candidate, on_step)
        seconds["train"] = time.perf_counter() - start
        on_stage("evaluating")
        return self.evaluate(candidate, model, "evaluated", seconds, gate_cache_hit=gate_hit, student_cache_hit=student_hit)

    def evaluate(self, candidate: Candidate, model: nn.Module, stage: str, seconds: dict[str, float],
                 artifact_name: str | None = None, **cache_hits: bool) -> TrialOutcome:
        """Deploy `model`, then score the artifact on the validation split and time it at the target."""
        target = self.ctx.target
        start = time.perf_counter()
        artifact = self.deploy(candidate, model, artifact_name)
        accuracy, f1 = self.score(artifact, self.ctx.validation)
        stats = self.measure(artifact)
        latency_ms = stats.percentile_ms(target.percentile)
        return TrialOutcome(
            candidate=candidate, stage=stage, feasible=latency_ms <= target.latency_ms, latency=stats.to_dict(),
            latency_ms=latency_ms, size_mb=artifact.size_bytes / MB, accuracy=accuracy, macro_f1=f1,
            achieved_sparsity=measured_sparsity(model), seconds=seconds | {"evaluate": time.perf_counter() - start},
            artifact=str(artifact.dir), **cache_hits,
        )

"""A task family: everything that differs between, say, an encoder classifier and a causal LM, behind one
interface, so that the study, the selection, result.json and the report never see which one runs.

The life of a task family in a run, in the order the calls come:

1. `load(spec)` (a classmethod) reads the user's data and the teacher, and builds the search space from the
   teacher's shape. It is cheap and strict: every user mistake surfaces here, before any slow step.
2. `prepare(loaded, spec, cache_dir, progress, metric)` makes the teacher ready (fine-tunes a new head, for a
   classifier) and computes its targets on the training split once (logits; top-k next-token distributions),
   cached on disk. The family instance it returns is the run's: frozen facts plus what trials read.
3. Per trial, `TrialPipeline` calls `stand_in` (the candidate's shape with random weights, for the gate),
   `make_student` and `distil` (the student, initialised from the teacher and trained on its targets),
   `build` (the deployable artifact at the candidate's precision), `time` (its latencies, in a clean child
   process) and `score` (what "accuracy" means, measured on the artifact in the target runtime).

`autotune.tasks.family_for(model.task)` chooses the family class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

from torch import nn

from autotune.runtime import Artifact
from profilers.latency import LatencyStats, MeasureSettings
from profilers.recipes import PORTABLE, Recipe
from search_spaces import Candidate, Space, TeacherShape

if TYPE_CHECKING:
    from autotune.compress import PruningSchedule
    from autotune.config import TuneSpec
    from autotune.progress import SilentProgress

#: Training progress: (step, total steps, loss).
Steps = Callable[[int, int, float], None]


@dataclass(frozen=True)
class Score:
    """A model's quality on one split: `objective` is what the study maximises (accuracy, or the user's metric);
    `extras` are figures reported beside it (macro-F1)."""

    objective: float
    extras: dict[str, float | None]


@dataclass(frozen=True)
class Timing:
    """How an artifact is timed: the batch, sequence length, threads and device of the target. For a causal LM,
    `seq_len` is the context decode is timed at and `prompt_len` the prompt TTFT is timed on."""

    batch_size: int
    seq_len: int
    threads: int
    device: str
    prompt_len: int | None = None


@dataclass(frozen=True)
class Timed:
    """An artifact's measured latencies by name ("latency": one forward pass; "decode" and "ttft" for a causal LM)
    and, where the family measures it, the peak resident memory of the process that ran it."""

    latencies: Mapping[str, LatencyStats]
    peak_mb: float | None = None

    def figures(self, percentile: float) -> dict[str, float]:
        """Each latency at `percentile` as `<name>_ms`, and `peak_mb` where measured: the figures a limit bounds."""
        out = {f"{name}_ms": stats.percentile_ms(percentile) for name, stats in self.latencies.items()}
        return out if self.peak_mb is None else out | {"peak_mb": self.peak_mb}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (gate cache entries)."""
        return {"latencies": {name: stats.to_dict() for name, stats in self.latencies.items()}, "peak_mb": self.peak_mb}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Timed":
        """Inverse of to_dict."""
        return cls({name: LatencyStats(**stats) for name, stats in data["latencies"].items()}, data.get("peak_mb"))


class TaskFamily(ABC):
    """One task family bound to one run's teacher and data (see the module docstring for the order of calls)."""

    #: The `model.task` value that selects this family.
    name: ClassVar[str]
    #: What `score(...).objective` is called in reports when no user metric replaces it.
    metric_name: ClassVar[str]

    @classmethod
    @abstractmethod
    def load(cls, spec: TuneSpec) -> Any:
        """The run's raw inputs (teacher, data, space), read and checked; cheap, and strict about user mistakes."""

    @classmethod
    @abstractmethod
    def prepare(cls, loaded: Any, spec: TuneSpec, cache_dir: Path, progress: SilentProgress,
                metric: Any = None) -> "TaskFamily":
        """The family ready for trials: the teacher made ready and its targets on the training split computed."""

    # -- facts of the run ---------------------------------------------------------------------------------

    @property
    @abstractmethod
    def teacher(self) -> nn.Module:
        """The model being compressed, ready (fine-tuned where its head was new)."""

    @property
    @abstractmethod
    def teacher_fine_tuned(self) -> bool:
        """Whether `prepare` trained the teacher (a new head) before the search, as the result records."""

    @property
    @abstractmethod
    def teacher_shape(self) -> TeacherShape:
        """The teacher's architecture: the upper bound of every architecture knob."""

    @property
    @abstractmethod
    def cache_identity(self) -> tuple[str, ...]:
        """What a trained student depends on besides its own knobs (teacher weights, training data)."""

    @property
    @abstractmethod
    def space(self) -> Space:
        """The search space of the spec, derived from the teacher's shape (before the hardware rules)."""

    @property
    @abstractmethod
    def objective_name(self) -> str:
        """What the objective is called in reports: the task's metric, or the user's metric's name."""

    @abstractmethod
    def anchor_candidates(self, space: Space) -> list[Candidate]:
        """The candidates a new study tries first, most telling first (the study keeps those the space holds, within
        a share of the budget): the simple compressions a random sampler would rarely propose."""

    def is_teacher(self, candidate: Candidate) -> bool:
        """Whether the candidate is the teacher's own shape, dense: nothing to train."""
        s = self.teacher_shape
        return (candidate.layers, candidate.hidden, candidate.heads, candidate.ffn) == (s.layers, s.hidden, s.heads, s.ffn) \
            and candidate.head_dim is None and candidate.sparsity == 0.0

    # -- the steps of a trial -------------------------------------------------------------------------------

    @abstractmethod
    def stand_in(self, candidate: Candidate) -> nn.Module:
        """The candidate's shape with random weights: what the latency gate times (latency depends on shape)."""

    @property
    @abstractmethod
    def stand_in_identity(self) -> tuple[Any, ...]:
        """What a stand-in depends on besides the candidate's shape: part of the gate's cache key."""

    @abstractmethod
    def deployed_size_bytes(self, stand_in: Artifact) -> int:
        """The size on disk the trained candidate will have, read off its stand-in's artifact."""

    @abstractmethod
    def make_student(self, candidate: Candidate) -> nn.Module:
        """The candidate's student, initialised from the teacher (layers and widths kept by importance)."""

    @abstractmethod
    def distil(self, student: nn.Module, candidate: Candidate, *, epochs: int, lr: float, seed: int,
               pruning: PruningSchedule | None, on_step: Steps | None = None) -> nn.Module:
        """`student` (the candidate's) trained on the teacher's targets for `epochs` of its budget, sparsified along
        `pruning` (None: kept dense)."""

    @abstractmethod
    def achieved_sparsity(self, model: nn.Module) -> float:
        """The fraction of zeros a trained model holds in the weights its family sparsifies (0.0 where none are)."""

    @abstractmethod
    def build(self, model: nn.Module, candidate: Candidate, out_dir: Path, recipe: Recipe) -> Artifact:
        """The deployable artifact of a trained `model` in `out_dir`, at the candidate's precision (bits, and a causal
        LM's weight-only scheme), int8/int4 built as this CPU's `recipe` says."""

    def fp32_deployments(self, out_dir: Path) -> dict[str, Artifact]:
        """The teacher's fp32 deployments the baseline is the fastest of, by name, built under `out_dir`: by default
        the one standard export; a family with graph options that only timing can order offers each."""
        return {"fp32": self.build(self.teacher, self.teacher_shape.as_candidate(32), out_dir / "fp32", PORTABLE)}

    @abstractmethod
    def time(self, artifact: Artifact, timing: Timing, settings: MeasureSettings) -> Timed:
        """The artifact's latencies at the target's shape, measured in a fresh child process where nothing else runs."""

    @abstractmethod
    def time_together(self, artifacts: list[Artifact], timing: Timing) -> list[Timed]:
        """Latencies of several artifacts measured in the same minutes, alternating where the family can (ratios
        between them then mean something on a shared host)."""

    def sample_outputs(self, artifacts: Mapping[str, Artifact]) -> dict[str, Any] | None:
        """What the report shows of named artifacts' outputs side by side (a causal LM's generations of one prompt);
        None where a family has nothing to show."""
        return None

    @abstractmethod
    def split_size(self, split: str) -> int:
        """How many examples `split` ("train", "validation", "test") holds; an empty test split is not scored."""

    @abstractmethod
    def score(self, artifact: Artifact, split: str, timing: Timing) -> Score:
        """The artifact's quality on `split` ("validation" or "test"), run in the target runtime."""


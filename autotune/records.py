"""What one trial measured, as values that travel: from the trial pipeline to the study's storage, the
selection after the search, result.json and the report. A leaf module: it knows no tensor and no Optuna.

`TrialOutcome` is what `TrialPipeline.run` returns; `TrialRecord` is one finished trial as the result keeps
it (the outcome's figures plus the trial's number, state, worker and hardware). Both name the step a trial
ended at with one `Stage`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from typing import Any

from search_spaces import Candidate


#: The study's constraint on the searched latency (ms over the target); a limit's is `<figure>_over_limit`.
LATENCY_CONSTRAINT = "latency_ms_over_target"


class Stage(str, Enum):
    """Where a trial ended. A str, so that JSON (result.json, Optuna's user attributes) stores the value."""

    PREDICTED_SKIP = "predicted-skip"  # predicted far over the target: not even gated
    GATE = "gate"  # its shape, timed with random weights, was clearly over the target: no training spent
    EVALUATED = "evaluated"  # trained, deployed, scored and timed
    REFINED = "refined"  # a finalist trained longer after the search, then evaluated again
    FAILED = "failed"  # raised; the error is recorded and the study went on

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TrialOutcome:
    """Everything one trial measured. `accuracy` is None when the trial never reached evaluation."""

    candidate: Candidate
    stage: Stage
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
    #: Figures beside the searched latency and the objective, by name: the other latencies at the target
    #: percentile (a causal LM's `ttft_ms`, `decode_ms`), `peak_mb`, and the score's own (`perplexity`, `agreement`).
    extras: dict[str, float | None] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        """The measured figures by name (the candidate apart): what a trial stores and a record holds."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "candidate"}


@dataclass(frozen=True)
class TrialRecord:
    """One finished trial (or one refinement of a finalist) as result.json and the report read it.

    Figures a trial never reached are None; `accuracy` is None for a gate rejection, whose objective value in
    the study is only a placeholder.
    """

    number: int
    state: str
    candidate: dict[str, Any] | None
    stage: Stage | None
    feasible: bool = False
    accuracy: float | None = None
    macro_f1: float | None = None
    latency_ms: float | None = None
    latency: dict[str, Any] | None = None
    size_mb: float | None = None
    achieved_sparsity: float | None = None
    seconds: dict[str, float] | None = None
    gate_cache_hit: bool | None = None
    student_cache_hit: bool | None = None
    artifact: str | None = None
    hardware_fingerprint: str | None = None
    worker: str | None = None
    error: str | None = None
    epochs: int | None = None
    extras: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def of(cls, number: int, outcome: TrialOutcome, **context: Any) -> "TrialRecord":
        """A record of an outcome measured outside the study (a refinement), with its trial's number."""
        return cls(number=number, state="COMPLETE", candidate=outcome.candidate.to_dict(), **outcome.figures(), **context)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; `epochs` only where a refinement set it, `extras` only where the family measured any."""
        data = asdict(self)
        data["stage"] = None if self.stage is None else self.stage.value
        for name in ("epochs", "extras"):
            if not data[name]:
                del data[name]
        return data

    def with_latency(self, latency_ms: float) -> "TrialRecord":
        """The record with a re-measured latency at the target percentile."""
        return replace(self, latency_ms=latency_ms)


def with_final_latencies(trials: list[dict[str, Any]], passed_over: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials (as result.json records them) with the latency the final measurement found where a candidate was
    re-measured: the search's figure, taken minutes earlier, may have been under the target."""
    final = {p["artifact"]: p["latency_ms"] for p in passed_over if p.get("latency_upper_ms") is not None}
    return [t | {"latency_ms": final[t["artifact"]]} if t.get("artifact") in final else t for t in trials]


def closest_measured(trials: list[dict[str, Any]], count: int = 3) -> list[dict[str, Any]]:
    """The `count` trials (as result.json records them) with the lowest measured latency, predicted skips excluded:
    the nearest misses when nothing met the target, for the selection's reason and the report alike."""
    measured = [t for t in trials if t["latency_ms"] is not None and t["stage"] != Stage.PREDICTED_SKIP]
    return sorted(measured, key=lambda t: t["latency_ms"])[:count]

"""TuneResult: what a run found, as one JSON document (`result.json`) that reports are rendered from alone.

Schema (version 1): name, target (resolved latency_ms and how it is measured), hardware (profile with its
fingerprint), space (knobs searched and values removed for this machine), baseline (the uncompressed model
exported the same way: accuracy {validation, test}, extras {validation, test} (figures scored beside the objective,
such as a causal LM's perplexity), latency_ms {p50, p90, p95, p99, ...}, figures (every latency at the target
percentile as `<name>_ms`, and peak_mb where measured), size_mb), trials [{number, state, candidate, stage,
feasible, accuracy, latency_ms, size_mb, seconds, error, extras, ...}], pareto [trial numbers], recommended
{number, candidate, accuracy {validation, test}, extras, latency_ms, figures, target_ms (the target it was
judged against: a relative one at the teacher's pace beside it), size_mb, speedup, artifact} or null
with `reason`, samples (the teacher's and the recommendation's outputs side by side, where the task family shows
some) or null, plus the study's storage (password redacted) and cache counters.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Any

from autotune.records import Stage, TrialRecord
from autotune.runtime.export import load_artifact
from autotune.study import redact
from autotune.trial import MB
from profilers.latency import LatencyStats
from search_spaces import Candidate

if TYPE_CHECKING:
    from autotune.selection import Choice
    from autotune.session import Session
    from autotune.tasks import Score

RESULT_SCHEMA_VERSION = 1
RESULT_FILE = "result.json"


class ResultError(ValueError):
    """A result.json that cannot be read: missing, corrupt or of another schema version."""


@dataclass(frozen=True)
class TuneResult:
    """A run's result.json as a mapping, with the parts callers read most often named."""

    data: dict[str, Any]

    @property
    def trials(self) -> list[dict[str, Any]]:
        """Every trial measured on this machine as result.json records it, gate rejections and failures included."""
        return self.data["trials"]

    @property
    def pareto(self) -> list[dict[str, Any]]:
        """The Pareto-optimal feasible trials (accuracy up, latency down), as trial records."""
        by_number = {t["number"]: t for t in self.trials}
        return [by_number[n] for n in self.data["pareto"]]

    @property
    def recommended(self) -> dict[str, Any] | None:
        """The recommended configuration with its artifact, or None when nothing met the target (`reason` then says
        why)."""
        return self.data["recommended"]

    @property
    def reason(self) -> str | None:
        """Why nothing was recommended, naming the nearest misses; None when something was."""
        return self.data.get("reason")

    @property
    def run_dir(self) -> Path:
        """Where the run wrote result.json, model/ and the report."""
        return Path(self.data["run_dir"])

    def to_json(self) -> str:
        """result.json's text; NaN is refused because strict JSON readers reject it."""
        return json.dumps(self.data, indent=2, allow_nan=False, default=str)

    def save(self, run_dir: str | os.PathLike[str]) -> Path:
        """Write result.json into `run_dir` through a temporary file renamed into place, so a crash mid-write never
        leaves a truncated result for `load_result`."""
        path = Path(run_dir) / RESULT_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json() + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


def load_result(path: str | os.PathLike[str]) -> TuneResult:
    """Read result.json (or a run directory holding it); every problem is one ResultError sentence."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultError(f"{path} does not exist; run `autotune tune` first.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultError(f"{path} cannot be read as a tune result ({exc}).") from None
    if not isinstance(data, dict) or data.get("schema_version") != RESULT_SCHEMA_VERSION:
        version = data.get("schema_version") if isinstance(data, dict) else None
        raise ResultError(f"{path} has schema_version {version!r}; this autotune reads {RESULT_SCHEMA_VERSION}.")
    return TuneResult(data)


def latency_summary(stats: LatencyStats) -> dict[str, float]:
    """A latency as result.json keeps the baseline's: its percentiles, spread and how it was measured."""
    return {"p50": stats.p50_ms, "p90": stats.p90_ms, "p95": stats.p95_ms, "p99": stats.p99_ms, "mean": stats.mean_ms,
            "stdev": stats.stdev_ms, "runs": stats.runs, "converged": stats.converged}


def recommended_entry(session: Session, choice: Choice, model_dir: Path, test: Score | None) -> dict[str, Any]:
    """The recommendation as result.json keeps it: its artifact copied to `model_dir`; its latency and speedup from
    the confirmation alternating it with the baseline, with the latency's confidence interval, the speedup's
    spread over the repeats, the verdict, and the engine and input shape the deployed file needs."""
    record, confirmation = choice.recommended, choice.confirmation
    bounds = confirmation.measured.bounds_ms(choice.percentile)
    deployed = load_artifact(model_dir)
    return {
        "number": record.number,
        "candidate": record.candidate,
        "description": Candidate.from_dict(record.candidate).describe(),
        "accuracy": {"validation": record.accuracy, "test": None if test is None else test.objective},
        "extras": {"validation": record.extras, "test": None if test is None else test.extras},
        "latency_ms": record.latency_ms,
        "figures": confirmation.figures,
        "latency_interval_ms": None if bounds is None else list(bounds),
        "verdict": choice.verdict,
        "target_ms": choice.target_ms,
        "margin": choice.margin,
        "size_mb": record.size_mb,
        "speedup": choice.speedup,
        "speedup_interval": None if choice.speedup_interval is None else list(choice.speedup_interval),
        "speedup_at_percentile": median(confirmation.tail_speedups),
        "final_measurement": {"interleaved_runs": confirmation.measured.runs, "speedups": list(confirmation.speedups),
                              "reconfirmed_after_twin": choice.reconfirmed,
                              "speedups_at_percentile": list(confirmation.tail_speedups),
                              "baseline": confirmation.baseline.to_dict(), "recommended": confirmation.measured.to_dict()},
        "epochs": record.epochs or session.spec.training.epochs,
        "refined": record.stage == Stage.REFINED,
        "artifact": str(model_dir),
        "engine": deployed.engine,
        "fixed_shape": None if deployed.fixed_shape is None else list(deployed.fixed_shape),
    }


def result_document(session: Session, records: list[TrialRecord], **found: Any) -> dict[str, Any]:
    """result.json's content: the run's facts from `session`, its trials, and what the selection `found`
    (other_hardware_trials, refined, pareto, recommended, reason, passed_over, importances, baseline_test, command,
    samples, seconds)."""
    spec, baseline, storage = session.spec, session.baseline, redact(session.storage)
    test = found["baseline_test"]
    return {
        "schema_version": RESULT_SCHEMA_VERSION,
        "name": spec.name,
        "run_dir": str(session.run_dir),
        "command": found["command"],
        "spec": spec.model_dump(mode="json") | {"search": spec.search.model_dump(mode="json") | {"storage": storage}},
        "target": session.target.to_dict() | {"speedup": spec.target.speedup},
        "hardware": session.profile.to_dict(),
        "recipe": session.pipeline.ctx.recipe.to_dict(),
        "space": {"preset": spec.space.preset, "knobs": session.space.describe(),
                  "removed": [{"knob": r.knob, "value": r.value, "reason": r.reason} for r in session.removals]},
        "baseline": {
            "accuracy": {"validation": baseline.validation.objective, "test": None if test is None else test.objective},
            "extras": {"validation": baseline.validation.extras, "test": None if test is None else test.extras},
            "latency_ms": latency_summary(baseline.latency),
            "figures": baseline.timed.figures(session.target.percentile),
            "size_mb": baseline.artifact.size_bytes / MB,
            "artifact": str(baseline.artifact.dir),
            "fused": baseline.artifact.fused,
            "engine": baseline.artifact.engine,
            "fp32_p50_ms": baseline.fp32_p50_ms,
            "teacher_fine_tuned": session.task.teacher_fine_tuned,
        },
        "study": {"name": session.study.study_name, "storage": storage, "sampler": spec.search.sampler},
        "trials": [r.to_dict() for r in records],
        "other_hardware_trials": [r.to_dict() for r in found["other_hardware_trials"]],
        "refined": [r.to_dict() for r in found["refined"]],
        "pareto": found["pareto"],
        "recommended": found["recommended"],
        "reason": found["reason"],
        "passed_over": found["passed_over"],
        "samples": found["samples"],
        "metric": session.task.objective_name,
        "importances": found["importances"],
        "counters": session.pipeline.counters,
        "seconds": found["seconds"],
    }

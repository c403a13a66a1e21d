"""Latency predictions where autotune needs them: screening candidates during a search, and planning a
finished run's configurations for other machines. The predictor itself lives in profilers/predictor.py.

Predictions never stand in for measurements. In a search they only skip the gate of a candidate predicted far
beyond the target (the whole prediction interval above `skip_factor` x target, once enough latencies were
measured on this machine), and such a trial is recorded as what it is: stage "predicted-skip", its latency
marked predicted. In a plan they are kept in their own report sections, labelled predicted, with intervals.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from profilers.hardware import HardwareProfile
from profilers.latency import LatencyStats
from profilers.predictor import (
    CalibrationPoint,
    ModelShape,
    Prediction,
    PredictionError,
    Predictor,
    Throughput,
    Workload,
    analytic_cost,
)
from search_spaces import Candidate

log = logging.getLogger(__name__)

#: Skip a gate only when the predicted interval's lower bound is above this multiple of the target.
DEFAULT_SKIP_FACTOR = 1.5
#: Latencies measured on this machine before any skip: with fewer, the interval is the uncalibrated one.
MIN_CALIBRATION_POINTS = 5
PREDICTED_SKIP = "predicted-skip"
MB = 1024 * 1024


def model_shape(candidate: Candidate) -> ModelShape:
    return ModelShape(candidate.layers, candidate.hidden, candidate.heads, candidate.ffn, candidate.bits)


def predicted_size_mb(candidate: Candidate, vocab_size: int, max_positions: int = 512) -> float:
    """Size on disk from the shape: encoder weights at their bit width plus fp32 embedding tables."""
    embeddings = (vocab_size + max_positions + 2) * candidate.hidden * 4
    return (analytic_cost(model_shape(candidate), Workload(1, 1)).weight_bytes + embeddings) / MB


class LatencyScreen:
    """Calibrated on the latencies a search measures on this machine; skips gates of hopeless candidates.

    `observe` is called with every latency measured (the baseline, each gate); it refits the predictor
    (milliseconds for tens of points). `skip` answers a Prediction when the candidate should not be measured.
    """

    def __init__(self, profile: HardwareProfile, workload: Workload, percentile: float, skip_factor: float = DEFAULT_SKIP_FACTOR,
                 min_points: int = MIN_CALIBRATION_POINTS) -> None:
        if skip_factor <= 1.0:
            raise ValueError(f"skip_factor must be > 1 (a multiple of the target), got {skip_factor}")
        self.machine = Throughput.of(profile)
        self.workload = workload
        self.percentile = percentile
        self.skip_factor = skip_factor
        self.min_points = min_points
        self.points: dict[str, CalibrationPoint] = {}
        self.predictor = Predictor.uncalibrated(percentile)

    def observe(self, candidate: Candidate, stats: LatencyStats) -> None:
        """A latency measured on this machine; the latest measurement of a shape replaces earlier ones."""
        try:
            shape = model_shape(candidate)
            analytic_cost(shape, self.workload)
        except PredictionError:
            return
        self.points[candidate.shape_key] = CalibrationPoint(shape, self.workload, stats.p50_ms, stats.percentile_ms(self.percentile))
        self.predictor = Predictor.calibrate(self.machine, list(self.points.values()), self.percentile)

    def predict(self, candidate: Candidate) -> Prediction | None:
        try:
            return self.predictor.predict(model_shape(candidate), self.workload, self.machine)
        except PredictionError:
            return None

    def skip(self, candidate: Candidate, target_ms: float) -> Prediction | None:
        """The prediction, when the candidate's whole interval lies beyond skip_factor x target; else None."""
        if len(self.points) < self.min_points or candidate.shape_key in self.points:
            return None
        prediction = self.predict(candidate)
        if prediction is None or prediction.low_ms <= self.skip_factor * target_ms:
            return None
        log.info("gate skipped: %s predicted %.2f ms [%.2f, %.2f] vs target %.2f ms", candidate.describe(),
                 prediction.latency_ms, prediction.low_ms, prediction.high_ms, target_ms)
        return prediction


# -- planning a finished run for other machines -------------------------------------------------------------


def calibration_from_result(result: dict[str, Any]) -> tuple[Throughput, list[CalibrationPoint]]:
    """The run's machine and every latency measured on it (gates and evaluations; predicted skips excluded)."""
    profile = HardwareProfile.from_dict(result["hardware"], source="the run's hardware profile")
    target = result["target"]
    workload = Workload(target["batch_size"], target["seq_len"])
    points = []
    for trial in result["trials"]:
        latency = trial.get("latency")
        if not latency or latency.get("predicted") or trial.get("candidate") is None:
            continue
        shape = model_shape(Candidate.from_dict(trial["candidate"]))
        if shape.bits in (32, 8, 4):
            points.append(CalibrationPoint(shape, workload, latency["p50_ms"], latency[f"p{target['percentile']:g}_ms"]))
    return Throughput.of(profile), points


@dataclass(frozen=True)
class PlannedConfig:
    """One configuration of the run as predicted on another machine; accuracy is the run's measured one."""

    trial: int
    candidate: dict[str, Any]
    accuracy: float | None
    prediction: Prediction | None  # None: bits not modelled on that machine
    target_ms: float

    @property
    def verdict(self) -> str:
        """'meets' (whole interval under target), 'likely' (prediction under, interval crosses), 'misses', 'unknown'."""
        p = self.prediction
        if p is None:
            return "unknown"
        if p.high_ms <= self.target_ms:
            return "meets"
        return "likely" if p.latency_ms <= self.target_ms else "misses"

    @property
    def headroom(self) -> float | None:
        return None if self.prediction is None else 1.0 - self.prediction.latency_ms / self.target_ms


@dataclass(frozen=True)
class MachinePlan:
    source: str
    fingerprint: str
    machine: str
    threads: int
    percentile: float
    target_ms: float
    calibration_points: int
    same_machine: bool
    configs: tuple[PlannedConfig, ...]

    @property
    def recommended(self) -> PlannedConfig | None:
        """The most accurate configuration predicted to meet the target with its whole interval, else the most
        accurate one predicted under it (verdict 'likely': measure there before relying on it)."""
        for verdict in ("meets", "likely"):
            fitting = [c for c in self.configs if c.verdict == verdict and c.accuracy is not None]
            if fitting:
                return max(fitting, key=lambda c: (c.accuracy, -c.prediction.latency_ms))
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "fingerprint": self.fingerprint, "machine": self.machine, "threads": self.threads,
            "percentile": self.percentile, "target_ms": self.target_ms, "calibration_points": self.calibration_points,
            "same_machine": self.same_machine, "predicted": True,
            "recommended_trial": None if self.recommended is None else self.recommended.trial,
            "configs": [{"trial": c.trial, "candidate": c.candidate, "accuracy": c.accuracy, "verdict": c.verdict,
                         "headroom": c.headroom, "prediction": None if c.prediction is None else c.prediction.to_dict()}
                        for c in self.configs],
        }


def planned_trials(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's Pareto configurations and its recommendation (one row per trial)."""
    numbers = set(result.get("pareto") or [])
    if result.get("recommended"):
        numbers.add(result["recommended"]["number"])
    return [t for t in result["trials"] if t["number"] in numbers]


def plan_for(result: dict[str, Any], profile: HardwareProfile, source: str, target_ms: float | None = None) -> MachinePlan:
    """Predicted latency of the run's configurations on `profile`, calibrated on the run's own measurements."""
    run_machine, points = calibration_from_result(result)
    target = result["target"]
    predictor = Predictor.calibrate(run_machine, points, target["percentile"])
    machine = Throughput.of(profile)
    workload = Workload(target["batch_size"], target["seq_len"])
    limit = float(target_ms if target_ms is not None else target["latency_ms"])
    configs = []
    for trial in planned_trials(result):
        candidate = Candidate.from_dict(trial["candidate"])
        try:
            prediction = predictor.predict(model_shape(candidate), workload, machine)
        except PredictionError:
            prediction = None
        configs.append(PlannedConfig(trial["number"], trial["candidate"], trial["accuracy"], prediction, limit))
    return MachinePlan(source, profile.fingerprint, profile.cpu.model_name, profile.threads, target["percentile"], limit,
                       predictor.calibration_points, machine.fingerprint == run_machine.fingerprint, tuple(configs))

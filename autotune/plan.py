"""`autotune plan`: a finished run's configurations predicted on other machines' profiles.

The latency model is calibrated on the latencies the run measured on its own machine, then applied to each
profile. Predictions are kept in their own report sections, labelled predicted, with intervals; they never
stand in for a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autotune.screening import model_shape
from profilers.hardware import HardwareProfile
from profilers.predictor import CalibrationPoint, Prediction, PredictionError, Predictor, Throughput, Workload
from search_spaces import Candidate


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
        """How far under the target the predicted latency lies, as a fraction of the target (negative: over); None when
        the bit width is not modelled."""
        return None if self.prediction is None else 1.0 - self.prediction.latency_ms / self.target_ms


@dataclass(frozen=True)
class MachinePlan:
    """One machine's plan: the run's configurations predicted on its profile, with what the prediction rests on
    (calibration points, whether it is the run's own machine), as `autotune plan` stores it."""

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
        """The JSON form kept under result.json's `plans`, marked predicted and carrying its verdicts, so
        `autotune report` re-renders it without the profiles."""
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
    if result["spec"]["model"].get("task") == "causal-lm":
        raise PredictionError("autotune plan predicts encoder runs only: the latency model has no decode or TTFT yet, "
                              "so a causal LM's configurations are not predicted on other machines; run `autotune tune` "
                              "(or a worker) on each machine instead")
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

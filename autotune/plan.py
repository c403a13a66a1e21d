"""`autotune plan`: a finished run's configurations predicted on other machines' profiles.

The latency model is calibrated on the latencies the run measured on its own machine, then applied to each
profile. Predictions are kept in their own report sections, labelled predicted, with intervals; they never
stand in for a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autotune.screening import model_shape
from profilers.decode_predictor import DecoderConfig, DecoderFit, DecoderPredictor
from profilers.hardware import HardwareProfile
from profilers.predictor import (
    CalibrationPoint, Prediction, PredictionError, Predictor, Throughput, Workload,
)
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
    #: Other latencies predicted beside the searched one (a causal LM's TTFT when decode is searched), by figure
    #: name ("ttft_ms"): predicted ms at the target percentile with its interval.
    others: dict[str, dict[str, float]] = field(default_factory=dict)

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
                         "headroom": c.headroom, "prediction": None if c.prediction is None else c.prediction.to_dict(),
                         "others": c.others} for c in self.configs],
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
        return decoder_plan_for(result, profile, source, target_ms)
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


def decoder_config(trial: dict[str, Any], prompt_len: int) -> DecoderConfig:
    """A causal LM trial as the decode predictor sees it: the bytes its artifact reads per token, blocks, bits."""
    candidate = trial["candidate"]
    return DecoderConfig(trial["size_mb"] * 2**20, candidate["layers"], candidate["bits"], prompt_len)


def decoder_plan_for(result: dict[str, Any], profile: HardwareProfile, source: str,
                     target_ms: float | None = None) -> MachinePlan:
    """A causal LM run's configurations predicted on `profile`: the searched latency (decode, or TTFT) at p50 and
    the target percentile, and the other one at the percentile, each fitted on what the run measured
    (`profilers.decode_predictor`)."""
    target = result["target"]
    searched, other = ("decode", "ttft") if target.get("measure", "decode") == "decode" else ("ttft", "decode")
    measured = [t for t in result["trials"] if all((t.get("extras") or {}).get(f"{name}_ms") for name in (searched, other))
                and t.get("size_mb") and t.get("latency") and not t["latency"].get("predicted")]
    run_machine = Throughput.of(HardwareProfile.from_dict(result["hardware"], source="the run's hardware profile"))
    prompt_len = target.get("prompt_len") or target["seq_len"]
    configs = [decoder_config(t, prompt_len) for t in measured]

    searched_fit = DecoderPredictor.calibrate(run_machine, configs, [t["latency"]["p50_ms"] for t in measured],
                                              [t["extras"][f"{searched}_ms"] for t in measured], searched,
                                              target["percentile"])
    other_tail = DecoderFit.calibrate(run_machine, configs, [t["extras"][f"{other}_ms"] for t in measured], other)
    machine = Throughput.of(profile)
    limit = float(target_ms if target_ms is not None else target["latency_ms"])
    planned = []
    for trial in planned_trials(result):
        config = decoder_config(trial, prompt_len)
        value, other_low, other_high = other_tail.predict(config, machine)
        planned.append(PlannedConfig(trial["number"], trial["candidate"], trial["accuracy"],
                                     searched_fit.predict(config, machine), limit,
                                     {f"{other}_ms": {"latency_ms": value, "low_ms": other_low, "high_ms": other_high}}))
    return MachinePlan(source, profile.fingerprint, profile.cpu.model_name, profile.threads, target["percentile"], limit,
                       len(measured), machine.fingerprint == run_machine.fingerprint, tuple(planned))


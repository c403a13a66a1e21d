"""Screening during a search: a latency predictor skips the gate of a candidate predicted far beyond the target;
an encoder's forward pass by `profilers.predictor`, a causal LM's decode or TTFT by `profilers.decode_predictor`.

Predictions never stand in for measurements. A gate is skipped only when the whole prediction interval lies
above `skip_factor` x target, once enough latencies were measured on this machine, and such a trial is
recorded as what it is: stage "predicted-skip", its latency marked predicted.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Callable, Mapping

from profilers.decode_predictor import MIN_POINTS, DecoderConfig, DecoderPredictor
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
MB = 1024 * 1024


def model_shape(candidate: Candidate) -> ModelShape:
    """A candidate as the predictor's ModelShape: shape and bits are all its cost model reads, since latency does not
    depend on the weights' values."""
    return ModelShape(candidate.layers, candidate.hidden, candidate.heads, candidate.ffn, candidate.bits,
                      None if candidate.head_dim is None else candidate.attention_width)


def predicted_size_mb(candidate: Candidate, vocab_size: int, max_positions: int = 512) -> float:
    """Size on disk from the shape: encoder weights at their bit width plus fp32 embedding tables."""
    embeddings = (vocab_size + max_positions + 2) * candidate.hidden * 4
    return (analytic_cost(model_shape(candidate), Workload(1, 1)).weight_bytes + embeddings) / MB


class Screen(ABC):
    """Calibrated on the latencies a search measures on this machine; skips gates of hopeless candidates.

    `observe` is called with every latency measured (the baseline, each gate) and refits the predictor
    (milliseconds for tens of points). `skip` answers a Prediction when the candidate should not be measured.
    """

    def __init__(self, skip_factor: float, min_points: int) -> None:
        if skip_factor <= 1.0:
            raise ValueError(f"skip_factor must be > 1 (a multiple of the target), got {skip_factor}")
        self.skip_factor = skip_factor
        self.min_points = min_points

    #: The calibration points by shape key: one per distinct shape measured.
    points: Mapping[str, object]

    @abstractmethod
    def observe(self, candidate: Candidate, stats: LatencyStats) -> None:
        """A latency measured on this machine; the latest measurement of a shape replaces earlier ones."""

    @abstractmethod
    def predict(self, candidate: Candidate) -> Prediction | None:
        """The calibrated prediction for `candidate` on this machine, or None when the model cannot make one."""

    @abstractmethod
    def size_mb(self, candidate: Candidate) -> float:
        """The candidate's weights in MB from its shape, for a trial that is never built (a causal LM's: those a
        token reads, its gathered embedding table left out)."""

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


class LatencyScreen(Screen):
    """An encoder's forward pass, predicted by `profilers.predictor` from the candidate's shape and bits."""

    def __init__(self, profile: HardwareProfile, workload: Workload, percentile: float, vocab_size: int,
                 skip_factor: float = DEFAULT_SKIP_FACTOR, min_points: int = MIN_CALIBRATION_POINTS) -> None:
        super().__init__(skip_factor, min_points)
        self.machine = Throughput.of(profile)
        self.workload = workload
        self.percentile = percentile
        self.vocab_size = vocab_size
        self.points: dict[str, CalibrationPoint] = {}
        self.predictor = Predictor.uncalibrated(percentile)

    def observe(self, candidate: Candidate, stats: LatencyStats) -> None:
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

    def size_mb(self, candidate: Candidate) -> float:
        return predicted_size_mb(candidate, self.vocab_size)


class DecodeScreen(Screen):
    """A causal LM's decode (or TTFT), predicted by `profilers.decode_predictor` from the bytes of weights a
    candidate's shape and precision read per token; `config_of` turns a candidate into those bytes and blocks."""

    def __init__(self, profile: HardwareProfile, latency: str, percentile: float,
                 config_of: Callable[[Candidate], DecoderConfig], skip_factor: float = DEFAULT_SKIP_FACTOR,
                 min_points: int = MIN_POINTS) -> None:
        super().__init__(skip_factor, max(min_points, MIN_POINTS))
        self.machine = Throughput.of(profile)
        self.latency = latency
        self.percentile = percentile
        self.config_of = config_of
        self.points: dict[str, tuple[DecoderConfig, float, float]] = {}
        self.predictor: DecoderPredictor | None = None

    def observe(self, candidate: Candidate, stats: LatencyStats) -> None:
        self.points[candidate.shape_key] = (self.config_of(candidate), stats.p50_ms, stats.percentile_ms(self.percentile))
        if len(self.points) >= MIN_POINTS:
            configs, p50s, tails = zip(*self.points.values())
            self.predictor = DecoderPredictor.calibrate(self.machine, configs, p50s, tails, self.latency,
                                                        self.percentile)

    def predict(self, candidate: Candidate) -> Prediction | None:
        return None if self.predictor is None else self.predictor.predict(self.config_of(candidate), self.machine)

    def size_mb(self, candidate: Candidate) -> float:
        return self.config_of(candidate).weight_bytes / MB

"""Decode and TTFT predictor for causal LMs: a configuration's per-token decode and its prefill of a prompt on a
machine, from that machine's HardwareProfile, calibrated on latencies measured on another.

Decode reads every weight once per token and does little arithmetic on it: its cost is the bytes of the weights
(the artifact's size on disk, which is what a token reads) over the profile's memory bandwidth, plus a few
small operators per block and per call, counted in units of the profile's operator overhead. Prefill is the
opposite: it multiplies a prompt's worth of rows by every weight, so its cost is FLOPs (2 x prompt x weights)
over the profile's GEMM chain throughput at the precision the kernels compute in (fp32 for fp32 weights; int8
for int8 and int4 weights, which MatMulNBits computes with int8 activations), plus the same overheads.

Each latency is a non-negative combination of those three components, fitted by least squares on relative error
to the latencies one run measured (its gates and evaluations), so the coefficients read as inverse efficiencies
that transfer to another profile. The interval is the leave-one-out residuals' conformal quantile, widened by
the assumed transfer error on another machine, as in `profilers.predictor`. A prediction is never a measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import nnls

from profilers.predictor import (
    TRANSFER_LOG_HALFWIDTH, UNCALIBRATED_LOG_HALFWIDTH, PredictionError, Throughput,
    conformal_halfwidth, operator_overhead_ms,
)

#: Bytes a weight occupies on disk at each width (int4 and int8 carry a scale per block of 32): how many weights
#: an artifact of a given size holds, for the prefill's FLOPs.
BYTES_PER_WEIGHT = {32: 4.0, 8: 1.0 + 4.0 / 32, 4: 0.5 + 4.0 / 32}
#: Fewer measured latencies than this and the fit is not trusted: three coefficients need more points than that.
MIN_POINTS = 4


@dataclass(frozen=True)
class DecoderConfig:
    """What a causal LM's decode and prefill cost depends on: the bytes of its weights, its blocks, the width its
    linears are quantized to, and the prompt prefilled."""

    weight_bytes: float
    blocks: int
    bits: int
    prompt_len: int


def components(config: DecoderConfig, machine: Throughput, latency: str) -> np.ndarray:
    """The three components of `latency` ("decode" or "ttft") in ms at full efficiency on `machine`: the weights
    read (decode) or the prompt's FLOPs (TTFT), the blocks' and the call's small operators."""
    overhead = operator_overhead_ms(machine)
    if latency == "decode":
        work = config.weight_bytes / (machine.bandwidth_gbps * 1e6)
    elif latency == "ttft":
        flops = 2.0 * config.prompt_len * config.weight_bytes / BYTES_PER_WEIGHT[config.bits]
        work = flops / ((machine.fp32_gflops if config.bits == 32 else machine.int8_gops) * 1e6)
    else:
        raise PredictionError(f"no model for a causal LM's {latency!r} latency; predicted: decode, ttft")
    return np.array([work, config.blocks * overhead, overhead])


def fit_nonnegative(x: np.ndarray, measured_ms: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimising the squared relative error of x @ c against the measurements."""
    return nnls(x / measured_ms[:, None], np.ones(len(measured_ms)))[0]


@dataclass(frozen=True)
class DecoderFit:
    """One latency's fitted coefficients on one calibration machine, and its interval half-width (log units)."""

    latency: str
    coefficients: tuple[float, ...]
    log_halfwidth: float
    n: int
    fingerprint: str

    @classmethod
    def calibrate(cls, machine: Throughput, configs: Sequence[DecoderConfig], measured_ms: Sequence[float],
                  latency: str) -> "DecoderFit":
        """Fit on latencies measured on `machine`; the interval from refits that leave each point out."""
        if len(configs) < MIN_POINTS:
            raise PredictionError(f"{len(configs)} measured {latency} latencies are too few to predict from (at least "
                                  f"{MIN_POINTS}): run more trials")
        x = np.stack([components(c, machine, latency) for c in configs])
        y = np.asarray(measured_ms, dtype=float)
        loo = []
        for i in range(len(y)):
            keep = np.arange(len(y)) != i
            held_out = float(x[i] @ fit_nonnegative(x[keep], y[keep]))
            loo.append(abs(math.log(y[i] / held_out)) if held_out > 0 else UNCALIBRATED_LOG_HALFWIDTH)
        return cls(latency, tuple(float(c) for c in fit_nonnegative(x, y)), conformal_halfwidth(loo), len(y),
                   machine.fingerprint)

    def predict(self, config: DecoderConfig, machine: Throughput) -> tuple[float, float, float]:
        """(predicted ms, low, high) on `machine`: the interval widened by the transfer error on another machine."""
        value = float(components(config, machine, self.latency) @ np.asarray(self.coefficients))
        width = math.hypot(self.log_halfwidth, 0.0 if machine.fingerprint == self.fingerprint else TRANSFER_LOG_HALFWIDTH)
        return value, value * math.exp(-width), value * math.exp(width)

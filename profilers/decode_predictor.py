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
    FP32_BYTES, INTERVAL_LEVEL, TRANSFER_LOG_HALFWIDTH, UNCALIBRATED_LOG_HALFWIDTH, Prediction, PredictionError,
    Throughput,
    conformal_halfwidth, operator_overhead_ms,
)

#: Fewer measured latencies than this and the fit is not trusted: three coefficients need more points than that.
MIN_POINTS = 4
#: The block size the prefill's FLOPs assume when counting an artifact's weights from its bytes (the builder's).
DEFAULT_BLOCK_SIZE = 32


def bytes_per_weight(bits: int, block_size: int) -> float:
    """Bytes one weight occupies at `bits`: an int4 or int8 weight carries its share of an fp32 scale per block."""
    return FP32_BYTES if bits == 32 else bits / 8 + FP32_BYTES / block_size


def offset_matrix_bytes(k: int, n: int, block_size: int) -> float:
    """Bytes of an int4 weight [k, n] with its blocks' offsets kept (`autotune.runtime.offset_grid`): per column, its
    k / block_size blocks and the whole blocks that hold their offsets, each block's codes with a scale and a 4-bit
    zero point."""
    sums = -(-k // block_size)
    blocks = sums + -(-sums // block_size)
    return n * blocks * (block_size / 2 + FP32_BYTES + 0.5)


def sensitive_blocks(blocks: int) -> list[int]:
    """The blocks whose qkv and down projections ONNX Runtime GenAI's `mixed_layers` keeps at int8 in an int4 body
    (llama.cpp's mixed strategy, as the builder's `make_matmul_mixed_precision` spells it): the first and last
    eighth, and every third block between."""
    return [i for i in range(blocks) if i < blocks / 8 or i >= 7 * blocks / 8 or (i - round(blocks / 8)) % 3 == 2]


@dataclass(frozen=True)
class DecoderDims:
    """A causal LM's shape as its weights' bytes see it: blocks, widths of the residual stream, the K/V projections
    and the FFN, and the vocabulary of its LM head."""

    blocks: int
    hidden: int
    kv_width: int
    ffn: int
    vocab: int


def weight_bytes_read(dims: DecoderDims, bits: int, block_size: int, head_bits: int, sensitive_int8: bool,
                      offsets: bool = False, head_int8_rows: int = 0) -> float:
    """The bytes of weights one decoded token reads: every block's linears and the LM head, each at its width (the
    embedding table is only gathered, one row a token). `offsets`: int4 with offsets kept (rtn-offset), whose
    4-bit head keeps `head_int8_rows` rows at int8."""
    h = dims.hidden

    def matrix(k: int, n: int, width: int) -> float:
        if offsets and width == 4:
            return offset_matrix_bytes(k, n, block_size)
        return k * n * bytes_per_weight(width, block_size)

    qkv, out, gate_up, down = (h, h + 2 * dims.kv_width), (h, h), (h, 2 * dims.ffn), (dims.ffn, h)
    body = dims.blocks * sum(matrix(k, n, bits) for k, n in (qkv, out, gate_up, down))
    if sensitive_int8 and bits == 4:
        upgraded = len(sensitive_blocks(dims.blocks)) * (h * (h + 2 * dims.kv_width) + dims.ffn * h)
        body += upgraded * (bytes_per_weight(8, block_size) - bytes_per_weight(4, block_size))
    rows = head_int8_rows if head_bits == 4 else 0
    return body + matrix(h, rows, 8) + matrix(h, dims.vocab - rows, head_bits)


@dataclass(frozen=True)
class DecoderConfig:
    """What a causal LM's decode and prefill cost depends on: the bytes of its weights, its blocks, the width its
    linears are quantized to, and the prompt prefilled."""

    weight_bytes: float  # what a token reads: `weight_bytes_read`, or an artifact's size on disk
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
        flops = 2.0 * config.prompt_len * config.weight_bytes / bytes_per_weight(config.bits, DEFAULT_BLOCK_SIZE)
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


@dataclass(frozen=True)
class DecoderPredictor:
    """One latency (decode or TTFT) at p50 and at the target percentile, each fitted on the same configurations."""

    percentile: float
    p50: DecoderFit
    tail: DecoderFit

    @classmethod
    def calibrate(cls, machine: Throughput, configs: Sequence[DecoderConfig], p50_ms: Sequence[float],
                  tail_ms: Sequence[float], latency: str, percentile: float) -> "DecoderPredictor":
        """Both fits on latencies measured on `machine` (PredictionError with fewer than MIN_POINTS)."""
        return cls(percentile, DecoderFit.calibrate(machine, configs, p50_ms, latency),
                   DecoderFit.calibrate(machine, configs, tail_ms, latency))

    def predict(self, config: DecoderConfig, machine: Throughput) -> Prediction:
        """The prediction on `machine`; the tail is never below p50, which separate fits do not guarantee."""
        p50, p50_low, p50_high = self.p50.predict(config, machine)
        tail, low, high = self.tail.predict(config, machine)
        return Prediction(p50, p50_low, p50_high, self.percentile, max(tail, p50), max(low, p50_low),
                          max(high, p50_high), INTERVAL_LEVEL, self.p50.n, machine.fingerprint == self.p50.fingerprint,
                          machine.fingerprint)

"""Latency predictor: a transformer encoder's shape x bits x workload -> predicted p50 and tail latency on a
machine, from that machine's HardwareProfile, with an interval that says how sure the prediction is.

Two layers, so that a profile of a machine nobody measured a model on still yields a number:

1. **Analytic cost** (`analytic_cost`): FLOPs of every GEMM by precision (fp32, int8 MatMulInteger, int4
   MatMulNBits), the attention matmuls (fp32), activation bytes of the elementwise operators (layernorm,
   softmax, gelu), int8's dynamic quantization bytes, weight bytes, the number of graph nodes and of per-head
   attention blocks, for the fused ONNX graph `autotune` deploys (one Attention, three MatMuls, two
   SkipLayerNormalizations and one BiasGelu per layer; int8 adds a quantize, a scale multiply and casts per
   MatMul). Each becomes a time in ms against the profile's own measurements (`components_ms`): GEMMs against
   the encoder-regime chain throughput at their precision (64 token rows, ORT nodes in a row: a second thread
   buys far less there than on a peak GEMM); weight bytes against memory bandwidth; activation and quantization
   bytes against the elementwise chain (the fused graph's skip-layernorm and gelu on 64 x 384 tensors, which
   live in cache: they move at a small share of copy bandwidth and gain less from a second thread than a copy
   does). Profiles from before those figures fall back to the peak GEMM figures and
   REFERENCE_ELEMENTWISE_SHARE of copy bandwidth. Nodes, per-head attention blocks and the call itself are
   counted in units of the profile's operator overhead (`operator_overhead_ms`): what one small ORT operator
   costs beyond its arithmetic, from the profile's `small_op_us` (a 48-wide MatMul chain's time per node). That
   overhead is dispatch plus handing work to the thread pool and waiting for it, so it changes with the thread
   count and the machine (more threads usually make it larger), and it dominates narrow models. Profiles from
   before that figure count them at REFERENCE_OVERHEAD_MS.
2. **Fitted correction** (`Correction`): predicted ms = sum_k c_k * component_k, one positive coefficient per
   component (an inverse efficiency; for nodes, heads and the call, how many operator overheads each costs).
   Per-head attention blocks cost far more than their FLOPs (each is a few small GEMM calls, so at equal width
   many narrow heads run markedly slower than few wide ones). The coefficients are fitted by least squares on
   log latency, calibrated on latencies measured on one machine, and shrunk toward priors so a handful of points
   cannot produce a wild model. Because every coefficient is relative to the profile's own microbenchmarks, a
   calibration transfers to another profile.

The interval comes from leave-one-out residuals of the calibration (split-conformal style), widened by an
assumed transfer error when predicting for another machine than the calibration's. A prediction is never a
measurement: callers may use it to skip candidates predicted far beyond a target and to order candidates,
not to call anything feasible.

Scope: ONNX Runtime's CPU execution provider, bits 32/8/4 (fp16 on CPU runs through casts and is not modelled).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from typing import Sequence

import numpy as np
from scipy.optimize import least_squares

from profilers.hardware import HardwareProfile, ProfileError
from profilers.microbench import CHAIN_ROWS, SMALL_OP_WIDTH, Microbench, gemm_ops

log = logging.getLogger(__name__)

PREDICTED_BITS = (32, 8, 4)
FP32_BYTES = 4.0
#: MatMulNBits int4: half a byte per weight plus one fp32 scale per block of 32.
INT4_BYTES_PER_WEIGHT = 0.5 + FP32_BYTES / 32
#: Graph nodes per layer and outside the layers of the fused exports autotune writes; a contract test in
#: tests/test_quantization.py counts them in real exports, so an ONNX Runtime that fuses differently fails it.
NODES_PER_LAYER = {32: 7, 8: 20, 4: 7}
NODES_FIXED = {32: 8, 8: 20, 4: 8}
COMPONENTS = ("gemm_fp32", "gemm_int8", "gemm_int4", "attention", "activations", "quantize", "weights", "nodes", "heads",
              "call")
#: Prior coefficients (inverse efficiencies; small operators per node, per attention head and per call): the
#: calibration's starting point and what it shrinks toward, and the whole model where nothing was measured.
#: Set by hand, not fitted, from latencies on one quiet multi-threaded AVX2 machine: GEMMs run at about the chain's
#: throughput, the attention matmuls at a third of it, activations at the elementwise chain's rate, int8's
#: quantization traffic (min/max, quantize, cast, rescale: simpler per byte than layernorm and gelu) at four times
#: it, a node costs about one operator overhead, each head of each layer two, the call five.
PRIOR_COEFFICIENTS = {"gemm_fp32": 1.0, "gemm_int8": 1.0, "gemm_int4": 1.0, "attention": 3.0, "activations": 1.0,
                      "quantize": 0.25, "weights": 1.0, "nodes": 1.0, "heads": 2.0, "call": 5.0}
#: The operator overhead (ms) assumed for profiles measured before `small_op_us` existed: the order of magnitude
#: a small ORT operator costs on a small multi-threaded CPU, the kind of machine the priors were set on.
REFERENCE_OVERHEAD_MS = 0.01
#: The elementwise chain's rate as a share of copy bandwidth, assumed for profiles measured before
#: `elementwise_gbps` existed: roughly the share measured where the priors were set (cache-resident activations
#: move through small operators far slower than a large copy streams).
REFERENCE_ELEMENTWISE_SHARE = 0.15
#: The overhead never counts below this share of the measured small operator: it is a difference of two measured
#: figures, and noise in them must not zero it.
OVERHEAD_FLOOR_SHARE = 0.1
#: How far (in log units) a coefficient may plausibly sit from its prior, vs how noisy a measured log latency is:
#: their ratio sets the shrinkage (a ridge penalty in log-coefficient space).
PRIOR_LOG_SD = 1.0
MEASUREMENT_LOG_SD = 0.05
#: Interval half-width (log units) with no calibration at all: a factor of 2 either way.
UNCALIBRATED_LOG_HALFWIDTH = math.log(2.0)
#: Extra interval half-width (log units) when predicting for another machine than the calibration's: an
#: assumption (+-25%), checked by bench/predictor.py's cross-machine coverage figure.
TRANSFER_LOG_HALFWIDTH = math.log(1.25)
INTERVAL_LEVEL = 0.9


class PredictionError(ValueError):
    """A prediction this model cannot make (a precision or device it does not model, a profile without figures)."""


@dataclass(frozen=True)
class ModelShape:
    """What latency depends on: the encoder's architecture and its bit width (not trained weights)."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    bits: int
    #: The attention's width (Q/K/V outputs) where heads were pruned below hidden; None means hidden.
    attention: int | None = None


@dataclass(frozen=True)
class Workload:
    """How the model is called (batch size, sequence length): latency depends on it as much as on the model, and it
    is kept apart from ModelShape so one shape can be predicted at several workloads."""

    batch_size: int
    seq_len: int


@dataclass(frozen=True)
class Cost:
    """Analytic work of one inference: operations by kind, bytes moved, graph nodes."""

    gemm_fp32_flops: float
    gemm_int8_ops: float
    gemm_int4_flops: float
    attention_flops: float
    activation_bytes: float  # between and around the GEMMs: embeddings, attention, skip-layernorms, gelu
    quantize_bytes: float  # int8 only: dynamic quantization of each GEMM input, rescaling of each int32 output
    weight_bytes: float
    nodes: int
    attention_heads: int  # per-head attention blocks (batch x heads x layers): each a few small GEMM calls


def analytic_cost(shape: ModelShape, workload: Workload) -> Cost:
    """FLOPs, bytes and nodes of one forward pass of the fused graph (BERT encoder + pooler + classifier).

    Per layer: the QKV projection (inside Attention; int8 in QAttention, fp32 under int4, which only rewrites
    the remaining MatMuls), out projection and the two FFN GEMMs; attention scores and context (2*B*S*S*H
    FLOPs each); softmax over B*heads*S*S scores; two skip-layernorms and a gelu. Dynamic int8 quantizes each
    GEMM input (two passes over it) and rescales each int32 output (cast + multiply).
    """
    if shape.bits not in PREDICTED_BITS:
        raise PredictionError(f"bits={shape.bits} is not modelled on CPU (predicted: {', '.join(map(str, PREDICTED_BITS))}); "
                              "fp16 runs through casts there")
    m = float(workload.batch_size * workload.seq_len)
    h, f, layers = float(shape.hidden), float(shape.ffn), shape.layers
    a = float(shape.attention or shape.hidden)
    qkv_w, rest_w = 3 * h * a, a * h + 2 * h * f  # weights per layer: QKV; out projection + FFN
    head_w = h * h  # pooler (the classifier's handful of columns is noise)
    qkv_flops, rest_flops = 2 * m * qkv_w * layers, 2 * m * rest_w * layers
    head_flops = 2 * workload.batch_size * head_w
    scores = float(workload.batch_size * shape.heads * workload.seq_len ** 2)
    per_layer_act = (
        m * 3 * a * 2 + scores * 4 + m * a * 2  # attention: QKV out/in, scores written/softmaxed/read, context
        + m * (a + h) * 2  # out projection, FFN2 inputs and outputs (FFN2 reads m*f, below)
        + m * h * 3 * 2  # two skip-layernorms: two inputs, one output each
        + m * f * 4  # FFN1 output, gelu in/out, FFN2 input
    ) * FP32_BYTES
    quantize_bytes = 0.0
    if shape.bits == 8:
        gemm_inputs = m * (h + a + h + f)  # QKV, out projection, FFN1, FFN2 inputs
        gemm_outputs = m * (3 * a + h + f + h)
        quantize_bytes = layers * (gemm_inputs * (2 * FP32_BYTES + 1) + gemm_outputs * 4 * FP32_BYTES)
    weights = (qkv_w + rest_w) * layers + head_w
    bytes_per_weight = {32: FP32_BYTES, 8: 1.0, 4: INT4_BYTES_PER_WEIGHT}[shape.bits]
    weight_bytes = (qkv_w * layers * FP32_BYTES + (rest_w * layers + head_w) * bytes_per_weight if shape.bits == 4
                    else weights * bytes_per_weight)
    return Cost(
        gemm_fp32_flops={32: qkv_flops + rest_flops + head_flops, 8: 0.0, 4: qkv_flops + head_flops}[shape.bits],
        gemm_int8_ops=qkv_flops + rest_flops + head_flops if shape.bits == 8 else 0.0,
        gemm_int4_flops=rest_flops if shape.bits == 4 else 0.0,
        attention_flops=4 * m * workload.seq_len * a * layers,
        activation_bytes=layers * per_layer_act + m * h * 3 * FP32_BYTES,  # + embeddings
        quantize_bytes=quantize_bytes,
        weight_bytes=weight_bytes,
        nodes=NODES_PER_LAYER[shape.bits] * layers + NODES_FIXED[shape.bits],
        attention_heads=workload.batch_size * shape.heads * layers,
    )


@dataclass(frozen=True)
class Throughput:
    """The figures of a profile the predictor divides by, at the profile's thread count: GEMM throughput per
    precision in the encoder regime (G(FL)OP/s), memory bandwidth and the elementwise chain's rate (GB/s), and one
    small operator's cost (ms)."""

    fp32_gflops: float
    int8_gops: float
    bandwidth_gbps: float
    threads: int
    fingerprint: str
    int4_gflops: float | None = None  # None: int4 GEMMs dequantize to fp32 compute, timed at fp32_gflops
    small_op_ms: float | None = None  # time per node of the SMALL_OP_WIDTH chain; None: REFERENCE_OVERHEAD_MS
    elementwise_gbps: float | None = None  # None: REFERENCE_ELEMENTWISE_SHARE of bandwidth_gbps

    @classmethod
    def of(cls, profile: HardwareProfile) -> "Throughput":
        """The profile's chain, small-operator and elementwise figures where it has them, else (older profiles) its
        peak GEMM figures and the reference small-operator cost and elementwise share."""
        bench: Microbench | None = profile.microbench
        if bench is None or min(bench.fp32_gemm_gflops, bench.int8_gemm_gops, bench.memory_bandwidth_gbps) <= 0:
            raise ProfileError(f"hardware profile {profile.fingerprint} has no measured throughput to predict from; "
                               "re-run `autotune profile -o FILE` on that machine (with its microbenchmarks)")
        return cls(bench.fp32_chain_gflops or bench.fp32_gemm_gflops, bench.int8_chain_gops or bench.int8_gemm_gops,
                   bench.memory_bandwidth_gbps, profile.threads, profile.fingerprint, bench.int4_chain_gflops,
                   bench.small_op_us / 1000.0 if bench.small_op_us else None, bench.elementwise_gbps)


def operator_overhead_ms(machine: Throughput) -> float:
    """What one small operator costs on `machine` beyond its arithmetic: the small-op chain's time per node less
    its FLOPs at the machine's fp32 chain throughput (at least OVERHEAD_FLOOR_SHARE of that time)."""
    if machine.small_op_ms is None:
        return REFERENCE_OVERHEAD_MS
    arithmetic_ms = gemm_ops(CHAIN_ROWS, SMALL_OP_WIDTH, SMALL_OP_WIDTH) / (machine.fp32_gflops * 1e6)
    return max(machine.small_op_ms - arithmetic_ms, OVERHEAD_FLOOR_SHARE * machine.small_op_ms)


def elementwise_gbps(machine: Throughput) -> float:
    """The rate activation bytes move at on `machine`: its elementwise chain's, else a reference share of its copy
    bandwidth."""
    return machine.elementwise_gbps or REFERENCE_ELEMENTWISE_SHARE * machine.bandwidth_gbps


def components_ms(cost: Cost, machine: Throughput) -> np.ndarray:
    """Each component of COMPONENTS as ms at 100% efficiency on `machine` (nodes, heads and the call: as that
    many operator overheads)."""
    per_ms_fp32, per_ms_int8, per_ms_bytes = machine.fp32_gflops * 1e6, machine.int8_gops * 1e6, machine.bandwidth_gbps * 1e6
    per_ms_int4 = (machine.int4_gflops or machine.fp32_gflops) * 1e6
    per_ms_activations = elementwise_gbps(machine) * 1e6
    overhead_ms = operator_overhead_ms(machine)
    return np.array([
        cost.gemm_fp32_flops / per_ms_fp32,
        cost.gemm_int8_ops / per_ms_int8,
        cost.gemm_int4_flops / per_ms_int4,
        cost.attention_flops / per_ms_fp32,
        cost.activation_bytes / per_ms_activations,
        cost.quantize_bytes / per_ms_activations,
        cost.weight_bytes / per_ms_bytes,
        cost.nodes * overhead_ms,
        cost.attention_heads * overhead_ms,
        overhead_ms,
    ])


def _prior_log() -> np.ndarray:
    return np.log([PRIOR_COEFFICIENTS[name] for name in COMPONENTS])


def _fit_log_coefficients(x: np.ndarray, measured_ms: np.ndarray) -> np.ndarray:
    """Log-coefficients minimising squared log error of sum(c * x) vs measured, plus a ridge toward the prior."""
    prior = _prior_log()
    log_measured = np.log(measured_ms)

    def residuals(theta: np.ndarray) -> np.ndarray:
        predicted = x @ np.exp(theta)
        return np.concatenate([(np.log(predicted) - log_measured) / MEASUREMENT_LOG_SD, (theta - prior) / PRIOR_LOG_SD])

    return least_squares(residuals, prior, method="trf").x


def conformal_halfwidth(abs_residuals: Sequence[float], level: float = INTERVAL_LEVEL) -> float:
    """The ceil((n+1) * level)-th smallest absolute residual (split-conformal quantile); with too few residuals
    for that rank, the uncalibrated half-width (never narrower than the largest residual seen)."""
    ordered = sorted(abs_residuals)
    rank = math.ceil((len(ordered) + 1) * level)
    if rank > len(ordered):
        return max([UNCALIBRATED_LOG_HALFWIDTH, *ordered])
    return ordered[rank - 1]


@dataclass(frozen=True)
class Correction:
    """Fitted coefficients of COMPONENTS and the interval half-width (log units) from leave-one-out residuals."""

    coefficients: tuple[float, ...]
    log_halfwidth: float
    n: int

    @classmethod
    def prior(cls) -> "Correction":
        """The hand-set PRIOR_COEFFICIENTS with the uncalibrated interval: what a prediction rests on before any
        latency has been measured, so there is always a (wide) answer."""
        return cls(tuple(PRIOR_COEFFICIENTS[c] for c in COMPONENTS), UNCALIBRATED_LOG_HALFWIDTH, 0)

    @classmethod
    def fit(cls, x: np.ndarray, measured_ms: np.ndarray) -> "Correction":
        """Fit on rows of components_ms vs measured latencies; the interval from refits that leave each point out."""
        n = len(measured_ms)
        if n == 0:
            return cls.prior()
        theta = _fit_log_coefficients(x, measured_ms)
        loo = []
        for i in range(n) if n >= 2 else ():
            keep = np.arange(n) != i
            held_out = x[i] @ np.exp(_fit_log_coefficients(x[keep], measured_ms[keep]))
            loo.append(abs(math.log(measured_ms[i] / held_out)))
        return cls(tuple(float(c) for c in np.exp(theta)), conformal_halfwidth(loo), n)

    def predict_ms(self, x: np.ndarray) -> float:
        """The coefficient-weighted sum of one components_ms row: linear in the components, so each coefficient reads
        as an inverse efficiency of its component."""
        return float(x @ np.asarray(self.coefficients))


@dataclass(frozen=True)
class CalibrationPoint:
    """One latency measured on the calibration machine: a shape at a workload, its p50 and tail percentile."""

    shape: ModelShape
    workload: Workload
    p50_ms: float
    tail_ms: float


@dataclass(frozen=True)
class Prediction:
    """A predicted (never measured) latency: p50 and the target percentile, each with its interval."""

    p50_ms: float
    p50_low_ms: float
    p50_high_ms: float
    percentile: float
    latency_ms: float
    low_ms: float
    high_ms: float
    level: float
    calibration_points: int
    same_machine: bool
    fingerprint: str
    predicted: bool = field(default=True, init=False)

    def to_dict(self) -> dict[str, float | int | bool | str]:
        """Every field, `predicted` included, so a stored prediction can never be mistaken for a measurement."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Predictor:
    """Corrections for p50 and the tail percentile, calibrated on one machine (`fingerprint`; None: priors only)."""

    percentile: float
    p50: Correction
    tail: Correction
    fingerprint: str | None = None

    @classmethod
    def uncalibrated(cls, percentile: float) -> "Predictor":
        """Priors only, tied to no machine: usable before the first latency is measured, with the widest interval."""
        return cls(percentile, Correction.prior(), Correction.prior())

    @classmethod
    def calibrate(cls, machine: Throughput, points: Sequence[CalibrationPoint], percentile: float) -> "Predictor":
        """Fit both corrections on latencies measured on `machine` (the profile they were measured with)."""
        if not points:
            return cls(percentile, Correction.prior(), Correction.prior(), machine.fingerprint)
        x = np.stack([components_ms(analytic_cost(p.shape, p.workload), machine) for p in points])
        p50 = Correction.fit(x, np.array([p.p50_ms for p in points]))
        tail = Correction.fit(x, np.array([p.tail_ms for p in points]))
        log.debug("calibrated on %d points: p50 coefficients %s", len(points), p50.coefficients)
        return cls(percentile, p50, tail, machine.fingerprint)

    @property
    def calibration_points(self) -> int:
        """How many measured latencies the corrections were fitted on (0: priors), shown beside every prediction so
        a reader can judge how far to trust it."""
        return self.p50.n

    def predict(self, shape: ModelShape, workload: Workload, machine: Throughput) -> Prediction:
        """p50 and tail latency of `shape` at `workload` on `machine`, each with an interval; widened by the transfer
        error when `machine` is not the calibration's, and with the tail kept at or above the p50 (two separate
        fits could otherwise cross)."""
        x = components_ms(analytic_cost(shape, workload), machine)
        same = machine.fingerprint == self.fingerprint
        extra = 0.0 if same or self.p50.n == 0 else TRANSFER_LOG_HALFWIDTH

        def bounds(correction: Correction) -> tuple[float, float, float]:
            value = correction.predict_ms(x)
            width = math.hypot(correction.log_halfwidth, extra)
            return value, value * math.exp(-width), value * math.exp(width)

        p50, p50_low, p50_high = bounds(self.p50)
        tail, low, high = bounds(self.tail)
        return Prediction(p50, p50_low, p50_high, self.percentile, max(tail, p50), max(low, p50_low),
                          max(high, p50_high), INTERVAL_LEVEL, self.p50.n, same, machine.fingerprint)

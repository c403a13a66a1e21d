"""How close a model runs to the machine's limit: the operations one inference does (the predictor's analytic
cost of the encoder) over its measured latency, against the profile's peak GEMM rate for the precision its
GEMMs compute in. A 20% figure says the time goes to what surrounds the arithmetic (quantize/rescale chains,
small operators), not to the arithmetic; that is the part a faster engine or mode can win back.
"""

from __future__ import annotations

from dataclasses import dataclass

from profilers.microbench import Microbench
from profilers.predictor import ModelShape, PredictionError, Workload, analytic_cost


@dataclass(frozen=True)
class Roofline:
    """Achieved and peak operations per second (G(FL)OP/s) of one timed model, at the precision of the peak."""

    achieved_gops: float
    peak_gops: float
    precision: str  # "fp32" or "int8": what the model's GEMMs compute in

    @property
    def pct(self) -> float:
        """Achieved as a percentage of the peak."""
        return 100.0 * self.achieved_gops / self.peak_gops


def compute_precision(bits: int, int4_int8_compute: bool) -> str:
    """What a model's GEMMs compute in: int8 weights in int8; int4 weights in int8 when MatMulNBits' accuracy level
    makes it quantize activations, else fp32; fp32 in fp32."""
    if bits == 8 or (bits == 4 and int4_int8_compute):
        return "int8"
    if bits in (32, 4):
        return "fp32"
    raise PredictionError(f"no roofline for {bits}-bit weights on CPU (fp32, int8 and int4 are modelled)")


def roofline(shape: ModelShape, workload: Workload, latency_ms: float, bench: Microbench, *,
             int4_int8_compute: bool = True) -> Roofline:
    """The encoder's operations at `workload` over `latency_ms`, against `bench`'s peak for its compute precision."""
    if latency_ms <= 0:
        raise ValueError(f"latency_ms must be > 0, got {latency_ms}")
    cost = analytic_cost(shape, workload)
    ops = cost.gemm_fp32_flops + cost.gemm_int8_ops + cost.gemm_int4_flops + cost.attention_flops
    precision = compute_precision(shape.bits, int4_int8_compute)
    peak = bench.int8_gemm_gops if precision == "int8" else bench.fp32_gemm_gflops
    if peak <= 0:
        raise PredictionError(f"the profile has no measured {precision} GEMM peak to compare with")
    return Roofline(ops / (latency_ms * 1e6), peak, precision)

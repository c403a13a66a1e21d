"""Measured throughput of this machine: the numbers a latency model of transformer inference is built on.

CPU GEMMs run through ONNX Runtime (the default deployment runtime), so the figures reflect the kernels a
deployed model actually hits: `MatMul` for fp32 and `MatMulInteger` (u8 x s8 -> s32, MLAS, VNNI where the CPU
has it) for int8. Memory bandwidth is a large tensor copy through torch at the same thread count. On a GPU,
fp16/bf16 GEMM and device-memory copy run through torch.cuda. Every figure is timed by the latency harness,
bounded by a time budget, and stored with how it was measured (engine, shape, threads, runs, seconds).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from profilers.benchmethod import BenchMethod
from profilers.gpu import GpuInfo
from profilers.latency import LatencyStats, MeasureSettings, measure, measure_onnx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchPlan:
    """Problem sizes and time budget; `quick` trades precision for a profile in seconds."""

    gemm_size: int
    copy_bytes: int
    seconds_per_figure: float
    gpu_gemm_size: int = 8192
    gpu_copy_bytes: int = 1 << 30

    @classmethod
    def for_mode(cls, quick: bool) -> "BenchPlan":
        if quick:
            return cls(gemm_size=512, copy_bytes=64 << 20, seconds_per_figure=1.0)
        return cls(gemm_size=1024, copy_bytes=256 << 20, seconds_per_figure=6.0)

    def settings(self) -> MeasureSettings:
        return MeasureSettings(warmup=2, min_runs=5, max_runs=500, max_seconds=self.seconds_per_figure, rel_ci=0.01)


@dataclass(frozen=True)
class Microbench:
    threads: int
    fp32_gemm_gflops: float
    int8_gemm_gops: float
    memory_bandwidth_gbps: float
    methods: dict[str, BenchMethod] = field(default_factory=dict)


def gemm_ops(m: int, n: int, k: int) -> float:
    """Multiply-adds count twice: 2*m*n*k operations."""
    return 2.0 * m * n * k


def matmul_model(size: int, integer: bool) -> bytes:
    """A one-node ONNX model A[size,size] x B[size,size] with B as an initializer, as deployed weights are."""
    rng = np.random.default_rng(0)
    if integer:
        weight = numpy_helper.from_array(rng.integers(-128, 128, (size, size), dtype=np.int8), "B")
        a_zero = numpy_helper.from_array(np.array(128, dtype=np.uint8), "a_zero")
        b_zero = numpy_helper.from_array(np.array(0, dtype=np.int8), "b_zero")
        node = helper.make_node("MatMulInteger", ["A", "B", "a_zero", "b_zero"], ["Y"])
        inputs = [helper.make_tensor_value_info("A", TensorProto.UINT8, [size, size])]
        output = helper.make_tensor_value_info("Y", TensorProto.INT32, [size, size])
        initializers = [weight, a_zero, b_zero]
    else:
        weight = numpy_helper.from_array(rng.standard_normal((size, size), dtype=np.float32), "B")
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, [size, size])]
        output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [size, size])
        initializers = [weight]
    graph = helper.make_graph([node], "gemm", inputs, [output], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _method(engine: str, shape: str, dtype: str, threads: int | None, stats: LatencyStats) -> BenchMethod:
    return BenchMethod(engine=engine, shape=shape, dtype=dtype, threads=threads, runs=stats.runs, seconds=round(stats.seconds, 3))


def cpu_gemm(size: int, integer: bool, threads: int, settings: MeasureSettings) -> tuple[float, BenchMethod]:
    """GEMM throughput in G(FL)OP/s through ONNX Runtime at `threads` intra-op threads."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (size, size), dtype=np.uint8) if integer else rng.standard_normal((size, size), dtype=np.float32)
    stats = measure_onnx(matmul_model(size, integer), {"A": a}, threads=threads, settings=settings)
    rate = gemm_ops(size, size, size) / (stats.p50_ms / 1000.0) / 1e9
    engine = "onnxruntime MatMulInteger" if integer else "onnxruntime MatMul"
    return rate, _method(engine, f"{size}x{size}x{size}", "u8s8->s32" if integer else "fp32", threads, stats)


def cpu_copy_bandwidth(nbytes: int, threads: int, settings: MeasureSettings) -> tuple[float, BenchMethod]:
    """Host memory bandwidth in GB/s from a large tensor copy: each copy reads and writes `nbytes`."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    stats = measure(lambda: dst.copy_(src), threads=threads, settings=settings)
    rate = 2.0 * nbytes / (stats.p50_ms / 1000.0) / 1e9
    return rate, _method("torch copy_", f"{nbytes >> 20} MiB", "fp32", threads, stats)


def run_cpu_microbench(threads: int, plan: BenchPlan) -> Microbench:
    settings = plan.settings()
    fp32, fp32_method = cpu_gemm(plan.gemm_size, False, threads, settings)
    int8, int8_method = cpu_gemm(plan.gemm_size, True, threads, settings)
    bandwidth, bw_method = cpu_copy_bandwidth(plan.copy_bytes, threads, settings)
    return Microbench(
        threads=threads,
        fp32_gemm_gflops=round(fp32, 2),
        int8_gemm_gops=round(int8, 2),
        memory_bandwidth_gbps=round(bandwidth, 2),
        methods={"fp32_gemm_gflops": fp32_method, "int8_gemm_gops": int8_method, "memory_bandwidth_gbps": bw_method},
    )


def _cuda_index_by_uuid() -> dict[str, int]:
    """torch device index per NVML uuid: CUDA_VISIBLE_DEVICES can renumber devices relative to NVML."""
    import torch

    mapping = {}
    for index in range(torch.cuda.device_count()):
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", ""))
        mapping[uuid.removeprefix("GPU-")] = index
    return mapping


def _gpu_gemm_tflops(device: str, dtype_name: str, size: int, settings: MeasureSettings) -> tuple[float, BenchMethod]:
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    stats = measure(lambda: torch.matmul(a, b), settings=settings, cuda=True)
    rate = gemm_ops(size, size, size) / (stats.p50_ms / 1000.0) / 1e12
    return rate, _method("torch.matmul (cuda)", f"{size}x{size}x{size}", dtype_name, None, stats)


def _gpu_copy_gbps(device: str, nbytes: int, settings: MeasureSettings) -> tuple[float, BenchMethod]:
    import torch

    src = torch.ones(nbytes // 2, device=device, dtype=torch.float16)
    dst = torch.empty_like(src)
    stats = measure(lambda: dst.copy_(src), settings=settings, cuda=True)
    rate = 2.0 * nbytes / (stats.p50_ms / 1000.0) / 1e9
    return rate, _method("torch copy_ (cuda)", f"{nbytes >> 20} MiB", "fp16", None, stats)


def measure_gpu(gpu: GpuInfo, device: str, plan: BenchPlan) -> GpuInfo:
    """The GPU entry with its fp16/bf16 GEMM TFLOP/s and device bandwidth filled in."""
    settings = plan.settings()
    fp16, fp16_method = _gpu_gemm_tflops(device, "float16", plan.gpu_gemm_size, settings)
    bf16, bf16_method = _gpu_gemm_tflops(device, "bfloat16", plan.gpu_gemm_size, settings)
    bandwidth, bw_method = _gpu_copy_gbps(device, plan.gpu_copy_bytes, settings)
    return replace(
        gpu,
        fp16_gemm_tflops=round(fp16, 2),
        bf16_gemm_tflops=round(bf16, 2),
        memory_bandwidth_gbps=round(bandwidth, 1),
        methods={"fp16_gemm_tflops": fp16_method, "bf16_gemm_tflops": bf16_method, "memory_bandwidth_gbps": bw_method},
    )


def run_gpu_microbench(
    gpus: tuple[GpuInfo, ...], plan: BenchPlan, measure_one: Callable[[GpuInfo, str, BenchPlan], GpuInfo] = measure_gpu
) -> tuple[GpuInfo, ...]:
    """Each GPU that torch can reach gets measured figures; the rest keep None with a logged reason."""
    if not gpus:
        return gpus
    try:
        import torch

        cuda_ready = torch.cuda.is_available()
    except ImportError:
        cuda_ready = False
    if not cuda_ready:
        log.warning("GPU throughput not measured: this torch build has no usable CUDA")
        return gpus
    by_uuid = _cuda_index_by_uuid()
    measured = []
    for gpu in gpus:
        index = by_uuid.get(gpu.uuid.removeprefix("GPU-"), gpu.index)
        try:
            measured.append(measure_one(gpu, f"cuda:{index}", plan))
        except Exception as exc:  # one failing GPU must not lose the others' figures
            log.warning("GPU %d (%s) throughput not measured: %s", gpu.index, gpu.name, exc)
            measured.append(gpu)
    return tuple(measured)

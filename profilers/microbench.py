"""Measured throughput of this machine: the numbers a latency model of transformer inference is built on.

CPU GEMMs run through ONNX Runtime (the default deployment runtime), so the figures reflect the kernels a
deployed model actually hits: `MatMul` for fp32 and `MatMulInteger` (u8 x s8 -> s32, MLAS, VNNI where the CPU
has it) for int8. Memory bandwidth is a large tensor copy through torch at the same thread count. On a GPU,
fp16/bf16 GEMM and device-memory copy run through torch.cuda. Every figure is timed by the latency harness,
bounded by a time budget, and stored with how it was measured (engine, shape, threads, runs, seconds).

Peak GEMM figures alone mispredict encoder inference at batch 1: its GEMMs are 64 token rows against
hidden-sized weights, one ORT node after another, where a second thread buys far less than on a 1024-cube.
So the CPU profile also times that regime directly: a chain of such GEMMs at each precision as autotune
deploys it (fp32 MatMul; int8 as ORT's dynamic quantizer rewrites it, activation quantization included; int4
as MatMulNBits). Narrow models are dominated by what each ORT operator costs beyond its arithmetic (dispatch,
handing work to the thread pool and waiting for it), which shrinks with fewer threads: a 48-wide fp32 chain
times that per-operator cost (`small_op_us`). The activations between GEMMs (skip-layernorm, gelu) are 64 x 384
tensors that live in cache, far from memory bandwidth, and a second thread buys them less than it buys a large
copy: a chain of the fused graph's own SkipLayerNormalization + BiasGelu nodes times them (`elementwise_gbps`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from statistics import geometric_mean
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from profilers.benchmethod import BenchMethod
from profilers.gpu import GpuInfo
from profilers.latency import LatencyStats, MeasureSettings, measure, measure_onnx
from profilers.recipes import PORTABLE, Recipe, int8_chain_bytes, quantize_int4

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MicrobenchSizes:
    """Problem sizes and time budget; `quick` trades precision for a profile in seconds."""

    gemm_size: int
    copy_bytes: int
    seconds_per_figure: float
    gpu_gemm_size: int = 8192
    gpu_copy_bytes: int = 1 << 30

    @classmethod
    def for_mode(cls, quick: bool) -> "MicrobenchSizes":
        """The two plans the CLI offers: `quick` halves the GEMM, quarters the copy and gives each figure a sixth of
        the time, for a profile in seconds when precision matters less than turnaround."""
        if quick:
            return cls(gemm_size=512, copy_bytes=64 << 20, seconds_per_figure=1.0)
        return cls(gemm_size=1024, copy_bytes=256 << 20, seconds_per_figure=6.0)

    def settings(self) -> MeasureSettings:
        """Harness settings for one figure: few warmups and runs, because a throughput call is long and the time
        budget, not a run count, should bound how long a profile takes; a tight CI to stop early when stable."""
        return MeasureSettings(warmup=2, min_runs=5, max_runs=500, max_seconds=self.seconds_per_figure, rel_ci=0.01)


#: The encoder-inference regime the chain figures time: batch 1 x 64 tokens against 384-wide weights (the
#: MiniLM/BERT-small width), `CHAIN_DEPTH` GEMM nodes in a row.
CHAIN_ROWS = 64
CHAIN_WIDTH = 384
CHAIN_DEPTH = 12
CHAIN_BITS = (32, 8, 4)
#: Sessions per chain figure, their geometric mean kept. A session's figure sits in one of two modes more than it
#: varies within them: a fresh session's chain speed is bimodal, at random from one session to the next, and a
#: multi-threaded chain can spend stretches of seconds no faster than one thread. A median of a few such
#: values jumps between modes; the mean of their logs moves by the share of sessions in each, and log latency is
#: what the predictor fits.
CHAIN_SESSIONS = 5
#: The per-operator figure's chain: 64 x 48 x 48 GEMMs (0.3 MFLOP each) are little arithmetic, so the time per
#: node is mostly the operator's fixed cost at this thread count (which a second thread can raise: handing a
#: small operator to the pool costs more than the pool saves it).
SMALL_OP_WIDTH = 48


@dataclass(frozen=True)
class Microbench:
    """Throughput at this thread count. The chain figures are None in profiles written before they were
    measured (schema 1 allows both); the predictor then falls back to the peak figures."""

    threads: int
    fp32_gemm_gflops: float
    int8_gemm_gops: float
    memory_bandwidth_gbps: float
    methods: dict[str, BenchMethod] = field(default_factory=dict)
    fp32_chain_gflops: float | None = None
    int8_chain_gops: float | None = None
    int4_chain_gflops: float | None = None
    small_op_us: float | None = None  # microseconds per node of the SMALL_OP_WIDTH fp32 chain
    elementwise_gbps: float | None = None  # activation traffic of the elementwise chain, GB/s as the predictor counts it


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


def _row_chain(name: str, nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], rows: int, width: int,
               *domains: str) -> onnx.ModelProto:
    """A chain graph from fp32 X[rows, width] to Y[rows, width] (opset 17, plus opset 1 of `domains`)."""
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [rows, width])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, width])], initializer=initializers)
    opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(domain, 1) for domain in domains)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def gemm_chain_model(rows: int = CHAIN_ROWS, width: int = CHAIN_WIDTH, depth: int = CHAIN_DEPTH) -> onnx.ModelProto:
    """fp32 X[rows, width] through `depth` MatMuls with distinct [width, width] weight initializers (distinct, so
    the weights stream from cache or memory as a model's do). Weights scaled 1/sqrt(width) keep values bounded."""
    rng = np.random.default_rng(2)
    names = ["X", *(f"h{i}" for i in range(1, depth)), "Y"]
    weights = [numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"W{i}")
               for i in range(depth)]
    nodes = [helper.make_node("MatMul", [names[i], f"W{i}"], [names[i + 1]]) for i in range(depth)]
    return _row_chain("gemm_chain", nodes, weights, rows, width)


#: Bytes one SkipLayerNormalization + BiasGelu block moves per element of its rows x width input, counted as the
#: predictor counts activation bytes: the skip-layernorm's two inputs and one output, the gelu's input and output,
#: 4 bytes each.
ELEMENTWISE_BYTES_PER_ELEMENT = 5 * 4


def elementwise_chain_model(rows: int = CHAIN_ROWS, width: int = CHAIN_WIDTH, depth: int = CHAIN_DEPTH) -> onnx.ModelProto:
    """fp32 X[rows, width] through `depth` blocks of SkipLayerNormalization (skip: X) + BiasGelu, the contrib
    operators ONNX Runtime's transformer fusion puts between an encoder layer's GEMMs."""
    rng = np.random.default_rng(4)
    initializers = [numpy_helper.from_array(v.astype(np.float32), name) for name, v in
                    (("gamma", np.ones(width)), ("beta", np.zeros(width)), ("bias", rng.standard_normal(width) * 0.1))]
    nodes, current = [], "X"
    for i in range(depth):
        nodes.append(helper.make_node("SkipLayerNormalization", [current, "X", "gamma", "beta", "bias"], [f"n{i}"],
                                      domain="com.microsoft", epsilon=1e-5))
        current = "Y" if i == depth - 1 else f"g{i}"
        nodes.append(helper.make_node("BiasGelu", [f"n{i}", "bias"], [current], domain="com.microsoft"))
    return _row_chain("elementwise_chain", nodes, initializers, rows, width, "com.microsoft")


def quantized_chain(fp32: onnx.ModelProto, bits: int, recipe: Recipe = PORTABLE) -> bytes:
    """The chain at `bits` as autotune deploys that precision on this CPU (`recipe`), through ONNX Runtime's own
    quantizers: int8 dynamic (DynamicQuantizeLinear + MatMulInteger + rescale per GEMM), int4 MatMulNBits."""
    if bits == 32:
        return fp32.SerializeToString()
    if bits == 4:
        return quantize_int4(fp32, recipe).SerializeToString()
    if bits != 8:
        raise ValueError(f"no chain microbenchmark for bits={bits}; measured: {CHAIN_BITS}")
    return int8_chain_bytes(fp32, recipe)


def chain_sessions(model: bytes, width: int, threads: int, settings: MeasureSettings, engine: str,
                   dtype: str, shape: str) -> tuple[float, BenchMethod]:
    """The geometric mean of the p50s (ms) of CHAIN_SESSIONS fresh sessions, each given an equal share of
    `settings.max_seconds`, on a CHAIN_ROWS x `width` input; the method (described as `shape`) counts every
    session's runs and seconds."""
    x = np.random.default_rng(3).standard_normal((CHAIN_ROWS, width)).astype(np.float32)
    share = replace(settings, max_seconds=settings.max_seconds / CHAIN_SESSIONS)
    sessions = [measure_onnx(model, {"X": x}, threads=threads, settings=share) for _ in range(CHAIN_SESSIONS)]
    method = BenchMethod(engine=engine, shape=shape,
                         dtype=dtype, threads=threads, runs=sum(s.runs for s in sessions),
                         seconds=round(sum(s.seconds for s in sessions), 3),
                         statistic=f"geometric mean of {CHAIN_SESSIONS} sessions' medians")
    return geometric_mean([s.p50_ms for s in sessions]), method


def gemm_chain_shape(width: int) -> str:
    """The chain's shape as its BenchMethod records it ("depth x rows x width x width"), built in one place so the
    GEMM and per-operator figures describe their chains alike."""
    return f"{CHAIN_DEPTH} x {CHAIN_ROWS}x{width}x{width}"


def cpu_gemm_chain(bits: int, threads: int, settings: MeasureSettings, recipe: Recipe = PORTABLE) -> tuple[float, BenchMethod]:
    """G(FL)OP/s of the encoder-regime GEMM chain at `bits` (see the module docstring), all nodes' time included."""
    engine = {32: "onnxruntime MatMul chain", 8: "onnxruntime quantize_dynamic chain", 4: "onnxruntime MatMulNBits chain"}[bits]
    dtype = recipe.describe(bits)
    p50_ms, method = chain_sessions(quantized_chain(gemm_chain_model(), bits, recipe), CHAIN_WIDTH, threads, settings, engine, dtype,
                                    gemm_chain_shape(CHAIN_WIDTH))
    return CHAIN_DEPTH * gemm_ops(CHAIN_ROWS, CHAIN_WIDTH, CHAIN_WIDTH) / (p50_ms / 1000.0) / 1e9, method


def cpu_small_op_us(threads: int, settings: MeasureSettings) -> tuple[float, BenchMethod]:
    """Microseconds per node of the SMALL_OP_WIDTH fp32 MatMul chain: one small operator's cost at `threads`."""
    model = gemm_chain_model(width=SMALL_OP_WIDTH).SerializeToString()
    p50_ms, method = chain_sessions(model, SMALL_OP_WIDTH, threads, settings, "onnxruntime MatMul chain (per node)", "fp32",
                                    gemm_chain_shape(SMALL_OP_WIDTH))
    return p50_ms * 1000.0 / CHAIN_DEPTH, method


def cpu_elementwise_gbps(threads: int, settings: MeasureSettings) -> tuple[float, BenchMethod]:
    """GB/s of activation traffic (ELEMENTWISE_BYTES_PER_ELEMENT) through the elementwise chain at `threads`."""
    model = elementwise_chain_model().SerializeToString()
    p50_ms, method = chain_sessions(model, CHAIN_WIDTH, threads, settings, "onnxruntime SkipLayerNormalization + BiasGelu chain",
                                    "fp32", f"{CHAIN_DEPTH} x {CHAIN_ROWS}x{CHAIN_WIDTH}")
    moved = CHAIN_DEPTH * CHAIN_ROWS * CHAIN_WIDTH * ELEMENTWISE_BYTES_PER_ELEMENT
    return moved / (p50_ms / 1000.0) / 1e9, method


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


def run_cpu_microbench(threads: int, sizes: MicrobenchSizes, recipe: Recipe = PORTABLE) -> Microbench:
    """One round of every CPU figure at `threads`: the peak GEMMs and copy bandwidth, plus the encoder-regime chains,
    per-operator cost and elementwise rate that the predictor prefers, because peak figures alone mispredict
    batch-1 encoders (see the module docstring)."""
    settings = sizes.settings()
    fp32, fp32_method = cpu_gemm(sizes.gemm_size, False, threads, settings)
    int8, int8_method = cpu_gemm(sizes.gemm_size, True, threads, settings)
    bandwidth, bw_method = cpu_copy_bandwidth(sizes.copy_bytes, threads, settings)
    chains = {bits: cpu_gemm_chain(bits, threads, settings, recipe) for bits in CHAIN_BITS}
    small_op, small_op_method = cpu_small_op_us(threads, settings)
    elementwise, elementwise_method = cpu_elementwise_gbps(threads, settings)
    return Microbench(
        threads=threads,
        fp32_gemm_gflops=round(fp32, 2),
        int8_gemm_gops=round(int8, 2),
        memory_bandwidth_gbps=round(bandwidth, 2),
        methods={"fp32_gemm_gflops": fp32_method, "int8_gemm_gops": int8_method, "memory_bandwidth_gbps": bw_method,
                 "fp32_chain_gflops": chains[32][1], "int8_chain_gops": chains[8][1], "int4_chain_gflops": chains[4][1],
                 "small_op_us": small_op_method, "elementwise_gbps": elementwise_method},
        fp32_chain_gflops=round(chains[32][0], 2),
        int8_chain_gops=round(chains[8][0], 2),
        int4_chain_gflops=round(chains[4][0], 2),
        small_op_us=round(small_op, 2),
        elementwise_gbps=round(elementwise, 3),
    )


#: The measured figures of a Microbench (every field but its thread count and methods).
FIGURES = tuple(f.name for f in fields(Microbench) if f.name not in ("threads", "methods"))


def merge_rounds(rounds: Sequence[Microbench]) -> Microbench:
    """Several rounds at one thread count as one Microbench: each figure the geometric mean of its rounds, each
    method with every round's runs and seconds and the value each round measured. A figure some round lacks (an
    optional one) is None. One round is returned as it is.

    Not the median: on a shared host a round lands in a fast or a slow minute (see CHAIN_SESSIONS), and the
    latencies a profile must predict were measured through both. The geometric mean weighs both kinds of minute by
    how often they came, where a median of a few rounds picks one; bench/predictor.py's rescoring of saved rounds
    compares the two."""
    if not rounds or len({r.threads for r in rounds}) != 1:
        raise ValueError("merge_rounds needs one or more rounds, all at the same thread count")
    if len(rounds) == 1:
        return rounds[0]
    values: dict[str, float | None] = {}
    methods: dict[str, BenchMethod] = {}
    for name in FIGURES:
        measured = [getattr(r, name) for r in rounds]
        if any(v is None for v in measured):
            values[name] = None
            continue
        values[name] = round(geometric_mean(measured), 2)
        first = rounds[0].methods.get(name)
        if first is not None:
            methods[name] = replace(first, runs=sum(r.methods[name].runs for r in rounds),
                                    seconds=round(sum(r.methods[name].seconds for r in rounds), 3),
                                    statistic=f"geometric mean of {len(rounds)} rounds", round_values=tuple(measured))
    return Microbench(threads=rounds[0].threads, methods=methods, **values)  # type: ignore[arg-type]


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


def measure_gpu(gpu: GpuInfo, device: str, sizes: MicrobenchSizes) -> GpuInfo:
    """The GPU entry with its fp16/bf16 GEMM TFLOP/s and device bandwidth filled in."""
    settings = sizes.settings()
    fp16, fp16_method = _gpu_gemm_tflops(device, "float16", sizes.gpu_gemm_size, settings)
    bf16, bf16_method = _gpu_gemm_tflops(device, "bfloat16", sizes.gpu_gemm_size, settings)
    bandwidth, bw_method = _gpu_copy_gbps(device, sizes.gpu_copy_bytes, settings)
    return replace(
        gpu,
        fp16_gemm_tflops=round(fp16, 2),
        bf16_gemm_tflops=round(bf16, 2),
        memory_bandwidth_gbps=round(bandwidth, 1),
        methods={"fp16_gemm_tflops": fp16_method, "bf16_gemm_tflops": bf16_method, "memory_bandwidth_gbps": bw_method},
    )


def run_gpu_microbench(
    gpus: tuple[GpuInfo, ...], sizes: MicrobenchSizes, measure_one: Callable[[GpuInfo, str, MicrobenchSizes], GpuInfo] = measure_gpu
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
            measured.append(measure_one(gpu, f"cuda:{index}", sizes))
        except Exception as exc:  # one failing GPU must not lose the others' figures
            log.warning("GPU %d (%s) throughput not measured: %s", gpu.index, gpu.name, exc)
            measured.append(gpu)
    return tuple(measured)

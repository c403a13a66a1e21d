"""Terminal rendering (rich) of the values the CLI prints. Pure: value in, renderable out."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table

from profilers.hardware import HardwareProfile
from profilers.microbench import Microbench

GIB = 1024**3


def _bytes(value: int | None) -> str:
    if value is None:
        return "unknown"
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


def _section(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def _microbench_rows(bench: Microbench) -> list[tuple[str, str]]:
    """Each CPU figure with its unit and how it was measured; figures an older profile lacks are left out."""
    rows = []
    for name, value, unit in (
        ("fp32_gemm_gflops", bench.fp32_gemm_gflops, "GFLOP/s"),
        ("int8_gemm_gops", bench.int8_gemm_gops, "GOP/s"),
        ("memory_bandwidth_gbps", bench.memory_bandwidth_gbps, "GB/s"),
        ("fp32_chain_gflops", bench.fp32_chain_gflops, "GFLOP/s"),
        ("int8_chain_gops", bench.int8_chain_gops, "GOP/s"),
        ("int4_chain_gflops", bench.int4_chain_gflops, "GFLOP/s"),
        ("small_op_us", bench.small_op_us, "us per node"),
        ("elementwise_gbps", bench.elementwise_gbps, "GB/s of activations"),
    ):
        if value is None:  # a profile written before the encoder-regime figures existed
            continue
        method = bench.methods.get(name)
        how = f"  ({method.engine}, {method.shape} {method.dtype}, {method.threads} threads, {method.runs} runs)" if method else ""
        if method and method.round_values:
            how += f", {method.statistic}: {', '.join(f'{v:.1f}' for v in method.round_values)}"
        rows.append((name, f"{value:.1f} {unit}{how}"))
    return rows


def profile_table(profile: HardwareProfile) -> Group:
    """A hardware profile as rich tables, each measured figure beside how it was measured (engine, shape, threads,
    rounds), so a reader can judge a figure rather than trust a bare number."""
    cpu, mem, sw = profile.cpu, profile.memory, profile.software
    freq = f"{cpu.max_frequency_mhz:.0f} MHz max" if cpu.max_frequency_mhz else "max unknown"
    if cpu.current_frequency_mhz:
        freq += f", {cpu.current_frequency_mhz:.0f} MHz now"
    parts = [
        _section(
            f"Hardware profile {profile.fingerprint} (threads {profile.threads}, {profile.created_at})",
            [
                ("CPU", f"{cpu.model_name} ({cpu.vendor}, {cpu.architecture})"),
                ("cores", f"{cpu.physical_cores} physical, {cpu.logical_cores} logical, {cpu.numa_nodes} NUMA node(s)"),
                ("frequency", freq),
                ("ISA flags", " ".join(cpu.flags) or "none found"),
                ("caches", f"L1d {_bytes(cpu.l1d_bytes)}, L2 {_bytes(cpu.l2_bytes)}, L3 {_bytes(cpu.l3_bytes)}"),
                ("memory", f"{_bytes(mem.total_bytes)} total, {_bytes(mem.available_bytes)} available, swap {_bytes(mem.swap_total_bytes)}"),
                ("software", f"python {sw.python}, torch {sw.torch}, onnxruntime {sw.onnxruntime} "
                             f"({', '.join(sw.onnxruntime_providers)}), optuna {sw.optuna}, transformers {sw.transformers}"),
            ],
        )
    ]
    if profile.microbench is not None:
        parts.append(_section("Measured throughput (CPU)", _microbench_rows(profile.microbench)))
    if not profile.gpus:
        parts.append(_section("GPUs", [("none", profile.gpu_unavailable_reason or "no GPU found")]))
    for gpu in profile.gpus:
        measured = (
            f"fp16 {gpu.fp16_gemm_tflops} TFLOP/s, bf16 {gpu.bf16_gemm_tflops} TFLOP/s, {gpu.memory_bandwidth_gbps} GB/s"
            if gpu.fp16_gemm_tflops is not None else "not measured (no CUDA-enabled torch)"
        )
        parts.append(
            _section(
                f"GPU {gpu.index}: {gpu.name}",
                [
                    ("memory", f"{_bytes(gpu.memory_total_bytes)} total, {_bytes(gpu.memory_free_bytes)} free"),
                    ("compute", f"capability {gpu.compute_capability}, {gpu.sm_count or '?'} SMs, "
                                f"SM {gpu.max_sm_clock_mhz} MHz, memory {gpu.max_memory_clock_mhz} MHz"),
                    ("power limit", f"{gpu.power_limit_w} W"),
                    ("driver", f"{gpu.driver_version}, CUDA {gpu.cuda_driver_version}"),
                    ("measured", measured),
                ],
            )
        )
    return Group(*parts)

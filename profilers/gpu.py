"""NVIDIA GPUs through NVML (package nvidia-ml-py, module pynvml).

No NVML library, no driver or no GPU is a normal state for a CPU box: the probe then returns an empty list and
the reason, never an exception. Each per-device query that a GPU or driver does not support is recorded as
None rather than failing the whole probe.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, TypeVar

from profilers.benchmethod import BenchMethod

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU: NVML's static facts, plus throughput figures once the microbenchmarks have filled them in.

    Facts a GPU or driver cannot report are None rather than an error, so one old card does not cost the whole
    profile; the figures stay None until measured, and `methods` says how each was measured.
    """

    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_free_bytes: int
    compute_capability: str | None
    sm_count: int | None
    max_sm_clock_mhz: int | None
    max_memory_clock_mhz: int | None
    power_limit_w: float | None
    driver_version: str | None
    cuda_driver_version: str | None
    fp16_gemm_tflops: float | None = None
    bf16_gemm_tflops: float | None = None
    memory_bandwidth_gbps: float | None = None
    methods: dict[str, BenchMethod] = field(default_factory=dict)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional(call: Callable[..., T], *args: Any) -> T | None:
    """One NVML query, None when this GPU or driver does not support it."""
    try:
        return call(*args)
    except Exception as exc:  # NVMLError subclasses differ across nvidia-ml-py releases
        log.debug("NVML query %s unsupported: %s", getattr(call, "__name__", call), exc)
        return None


def cuda_version_text(encoded: int | None) -> str | None:
    """NVML encodes the CUDA driver version as 1000*major + 10*minor (12040 -> '12.4')."""
    if encoded is None:
        return None
    return f"{encoded // 1000}.{(encoded % 1000) // 10}"


def _sm_count(nvml: ModuleType, handle: Any) -> int | None:
    """NVML reports the SM count through its device attributes, which not every GPU or driver supports."""
    query = getattr(nvml, "nvmlDeviceGetAttributes_v2", None) or getattr(nvml, "nvmlDeviceGetAttributes", None)
    attributes = _optional(query, handle) if query else None
    count = getattr(attributes, "multiprocessorCount", None)
    return int(count) if count else None


def _device(nvml: ModuleType, index: int, driver: str | None, cuda: str | None) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    capability = _optional(nvml.nvmlDeviceGetCudaComputeCapability, handle)
    power_mw = _optional(nvml.nvmlDeviceGetPowerManagementLimit, handle)
    return GpuInfo(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        uuid=_text(_optional(nvml.nvmlDeviceGetUUID, handle) or ""),
        memory_total_bytes=int(memory.total),
        memory_free_bytes=int(memory.free),
        compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
        sm_count=_sm_count(nvml, handle),
        max_sm_clock_mhz=_optional(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_SM),
        max_memory_clock_mhz=_optional(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_MEM),
        power_limit_w=power_mw / 1000.0 if power_mw else None,
        driver_version=driver,
        cuda_driver_version=cuda,
    )


def probe_gpus(nvml: ModuleType | None = None) -> tuple[tuple[GpuInfo, ...], str | None]:
    """(gpus, reason): the reason says why the list is empty, and is None when GPUs were found.

    `nvml` is injectable so tests can stand in a fake module; by default pynvml is imported here.
    """
    try:
        nvml = nvml or importlib.import_module("pynvml")
        nvml.nvmlInit()
    except Exception as exc:
        return (), f"NVML unavailable ({type(exc).__name__}: {exc})"
    try:
        count = int(nvml.nvmlDeviceGetCount())
        if count == 0:
            return (), "NVML found no NVIDIA GPU"
        driver = _optional(nvml.nvmlSystemGetDriverVersion)
        cuda = cuda_version_text(_optional(nvml.nvmlSystemGetCudaDriverVersion))
        return tuple(_device(nvml, i, _text(driver) if driver else None, cuda) for i in range(count)), None
    except Exception as exc:
        return (), f"NVML query failed ({type(exc).__name__}: {exc})"
    finally:
        _optional(nvml.nvmlShutdown)

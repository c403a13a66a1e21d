"""What the CPU is: model, cores, the ISA extensions inference kernels dispatch on, caches, NUMA.

Facts come from py-cpuinfo (CPUID / /proc/cpuinfo) and psutil; only what neither library exposes (per-cache
sizes, NUMA nodes) is read from sysfs. Nothing here measures speed; see microbench.py for that.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import psutil

# ISA extensions that change which GEMM / attention kernels ONNX Runtime, oneDNN and FBGEMM can use.
INFERENCE_FLAG_PATTERN = re.compile(
    r"^(sse4_1|sse4_2|ssse3|avx|avx2|fma|f16c|avx512\w*|avx_vnni\w*|avx_ifma|avx_ne_convert|amx\w*"
    r"|neon|asimd\w*|sve\w*|sme\d*|sme_\w+|i8mm|bf16|fphp|asimdhp|dotprod)$"
)
#: py-cpuinfo adds CPUID-decoded names beside the kernel's; these are the ones it spells differently. The kernel's
#: spelling (/proc/cpuinfo) is canonical, so a profile, its fingerprint and the hardware rules read one name per
#: feature whichever library reported it.
FLAG_ALIASES = {
    "avx512vnni": "avx512_vnni", "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq", "avx5124vnniw": "avx512_4vnniw", "avx5124fmaps": "avx512_4fmaps",
    "avx512vp2intersect": "avx512_vp2intersect", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
    "avxvnni": "avx_vnni", "amxbf16": "amx_bf16", "amxint8": "amx_int8", "amxtile": "amx_tile",
    "amxfp16": "amx_fp16",
}
SYSFS_CPU = Path("/sys/devices/system/cpu")
SYSFS_NODE = Path("/sys/devices/system/node")


@dataclass(frozen=True)
class CpuInfo:
    """The static facts of the CPU that decide which kernels run and how fast: frozen, so a profile can hash them.

    Only the ISA flags that inference kernels dispatch on are kept, so an unrelated flag cannot change the
    fingerprint.
    """

    vendor: str
    model_name: str
    architecture: str
    physical_cores: int
    logical_cores: int
    max_frequency_mhz: float | None
    current_frequency_mhz: float | None
    flags: tuple[str, ...]
    l1d_bytes: int | None
    l2_bytes: int | None
    l3_bytes: int | None
    numa_nodes: int


def canonical_flag(name: str) -> str:
    """The kernel's spelling of a CPU flag (`avx512vnni` -> `avx512_vnni`), lower case."""
    lowered = name.lower()
    return FLAG_ALIASES.get(lowered, lowered)


def inference_flags(all_flags: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The sorted subset of CPU flags that matter for inference kernels, in the kernel's spelling."""
    return tuple(sorted({canonical_flag(f) for f in all_flags if INFERENCE_FLAG_PATTERN.match(canonical_flag(f))}))


def parse_cache_size(text: str) -> int:
    """sysfs cache sizes look like '32K' or '1024K' or '32M'."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)\s*", text)
    if not match:
        raise ValueError(f"unrecognised cache size {text!r}")
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[match.group(2)]
    return int(match.group(1)) * scale


def sysfs_cache_sizes(cpu_dir: Path = SYSFS_CPU / "cpu0") -> dict[str, int]:
    """Per-instance cache sizes of one core, keyed 'l1d', 'l2', 'l3' (what one core sees, not a sum)."""
    sizes: dict[str, int] = {}
    for index in sorted((cpu_dir / "cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = parse_cache_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind == "Instruction":
            continue
        key = "l1d" if level == "1" else f"l{level}"
        sizes[key] = size
    return sizes


def numa_node_count(node_dir: Path = SYSFS_NODE) -> int:
    """NUMA nodes from sysfs, at least 1: neither py-cpuinfo nor psutil reports them, and a thread pool spread over
    nodes pays remote-memory latency, so the count is part of what determines speed."""
    nodes = [p for p in node_dir.glob("node[0-9]*")] if node_dir.exists() else []
    return max(1, len(nodes))


def _frequency_mhz(raw: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """(max, current) in MHz: psutil first; VMs often report max 0, then the advertised clock stands in."""
    freq = psutil.cpu_freq()
    current = freq.current if freq and freq.current else None
    maximum = freq.max if freq and freq.max else None
    if maximum is None and raw.get("hz_advertised"):
        maximum = raw["hz_advertised"][0] / 1e6
    return maximum, current


def cpu_info_from(raw: Mapping[str, Any], caches: Mapping[str, int], numa_nodes: int) -> CpuInfo:
    """Assemble CpuInfo from py-cpuinfo's dict; pure apart from psutil's core counts and frequency."""
    maximum, current = _frequency_mhz(raw)
    logical = psutil.cpu_count(logical=True) or raw.get("count") or 1
    physical = psutil.cpu_count(logical=False) or logical
    return CpuInfo(
        vendor=str(raw.get("vendor_id_raw") or "unknown"),
        model_name=str(raw.get("brand_raw") or platform.processor() or "unknown"),
        architecture=str(raw.get("arch_string_raw") or platform.machine()),
        physical_cores=int(physical),
        logical_cores=int(logical),
        max_frequency_mhz=maximum,
        current_frequency_mhz=current,
        flags=inference_flags(raw.get("flags", [])),
        l1d_bytes=caches.get("l1d", raw.get("l1_data_cache_size")),
        l2_bytes=caches.get("l2", raw.get("l2_cache_size")),
        l3_bytes=caches.get("l3", raw.get("l3_cache_size")),
        numa_nodes=numa_nodes,
    )


#: /proc/cpuinfo lines that move while the machine runs: left out of what names a CPU.
MOVING_CPUINFO_LINES = ("cpu mhz", "bogomips")


def cpuinfo_cache_path(boot_id_file: Path = Path("/proc/sys/kernel/random/boot_id"),
                       proc_cpuinfo: Path = Path("/proc/cpuinfo")) -> Path | None:
    """Where py-cpuinfo's answer is kept for this boot of this CPU: a file in the temp folder named by the kernel's
    boot id and its own description of the CPU, so a reboot, or a CPU the kernel describes otherwise, probes again.
    None where the kernel says neither (not Linux): then every process probes."""
    try:
        boot = boot_id_file.read_text(encoding="utf-8").strip()
        described = [line for line in proc_cpuinfo.read_text(encoding="utf-8").splitlines()
                     if not line.lower().startswith(MOVING_CPUINFO_LINES)]
    except OSError:
        return None
    digest = hashlib.sha256("\n".join([boot, *described]).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"autotune-cpuinfo-{os.getuid()}-{digest}.json"


def raw_cpu_info(cache: Path | None) -> dict[str, Any]:
    """py-cpuinfo's dict, read from `cache` when a process of this boot wrote it, else probed and written there
    (`keep`: a reader never sees half of it). The probe starts a child process and takes over a second, which every
    command paid at its start; an unreadable or foreign file is probed over."""
    if cache is not None:
        try:
            raw = json.loads(cache.read_text(encoding="utf-8"))
            if isinstance(raw, dict):
                return raw
        except (OSError, ValueError):
            pass
    import cpuinfo

    raw = cpuinfo.get_cpu_info()
    if cache is not None:
        keep(raw, cache)
    return raw


def keep(raw: Mapping[str, Any], cache: Path) -> None:
    """Write `raw` to `cache` through a temp file and a rename; where that fails (a read-only or full temp folder)
    nothing is left behind and the next process probes again."""
    try:
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(raw, handle)
        os.replace(tmp, cache)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


@functools.cache
def probe_cpu() -> CpuInfo:
    """This machine's CpuInfo; the only impure entry point, so `cpu_info_from` stays testable with canned inputs.
    Probed once per process, and py-cpuinfo's part once per boot (`raw_cpu_info`): a run asks at start-up for its
    default threads and its fingerprint, and every command line starts a process."""
    return cpu_info_from(raw_cpu_info(cpuinfo_cache_path()), sysfs_cache_sizes(), numa_node_count())

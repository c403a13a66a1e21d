"""Hardware-aware pruning of the space: values this machine or runtime has no kernel for are removed, with a
reason, before any trial runs. Only capability is decided here; whether a value *pays* is measured.
"""

from __future__ import annotations

import logging

from profilers.hardware import HardwareProfile
from search_spaces.space import Removal, Space

log = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "torch")
DEVICES = ("cpu", "cuda")
CPU_FP16_FLAGS = frozenset({"avx512_fp16", "fphp", "asimdhp"})
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def _min_compute_capability(profile: HardwareProfile) -> float:
    capabilities = [float(g.compute_capability) for g in profile.gpus if g.compute_capability]
    return min(capabilities, default=0.0)


def unsupported_values(profile: HardwareProfile, runtime: str, device: str) -> list[tuple[str, object, str]]:
    """(knob, value, reason) for each value with no execution path on this runtime and device."""
    flags = set(profile.cpu.flags)
    out: list[tuple[str, object, str]] = []
    if runtime == "onnxruntime":
        if device == "cpu":
            out.append(("method", "hqq", "stores float zero points, which ONNX Runtime's CPU MatMulNBits kernels run "
                                         "about 7x slower than fp32 (bench/llm_operators.py), so it cannot buy speed"))
        out.append(("sparsity_pattern", "2:4", "has no sparse kernel in ONNX Runtime's CPU or CUDA provider, so it would cost accuracy for no speed"))
        native = profile.software.onnxruntime_cpu_fp16
        if device == "cpu" and native is False:
            out.append(("bits", 16, "has no fp16 MatMul kernel in ONNX Runtime's CPU provider here (probed: it casts to fp32)"))
        elif device == "cpu" and native is None and not flags & CPU_FP16_FLAGS:
            out.append(("bits", 16, "has no fp16 GEMM path in ONNX Runtime on this CPU (no avx512_fp16/fphp flag); it would run through casts"))
    elif runtime == "torch":
        out.append(("bits", 4, "has no int4 execution path in the torch runtime"))
        if device == "cpu" and not flags & CPU_BF16_FLAGS:
            out.append(("bits", 16, "(bf16 in the torch runtime) has no native bf16 path on this CPU (no avx512_bf16/amx_bf16)"))
        if device == "cuda":
            out.append(("bits", 8, "(dynamic int8 in the torch runtime) runs on the CPU only"))
        if device == "cpu" or _min_compute_capability(profile) < 8.0:
            out.append(("sparsity_pattern", "2:4", "needs semi-structured sparse tensor cores (CUDA, compute capability >= 8.0)"))
    return out


def restrict_to_hardware(space: Space, profile: HardwareProfile, runtime: str, device: str) -> tuple[Space, tuple[Removal, ...]]:
    """The space without values this machine cannot run, and the removals (each logged with its reason)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {list(DEVICES)}, got {device!r}")
    removals = []
    for knob, value, reason in unsupported_values(profile, runtime, device):
        if space.has(knob) and value in space.knob(knob).values():
            space, removal = space.without(knob, value, reason)
            log.info("search space: %s=%s removed: %s", knob, value, reason)
            removals.append(removal)
    return space, tuple(removals)
